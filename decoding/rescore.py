"""Teacher-forced log-probability of finished texts under one model, in its own tokenization.

Each candidate is scored the way the model would have produced it after its own prompt: with a chat
template, the tokens of the text and then the end of the turn (the log of the summed probability of
the model's end tokens at that position); with the plain few-shot template, the text as the
examples present a target (the separator between ``{tgt_lang}:`` and ``{target}``, usually one
space) followed by the first stop string (the line end), all teacher-forced. One forward pass per
chunk of (segment, candidate) rows, left-padded, keeping only the logits of the last positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.prompt import PromptConfig, prompt_rows, render_prompt, stop_strings, uses_chat_template

LOGIT_BUDGET = 2**26  # floats of kept logits per forward pass (256 MB in fp32): bounds the chunk size


@dataclass
class Continuation:
    """A candidate as token ids after the prompt, and whether the end of turn is scored after them."""

    ids: list[int]
    score_end: bool


def plain_target_lead(prompt: PromptConfig) -> str:
    """What the few-shot examples put between the plain template's end and the target (" ")."""
    head = prompt.example_template.split("{target}", 1)[0]
    return head[len(prompt.plain_template):] if head.startswith(prompt.plain_template) else ""


def continuation(model, text: str, prompt: PromptConfig) -> Continuation:
    tok = model.tokenizer
    if uses_chat_template(tok):
        return Continuation(tok(text, add_special_tokens=False)["input_ids"], score_end=True)
    stops = stop_strings(tok, prompt, model.spec.stop_strings)
    full = plain_target_lead(prompt) + text + (stops[0] if stops else "")
    return Continuation(tok(full, add_special_tokens=False)["input_ids"], score_end=not stops)


def prompt_ids(model, sources: list[str], prompt: PromptConfig) -> list[list[int]]:
    """Each source's prompt ids, exactly as generation sees them (padding removed)."""
    return prompt_rows(render_prompt(model, sources, prompt))


@torch.inference_mode()
def sequence_logprobs(model, prompt: PromptConfig, sources: list[str],
                      texts: list[list[str]]) -> tuple[list[list[float]], int]:
    """log p(text | prompt of source) for every text of every source; and the forward passes made."""
    heads = prompt_ids(model, sources, prompt)
    rows = [(s, k, heads[s], continuation(model, text, prompt))
            for s, group in enumerate(texts) for k, text in enumerate(group)]
    out = [[0.0] * len(group) for group in texts]
    end_ids = torch.tensor(model.end_ids, device=model.device)
    # Longest continuations first, so each chunk keeps few padded logit rows.
    rows.sort(key=lambda r: -len(r[3].ids))
    passes, start = 0, 0
    while start < len(rows):
        keep = len(rows[start][3].ids) + 1
        size = max(1, LOGIT_BUDGET // (keep * model.vocab_size))
        chunk = rows[start:start + size]
        start += size
        passes += 1
        seqs = [head + cont.ids for _, _, head, cont in chunk]
        width = max(map(len, seqs))
        pad = model.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(q)) + q for q in seqs], device=model.device)
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in seqs], device=model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # logprobs[:, t] predicts the token at position width - keep + t + 1 (the last one: what follows the text)
        logprobs = model.forward(input_ids, mask, positions, None, logits_to_keep=keep)
        for row, (s, k, _, cont) in enumerate(chunk):
            n = len(cont.ids)
            if n:
                ids = torch.tensor(cont.ids, device=model.device)
                total = logprobs[row, keep - 1 - n: keep - 1].gather(-1, ids[:, None]).sum()
            else:
                total = torch.zeros((), device=model.device)
            if cont.score_end:
                total = total + torch.logsumexp(logprobs[row, keep - 1, end_ids], dim=-1)
            out[s][k] = float(total)
    return out, passes
