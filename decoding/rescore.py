"""Teacher-forced log-probability of finished texts under one model, in its own tokenization.

Each candidate is scored the way the model would have produced it after its own prompt: with a chat
template, the tokens of the text and then the end of the turn (the log of the summed probability of
the model's end tokens at that position); with the plain few-shot template, the text as the
examples present a target (the separator between ``{tgt_lang}:`` and ``{target}``, usually one
space) followed by the first stop string (the line end), all teacher-forced. Each source's prompt
runs once (but its last token), on top of the run's shared prompt prefix when that is cached; its
candidates continue from copies of that KV cache, right-padded (a causal model's logits at a token
never see the padding after it), in chunks bounded by the logits they keep: a pool of N candidates
costs one prompt pass, not N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from decoding.prompt import PromptConfig, prompt_rows, render_prompt, stop_strings, uses_chat_template
from decoding.stream import fill_rows

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
    out = [[0.0] * len(group) for group in texts]
    passes = 0
    for s, group in enumerate(texts):
        if group:
            out[s], n = _source_logprobs(model, heads[s], [continuation(model, text, prompt) for text in group])
            passes += n
    return out, passes


def _prompt_layers(model, head: list[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Keys and values of ``head`` but its last token, per layer; and the forward passes made. The part
    the run's shared prompt prefix covers (``model.prompt_cache``, decoding/prefix.py) comes from it."""
    device = model.device
    shared = model.prompt_cache.shared_len([head], reserve=1) if model.prompt_cache is not None else 0
    layers = model.prompt_cache.layers(shared) if shared else []
    if shared == len(head) - 1:  # all of it cached (or a one-token prompt: nothing to run)
        return layers, 0
    cache = fill_rows(DynamicCache(), layers, 1)  # full layers: nothing cropped to a sliding window
    rest = torch.tensor([head[shared:-1]], device=device)
    model.forward(rest, torch.ones(1, len(head) - 1, device=device, dtype=torch.long),
                  torch.arange(shared, len(head) - 1, device=device)[None], cache)
    return [(layer.keys, layer.values) for layer in cache.layers], 1


def _source_logprobs(model, head: list[int], conts: list[Continuation]) -> tuple[list[float], int]:
    """The log-probabilities of one source's continuations after its prompt ``head``; and the passes made."""
    device = model.device
    layers, passes = _prompt_layers(model, head)
    end_ids = torch.tensor(model.end_ids, device=device)
    pad = model.tokenizer.pad_token_id
    out = [0.0] * len(conts)
    # Longest continuations first, so each chunk keeps few padded logit rows.
    order = sorted(range(len(conts)), key=lambda k: -len(conts[k].ids))
    start = 0
    while start < len(order):
        width = len(conts[order[start]].ids) + 1  # the prompt's last token, then the continuation
        chunk = order[start:start + max(1, LOGIT_BUDGET // (width * model.vocab_size))]
        start += len(chunk)
        passes += 1
        rows = [[head[-1]] + conts[k].ids for k in chunk]
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
        mask = torch.tensor([[1] * (len(head) - 1 + len(row)) + [0] * (width - len(row)) for row in rows],
                            device=device)
        positions = torch.arange(len(head) - 1, len(head) - 1 + width, device=device).expand(len(chunk), -1)
        cache = fill_rows(DynamicCache(), layers, len(chunk))
        # logprobs[:, t] predicts the continuation's token t (t = its length: what follows the text)
        logprobs = model.forward(input_ids, mask, positions, cache, logits_to_keep=width)
        totals = []
        for row, k in enumerate(chunk):
            n = len(conts[k].ids)
            ids = input_ids[row, 1:n + 1]  # the continuation's tokens, already on the device
            total = logprobs[row, :n].gather(-1, ids[:, None]).sum()
            if conts[k].score_end:
                total = total + torch.logsumexp(logprobs[row, n, end_ids], dim=-1)
            totals.append(total)
        for k, total in zip(chunk, torch.stack(totals).tolist()):  # one transfer per chunk, not per candidate
            out[k] = total
    return out, passes
