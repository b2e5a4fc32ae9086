"""Samples that do not depend on batching: one random generator per segment.

A run's samples must be the same whether a segment is decoded alone or in a batch of 8, in one
process or in another shard, in the first run or after a resume. One generator shared by a batch
hands out its numbers in the order the batch's rows draw them, so batching changed the samples.
Each source instead gets its own generator, seeded from the run's one ``seed`` and the source text
(the decode interface sees texts, not ids; equal sources draw equally, as they should).
"""

from __future__ import annotations

import hashlib

import torch

# Named in the fingerprint of every sampling run: samples drawn before it came from a shared stream.
SAMPLER = "per-segment"


def segment_generators(seed: int, sources: list[str]) -> list[torch.Generator]:
    """One CPU generator per source, seeded from (``seed``, source text)."""
    return [torch.Generator().manual_seed(segment_seed(seed, source)) for source in sources]


def segment_seed(seed: int, source: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{source}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative 63-bit seed


def warp(logprobs: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling distribution: temperature, then nucleus (top-p) truncation, renormalised."""
    probs = torch.softmax(logprobs / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
