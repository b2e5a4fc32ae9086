"""Collect every run under a folder into one comparison: a table with the options that tell the runs
apart, per-domain scores, paired-bootstrap markers against a baseline, and a quality-vs-speed plot.

    python -m eval.report results/ [--baseline unite__gemma3_270m+smollm2_135m] [--correction holm|none] [--wandb]
    python -m eval.report runs/ --member-baselines --member-ranking dev/compat.json

writes ``report.md``, ``report.csv``, ``report_domains.csv`` (when the results rows carry a
``domain``) and ``report.png`` into that folder; ``--wandb`` also logs the tables (W&B Tables) and
the plot as one W&B run in the runs' sweep group.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from decoding.errors import FusemtError, fail
from eval.jsonio import read_json_object, read_jsonl_objects, write_atomically
from eval.metrics import corpus_scores

ROW_KEYS = ("id", "source", "hypothesis")  # what every results line has and the pages show
RESULTS_FIX = ("pass a fusemt results JSONL, or fix or delete that line "
               "(rerunning the config rewrites a deleted segment)")
METRICS_FIX = "fix or delete that file (rerunning its config rewrites it), then rerun the report"
METRICS_SUFFIX = ".metrics.json"
BASE_COLUMNS = ["run_name", "method", "models"]
SCORE_COLUMNS = ["dataset", "segments", "bleu", "chrf", "comet", "tokens_per_s", "forward_passes", "acceptance_rate",
                 "agreement_rate", "latin_share", "non_japanese_share"]
BOOTSTRAP_COLUMNS = ["baseline", "bleu_delta", "bleu_p", "chrf_delta", "chrf_p", "bootstrap_segments"]
ADJUSTED_COLUMNS = ["bleu_p_adj", "chrf_p_adj"]  # with a multiple-comparison correction
CORRECTIONS = ("holm", "none")
# Options shown whenever a run has them; any other option is shown when its values differ between runs.
KEY_OPTIONS = ("weights", "top_k", "num_beams")
# Overrides outside these change nothing the runs are compared on (selection, batching, logging).
OPTION_PREFIXES = ("decoding.", "prompt.")
SIGNIFICANCE = 0.05
BOOTSTRAP_SAMPLES = 1000
# Resampling a handful of segments has only a handful of distinct outcomes: no marker below this many.
BOOTSTRAP_MIN_SEGMENTS = 20
KEY_WIDTH = 48  # characters per line of a run's label in the plot's key
PLOT_DPI = 110


def read_rows(path: Path) -> list[dict]:
    """The segments of a results JSONL (one-line errors naming file, line and fix)."""
    if not path.is_file():
        raise FusemtError(f"results file {path} not found: pass a results/.../<run_name>.jsonl")
    rows = read_jsonl_objects(path, RESULTS_FIX, required=ROW_KEYS, segment=True)
    if not rows:
        raise FusemtError(f"{path} holds no segments yet")
    return rows


def read_segment_comet(results: Path) -> Optional[dict[str, float]]:
    """Segment COMET scores by id from ``<run>.comet.jsonl`` beside the results, None when not scored."""
    path = results.with_suffix(".comet.jsonl")
    if not path.exists():
        return None
    fix = "delete it (rerunning the config rescores COMET) and rerun"
    return {str(r["id"]): r["comet"] for r in read_jsonl_objects(path, fix, required=("id", "comet"))}


def _value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _value_text(value)
    return flat


@dataclass
class RunOptions:
    """A run's method options (``top_k``, ``weights``, ``prompt.system``, ``seed``, ...) as text.

    From ``metrics["config"]`` when the run recorded its whole config (``complete``); otherwise
    only the options its command line overrode (``provenance.overrides``), the rest being defaults."""

    values: dict[str, str]
    complete: bool

    @classmethod
    def from_metrics(cls, metrics: dict) -> "RunOptions":
        config = metrics.get("config")
        if isinstance(config, dict) and isinstance(config.get("decoding"), dict):
            values = {k: v for k, v in _flatten(config["decoding"]).items() if k != "name"}
            if isinstance(config.get("prompt"), dict):
                values.update(_flatten(config["prompt"], "prompt."))
            if "seed" in config:
                values["seed"] = _value_text(config["seed"])
            return cls(values, complete=True)
        values = {}
        for override in (metrics.get("provenance") or {}).get("overrides") or []:
            key, _, value = override.lstrip("+~").partition("=")
            if key.startswith(OPTION_PREFIXES) or key == "seed":
                values[key.removeprefix("decoding.")] = value
        return cls(values, complete=False)

    def cell(self, key: str) -> str:
        """The option's value; for a run without it, "(default)" when only overrides are known, else "—"."""
        return self.values.get(key, "—" if self.complete else "(default)")


