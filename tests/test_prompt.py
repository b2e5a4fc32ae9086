import pytest
from conftest import stand_in_model, tiny_tokenizer

from decoding.prompt import prompt_text, render_prompt, stop_strings

CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
             "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_plain_template_is_few_shot_and_stops_at_newline(prompt_cfg):
    tok = tiny_tokenizer()
    text = prompt_text(tok, "hello world", prompt_cfg)
    assert text.endswith("English: hello world\nJapanese:")
    assert "Japanese: おはようございます。\n\n" in text  # the few-shot examples come first
    assert stop_strings(tok, prompt_cfg, []) == ["\n"]


def test_chat_template_used_only_when_present(prompt_cfg):
    tok = tiny_tokenizer(CHAT)
    text = prompt_text(tok, "hello world", prompt_cfg)
    assert text.startswith("<user> Translate the following English text into Japanese.")
    assert text.endswith("hello world <assistant>")
    assert "おはよう" not in text  # no few-shot block for chat models
    assert stop_strings(tok, prompt_cfg, ["</s>"]) == ["</s>"]


def test_system_prompt_goes_to_system_turn_or_merges(prompt_cfg):
    from dataclasses import replace

    cfg = replace(prompt_cfg, system="You are a translator.")
    assert prompt_text(tiny_tokenizer(CHAT), "hi", cfg).startswith("<system> You are a translator. <user>")
    merged = prompt_text(tiny_tokenizer(NO_SYSTEM), "hi", cfg)
    assert merged.startswith("<user> You are a translator.\n\nTranslate")
    assert prompt_text(tiny_tokenizer(), "hi", cfg).startswith("You are a translator.\n\nEnglish:")


def test_render_prompt_left_pads_and_masks(prompt_cfg):
    model = stand_in_model(tiny_tokenizer())
    batch = render_prompt(model, ["hello", "the weather is nice today"], prompt_cfg)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()  # left padding on the shorter row
    assert ids[1, 0] == model.tokenizer.bos_token_id  # plain prompts get BOS
    assert batch["truncated"] == [False, False]


def test_render_prompt_truncates_from_the_left(prompt_cfg):
    model = stand_in_model(tiny_tokenizer(), max_input_tokens=5)
    batch = render_prompt(model, ["hello world"], prompt_cfg)
    assert batch["input_ids"].shape[1] == 5 and batch["truncated"] == [True]
    assert model.tokenizer.decode(batch["input_ids"][0]).endswith("Japanese :")


@pytest.mark.slow
def test_real_models_chat_and_plain(prompt_cfg, gemma, smollm):
    assert gemma.tokenizer.chat_template is None and smollm.tokenizer.chat_template is not None
    g = render_prompt(gemma, ["Good night."], prompt_cfg)
    assert gemma.tokenizer.decode(g["input_ids"][0]).startswith("<bos>")
    s = smollm.tokenizer.decode(render_prompt(smollm, ["Good night."], prompt_cfg)["input_ids"][0])
    assert "<|im_start|>user" in s and s.rstrip().endswith("<|im_start|>assistant")
