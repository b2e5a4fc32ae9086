"""Choosing among finished translations: the candidate pool, utilities, and minimum Bayes risk.

A pool holds each distinct candidate text once, with its count and where it came from. MBR picks
the candidate with the highest expected utility against the pool used as pseudo-references:

    E(i) = sum_j w_j U(c_i, c_j) / sum_j w_j

where ``w_j`` is candidate j's count (``weights="count"``, the empirical distribution of the pool) or
a model probability (model-based MBR). Without ``include_self`` a candidate is not its own
pseudo-reference: one copy of it is removed from the sum (``w_i`` becomes ``count_i - 1``; with
model weights, ``w_i = 0``), exactly as a brute force over the unmerged list that skips the same
position. Ties go to the candidate that entered the pool first (pool order: members in config
order, each member's generations in ``decoding.generate`` order, then ``decoding.runs`` in order).

Utilities are sacrebleu's sentence chrF (chrF2, char order 6) and sentence BLEU (ja-mecab, effective
order), both 0..100, COMET (x100) from a local checkpoint, or a weighted sum such as
``chrf:0.5+bleu:0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from decoding.errors import FusemtError

UTILITIES = ("chrf", "bleu", "comet")


@dataclass
class Candidate:
    """One distinct text of the pool: how often it was produced, and by what (origin -> count)."""

    text: str
    origins: dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(self.origins.values())


def build_pool(entries: list[tuple[str, str]]) -> list[Candidate]:
    """(origin, text) in pool order -> distinct candidates, duplicates merged (their origins and counts
    kept), in order of first appearance."""
    pool: dict[str, Candidate] = {}
    for origin, text in entries:
        cand = pool.setdefault(text, Candidate(text=text))
        cand.origins[origin] = cand.origins.get(origin, 0) + 1
    return list(pool.values())


def parse_utility(spec: str) -> dict[str, float]:
    """``chrf`` / ``bleu`` / ``comet`` or a weighted sum ``chrf:0.7+comet:0.3`` -> {name: weight}."""
    terms: dict[str, float] = {}
    for part in spec.replace(" ", "").split("+"):
        name, _, weight = part.partition(":")
        if name not in UTILITIES:
            raise FusemtError(f"decoding.utility='{spec}': unknown utility '{name}': use {', '.join(UTILITIES)} "
                              "or a weighted sum such as chrf:0.5+bleu:0.5")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise FusemtError(f"decoding.utility='{spec}': weight '{weight}' of {name} is not a number") from None
        if value <= 0 or name in terms:
            raise FusemtError(f"decoding.utility='{spec}': each utility once, with a positive weight")
        terms[name] = value
    return terms


def check_comet_checkpoint(model: str) -> None:
    """COMET as a utility runs only from a checkpoint on this disk (no hub download mid-run)."""
    path = Path(model).expanduser()
    checkpoint = path if path.is_file() else path / "checkpoints" / "model.ckpt"
    if not checkpoint.is_file():
        raise FusemtError(f"decoding.utility uses comet but decoding.comet_model='{model}' "
                          "is not a local COMET checkpoint: "
                          "set decoding.comet_model to a .../checkpoints/model.ckpt on this disk, or use chrf/bleu")


class PairwiseUtility:
    """U(hypothesis, pseudo-reference) for every ordered pair of a pool, as a matrix."""

    def __init__(self, spec: str, comet_model: str = "", comet_batch_size: int = 16):
        from sacrebleu.metrics import BLEU, CHRF

        self.terms = parse_utility(spec)
        self.chrf = CHRF()
        self.bleu = BLEU(tokenize="ja-mecab", effective_order=True)
        self.comet_model, self.comet_batch_size = comet_model, comet_batch_size

    def matrix(self, texts: list[str], source: str = "") -> torch.Tensor:
        """``[i, j]`` = utility of ``texts[i]`` with ``texts[j]`` as reference (diagonal included)."""
        n = len(texts)
        total = torch.zeros(n, n, dtype=torch.float64)
        pairs = [(i, j) for i in range(n) for j in range(n)]
        for name, weight in self.terms.items():
            if name == "comet":
                scores = self._comet([texts[i] for i, _ in pairs], [texts[j] for _, j in pairs], source)
            else:
                metric = self.chrf if name == "chrf" else self.bleu
                scores = [metric.sentence_score(texts[i], [texts[j]]).score for i, j in pairs]
            total += weight * torch.tensor(scores, dtype=torch.float64).view(n, n)
        return total

    def _comet(self, hyps: list[str], refs: list[str], source: str) -> list[float]:
        from eval.comet_score import CometUnavailable, load_comet

        try:
            scorer = load_comet(self.comet_model)
        except CometUnavailable as err:
            raise FusemtError(f"comet utility: {err}") from None
        data = [{"src": source, "mt": h, "ref": r} for h, r in zip(hyps, refs)]
        out = scorer.predict(data, batch_size=self.comet_batch_size, gpus=1 if torch.cuda.is_available() else 0,
                             progress_bar=False)
        return [100.0 * float(s) for s in out.scores]


def expected_utility(utility: torch.Tensor, weights: torch.Tensor, self_weights: torch.Tensor) -> torch.Tensor:
    """E(i) = sum_j W_ij U_ij / sum_j W_ij with W_ij = weights_j off the diagonal and self_weights_i on
    it; a candidate with no pseudo-reference left (a one-candidate pool) gets 0."""
    w = weights.to(utility.dtype).expand_as(utility).clone()
    w.diagonal().copy_(self_weights.to(utility.dtype))
    mass = w.sum(dim=1)
    return torch.where(mass > 0, (w * utility).sum(dim=1) / mass.clamp(min=1e-300), torch.zeros_like(mass))


def mbr_weights(counts: list[int], include_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Count weights: every copy of a candidate is one pseudo-reference; without the self-pair one
    copy of the candidate itself is left out."""
    w = torch.tensor(counts, dtype=torch.float64)
    return w, (w if include_self else w - 1)


def model_weights(scores: list[float], include_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-based MBR: pseudo-references weighted by softmax of the joint (per-character) score."""
    w = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0)
    return w, (w if include_self else torch.zeros_like(w))


def argmax_first(values: list[float] | torch.Tensor) -> int:
    """Index of the highest value; ties go to the earliest (the candidate that entered the pool first)."""
    values = [float(v) for v in values]
    best = max(values)
    return values.index(best)
