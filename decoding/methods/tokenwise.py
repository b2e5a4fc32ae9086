"""``decoding=tokenwise``: dual-model (or N-model) token fusion, as researchers first built it.

Each model proposes its top-k next pieces (compared as bytes). A piece proposed by every model
scores the weighted mean of their probabilities; a piece proposed by only some scores the
weighted mean of the proposers' probabilities times ``single_weight``; the end candidate is
further multiplied by ``eos_weight``. A repetition guard forbids a piece chosen
``max_piece_repeats`` times in a row and, optionally, any repeated piece n-gram.
"""

import math
from dataclasses import dataclass

from decoding.base import register
from decoding.fusion import END, Candidate, FusionDecoder


@register
class TokenwiseDecoder(FusionDecoder):
    name = "tokenwise"

    @dataclass
    class Config(FusionDecoder.Config):
        top_k: int = 5
        single_weight: float = 0.5
        eos_weight: float = 1.0
        max_piece_repeats: int = 8  # 0: off
        no_repeat_ngram_size: int = 0  # 0: off

    def score(self, candidates: list[Candidate], recent: list[bytes]) -> list[float]:
        scores = []
        for c in candidates:
            proposers = [m for m, p in enumerate(c.proposed) if p]
            weight = sum(self.weights[m] for m in proposers)
            mean = sum(self.weights[m] * c.probs[m] for m in proposers) / weight if weight > 0 else 0.0
            score = mean if len(proposers) == len(self.models) else mean * self.cfg.single_weight
            if c.key is END:
                score *= self.cfg.eos_weight
            elif self._repeats(c.key, recent):
                score = -math.inf
            scores.append(score)
        return scores

    def _repeats(self, piece: bytes, recent: list[bytes]) -> bool:
        n = self.cfg.max_piece_repeats
        if n and len(recent) >= n and all(p == piece for p in recent[-n:]):
            return True
        size = self.cfg.no_repeat_ngram_size
        if size and len(recent) >= size:
            gram = tuple(recent[-(size - 1):]) + (piece,) if size > 1 else (piece,)
            return any(tuple(recent[i:i + size]) == gram for i in range(len(recent) - size + 1))
        return False
