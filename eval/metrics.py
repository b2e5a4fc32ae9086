"""BLEU (Japanese tokenisation) and chrF with sacrebleu, signatures included: per corpus and per segment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sacrebleu.metrics import BLEU, CHRF


def corpus_scores(hypotheses: list[str], references: list[str], bleu: bool = True, chrf: bool = True) -> dict:
    """BLEU with ``tokenize='ja-mecab'`` (sacrebleu otherwise silently uses 13a) and chrF."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses vs {len(references)} references")
    scores: dict = {"segments": len(hypotheses)}
    if bleu:
        metric = BLEU(tokenize="ja-mecab")
        scores["bleu"] = round(metric.corpus_score(hypotheses, [references]).score, 4)
        scores["bleu_signature"] = str(metric.get_signature())
    if chrf:
        metric = CHRF()
        scores["chrf"] = round(metric.corpus_score(hypotheses, [references]).score, 4)
        scores["chrf_signature"] = str(metric.get_signature())
    return scores


@dataclass
class SegmentScores:
    """Sentence-level scores, one per segment, and the signatures they were computed with
    (None when there was no segment: sacrebleu signs only a metric that has scored)."""

    bleu: list[float]
    chrf: list[float]
    bleu_signature: Optional[str]
    chrf_signature: Optional[str]


def segment_scores(hypotheses: list[str], references: list[str]) -> SegmentScores:
    """Sentence BLEU (``ja-mecab``, effective order: a short sentence missing some 4-gram is not
    zeroed) and sentence chrF for each pair."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses vs {len(references)} references")
    bleu, chrf = BLEU(tokenize="ja-mecab", effective_order=True), CHRF()
    pairs = list(zip(hypotheses, references))
    return SegmentScores(
        bleu=[round(bleu.sentence_score(h, [r]).score, 4) for h, r in pairs],
        chrf=[round(chrf.sentence_score(h, [r]).score, 4) for h, r in pairs],
        bleu_signature=str(bleu.get_signature()) if pairs else None,
        chrf_signature=str(chrf.get_signature()) if pairs else None,
    )
