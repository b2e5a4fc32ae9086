"""Determine-then-ensemble: is a pair of models worth ensembling? (UniTE, Yao et al. 2025)

UniTE's authors ensemble two models only when (1) their scores on the task are close — a gap of at
most 10% of the better one — and (2) their responses have a similar style; vocabulary overlap
matters little. Here, per model on a dev slice: its score (chrF by default), its output-length
ratio (output characters / reference characters: a verbose, chatty or truncating model shows
here), its tokenizer's fertility (characters and words per token, as in "How Good Is Your
Tokenizer?", Rust et al. 2021) on the English sources and the Japanese references; per pair: how
often the two models' most likely next character agrees on reference prefixes (teacher-forced,
from charwise's character probabilities). The verdict follows rules (1) and (2); fertility and agreement are
reported as context.

A verdict needs enough segments: on a handful, a score gap is mostly noise (on 2 segments the
check once said "ensemble" for a pair it rejects on 25). Below ``min_segments`` (default 20, the
same floor as the report's paired bootstrap) the check reports the profiles and gives no verdict.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class CompatRules:
    max_score_gap: float = 0.10  # relative to the better model's score (UniTE: 10%)
    max_length_ratio: float = 1.3  # the two models' output-length ratios may differ by at most this factor
    metric: str = "chrf"  # chrf | bleu: the score the gap is measured on
    min_segments: int = 20  # fewer scored segments: no verdict (the gap would be noise)


@dataclass
class ModelProfile:
    name: str
    scores: dict[str, float]  # bleu, chrf (corpus, sacrebleu)
    length_ratio: float  # output characters / reference characters
    fertility: dict[str, float]  # {en,ja}_{chars,words}_per_token
    latin_share: float
    non_japanese_share: float


@dataclass
class PairVerdict:
    models: tuple[str, str]
    compatible: Optional[bool]  # None: too few segments for a verdict
    reasons: list[str]
    score_gap: float  # relative to the better score
    length_ratio: float  # the larger output-length ratio over the smaller
    next_char_agreement: Optional[float]  # share of reference positions where both argmax characters agree
    details: dict = field(default_factory=dict)


def fertility(tokenize, texts: list[str], words) -> dict[str, float]:
    """Characters and words per token of ``texts`` (``tokenize``: text -> token ids, no special
    tokens; ``words``: text -> list of words)."""
    tokens = sum(len(tokenize(t)) for t in texts)
    if tokens == 0:
        return {"chars_per_token": 0.0, "words_per_token": 0.0}
    return {"chars_per_token": round(sum(len(t) for t in texts) / tokens, 4),
            "words_per_token": round(sum(len(words(t)) for t in texts) / tokens, 4)}


def length_ratio(hypotheses: list[str], references: list[str]) -> float:
    total = sum(len(r) for r in references)
    return round(sum(len(h) for h in hypotheses) / total, 4) if total else 0.0


def agreement_rate(tops_a: list[list], tops_b: list[list]) -> float:
    """Share of positions (over all sequences) where the two argmax lists agree."""
    pairs = [(a, b) for seq_a, seq_b in zip(tops_a, tops_b) for a, b in zip(seq_a, seq_b)]
    return round(sum(a == b for a, b in pairs) / len(pairs), 4) if pairs else 0.0


def verdict_text(verdict: "PairVerdict") -> str:
    return {True: "ensemble", False: "do not ensemble", None: "no verdict"}[verdict.compatible]


def judge(a: ModelProfile, b: ModelProfile, agreement: Optional[float], rules: CompatRules,
          segments: int) -> PairVerdict:
    """UniTE's rules: close scores and a similar response style, on ``segments`` scored segments
    (below ``rules.min_segments``: no verdict)."""
    score_a, score_b = a.scores[rules.metric], b.scores[rules.metric]
    best, worst = max(score_a, score_b), min(score_a, score_b)
    gap = (best - worst) / best if best > 0 else 0.0
    low, high = sorted((a.length_ratio, b.length_ratio))
    ratio = high / low if low > 0 else float("inf")
    leader = a.name if score_a >= score_b else b.name
    reasons = []
    gap_ok = gap <= rules.max_score_gap
    reasons.append(f"{rules.metric} {score_a:.1f} vs {score_b:.1f}: gap {gap:.0%} of the better ({leader}) "
                   f"{'<=' if gap_ok else '>'} {rules.max_score_gap:.0%}")
    style_ok = ratio <= rules.max_length_ratio
    reasons.append(f"output/reference length {a.length_ratio:.2f} vs {b.length_ratio:.2f}: factor {ratio:.2f} "
                   f"{'<=' if style_ok else '>'} {rules.max_length_ratio:g}")
    for profile in (a, b):
        if profile.latin_share >= 0.25:
            reasons.append(f"{profile.name} leaves {profile.latin_share:.0%} of its outputs mostly in Latin script "
                           "(copies)")
    if agreement is not None:
        reasons.append(f"next-character argmax agreement on reference prefixes {agreement:.0%}")
    compatible: Optional[bool] = gap_ok and style_ok
    if segments < rules.min_segments:
        compatible = None
        reasons.insert(0, f"only {segments} segments: a verdict needs at least {rules.min_segments} "
                          "(compat.rules.min_segments); use a larger slice")
    return PairVerdict(models=(a.name, b.name), compatible=compatible, reasons=reasons,
                       score_gap=round(gap, 4), length_ratio=round(ratio, 4), next_char_agreement=agreement)


def to_markdown(profiles: list[ModelProfile], verdicts: list[PairVerdict], rules: CompatRules, about: str) -> str:
    lines = [f"# Compatibility check (determine-then-ensemble)\n\n{about}\n",
             f"Rules: {rules.metric} gap <= {rules.max_score_gap:.0%} of the better model; output-length ratios "
             f"within a factor {rules.max_length_ratio:g}; a verdict needs at least {rules.min_segments} segments.\n",
             "| model | BLEU | chrF | length ratio | Latin | non-Japanese | en chars/tok | en words/tok | ja chars/tok "
             "| ja words/tok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in profiles:
        f = p.fertility
        lines.append(f"| {p.name} | {p.scores.get('bleu', 0):.1f} | {p.scores.get('chrf', 0):.1f} | "
                     f"{p.length_ratio:.2f} | {p.latin_share:.0%} | {p.non_japanese_share:.0%} | "
                     f"{f['en_chars_per_token']:.2f} | {f['en_words_per_token']:.2f} | {f['ja_chars_per_token']:.2f} | "
                     f"{f['ja_words_per_token']:.2f} |")
    lines += ["", "| pair | verdict | reasons |", "|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {' + '.join(v.models)} | {verdict_text(v)} | "
                     f"{'; '.join(v.reasons)} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, profiles: list[ModelProfile], verdicts: list[PairVerdict], rules: CompatRules,
                 about: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "compat.json", out_dir / "compat.md"
    payload = {"about": about, "rules": asdict(rules), "models": [asdict(p) for p in profiles],
               "pairs": [asdict(v) for v in verdicts]}
    json_path.write_text(json.dumps(payload, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(to_markdown(profiles, verdicts, rules, about), encoding="utf-8")
    return json_path, md_path


def verdict_table(verdicts: list[PairVerdict]) -> tuple[list[str], list[list]]:
    """Columns and rows for a W&B table."""
    columns = ["pair", "compatible", "score_gap", "length_ratio", "next_char_agreement", "reasons"]
    return columns, [[" + ".join(v.models), v.compatible, v.score_gap, v.length_ratio, v.next_char_agreement,
                      "; ".join(v.reasons)] for v in verdicts]
