"""Beam search over fused hypotheses, as Hugging Face's beam search does it for one model.

The fusion engine (``decoding/fusion.py``) scores each live hypothesis's candidates with the
method's fused score; this strategy only decides which hypotheses live on. Per source and step
(transformers 5 ``_beam_search``):
1. every (hypothesis, candidate) pair scores the hypothesis's summed log fused score plus the log of
   the candidate's; the best ``2 * num_beams`` are kept (a step starts from one hypothesis);
2. of those, the ones that finish (the end, a stop string, ``max_new_tokens``) and rank among the
   first ``num_beams`` join the finished pool with score / length ** ``length_penalty`` (length:
   steps including the last), the pool keeping its ``num_beams`` best;
3. the best ``num_beams`` that do not finish are the next step's hypotheses;
4. a source is done when nothing is left to continue, or its pool is full and, with
   ``early_stopping``, at once; without, once the best live hypothesis, normalised at the current
   length, no longer beats the pool's worst.
The output is the pool's best. With one hypothesis this is the greedy choice; with one member and
a fused score equal to its probability (``tokenwise``), Hugging Face's beam search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Live:
    """A live hypothesis of one source: its slot in the engine, summed log score and length."""

    slot: int
    score: float
    length: int


@dataclass
class Extension:
    """A hypothesis extended by one candidate (``ranked``: the parent's candidates, for the trace)."""

    parent: Live
    candidate: Any
    score: float
    finishes: bool
    ranked: list = field(default_factory=list)


@dataclass
class SourceBeams:
    live: list[Live]
    finished: list[tuple[float, int]] = field(default_factory=list)  # (normalised score, slot), best first
    done: bool = False


class BeamSearch:
    """The strategy's state for a batch of ``sources``: per source at most ``num_beams`` live
    hypotheses, each one row (slot) of the engine's streams, whose log-probabilities per step are
    [live slots, vocab] per member; sizes here are Python lists, the tensors stay in the engine."""

    def __init__(self, sources: int, num_beams: int, length_penalty: float, early_stopping: bool):
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.sources = [SourceBeams(live=[Live(slot=s, score=0.0, length=0)]) for s in range(sources)]

    def normalised(self, score: float, length: int) -> float:
        return score / (max(length, 1) ** self.length_penalty)

    def select(self, source: int, options: list[Extension]) -> tuple[list[Extension], list[Extension]]:
        """The next hypotheses of ``source`` and the extensions that join its finished pool, from
        every scored extension of its live hypotheses (in hypothesis, then candidate rank order):
        ``options`` has at most [live hypotheses × candidates each] entries; at most ``num_beams``
        go on and at most ``num_beams`` finish."""
        beams, n = self.sources[source], self.num_beams
        ranked = sorted((o for o in options if o.score > -math.inf), key=lambda o: -o.score)[: 2 * n]
        finishing = [o for o in ranked[:n] if o.finishes and not (self.early_stopping and len(beams.finished) >= n)]
        going_on = [o for o in ranked if not o.finishes][:n]
        return going_on, finishing

    def update(self, source: int, going_on: list[Live], finished: list[tuple[float, int]]) -> None:
        """Record the step's outcome: the new live hypotheses and the new finished (score, slot) pairs."""
        beams, n = self.sources[source], self.num_beams
        beams.finished = sorted(beams.finished + finished, key=lambda f: -f[0])[:n]
        beams.live = going_on
        if not going_on:
            beams.done = True
        elif len(beams.finished) >= n:
            best_live = self.normalised(going_on[0].score, going_on[0].length)
            beams.done = self.early_stopping or best_live <= beams.finished[-1][0]

    def best(self, source: int) -> tuple[int, float]:
        """(slot, normalised score) of the source's output: the pool's best (the best live one if none)."""
        beams = self.sources[source]
        if beams.finished:
            score, slot = beams.finished[0]
            return slot, score
        top = max(beams.live, key=lambda h: h.score)
        return top.slot, self.normalised(top.score, top.length)