@dataclass
class Run:
    """One run as the review pages see it: its results rows, metrics file and segment COMET."""

    results: Path
    metrics: dict
    rows: Optional[list[dict]]  # None: only the metrics file exists
    segment_comet: Optional[dict[str, float]]
    options: RunOptions = field(init=False)

    def __post_init__(self):
        self.options = RunOptions.from_metrics(self.metrics)

    @classmethod
    def from_results(cls, results: Path) -> "Run":
        rows = read_rows(results)
        metrics_path = results.with_suffix(".metrics.json")
        metrics = (check_metrics(read_json_object(metrics_path, METRICS_FIX), metrics_path)
                   if metrics_path.exists() else {})
        return cls(results, metrics, rows, read_segment_comet(results))

    @classmethod
    def from_metrics(cls, metrics_path: Path) -> "Run":
        results = metrics_path.with_name(metrics_path.name.removesuffix(METRICS_SUFFIX) + ".jsonl")
        metrics = check_metrics(read_json_object(metrics_path, METRICS_FIX), metrics_path)
        if not results.exists():
            return cls(results, metrics, None, None)
        return cls(results, metrics, read_rows(results), read_segment_comet(results))

    def _first_row(self, key: str, default=None):
        return self.rows[0].get(key, default) if self.rows else default

    @property
    def name(self) -> str:
        return self.metrics.get("run_name") or self.results.stem

    @property
    def method(self) -> str:
        return self.metrics.get("method") or self._first_row("method", "?")

    @property
    def models(self) -> str:
        return "+".join(self.metrics.get("models") or self._first_row("models", []))

    @property
    def dataset(self) -> Optional[str]:
        return self.metrics.get("dataset")

    @property
    def members(self) -> list[str]:
        return list(self.metrics.get("models") or self._first_row("models", []))

    @property
    def forward_passes(self) -> Optional[float]:
        """Forward calls per segment, summed over the members (None when the run did not count them)."""
        counts = self.metrics.get("forward_passes")
        if not isinstance(counts, dict) or not self.rows:
            return None
        return round(sum(counts.values()) / len(self.rows), 2)

    @property
    def sweep(self) -> Optional[str]:
        return self.metrics.get("sweep")

    def scored(self) -> dict[str, dict]:
        """Rows with a reference, by segment id."""
        return {str(r["id"]): r for r in self.rows or [] if r.get("reference") is not None}


def mix_warnings(runs: list[Run]) -> list[str]:
    """What makes a table of these runs misleading: runs of different datasets, or of one dataset
    with different segment counts (their scores are over different segments)."""
    warnings = []
    datasets = sorted({run.dataset or "?" for run in runs})
    if len(datasets) > 1:
        warnings.append(f"the runs are of {len(datasets)} datasets ({', '.join(datasets)}): compare scores only "
                        "within one dataset")
    for dataset in datasets:
        counts = sorted({run.metrics.get("segments") for run in runs if (run.dataset or "?") == dataset} - {None})
        if len(counts) > 1:
            warnings.append(f"the runs of {dataset} scored different numbers of segments "
                            f"({', '.join(map(str, counts))}): "
                            "their scores are over different segments; finish the runs or report one selection")
    return warnings


def find_runs(folder: Path) -> list[Run]:
    """Every run under ``folder`` that has a metrics file."""
    if not folder.is_dir():
        raise FusemtError(f"{folder} is not a folder: pass the results folder, e.g. results/")
    runs = [Run.from_metrics(path) for path in sorted(folder.rglob(f"*{METRICS_SUFFIX}"))]
    if not runs:
        raise FusemtError(f"no *{METRICS_SUFFIX} under {folder}: run fusemt first")
    return runs


