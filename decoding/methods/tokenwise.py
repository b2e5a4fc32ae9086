"""``decoding=tokenwise``: dual-model (or N-model) token fusion, as researchers first built it.

Each model proposes its top-k next pieces (compared as bytes). A piece proposed by every model
scores the weighted mean of their probabilities; a piece proposed by only some scores the
weighted mean of the proposers' probabilities times ``single_weight``; the end candidate is
further multiplied by ``eos_weight``. A repetition guard over the text (``RepetitionGuard``)
forbids a piece that would complete a unit of 1..``repeat_unit`` characters repeated more than
``max_repeats`` times in a row and, optionally, any repeated character n-gram of
``no_repeat_ngram_size``.
"""

import math
from dataclasses import dataclass

from decoding.fusion import END, Candidate, FusionDecoder
from decoding.methods import register
from decoding.repetition import RepetitionGuard


@register
class TokenwiseDecoder(FusionDecoder):
    name = "tokenwise"

    @dataclass
    class Config(FusionDecoder.Config):
        top_k: int = 5
        single_weight: float = 0.5
        eos_weight: float = 1.0
        max_repeats: int = 7  # most times a unit of up to repeat_unit characters may occur in a row; 0: off
        repeat_unit: int = 4
        no_repeat_ngram_size: int = 0  # no character n-gram of this size twice; 0: off

    every_meaning = "proposed by every model (in each top-k): scored by the weighted mean of their probabilities"
    lookup_meaning = ("proposed by some models only (their mean × single_weight); a model that did not propose it "
                      "has no token of exactly these bytes (its probability shown is of the first token of its "
                      "spelling)")
    alone_meaning = "proposed by {models} only: its probability × single_weight"

    @classmethod
    def check_config(cls, cfg, n_models: int) -> None:
        super().check_config(cfg, n_models)
        RepetitionGuard.from_config(cfg)  # refuses bad limits at start-up

    def __init__(self, cfg, models, prompt):
        super().__init__(cfg, models, prompt)
        self.guard = RepetitionGuard.from_config(cfg)

    def score(self, candidates: list[Candidate], text: bytes) -> list[float]:
        scores = []
        for c in candidates:
            proposers = [m for m, p in enumerate(c.proposed) if p]
            weight = sum(self.weights[m] for m in proposers)
            mean = sum(self.weights[m] * c.probs[m] for m in proposers) / weight if weight > 0 else 0.0
            score = mean if len(proposers) == len(self.models) else mean * self.cfg.single_weight
            if c.key is END:
                score *= self.cfg.eos_weight
            elif self.guard.blocks(text, c.key):
                score = -math.inf
            scores.append(score)
        return scores
