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


def _is_latin_letter(ch: str) -> bool:
    return ch.isalpha() and ord(ch) < 0x250  # Basic Latin .. Latin Extended-B


def _outside_japanese(ch: str) -> bool:
    """Hangul, or a Han character not in JIS X 0213 (simplified-only Chinese forms such as 们 这 说)."""
    code = ord(ch)
    if 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return True
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF:
        try:
            ch.encode("euc_jis_2004")
        except UnicodeEncodeError:
            return True
    return False


def is_mostly_latin(text: str) -> bool:
    """More than half of the letters are Latin: a copy of the English source, or English output."""
    letters = [ch for ch in text if ch.isalpha()]
    return bool(letters) and sum(map(_is_latin_letter, letters)) > len(letters) / 2


def script_shares(hypotheses: list[str]) -> dict:
    """Share of hypotheses that are mostly Latin script (copies), and that contain characters outside
    Japanese usage (Hangul, Han characters outside JIS X 0213: Chinese simplified forms)."""
    n = max(len(hypotheses), 1)
    return {"latin_share": round(sum(map(is_mostly_latin, hypotheses)) / n, 4),
            "non_japanese_share": round(sum(any(map(_outside_japanese, h)) for h in hypotheses) / n, 4)}


class RunningScores:
    """Corpus BLEU (``ja-mecab``) and chrF of a growing set of segments, for live progress: each
    segment's sacrebleu sufficient statistics are extracted once and summed, so a score after every
    batch costs the new segments, not the whole run again. Equal to ``corpus_scores`` on the same pairs."""

    def __init__(self):
        self._metrics = {"bleu": BLEU(tokenize="ja-mecab"), "chrf": CHRF()}
        self._stats: dict[str, list] = {name: [] for name in self._metrics}

    def add(self, hypotheses: list[str], references: list[str]) -> None:
        if hypotheses:
            for name, metric in self._metrics.items():
                self._stats[name] += metric._extract_corpus_statistics(hypotheses, [references])

    def scores(self) -> dict[str, float]:
        if not self._stats["bleu"]:
            return {}
        return {name: round(metric._aggregate_and_compute(self._stats[name]).score, 4)
                for name, metric in self._metrics.items()}


def pool_metrics(rows: list[dict]) -> dict:
    """For runs that chose among candidate pools (``decoding=pool``): candidates per segment, the share
    of choices each origin produced (a candidate several origins produced counts for each), and the
    pool's oracle (each segment's candidate with the best sentence chrF against the reference: an
    upper bound, scored by corpus BLEU and chrF)."""
    pooled = [r for r in rows if r.get("pool")]
    if not pooled:
        return {}
    origins: dict[str, int] = {}
    for row in pooled:
        chosen = next((c for c in row["pool"] if c.get("chosen")), None)  # a hand-edited pool may mark none
        for origin in chosen["origins"] if chosen else ():
            origins[origin] = origins.get(origin, 0) + 1
    out: dict = {"pool_candidates_per_segment": round(sum(len(r["pool"]) for r in pooled) / len(pooled), 3),
                 "pool_choice_share": {o: round(n / len(pooled), 4)
                                       for o, n in sorted(origins.items(), key=lambda x: -x[1])}}
    judged = [r for r in pooled
              if r.get("reference") is not None and all(c.get("ref_chrf") is not None for c in r["pool"])]
    if judged:
        best = [max(r["pool"], key=lambda c: c["ref_chrf"])["text"] for r in judged]  # max keeps the first of ties
        oracle = corpus_scores(best, [r["reference"] for r in judged])
        out["pool_oracle_bleu"], out["pool_oracle_chrf"] = oracle["bleu"], oracle["chrf"]
    return out
