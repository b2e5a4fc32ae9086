"""One ``render_prompt`` for every model: chat template when the tokenizer has one, else a plain
(few-shot) template."""

from __future__ import annotations

from dataclasses import dataclass, field
from string import Formatter

from jinja2.exceptions import TemplateError

from decoding.errors import FusemtError


@dataclass
class FewShotExample:
    source: str = ""
    target: str = ""


@dataclass
class PromptConfig:
    src_lang: str = "English"
    tgt_lang: str = "Japanese"
    system: str = ""  # empty: no system turn (chat templates may add their own default)
    instruction: str = ("Translate the following {src_lang} text into {tgt_lang}. "
                        "Reply with the translation only.\n\n{source}")
    # Plain template for models without a chat template: the examples, then the source.
    example_template: str = "{src_lang}: {source}\n{tgt_lang}: {target}\n\n"
    plain_template: str = "{src_lang}: {source}\n{tgt_lang}:"
    examples: list[FewShotExample] = field(default_factory=list)
    # A few-shot continuation would go on with the next example: stop at the end of the line.
    plain_stop_strings: list[str] = field(default_factory=lambda: ["\n"])


# The {keys} each template is formatted with; the first must appear in it.
_TEMPLATE_KEYS = {"instruction": ("source", "src_lang", "tgt_lang"),
                  "plain_template": ("source", "src_lang", "tgt_lang"),
                  "example_template": ("source", "target", "src_lang", "tgt_lang")}


def check_prompt(prompt: PromptConfig) -> None:
    """Templates are checked at start-up, before any model loads: an unknown ``{key}`` or a template
    without ``{source}`` (every segment would translate the template itself) is a one-line error."""
    for name, keys in _TEMPLATE_KEYS.items():
        template = getattr(prompt, name)
        try:
            used = {key for _, key, _, _ in Formatter().parse(template) if key is not None}
        except ValueError as err:
            raise FusemtError(f"prompt.{name} is not a valid template ({err}): "
                              "write a literal brace as {{ or }}") from None
        unknown = sorted(used - set(keys))
        if unknown:
            raise FusemtError(f"prompt.{name} uses {{{unknown[0]}}}: "
                              f"the keys are {', '.join('{' + k + '}' for k in keys)} "
                              "(a literal brace is written {{ or }})")
        if keys[0] not in used:
            raise FusemtError(f"prompt.{name} has no {{source}}: without it every segment would translate the "
                              "template itself: put {source} where the text goes")


def uses_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def prompt_text(tokenizer, source: str, prompt: PromptConfig) -> str:
    """The prompt string a model sees for one source segment."""
    fields = {"src_lang": prompt.src_lang, "tgt_lang": prompt.tgt_lang}
    if uses_chat_template(tokenizer):
        user = prompt.instruction.format(source=source, **fields)
        messages = [{"role": "user", "content": user}]
        if prompt.system:
            messages.insert(0, {"role": "system", "content": prompt.system})
        # Qwen3-style templates think unless told not to; other templates ignore the flag.
        kwargs = dict(tokenize=False, add_generation_prompt=True, enable_thinking=False)
        try:
            return tokenizer.apply_chat_template(messages, **kwargs)
        except TemplateError:
            if not prompt.system:
                raise
            # Templates without a system role (e.g. Gemma's older ones): merge it into the user turn.
            merged = [{"role": "user", "content": f"{prompt.system}\n\n{user}"}]
            return tokenizer.apply_chat_template(merged, **kwargs)
    shots = "".join(prompt.example_template.format(source=ex.source, target=ex.target, **fields)
                    for ex in prompt.examples)
    header = f"{prompt.system}\n\n" if prompt.system else ""
    return header + shots + prompt.plain_template.format(source=source, **fields)


def stop_strings(tokenizer, prompt: PromptConfig, model_stop_strings: list[str]) -> list[str]:
    """Stop strings for a model: its own, plus the plain template's when no chat template is used."""
    extra = [] if uses_chat_template(tokenizer) else list(prompt.plain_stop_strings)
    return list(dict.fromkeys(list(model_stop_strings) + extra))


def ensemble_stop_strings(models, prompt: PromptConfig) -> list[str]:
    """Every member's stop strings, once each: an ensemble's output ends at any of them."""
    return list(dict.fromkeys(s for m in models for s in stop_strings(m.tokenizer, prompt, m.spec.stop_strings)))


def find_stop(data: bytes, stop_strings: list[str], start: int = 0) -> int | None:
    """Byte offset of the earliest stop string in ``data`` (searching from ``start``), or None."""
    hits = [i for s in stop_strings if s and (i := data.find(s.encode("utf-8"), max(start - len(s.encode()), 0))) >= 0]
    return min(hits) if hits else None


def render_prompt(model, sources: list[str], prompt: PromptConfig):
    """Tokenise a batch of prompts for ``model`` (a LoadedModel): left-padded, with attention mask.

    Inputs longer than the model's ``max_input_tokens`` are cut from the left (the few-shot
    examples go first); the returned ``truncated`` list says which.
    """
    tokenizer = model.tokenizer
    texts = [prompt_text(tokenizer, s, prompt) for s in sources]
    # Chat templates already contain BOS; plain prompts get the tokenizer's own special tokens.
    add_special = not uses_chat_template(tokenizer)
    ids = tokenizer(texts, add_special_tokens=add_special)["input_ids"]
    if getattr(model, "prompt_cache", None) is not None:
        from decoding.prefix import prompt_head  # (decoding.prefix builds on the streams, which import this module)

        model.prompt_cache.set_head(prompt_head(tokenizer, prompt, add_special))
    budget = model.spec.max_input_tokens
    truncated = [len(row) > budget for row in ids]
    ids = [row[-budget:] for row in ids]
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    batch["truncated"] = truncated
    return batch


def prompt_rows(batch) -> list[list[int]]:
    """Each prompt's token ids without the left padding, from a ``render_prompt`` batch."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
