"""Corpus-level BLEU (Japanese tokenisation) and chrF with sacrebleu, signatures included."""

from __future__ import annotations

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
