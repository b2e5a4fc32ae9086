"""The token-level ensembles: canonical streams, decision scores in traces and cache = recompute
on a tiny random pair (fast), and their properties on the embedded models (slow)."""

import pytest
from conftest import build_decoder, compose_run
from stream_checks import decode_checking_streams, longest_run
from tiny_models import tiny_gemma3, tiny_llama

from decoding.methods import decoder_class
from decoding.model import load_model
from decoding.vocab import complete_utf8_prefix

TINY_SOURCES = ["The weather is nice today.", "Good morning.", "Send the mail."]

SOURCES = ["The weather is nice today.", "Where is the train station?", "The company will open a new office in Tokyo.",
           "Cherry blossoms bloom in spring."]


def decode(*overrides, sources=SOURCES):
    run = compose_run(*overrides)
    models = [load_model(spec) for spec in run.models]
    return decoder_class(run.decoding_name)(run.decoding, models, run.prompt).decode(sources)


@pytest.fixture(scope="module")
def gemma_greedy():
    return [o.text for o in decode("models=gemma3_270m", "decoding=greedy", "decoding.max_new_tokens=40")]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tokenwise", "unite"])
def test_model_with_itself_is_its_greedy_output(method, gemma_greedy):
    outs = decode("models=pair", "models.members=[gemma3_270m,gemma3_270m]", f"decoding={method}",
                  "decoding.max_new_tokens=40")
    assert [o.text for o in outs] == gemma_greedy
    assert all(o.stats["agreement_rate"] == 1.0 for o in outs)
    assert all(step["origin"] == "both" for o in outs for step in o.trace)


@pytest.mark.slow
def test_unite_weights_1_0_is_gemma_greedy_across_tokenizers(gemma_greedy):
    outs = decode("models=gemma3_smollm2", "decoding=unite", "decoding.weights=[1,0]", "decoding.max_new_tokens=40")
    assert [o.text for o in outs] == gemma_greedy
    # SmolLM2 followed along with its own tokens the whole time
    assert all(o.stats["forward_passes"]["smollm2_135m"] == o.stats["forward_passes"]["gemma3_270m"] > 0 for o in outs)
    assert any(step["ids"]["smollm2_135m"] for o in outs for step in o.trace)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tokenwise", "unite"])
def test_japanese_output_is_valid_and_traces_spell_it(method):
    outs = decode("models=gemma3_smollm2", f"decoding={method}", "decoding.max_new_tokens=48")
    for out in outs:
        assert "\ufffd" not in out.text
        raw = b"".join(bytes.fromhex(s["piece_bytes"]) for s in out.trace)
        assert raw.decode("utf-8", errors="ignore").strip() == out.text
        for step in out.trace:
            assert set(step) >= {"piece", "ids", "logprob", "origin", "top", "union"}
            assert step["union"] >= 1 and step["origin"] in {"both", "gemma3_270m", "smollm2_135m", "lookup"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tokenwise", "unite"])
def test_kv_cache_path_equals_full_recompute(method):
    common = ("models=gemma3_smollm2", f"decoding={method}", "decoding.max_new_tokens=24")
    cached = decode(*common, sources=SOURCES[:2])
    reference = decode(*common, "decoding.use_cache=false", sources=SOURCES[:2])
    assert [o.text for o in cached] == [o.text for o in reference]
    assert [[s["ids"] for s in o.trace] for o in cached] == [[s["ids"] for s in o.trace] for o in reference]


@pytest.mark.slow
def test_batch_of_8_equals_8_single_runs():
    sources = SOURCES + ["I forgot my umbrella at home.", "Please restart your computer.", "Birds sing in the morning.",
                         "How much is this ticket?"]
    common = ("models=gemma3_smollm2", "decoding=unite", "decoding.max_new_tokens=24")
    batched = [o.text for o in decode(*common, sources=sources)]
    single = [decode(*common, sources=[s])[0].text for s in sources]
    assert batched == single


@pytest.mark.slow
def test_unite_primary_model_defines_the_output_vocabulary(smollm):
    outs = decode("models=gemma3_smollm2", "decoding=unite", "decoding.primary=1", "decoding.max_new_tokens=16",
                  sources=SOURCES[:2])
    for out in outs:
        for step in out.trace:
            assert step.get("end") or "stop" in step or bytes.fromhex(step["piece_bytes"]) in smollm.vocab.bytes_to_ids


# --- tiny random pair (fast): Gemma 3 with 8-token windows + byte fallback, Llama + byte-level BPE ----------

def tiny_decoder(method: str, **options):
    return build_decoder(method, [tiny_gemma3(), tiny_llama()], **options)


@pytest.mark.parametrize("method", ["tokenwise", "unite"])
def test_tiny_pair_streams_stay_canonical_at_every_step(method):
    outs = decode_checking_streams(tiny_decoder(method, max_new_tokens=40), TINY_SOURCES)
    # random models choose pieces that end inside characters: the check saw unfinished characters
    prefixes = [bytes.fromhex("".join(s["piece_bytes"] for s in out.trace[:n]))
                for out in outs for n in range(len(out.trace))]
    assert any(complete_utf8_prefix(text) != text for text in prefixes)


@pytest.mark.parametrize("method", ["tokenwise", "unite"])
def test_tiny_pair_trace_ranks_candidates_by_the_decision_score(method):
    for out in tiny_decoder(method, max_new_tokens=40).decode(TINY_SOURCES):
        for step in out.trace:
            scores = [score for _, score in step["top"]]
            assert scores == sorted(scores, reverse=True)
            chosen = ("<end>" if step.get("end")
                      else bytes.fromhex(step["piece_bytes"]).decode("utf-8", "backslashreplace"))
            assert step["top"][0][0] == chosen


@pytest.mark.parametrize("method", ["tokenwise", "unite"])
def test_tiny_pair_cache_path_equals_recompute(method):
    cached = tiny_decoder(method, max_new_tokens=40).decode(TINY_SOURCES)
    reference = tiny_decoder(method, max_new_tokens=40, use_cache=False).decode(TINY_SOURCES)
    assert [[(s["piece_bytes"], s["ids"]) for s in o.trace] for o in cached] == \
           [[(s["piece_bytes"], s["ids"]) for s in o.trace] for o in reference]


# --- embedded pair (slow) ------------------------------------------------------------------------------------

# Sample segments whose translations are rich in katakana, where byte-level pieces end inside characters.
CANONICAL_SOURCES = ["Please restart your computer.", "You can download the app for free.",
                     "The battery lasts about ten hours."]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tokenwise", "unite"])
def test_streams_stay_canonical_and_runs_come_from_a_member(method):
    run = compose_run("models=gemma3_smollm2", f"decoding={method}", "decoding.max_new_tokens=32")
    models = [load_model(spec) for spec in run.models]
    outs = decode_checking_streams(decoder_class(run.decoding_name)(run.decoding, models, run.prompt),
                                   CANONICAL_SOURCES)
    for source, out in zip(CANONICAL_SOURCES, outs):
        char, n = longest_run(out.text)
        if n >= 8:  # allowed only when a member alone (greedy) produces that run
            alone = [decode(f"models={m}", "decoding=greedy", "decoding.max_new_tokens=32", sources=[source])[0].text
                     for m in ("gemma3_270m", "smollm2_135m")]
            assert any(char * n in text for text in alone), (out.text, alone)
