"""Shared prompt prefixes (decoding/prefix.py): outputs with the prefix's KV cache reused equal those
without it, for HF generate (greedy, beam) and the stream-based methods; the prefix runs once per
run; rows that do not start with it run without it. Fast on the tiny random models (Gemma 3 with an
8-token sliding window: prompts here are several windows long, left-padded to different lengths);
the embedded models with both shipped prompts are the slow end-to-end check."""

import pytest
from conftest import build_decoder, compose_run, trace_pieces
from tiny_models import tiny_gemma3, tiny_llama

from decoding.errors import FusemtError
from decoding.prefix import PromptCache
from decoding.prompt import FewShotExample, PromptConfig, render_prompt

FEWSHOT = PromptConfig(examples=[FewShotExample("The weather is nice today.", "今日は天気がいいです。"),
                                 FewShotExample("Good morning.", "メールを送ってください。")])
SOURCES = ["Good morning.", "The weather", "今日は天気がいいです。 The weather is nice today. Good morning.", "ルール"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def logprobs(outs) -> list[list[float]]:
    return [[v for s in out.trace for v in s["logprob"].values() if v is not None] for out in outs]


def decode_both(method: str, models, prompt, sources=SOURCES, **options):
    """(outputs without, outputs with the prompt cache), and the caches used."""
    for model in models:
        model.prompt_cache = None
    plain = build_decoder(method, models, prompt, max_new_tokens=10, **options).decode(sources)
    for model in models:
        model.prompt_cache = PromptCache(model)
    cached = build_decoder(method, models, prompt, max_new_tokens=10, **options).decode(sources)
    caches = [m.prompt_cache for m in models]
    for model in models:
        model.prompt_cache = None
    return plain, cached, caches


def assert_same(plain, cached):
    assert trace_pieces(cached) == trace_pieces(plain)
    assert [o.text for o in cached] == [o.text for o in plain]
    for a, b in zip(logprobs(plain), logprobs(cached)):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("make", [tiny_gemma3, tiny_llama])
@pytest.mark.parametrize("method,options", [("greedy", {}), ("beam", {"num_beams": 3})])
def test_generate_equal_with_prompt_cache(make, method, options):
    model = make()
    plain, cached, (cache,) = decode_both(method, [model], FEWSHOT, **options)
    assert_same(plain, cached)
    assert len(cache.head) >= 3 * 8 and cache.prefix_passes == 1  # several sliding windows long


@pytest.mark.parametrize("method,options", [("unite", {}), ("unite", {"num_beams": 2}),
                                            ("unite", {"num_draft_tokens": 3}), ("speculative", {}), ("charwise", {})])
def test_streams_equal_with_prompt_cache(method, options):
    models = [tiny_gemma3(), tiny_llama()]
    plain, cached, caches = decode_both(method, models, FEWSHOT, **options)
    assert_same(plain, cached)
    assert all(c.prefix_passes == 1 for c in caches)


def test_chat_template_head_and_one_pass_per_run():
    """A chat template's system turn and instruction head is the prefix; two batches share one pass."""
    model = tiny_gemma3()
    model.tokenizer = model.tokenizer.__class__(tokenizer_object=model.tokenizer.backend_tokenizer,
                                                pad_token="<pad>", eos_token="<eos>")
    model.tokenizer.chat_template = CHAT_TEMPLATE
    model.tokenizer.padding_side = "left"
    prompt = PromptConfig(system="Translate the weather.", instruction="English: {source} Japanese:")
    model.prompt_cache = PromptCache(model)
    render_prompt(model, SOURCES[:1], prompt)
    head = model.tokenizer.decode(list(model.prompt_cache.head))
    assert head.startswith("<system>Translate the weather.</system>\n<user>English:")
    model.prompt_cache = None
    plain = build_decoder("greedy", [model], prompt, max_new_tokens=12).decode(SOURCES)
    model.prompt_cache = PromptCache(model)
    decoder = build_decoder("greedy", [model], prompt, max_new_tokens=12)
    cached = decoder.decode(SOURCES[:2]) + decoder.decode(SOURCES[2:])
    assert_same(plain, cached)
    assert model.prompt_cache.prefix_passes == 1


def test_rows_not_starting_with_the_head_share_nothing():
    model = tiny_llama()
    cache = PromptCache(model)
    cache.set_head([5, 6, 7, 8])
    assert cache.shared_len([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 10]], reserve=1) == 4
    assert cache.shared_len([[5, 6, 7, 8, 9], [5, 6, 9]], reserve=1) == 2  # checked per row
    assert cache.shared_len([[5, 6, 7, 8]], reserve=1) == 3  # every row keeps a token to run
    assert cache.shared_len([[7, 8, 9]], reserve=1) == 0  # e.g. cut from the left by max_input_tokens
    # A batch whose rows were truncated from the left decodes as without the cache.
    model.spec.max_input_tokens = 12
    plain, cached, _ = decode_both("greedy", [model], FEWSHOT)
    assert_same(plain, cached)


def test_prompt_cache_is_typed_and_outside_the_fingerprint():
    on, off = compose_run("prompt_cache=true"), compose_run("prompt_cache=false")
    assert (on.prompt_cache, off.prompt_cache) == (True, False)
    assert on.fingerprint == off.fingerprint and on.run_name == off.run_name
    with pytest.raises(FusemtError, match="prompt_cache=maybe: must be true or false"):
        compose_run("prompt_cache=maybe")


@pytest.mark.slow
@pytest.mark.parametrize("prompt_name", ["fewshot_en_ja", "wmt_en_ja"])
def test_embedded_models_equal_with_prompt_cache(gemma, smollm, prompt_name):
    prompt = compose_run(f"prompt={prompt_name}").prompt
    sources = ["The city council approved the new budget on Tuesday.", "@kenji_t Thanks for the tip!"]
    for method, models, options in (("greedy", [gemma], {}), ("greedy", [smollm], {}),
                                    ("beam", [gemma], {"num_beams": 2}),
                                    ("unite", [gemma, smollm], {}), ("speculative", [gemma, smollm], {})):
        plain, cached, caches = decode_both(method, models, prompt, sources, **options)
        assert [o.text for o in cached] == [o.text for o in plain], (method, prompt_name)
        assert trace_pieces(cached) == trace_pieces(plain), (method, prompt_name)
        assert all(len(c.head) > 20 and c.prefix_passes == 1 for c in caches), (method, [len(c.head) for c in caches])
