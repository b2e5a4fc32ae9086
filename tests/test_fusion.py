"""The five properties of the token-level ensembles, on the embedded models (slow)."""

import pytest
from conftest import compose_run

from decoding.base import decoder_class
from decoding.model import load_model

pytestmark = pytest.mark.slow

SOURCES = ["The weather is nice today.", "Where is the train station?", "The company will open a new office in Tokyo.",
           "Cherry blossoms bloom in spring."]


def decode(*overrides, sources=SOURCES):
    run = compose_run(*overrides)
    models = [load_model(spec) for spec in run.models]
    return decoder_class(run.decoding_name)(run.decoding, models, run.prompt).decode(sources)


@pytest.fixture(scope="module")
def gemma_greedy():
    return [o.text for o in decode("models=gemma3_270m", "decoding=greedy", "decoding.max_new_tokens=40")]


@pytest.mark.parametrize("method", ["tokenwise", "unite"])
def test_model_with_itself_is_its_greedy_output(method, gemma_greedy):
    outs = decode("models=pair", "models.members=[gemma3_270m,gemma3_270m]", f"decoding={method}",
                  "decoding.max_new_tokens=40")
    assert [o.text for o in outs] == gemma_greedy
    assert all(o.stats["agreement_rate"] == 1.0 for o in outs)
    assert all(step["origin"] == "both" for o in outs for step in o.trace)


def test_unite_weights_1_0_is_gemma_greedy_across_tokenizers(gemma_greedy):
    outs = decode("models=gemma3_smollm2", "decoding=unite", "decoding.weights=[1,0]", "decoding.max_new_tokens=40")
    assert [o.text for o in outs] == gemma_greedy
    # SmolLM2 followed along with its own tokens the whole time
    assert all(o.stats["forward_passes"]["smollm2_135m"] == o.stats["forward_passes"]["gemma3_270m"] > 0 for o in outs)
    assert any(step["ids"]["smollm2_135m"] for o in outs for step in o.trace)


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


@pytest.mark.parametrize("method", ["tokenwise", "unite"])
def test_kv_cache_path_equals_full_recompute(method):
    common = ("models=gemma3_smollm2", f"decoding={method}", "decoding.max_new_tokens=24")
    cached = decode(*common, sources=SOURCES[:2])
    reference = decode(*common, "decoding.use_cache=false", sources=SOURCES[:2])
    assert [o.text for o in cached] == [o.text for o in reference]
    assert [[s["ids"] for s in o.trace] for o in cached] == [[s["ids"] for s in o.trace] for o in reference]


def test_batch_of_8_equals_8_single_runs():
    sources = SOURCES + ["I forgot my umbrella at home.", "Please restart your computer.", "Birds sing in the morning.",
                         "How much is this ticket?"]
    common = ("models=gemma3_smollm2", "decoding=unite", "decoding.max_new_tokens=24")
    batched = [o.text for o in decode(*common, sources=sources)]
    single = [decode(*common, sources=[s])[0].text for s in sources]
    assert batched == single


def test_unite_primary_model_defines_the_output_vocabulary(smollm):
    outs = decode("models=gemma3_smollm2", "decoding=unite", "decoding.primary=1", "decoding.max_new_tokens=16",
                  sources=SOURCES[:2])
    for out in outs:
        for step in out.trace:
            assert step.get("end") or "stop" in step or bytes.fromhex(step["piece_bytes"]) in smollm.vocab.bytes_to_ids
