"""Collect every run under a folder into one comparison: a table with the options that tell the runs
apart, per-domain scores, paired-bootstrap markers against a baseline, and a quality-vs-speed plot.

    python -m eval.report results/ [--baseline unite__gemma3_270m+smollm2_135m] [--wandb]

writes ``report.md``, ``report.csv``, ``report_domains.csv`` (when the results rows carry a
``domain``) and ``report.png`` into that folder; ``--wandb`` also logs the tables (W&B Tables) and
the plot as one W&B run in the runs' sweep group.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from decoding.errors import FusemtError, fail
from eval.jsonio import read_json_object, read_jsonl_objects
from eval.metrics import corpus_scores

ROW_KEYS = ("id", "source", "hypothesis")  # what every results line has and the pages show
RESULTS_FIX = "pass a fusemt results JSONL, or fix or delete that line (rerunning the config rewrites a deleted segment)"
METRICS_FIX = "fix or delete that file (rerunning its config rewrites it), then rerun the report"
METRICS_SUFFIX = ".metrics.json"
BASE_COLUMNS = ["run_name", "method", "models"]
SCORE_COLUMNS = ["dataset", "segments", "bleu", "chrf", "comet", "tokens_per_s", "forward_passes", "acceptance_rate",
                 "agreement_rate", "latin_share", "non_japanese_share"]
BOOTSTRAP_COLUMNS = ["baseline", "bleu_delta", "bleu_p", "chrf_delta", "chrf_p", "bootstrap_segments"]
# Options shown whenever a run has them; any other option is shown when its values differ between runs.
KEY_OPTIONS = ("weights", "top_k", "num_beams")
# Overrides outside these change nothing the runs are compared on (selection, batching, logging).
OPTION_PREFIXES = ("decoding.", "prompt.")
SIGNIFICANCE = 0.05
BOOTSTRAP_SAMPLES = 1000
# Resampling a handful of segments has only a handful of distinct outcomes: no marker below this many.
BOOTSTRAP_MIN_SEGMENTS = 20


def read_rows(path: Path) -> list[dict]:
    """The segments of a results JSONL (one-line errors naming file, line and fix)."""
    if not path.is_file():
        raise FusemtError(f"results file {path} not found: pass a results/.../<run_name>.jsonl")
    rows = read_jsonl_objects(path, RESULTS_FIX, required=ROW_KEYS)
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
        metrics = read_json_object(metrics_path, METRICS_FIX) if metrics_path.exists() else {}
        return cls(results, metrics, rows, read_segment_comet(results))

    @classmethod
    def from_metrics(cls, metrics_path: Path) -> "Run":
        results = metrics_path.with_name(metrics_path.name.removesuffix(METRICS_SUFFIX) + ".jsonl")
        metrics = read_json_object(metrics_path, METRICS_FIX)
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
        comet = [run.segment_comet[str(r["id"])] for r in rows if run.segment_comet and str(r["id"]) in run.segment_comet]
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

    def marker(self, metric: str) -> str:
        """▲ / ▼: significantly better / worse than the baseline (p < 0.05, on enough segments); nothing otherwise."""
        delta, p = getattr(self, f"{metric}_delta"), getattr(self, f"{metric}_p")
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


def best_member_run(runs: list[Run], run: Run) -> Optional[Run]:
    """For an ensemble: the best (BLEU, then chrF) single-model run of one of its members on the same
    dataset that searched as it did: greedy, or for an ensemble beam search (``num_beams`` > 1)
    beam search with as many beams; None for a single-model run or when no member ran alone so."""
    members = run.members
    if len(members) < 2:
        return None
    beams = run.options.values.get("num_beams", "1")
    singles = [r for r in runs if r.dataset == run.dataset and len(r.members) == 1 and r.members[0] in members
               and (r.method == "greedy" if beams == "1" else
                    r.method == "beam" and r.options.values.get("num_beams", "4") == beams)]
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


def _format(column: str, value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    digits = 4 if column in ("comet", "bleu_p", "chrf_p") else 3 if column.endswith("_rate") else 2
    return f"{value:.{digits}f}"


@dataclass
class Report:
    runs: list[Run]
    option_keys: list[str]
    baselines: dict[str, Run] = field(default_factory=dict)  # run name -> the run it is tested against
    bootstraps: dict[str, Bootstrap] = field(default_factory=dict)  # by run name
    baseline_rule: str = ""  # how the baselines were chosen, for the legend
    domains: dict[str, dict[str, dict]] = field(default_factory=dict)  # run name -> domain -> scores

    @classmethod
    def build(cls, runs: list[Run], baseline: Optional[str] = None, member_baselines: bool = False) -> "Report":
        """``baseline``: every run is tested against that run; ``member_baselines``: each ensemble
        against the best single-model run of its members that searched alike (``best_member_run``)."""
        runs = sorted(runs, key=lambda r: (r.dataset or "", -(r.metrics.get("bleu") or 0), r.name))
        report = cls(runs, distinguishing_options(runs))
        if baseline is not None:
            chosen = pick_run(runs, baseline)
            report.baselines = {run.name: chosen for run in runs if run.dataset == chosen.dataset}
            report.baseline_rule = f"the baseline {chosen.name}"
        elif member_baselines:
            report.baselines = {run.name: base for run in runs if (base := best_member_run(runs, run))}
            report.baseline_rule = ("the best single member of the run's ensemble, searching as the ensemble did "
                                    "(greedy, or beam search with as many beams; column baseline)")
        for run in runs:
            if run.name in report.baselines and (result := paired_bootstrap(report.baselines[run.name], run)):
                report.bootstraps[run.name] = result
        report.domains = {run.name: scores for run in runs if (scores := per_domain(run))}
        return report

    @property
    def columns(self) -> list[str]:
        return BASE_COLUMNS + self.option_keys + SCORE_COLUMNS + (BOOTSTRAP_COLUMNS if self.baselines else [])

    def rows(self) -> list[dict]:
        """One row per run: identity, distinguishing options, scores (numbers), bootstrap p-values."""
        table = []
        for run in self.runs:
            row = {"run_name": run.name, "method": run.method, "models": run.models}
            row.update({key: run.options.cell(key) for key in self.option_keys})
            row.update({key: run.metrics.get(key) for key in SCORE_COLUMNS})
            row["forward_passes"] = run.forward_passes
            # one stat: the speculative method's, or a speculative ensemble's (decoding.num_draft_tokens)
            row["acceptance_rate"] = run.metrics.get("acceptance_rate", (run.metrics.get("speculation") or {}).get("acceptance_rate"))
            if self.baselines:
                boot, base = self.bootstraps.get(run.name), self.baselines.get(run.name)
                row.update(baseline=base.name if base and base is not run else None,
                           bleu_delta=boot and boot.bleu_delta, bleu_p=boot and boot.bleu_p,
                           chrf_delta=boot and boot.chrf_delta, chrf_p=boot and boot.chrf_p,
                           bootstrap_segments=boot and boot.segments)
            table.append(row)
        return table

    def to_markdown(self) -> str:
        shown = [c for c in self.columns if c not in BOOTSTRAP_COLUMNS or c in ("bleu_delta", "chrf_delta", "chrf_p")]
        lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
        for run, row in zip(self.runs, self.rows()):
            cells = []
            for column in shown:
                text = _format(column, row[column])
                boot = self.bootstraps.get(run.name)
                if column in ("bleu", "chrf") and boot and boot.marker(column):
                    text += f" {boot.marker(column)}"
                is_baseline = run in self.baselines.values() and column == "run_name"
                cells.append("**baseline** " + text if is_baseline else text)
            lines.append("| " + " | ".join(cells) + " |")
        if self.baselines:
            lines.append(f"\n▲ / ▼: BLEU or chrF significantly better / worse than {self.baseline_rule} "
                         f"(sacrebleu paired bootstrap, {BOOTSTRAP_SAMPLES} resamples, p < {SIGNIFICANCE}, on the "
                         f"segments both runs have, when there are at least {BOOTSTRAP_MIN_SEGMENTS}); deltas are "
                         "run minus baseline; baselines and BLEU p-values in report.csv.")
        if self.domains:
            lines += ["", "## Per domain (BLEU / chrF, segments)", ""]
            names = sorted({d for scores in self.domains.values() for d in scores})
            lines += ["| run_name | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
            for run_name, scores in self.domains.items():
                cells = [f"{s['bleu']:.2f} / {s['chrf']:.2f} ({s['segments']})" if (s := scores.get(d)) else "—"
                         for d in names]
                lines.append(f"| {run_name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def domain_rows(self) -> list[dict]:
        return [{"run_name": name, "domain": domain, **{k: s.get(k) for k in ("segments", "bleu", "chrf", "comet")}}
                for name, scores in self.domains.items() for domain, s in scores.items()]

    def write(self, folder: Path) -> list[Path]:
        md, csv_path = folder / "report.md", folder / "report.csv"
        md.write_text(self.to_markdown(), encoding="utf-8")
        _write_csv(csv_path, self.columns, self.rows())
        paths = [md, csv_path]
        if self.domains:
            paths.append(_write_csv(folder / "report_domains.csv", ["run_name", "domain", "segments", "bleu", "chrf",
                                                                    "comet"], self.domain_rows()))
        paths.append(self.plot(folder / "report.png"))
        return paths

    def figure(self):
        """Quality (COMET when every run has it, else BLEU) against tokens/s; each point's label sits in
        the right margin at its own height, spread apart so that no two labels overlap."""
        from eval.plots import label_text, use_cjk_font

        use_cjk_font()
        import matplotlib.pyplot as plt

        quality = "comet" if all(run.metrics.get("comet") is not None for run in self.runs) else "bleu"
        labels = run_labels(self.runs, self.option_keys)
        points = [(run.metrics["tokens_per_s"], run.metrics[quality], label, run.method)
                  for run, label in zip(self.runs, labels)
                  if run.metrics.get("tokens_per_s") is not None and run.metrics.get(quality) is not None]
        fig, ax = plt.subplots(figsize=(10, max(4.5, 0.22 * len(points) + 1.5)))
        fig.subplots_adjust(left=0.08, right=0.58, top=0.92, bottom=0.12)
        methods = list(dict.fromkeys(p[3] for p in points))
        colours = plt.get_cmap("tab10")
        for x, y, _, method in points:
            ax.scatter(x, y, s=40, color=colours(methods.index(method) % 10), zorder=3)
        ax.set_xlabel("tokens / s")
        ax.set_ylabel("BLEU" if quality == "bleu" else "COMET")
        ax.set_title("quality vs speed")
        ax.grid(alpha=0.3)
        if points:
            ax.margins(0.15)
            fig.canvas.draw()  # fixes the limits the data -> axes-fraction transform below uses
            to_axes = ax.transData + ax.transAxes.inverted()
            heights = [to_axes.transform((x, y))[1] for x, y, _, _ in points]
            line_height = 7 * 1.5 / (ax.get_window_extent().height * 72 / fig.dpi)  # 7-pt text, in axes fraction
            for (x, y, label, method), height in zip(points, spread(heights, line_height)):
                ax.annotate(label_text(label), (x, y), xytext=(1.04, height), textcoords="axes fraction", fontsize=7,
                            va="center", annotation_clip=False, color=colours(methods.index(method) % 10),
                            arrowprops={"arrowstyle": "-", "color": "#999", "lw": 0.6, "shrinkA": 0, "shrinkB": 3})
        return fig

    def plot(self, path: Path) -> Path:
        import matplotlib.pyplot as plt

        fig = self.figure()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def spread(heights: list[float], gap: float, low: float = 0.0, high: float = 1.0) -> list[float]:
    """Label heights as close to ``heights`` as keeps every two at least ``gap`` apart, in the same
    order, inside [low, high] where the labels fit there."""
    order = sorted(range(len(heights)), key=lambda i: heights[i])
    placed: list[float] = []
    for i in order:
        placed.append(max(heights[i], placed[-1] + gap) if placed else heights[i])
    if not placed:
        return []
    # centre the column on the points it labels (pushing up alone drifts it upwards), then keep it inside
    shift = (sum(heights) - sum(placed)) / len(placed)
    shift -= max(placed[-1] + shift - high, 0.0)
    shift += max(low - (placed[0] + shift), 0.0)
    result = [0.0] * len(heights)
    for i, height in zip(order, placed):
        result[i] = height + shift
    return result


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One comparison table (markdown + CSV), per-domain scores, paired "
                                                 "bootstrap against a baseline, and a quality-vs-speed plot.")
    parser.add_argument("folder", type=Path, nargs="?", default=Path("results"))
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", help="run name (or a part of exactly one) to mark significant differences against")
    baseline.add_argument("--member-baselines", action="store_true",
                          help="test each ensemble against the best greedy single-model run of its members")
    parser.add_argument("--wandb", action="store_true", help="also log the tables and the plot to W&B")
    parser.add_argument("--wandb-project", default="fusemt")
    args = parser.parse_args(argv)
    try:
        report = Report.build(find_runs(args.folder), args.baseline, args.member_baselines)
        paths = report.write(args.folder)
    except FusemtError as err:
        fail(err)
    if args.wandb:
        log_report(report, args.folder, args.wandb_project)
    print(report.to_markdown(), end="")
    print("\n".join(f"wrote {p}" for p in paths))


if __name__ == "__main__":
    main()