def distinguishing_options(runs: list[Run]) -> list[str]:
    """The options a reader needs to tell these runs apart: the key ones any run has, and every
    other option whose value differs between the runs that have it (or were run with it overridden)."""
    keys = list(dict.fromkeys(k for run in runs for k in run.options.values))
    shown = []
    for key in keys:
        values = {run.options.values.get(key) if run.options.complete else run.options.cell(key) for run in runs}
        values.discard(None)
        if key in KEY_OPTIONS or len(values) > 1:
            shown.append(key)
    return sorted(shown, key=lambda k: (k not in KEY_OPTIONS, KEY_OPTIONS.index(k) if k in KEY_OPTIONS else 0, k))


def run_labels(runs: list[Run], option_keys: list[str]) -> list[str]:
    """Short names for figures and headers: method, models when they differ, the run's distinguishing options."""
    show_models = len({run.models for run in runs}) > 1
    labels = []
    for run in runs:
        parts = [run.method] + ([run.models] if show_models else [])
        parts += [f"{key}={run.options.values[key]}" for key in option_keys if key in run.options.values]
        labels.append(" ".join(parts))
    return labels


def per_domain(run: Run) -> dict[str, dict]:
    """Corpus BLEU/chrF (and mean segment COMET where scored) per ``domain`` of the results rows."""
    by_domain: dict[str, list[dict]] = {}
    for row in run.scored().values():
        if row.get("domain") is not None:
            by_domain.setdefault(str(row["domain"]), []).append(row)
    scores = {}
    for domain, rows in sorted(by_domain.items()):
        scores[domain] = corpus_scores([r["hypothesis"] for r in rows], [r["reference"] for r in rows])
        comet = [run.segment_comet[str(r["id"])] for r in rows
                 if run.segment_comet and str(r["id"]) in run.segment_comet]
        scores[domain]["comet"] = round(sum(comet) / len(comet), 4) if comet and len(comet) == len(rows) else None
    return scores


@dataclass
class Bootstrap:
    """sacrebleu's paired bootstrap of a run against the baseline on the segments both scored."""

    segments: int
    bleu_delta: float
    bleu_p: float
    chrf_delta: float
    chrf_p: float
    adjusted: dict[str, float] = field(default_factory=dict)  # metric -> p after the table's correction

    def p(self, metric: str) -> float:
        """The p-value the marker uses: corrected when the report applied a correction, else raw."""
        return self.adjusted.get(metric, getattr(self, f"{metric}_p"))

    def marker(self, metric: str) -> str:
        """▲ / ▼: significantly better / worse than the baseline (p < 0.05 after the report's correction,
        on enough segments); nothing otherwise."""
        delta, p = getattr(self, f"{metric}_delta"), self.p(metric)
        if self.segments < BOOTSTRAP_MIN_SEGMENTS or p >= SIGNIFICANCE or delta == 0:
            return ""
        return "▲" if delta > 0 else "▼"


