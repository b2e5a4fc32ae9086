"""Shared prompt prefixes: the part of the prompt every segment shares (a plain prompt's few-shot
examples, a chat template's system turn and instruction head) runs through a model once per run,
and every row of every batch starts from a copy of its KV cache.

The prefix is a token-level prefix of every row's own encoding: ``render_prompt`` records the
head, the longest common prefix of the token ids of the prompt rendered around two unrelated
probe sources (a boundary that the source's first characters cannot move), and each batch uses
the longest prefix of that head which every row starts with (checked per row; rows cut by
``max_input_tokens`` share nothing and run without it). Keys and values of a token depend only
on the tokens before it and on its position, so the prefix's cache is the same in every row.

Two consumers: ``ModelStream`` (fusion methods, speculative, charwise) starts its rows from the
prefix's columns, since it masks by token positions anyway; HF ``generate`` (greedy, beam) gets
``prefilled_cache``: the rest of every prompt but its last token is run by a stream on top of
the prefix, then its columns are laid out exactly as ``generate`` lays out a left-padded batch
(padding first, so Gemma 3's sliding-window masks, built over cache columns, stay exact), and
``generate`` runs the last prompt token itself.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from decoding.prompt import prompt_rows, prompt_text
from decoding.stream import ModelStream, common_prefix_len

PROBE_SOURCES = ("0", "Zebra")  # differ from their first character on, in any tokenizer


class PromptCache:
    """One model's shared prompt prefix and its KV cache for one run ([1, heads, tokens, dim] per layer)."""

    def __init__(self, model):
        self.model = model
        self.head: tuple[int, ...] = ()
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.prefix_passes = 0  # forward passes over the head (one per run and head)

    def set_head(self, head: list[int]) -> None:
        if tuple(head) != self.head:
            self.head, self._layers = tuple(head), None

    def shared_len(self, rows: list[list[int]], reserve: int) -> int:
        """Tokens of the head that every row starts with, leaving at least ``reserve`` tokens of each row out."""
        n = len(self.head)
        for row in rows:
            n = min(n, common_prefix_len(self.head, row), len(row) - reserve)
        return max(n, 0)

    @torch.inference_mode()
    def layers(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of the first ``n`` head tokens, per layer."""
        if self._layers is None:
            cache = DynamicCache()  # full layers: nothing cropped to a sliding window
            ids = torch.tensor([self.head], device=self.model.device)
            positions = torch.arange(len(self.head), device=self.model.device)[None]
            self.model.forward(ids, torch.ones_like(ids), positions, cache)
            self._layers = [(layer.keys, layer.values) for layer in cache.layers]
            self.prefix_passes += 1
        return [(keys[:, :, :n], values[:, :, :n]) for keys, values in self._layers]


def prompt_head(tokenizer, prompt, add_special: bool) -> list[int]:
    """The token ids every rendered prompt of this model starts with (see the module docstring)."""
    probes = [tokenizer(prompt_text(tokenizer, s, prompt), add_special_tokens=add_special)["input_ids"]
              for s in PROBE_SOURCES]
    return probes[0][: common_prefix_len(*probes)]


def prefilled_cache(model, batch, repeats: int = 1) -> DynamicCache | None:
    """For ``generate``: the KV cache of every left-padded prompt in ``batch`` but its last column,
    built on the shared prefix; None when the rows share no prefix with the head."""
    rows = prompt_rows(batch)
    if model.prompt_cache is None or model.prompt_cache.shared_len(rows, reserve=2) == 0:
        return None
    stream = ModelStream(model, [row[:-1] for row in rows])
    stream.logprobs()
    # Stream columns hold (row, position) pairs in any order; generate's layout puts position j of a
    # row of length L at column width - L + j, padding before it (its values are masked: any will do).
    width = batch["input_ids"].shape[1]
    pos = stream.column_pos
    r, c = (pos >= 0).nonzero(as_tuple=True)
    lengths = torch.tensor([len(row) for row in rows])
    index = torch.zeros(len(rows), width - 1, dtype=torch.long)
    index[r, width - lengths[r] + pos[r, c]] = c
    cache = DynamicCache(config=model.model.config)
    for i, layer in enumerate(stream.cache.layers):
        gather = index.to(layer.keys.device)[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        cache.update(layer.keys.gather(2, gather), layer.values.gather(2, gather), i)
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
    return cache
