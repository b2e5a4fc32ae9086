"""The Qwen2.5-Coder members from their chunk packages (``make models``). Skipped where they are not
installed (CI): they are 1.6 GB and optional; the chunk mechanics are tested in test_packaged.py."""

import pytest
from conftest import compose_run

from decoding.methods import decoder_class
from decoding.model import load_model
from decoding.packaged import missing_parts
from decoding.prompt import prompt_text
from runners.config import resolve_member

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_parts(resolve_member("qwen25_coder_05b").chunks)),
                       reason="Qwen2.5-Coder 0.5B part packages not installed (make models)"),
]
SOURCES = ["The weather is nice today.", "@kenji Thanks, see you at the station at 7!"]


def decode(*overrides):
    run = compose_run(*overrides, "decoding.max_new_tokens=16")
    models = [load_model(spec) for spec in run.models]
    return [o.text for o in decoder_class(run.decoding_name)(run.decoding, models, run.prompt).decode(SOURCES)]


def test_qwen_uses_the_chat_template_shipped_in_its_gguf():
    model = load_model(resolve_member("qwen25_coder_05b"))
    assert model.vocab_size == 151_936
    text = prompt_text(model.tokenizer, "Hello", compose_run("prompt=wmt_en_ja").prompt)
    assert text.startswith("<|im_start|>system\nYou are a professional English-to-Japanese translator")
    assert text.endswith("Hello<|im_end|>\n<|im_start|>assistant\n")


def test_cross_tokenizer_fusion_with_one_hot_weights_follows_qwen():
    """Qwen 0.5B leads (weights 1,0), Gemma 3 follows with its own SentencePiece tokens. The first
    source's output is Qwen's greedy output. The second parts from it after "@kenji" (" 槃" vs "ru"),
    not explained yet: there Qwen's greedy tokens also leave its tokenizer's own encoding of the text
    ("目","に" for "目に"), which the fused streams keep every member on; a near-tie under another batch
    layout is the other candidate. Only the first is asserted equal until that is settled."""
    qwen = decode("models=qwen25_coder_05b", "decoding=greedy")
    assert all(any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in text) for text in qwen)
    fused = decode("models=pair", "models.members=[qwen25_coder_05b,gemma3_270m]", "decoding=unite",
                   "decoding.weights=[1,0]")
    assert fused[0] == qwen[0] and "\ufffd" not in "".join(fused)


def test_charwise_starts_a_chat_members_answer_after_its_generation_prompt():
    """The chat template's "assistant\\n" is not re-covered: Qwen's first character is text, not a
    newline (with the newline re-covered it put ~0.9 on "\\n", and Gemma's stop string ended the output)."""
    run = compose_run("models=gemma3_qwen05", "decoding=charwise", "prompt=wmt_en_ja", "decoding.max_new_tokens=8")
    models = [load_model(spec) for spec in run.models]
    outs = decoder_class("charwise")(run.decoding, models, run.prompt).decode(SOURCES)
    assert all(out.text for out in outs)
    assert all(out.trace[0]["p"]["qwen25_coder_05b"] > 0.01 and out.trace[0]["piece"] != "\n" for out in outs)