def paired_bootstrap(baseline: Run, run: Run, n_samples: int = BOOTSTRAP_SAMPLES) -> Optional[Bootstrap]:
    """BLEU (ja-mecab) and chrF paired bootstrap resampling (sacrebleu's ``paired_bs``, its fixed
    seed), on the segment ids both runs have with a reference; None when they share none."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    mine, base = run.scored(), baseline.scored()
    common = [i for i in base if i in mine]
    if run is baseline or not common:
        return None
    if all(mine[i]["hypothesis"] == base[i]["hypothesis"] for i in common):  # sacrebleu reports p ~ 0 for no difference
        return Bootstrap(segments=len(common), bleu_delta=0.0, bleu_p=1.0, chrf_delta=0.0, chrf_p=1.0)
    test = PairedTest([("baseline", [base[i]["hypothesis"] for i in common]),
                       ("run", [mine[i]["hypothesis"] for i in common])],
                      metrics={"bleu": BLEU(tokenize="ja-mecab"), "chrf": CHRF()},
                      references=[[base[i]["reference"] for i in common]], test_type="bs", n_samples=n_samples)
    _, scores = test()
    (bleu_base, bleu_run), (chrf_base, chrf_run) = [scores[name] for name in scores if name != "System"]
    return Bootstrap(segments=len(common), bleu_delta=round(bleu_run.score - bleu_base.score, 4),
                     bleu_p=round(bleu_run.p_value, 4), chrf_delta=round(chrf_run.score - chrf_base.score, 4),
                     chrf_p=round(chrf_run.p_value, 4))


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the given order: the i-th smallest of m is multiplied by
    m - i + 1, made monotone (never below the one before it) and capped at 1. Rejecting where the
    adjusted p < alpha controls the family-wise error rate at alpha over all m tests."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def read_member_ranking(path: Path) -> list[str]:
    """Member names best first from a ``fusemt-compat`` result (compat.json, e.g. on a dev slice):
    by the score its rules compare (``rules.metric``), then the other score."""
    data = read_json_object(path, "pass the compat.json that fusemt-compat wrote")
    models = data.get("models")
    metric = (data.get("rules") or {}).get("metric", "chrf")
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("scores"), dict)
                                               and "name" in m for m in models):
        raise FusemtError(f"{path} has no models with scores: pass the compat.json that fusemt-compat wrote")
    other = "bleu" if metric == "chrf" else "chrf"
    ranked = sorted(models, key=lambda m: (-(m["scores"].get(metric) or 0), -(m["scores"].get(other) or 0)))
    return [str(m["name"]) for m in ranked]


def best_member_run(runs: list[Run], run: Run, ranking: Optional[list[str]] = None) -> Optional[Run]:
    """For an ensemble: the single-model run of its best member on the same dataset that searched as it
    did: greedy, or for an ensemble beam search (``num_beams`` > 1) beam search with as many beams.
    The best member is the first of ``ranking`` (chosen elsewhere, e.g. on a dev slice) that ran so,
    else the run with the best BLEU, then chrF, on this dataset; None for a single-model run or when
    no member ran alone so."""
    members = run.members
    if len(members) < 2:
        return None
    beams = run.options.values.get("num_beams", "1")
    singles = [r for r in runs if r.dataset == run.dataset and len(r.members) == 1 and r.members[0] in members
               and (r.method == "greedy" if beams == "1" else
                    r.method == "beam" and r.options.values.get("num_beams", "4") == beams)]
    if ranking is not None:
        ranked = [r for name in ranking for r in singles if r.members[0] == name]
        return ranked[0] if ranked else None
    return max(singles, key=lambda r: (r.metrics.get("bleu") or 0, r.metrics.get("chrf") or 0), default=None)


def pick_run(runs: list[Run], wanted: str, flag: str = "--baseline") -> Run:
    """The run named ``wanted``: its run name, or a part of exactly one run name."""
    exact = [run for run in runs if run.name == wanted]
    matches = exact or [run for run in runs if wanted in run.name]
    if len(matches) != 1:
        names = ", ".join(run.name for run in (matches or runs))
        problem = "matches no run" if not matches else f"matches {len(matches)} runs"
        raise FusemtError(f"{flag} {wanted} {problem}: give one of {names}")
    return matches[0]


def _markdown_cell(text: str) -> str:
    """A table cell whatever the text: a '|' or a line break in a value (a prompt option) would split the row."""
    return text.replace("|", "\\|").replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def check_metrics(metrics: dict, path: Path) -> dict:
    """A metrics file as the report reads it: a run (its ``run_name``) with numeric scores or null; a
    hand-edited one that says otherwise is refused, naming the file and the key."""
    if not isinstance(metrics.get("run_name"), str):
        raise FusemtError(f"{path} has no 'run_name', so it describes no run: {METRICS_FIX}")
    for key in SCORE_COLUMNS:
        value = metrics.get(key)
        if key not in ("dataset", "forward_passes") and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise FusemtError(f"{path}: '{key}' is {json.dumps(value, ensure_ascii=False)}, not a number or null: "
                              f"{METRICS_FIX}")
    return metrics


def _format(column: str, value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    digits = (4 if column in ("comet", "bleu_p", "chrf_p", "bleu_p_adj", "chrf_p_adj")
              else 3 if column.endswith("_rate") else 2)
    return f"{value:.{digits}f}"


@dataclass
class Report:
    runs: list[Run]
    option_keys: list[str]
    baselines: dict[str, Run] = field(default_factory=dict)  # run name -> the run it is tested against
    bootstraps: dict[str, Bootstrap] = field(default_factory=dict)  # by run name
    baseline_rule: str = ""  # how the baselines were chosen, for the legend
    domains: dict[str, dict[str, dict]] = field(default_factory=dict)  # run name -> domain -> scores
    correction: str = "holm"  # multiple-comparison correction over the table's tests: holm | none
    tests: int = 0  # how many tests the correction covers
    warnings: list[str] = field(default_factory=list)  # what the reader must know about the mix of runs

    @classmethod
    def build(cls, runs: list[Run], baseline: Optional[str] = None, member_baselines: bool = False,
              correction: str = "holm", member_ranking: Optional[list[str]] = None,
              ranking_source: str = "") -> "Report":
        """``baseline``: every run is tested against that run; ``member_baselines``: each ensemble
        against the single-model run of its best member that searched alike (``best_member_run``,
        by ``member_ranking`` when given). ``correction="holm"`` adjusts the p-values of all the
        table's tests (BLEU and chrF of every tested run) with Holm–Bonferroni."""
        runs = sorted(runs, key=lambda r: (r.dataset or "", -(r.metrics.get("bleu") or 0), r.name))
        report = cls(runs, distinguishing_options(runs), correction=correction, warnings=mix_warnings(runs))
        if baseline is not None:
            chosen = pick_run(runs, baseline)
            report.baselines = {run.name: chosen for run in runs if run.dataset == chosen.dataset}
            report.baseline_rule = f"the baseline {chosen.name}"
        elif member_baselines:
            report.baselines = {run.name: base for run in runs if (base := best_member_run(runs, run, member_ranking))}
            chosen_by = (f"the member ranked best in {ranking_source}" if member_ranking is not None
                         else "the member with the best BLEU (then chrF) in this table")
            report.baseline_rule = (f"the single-model run of the ensemble's best member ({chosen_by}), searching as "
                                    "the ensemble did (greedy, or beam search with as many beams; column baseline)")
        for run in runs:
            if run.name in report.baselines and (result := paired_bootstrap(report.baselines[run.name], run)):
                report.bootstraps[run.name] = result
        report._correct()
        report.domains = {run.name: scores for run in runs if (scores := per_domain(run))}
        return report

    def _correct(self) -> None:
        """Adjust every test's p-value over the family of the table's tests (BLEU and chrF per run)."""
        tests = [(boot, metric) for boot in self.bootstraps.values() for metric in ("bleu", "chrf")]
        self.tests = len(tests)
        if self.correction == "none" or not tests:
            return
        for (boot, metric), adjusted in zip(tests, holm([getattr(b, f"{m}_p") for b, m in tests])):
            boot.adjusted[metric] = round(adjusted, 4)

    @property
    def columns(self) -> list[str]:
        tested = BOOTSTRAP_COLUMNS + (ADJUSTED_COLUMNS if self.correction != "none" else []) if self.baselines else []
        return BASE_COLUMNS + self.option_keys + SCORE_COLUMNS + tested

    def rows(self) -> list[dict]:
        """One row per run: identity, distinguishing options, scores (numbers), bootstrap p-values."""
        table = []
        for run in self.runs:
            row = {"run_name": run.name, "method": run.method, "models": run.models}
            row.update({key: run.options.cell(key) for key in self.option_keys})
            row.update({key: run.metrics.get(key) for key in SCORE_COLUMNS})
            row["forward_passes"] = run.forward_passes
            # one stat: the speculative method's, or a speculative ensemble's (decoding.num_draft_tokens)
            row["acceptance_rate"] = run.metrics.get("acceptance_rate",
                                                     (run.metrics.get("speculation") or {}).get("acceptance_rate"))
            if self.baselines:
                boot, base = self.bootstraps.get(run.name), self.baselines.get(run.name)
                row.update(baseline=base.name if base and base is not run else None,
                           bleu_delta=boot and boot.bleu_delta, bleu_p=boot and boot.bleu_p,
                           chrf_delta=boot and boot.chrf_delta, chrf_p=boot and boot.chrf_p,
                           bootstrap_segments=boot and boot.segments)
                if self.correction != "none":
                    row.update(bleu_p_adj=boot and boot.adjusted.get("bleu"),
                               chrf_p_adj=boot and boot.adjusted.get("chrf"))
            table.append(row)
        return table

    def significance_note(self) -> str:
        """Which p-values the markers use: the correction and its family, or none."""
        if self.correction == "none":
            return "raw p-values, no multiple-comparison correction (--correction none)"
        return (f"p-values Holm–Bonferroni-adjusted over the {self.tests} tests of this table (BLEU and chrF of each "
                "tested run; columns *_p_adj, raw p in *_p)")

    def to_markdown(self) -> str:
        p_shown = ("bleu_p_adj", "chrf_p_adj") if self.correction != "none" else ("bleu_p", "chrf_p")
        shown = [c for c in self.columns if c not in BOOTSTRAP_COLUMNS + ADJUSTED_COLUMNS
                 or c in ("bleu_delta", "chrf_delta", *p_shown)]
        lines = [f"> warning: {w}" for w in self.warnings] + ([""] if self.warnings else [])
        lines += ["| " + " | ".join(map(_markdown_cell, shown)) + " |", "|" + "---|" * len(shown)]
        for run, row in zip(self.runs, self.rows()):
            cells = []
            for column in shown:
                text = _format(column, row[column])
                boot = self.bootstraps.get(run.name)
                if column in ("bleu", "chrf") and boot and boot.marker(column):
                    text += f" {boot.marker(column)}"
                is_baseline = run in self.baselines.values() and column == "run_name"
                cells.append(_markdown_cell("**baseline** " + text if is_baseline else text))
            lines.append("| " + " | ".join(cells) + " |")
        if self.baselines:
            lines.append(f"\n▲ / ▼: BLEU or chrF significantly better / worse than {self.baseline_rule} "
                         f"(sacrebleu paired bootstrap, {BOOTSTRAP_SAMPLES} resamples, p < {SIGNIFICANCE}, on the "
                         f"segments both runs have, when there are at least {BOOTSTRAP_MIN_SEGMENTS}); "
                         f"{self.significance_note()}; deltas are run minus baseline; baselines in report.csv.")
        if self.domains:
            lines += ["", "## Per domain (BLEU / chrF, segments)", ""]
            names = sorted({d for scores in self.domains.values() for d in scores})
            lines += ["| run_name | " + " | ".join(map(_markdown_cell, names)) + " |", "|" + "---|" * (len(names) + 1)]
            for run_name, scores in self.domains.items():
                cells = [f"{s['bleu']:.2f} / {s['chrf']:.2f} ({s['segments']})" if (s := scores.get(d)) else "—"
                         for d in names]
                lines.append(f"| {_markdown_cell(run_name)} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def domain_rows(self) -> list[dict]:
        return [{"run_name": name, "domain": domain, **{k: s.get(k) for k in ("segments", "bleu", "chrf", "comet")}}
                for name, scores in self.domains.items() for domain, s in scores.items()]

    def write(self, folder: Path) -> list[Path]:
        md, csv_path = folder / "report.md", folder / "report.csv"
        write_atomically(md, self.to_markdown())
        _write_csv(csv_path, self.columns, self.rows())
        paths = [md, csv_path]
        if self.domains:
            paths.append(_write_csv(folder / "report_domains.csv", ["run_name", "domain", "segments", "bleu", "chrf",
                                                                    "comet"], self.domain_rows()))
        paths.append(self.plot(folder / "report.png"))
        return paths

    def figure(self):
        """BLEU and chrF (and COMET when every run has it) against tokens/s, one panel each. Points are
        coloured by method (legend) and numbered; the key beside the panels gives each number's short
        label (method, models where they differ, the options that tell runs of that method apart).
        Runs at the same point share one number label. The figure grows until every text fits."""
        from eval.plots import label_text, use_cjk_font

        use_cjk_font()
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D

        metrics = ["bleu", "chrf"] + (["comet"] if all(run.metrics.get("comet") is not None for run in self.runs)
                                      else [])
        plotted = [(n, run, label) for n, (run, label) in enumerate(zip(self.runs, short_labels(self.runs)), 1)
                   if run.metrics.get("tokens_per_s") is not None]
        methods = list(dict.fromkeys(run.method for _, run, _ in plotted))
        colours = plt.get_cmap("tab10")

        def colour(method: str):
            return colours(methods.index(method) % 10)

        key = [(f"{n:>2}  " + textwrap.fill(label_text(label), KEY_WIDTH, subsequent_indent="    "), colour(run.method))
               for n, run, label in plotted]
        key_lines = sum(text.count("\n") + 1 for text, _ in key)
        width, height = 4.2 * len(metrics) + 4.2, max(4.5, 0.17 * key_lines + 2.2)
        fig = plt.figure(figsize=(width, height), dpi=PLOT_DPI)  # measured at the resolution it is saved at
        panels = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, metric in zip(panels, metrics):
            positions: dict[tuple, list[int]] = {}
            for n, run, _ in plotted:
                if (y := run.metrics.get(metric)) is None:
                    continue
                x = run.metrics["tokens_per_s"]
                ax.scatter(x, y, s=36, color=colour(run.method), zorder=3)
                positions.setdefault((round(x, 6), round(y, 6)), []).append(n)
            for (x, y), numbers in positions.items():
                ax.annotate(",".join(map(str, numbers)), (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
            ax.set_xlabel("tokens / s")
            ax.set_title({"bleu": "BLEU", "chrf": "chrF", "comet": "COMET"}[metric])
            ax.grid(alpha=0.3)
            ax.margins(0.12)
        fig.suptitle("quality vs speed", fontsize=11)
        handles = [Line2D([], [], marker="o", linestyle="", color=colour(m), label=m) for m in methods]
        legend = fig.legend(handles=handles, title="method", loc="upper left", fontsize=8, title_fontsize=8,
                            frameon=False)
        texts = [fig.text(0, 0, text, fontsize=7, color=c, va="top", family="monospace") for text, c in key]
        fit_key_beside(fig, panels, legend, texts)
        return fig

    def plot(self, path: Path) -> Path:
        import matplotlib.pyplot as plt

        fig = self.figure()
        fig.savefig(path, dpi=PLOT_DPI)
        plt.close(fig)
        return path


def fit_key_beside(fig, panels, legend, texts, pad_in: float = 0.15) -> None:
    """Place the legend and the key texts in a column right of the panels, and widen / heighten the
    figure until the column, the panels' tick labels and titles all lie inside it."""
    for _ in range(4):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        dpi = fig.dpi
        legend_box = legend.get_window_extent(renderer)
        column = max([legend_box.width] + [t.get_window_extent(renderer).width for t in texts]) / dpi + 2 * pad_in
        column_height = (legend_box.height + sum(t.get_window_extent(renderer).height for t in texts)) / dpi + 1.0
        width, height = fig.get_size_inches()
        width, height = max(width, 3.2 * len(panels) + column), max(height, column_height)
        fig.set_size_inches(width, height)
        right = 1 - column / width
        fig.subplots_adjust(left=0.6 / width, right=right - 0.3 / width, bottom=0.7 / height, top=1 - 0.7 / height,
                            wspace=0.28)
        legend.set_bbox_to_anchor((right, 1 - 0.4 / height), transform=fig.transFigure)
        fig.canvas.draw()
        y = legend.get_window_extent(fig.canvas.get_renderer()).y0 / (height * dpi) - 0.1 / height
        for text in texts:
            text.set_position((right + pad_in / width, y))
            y -= text.get_window_extent(fig.canvas.get_renderer()).height / (height * dpi) + 0.03 / height
        if all(inside(fig, artist) for artist in [legend, *texts, *fig.texts]):
            return


def inside(fig, artist) -> bool:
    """Whether the artist's rendered extent lies within the figure's canvas."""
    box, canvas = artist.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    return (box.x0 >= canvas.x0 - 0.5 and box.y0 >= canvas.y0 - 0.5
            and box.x1 <= canvas.x1 + 0.5 and box.y1 <= canvas.y1 + 0.5)


def short_labels(runs: list[Run]) -> list[str]:
    """Short names for figures: the method, the models when the runs' models differ, and the options
    whose values differ between the runs of that method (``unite top_k=5``); an option the run lacks is
    left out."""
    show_models = len({run.models for run in runs}) > 1
    labels = []
    for run in runs:
        same_method = [r for r in runs if r.method == run.method]
        keys = [key for key in distinguishing_options(same_method)
                if len({r.options.values.get(key) for r in same_method}) > 1]
        parts = [run.method] + ([run.models] if show_models else [])
        parts += [f"{key}={run.options.values[key]}" for key in keys if key in run.options.values]
        labels.append(" ".join(parts))
    return labels


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def log_report(report: Report, folder: Path, project: str) -> None:
    """The report table and per-domain scores as W&B Tables and the plot, in one run of the runs' sweep group."""
    from eval.wandb_logger import LoggerConfig, RunLogger

    sweeps = {run.sweep for run in report.runs}
    group = sweeps.pop() if len(sweeps) == 1 else None
    logger = RunLogger(LoggerConfig(project=project, group=group, tags=["report"]), f"report-{folder.resolve().name}",
                       config={"folder": str(folder), "baselines": report.baseline_rule},
                       out_dir=folder)
    tables = {"report": (report.columns, [[row[c] for c in report.columns] for row in report.rows()])}
    if report.domains:
        columns = ["run_name", "domain", "segments", "bleu", "chrf", "comet"]
        tables["report_domains"] = (columns, [[row[c] for c in columns] for row in report.domain_rows()])
    logger.log_review(tables=tables, images={"report_plot": folder / "report.png"})
    logger.finish()


def select_runs(paths: list[Path], output: Optional[Path]) -> tuple[list[Run], Path]:
    """The runs to report and the folder to write into: one folder's runs, or exactly the given results files."""
    if len(paths) == 1 and (paths[0].is_dir() or paths[0].suffix != ".jsonl"):
        return find_runs(paths[0]), output or paths[0]  # a folder (one that is not says so)
    if folders := [p for p in paths if p.is_dir()]:
        raise FusemtError(f"{folders[0]} is a folder: pass one folder, or results JSONL files")
    if output is None:
        raise FusemtError("results files given: say where the report goes with -o <folder>")
    return [Run.from_results(path) for path in dict.fromkeys(p.resolve() for p in paths)], output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One comparison table (markdown + CSV), per-domain scores, paired "
                                                 "bootstrap against a baseline, and a quality-vs-speed plot.")
    parser.add_argument("paths", type=Path, nargs="*", default=[Path("results")], metavar="FOLDER_OR_RESULTS",
                        help="a folder (every run under it with a metrics file), or results JSONL files (exactly "
                             "these runs, e.g. the ones a sweep's summary lists)")
    parser.add_argument("-o", "--output", type=Path, help="folder for report.md/.csv/.png (default: the folder given)")
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline",
                          help="run name (or a part of exactly one) to mark significant differences against")
    baseline.add_argument("--member-baselines", action="store_true",
                          help="test each ensemble against the best greedy single-model run of its members")
    parser.add_argument("--member-ranking", type=Path, metavar="COMPAT_JSON",
                        help="with --member-baselines: rank the members by this fusemt-compat result (e.g. on a dev "
                             "slice) instead of by their scores in this table")
    parser.add_argument("--correction", choices=CORRECTIONS, default="holm",
                        help="multiple-comparison correction over the table's tests (default: holm = Holm–Bonferroni)")
    parser.add_argument("--wandb", action="store_true", help="also log the tables and the plot to W&B")
    parser.add_argument("--wandb-project", default="fusemt")
    args = parser.parse_args(argv)
    if args.member_ranking and not args.member_baselines:
        parser.error("--member-ranking goes with --member-baselines")
    try:
        runs, folder = select_runs(args.paths, args.output)
        ranking = read_member_ranking(args.member_ranking) if args.member_ranking else None
        report = Report.build(runs, args.baseline, args.member_baselines, args.correction,
                              ranking, ranking_source=str(args.member_ranking))
        folder.mkdir(parents=True, exist_ok=True)
        paths = report.write(folder)
    except (FusemtError, OSError) as err:  # an OS error: a read-only folder, a full disk, ...
        fail(err)
    for warning in report.warnings:
        print(f"fusemt: warning: {warning}", file=sys.stderr)
    if args.wandb:
        log_report(report, folder, args.wandb_project)
    print(report.to_markdown(), end="")
    print("\n".join(f"wrote {p}" for p in paths))


if __name__ == "__main__":
    main()
