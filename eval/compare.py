"""Compare runs segment by segment on one HTML page.

    python -m eval.compare results/sample/ensemble/                  # every run there with a metrics file
    python -m eval.compare a.jsonl b.jsonl c.jsonl [-o compare.html] [--baseline RUN] [--wandb]

Per segment: source, reference and each run's hypothesis side by side (characters that differ from
the baseline run highlighted), with sentence chrF/BLEU, COMET where scored, and flags; the page
sorts by the score difference between two runs chosen on it (also from the address:
``compare.html?sort=chrf&a=1&b=2&order=desc``). A header table gives each run's corpus scores on
the segments every run has, and the options that tell the runs apart.
"""

from __future__ import annotations

import argparse
import difflib
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from decoding.errors import FusemtError, fail
from eval.jsonio import write_atomically
from eval.metrics import corpus_scores
from eval.report import (
    BOOTSTRAP_MIN_SEGMENTS,
    SIGNIFICANCE,
    Bootstrap,
    Run,
    distinguishing_options,
    find_runs,
    holm,
    paired_bootstrap,
    pick_run,
    run_labels,
)
from eval.trace import PAGE_STYLE, SORT_SCRIPT, SegmentReview, flag_badges, review_segments, step_limit

SCORES = (("chrf", "chrF", 1), ("bleu", "BLEU", 1), ("comet", "COMET", 3))


def load_runs(paths: list[Path]) -> list[Run]:
    """The runs named on the command line: results JSONL files, or one folder (its runs with a metrics file)."""
    if len(paths) == 1 and paths[0].is_dir():
        runs = find_runs(paths[0])
        if missing := [run.results for run in runs if run.rows is None]:
            raise FusemtError(f"{missing[0]} is missing (its metrics file is there): rerun that config or delete "
                              "its metrics file")
    else:
        if folders := [p for p in paths if p.is_dir()]:
            raise FusemtError(f"{folders[0]} is a folder: pass one folder, or results JSONL files")
        runs = [Run.from_results(path) for path in dict.fromkeys(p.resolve() for p in paths)]
    if len(runs) < 2:
        raise FusemtError(f"{len(runs)} run found in {' '.join(map(str, paths))}: a comparison needs two or more")
    datasets = sorted({run.dataset for run in runs if run.dataset})
    if len(datasets) > 1:
        raise FusemtError(f"the runs translate different datasets ({', '.join(datasets)}): compare the runs of one "
                          "dataset (e.g. the folder results/<group>/ensemble of one of them)")
    _check_same_texts(runs)
    return runs


def _check_same_texts(runs: list[Run]) -> None:
    """Runs are compared segment by segment, by id: a segment must be the same text in every run. Two
    files that share a dataset name (or a dataset edited between runs) would otherwise be compared as one."""
    first: dict[str, tuple[Run, dict]] = {}
    for run in runs:
        for row in run.rows:
            seen = first.setdefault(row["id"], (run, row))
            for key in ("source", "reference"):
                if row.get(key) != seen[1].get(key):
                    raise FusemtError(f"segment '{row['id']}' has another {key} in {run.results} than in "
                                      f"{seen[0].results}: the runs translate different data: compare runs of one "
                                      "dataset file")


def diff_marks(hypothesis: str, baseline: str) -> str:
    """The hypothesis with the characters that differ from the baseline's hypothesis marked."""
    parts = []
    for op, a0, a1, _, _ in difflib.SequenceMatcher(None, hypothesis, baseline, autojunk=False).get_opcodes():
        text = html.escape(hypothesis[a0:a1])
        parts.append(text if op == "equal" else f"<mark>{text}</mark>" if text else "")
    return "".join(parts)


@dataclass
class Comparison:
    runs: list[Run]
    labels: list[str]
    option_keys: list[str]
    baseline: int  # index of the run the highlighting compares with
    ids: list[str]  # every segment id, in the order the runs first have them
    reviews: list[dict[str, SegmentReview]]  # per run: segment id -> scores and flags
    common: list[str]  # the ids every run has with a reference
    bootstraps: dict[int, Bootstrap] = field(default_factory=dict)  # run index -> paired bootstrap vs the baseline

    @classmethod
    def build(cls, runs: list[Run], baseline: Optional[str] = None) -> "Comparison":
        keys = distinguishing_options(runs)
        base = runs.index(pick_run(runs, baseline)) if baseline else 0
        ids = list(dict.fromkeys(str(r["id"]) for run in runs for r in run.rows))
        reviews = []
        for run in runs:
            scored = review_segments(run.rows, run.segment_comet, step_limit(run.options))
            reviews.append({str(r["id"]): review for r, review in zip(run.rows, scored)})
        scored_ids = [run.scored() for run in runs]
        common = [i for i in ids if all(i in scored for scored in scored_ids)]
        # Corpus-level significance against the baseline, Holm-corrected over the page's tests (BLEU, chrF per run).
        bootstraps = {n: boot for n, run in enumerate(runs)
                      if n != base and (boot := paired_bootstrap(runs[base], run))}
        tests = [(boot, metric) for boot in bootstraps.values() for metric in ("bleu", "chrf")]
        for (boot, metric), adjusted in zip(tests, holm([getattr(b, f"{m}_p") for b, m in tests])):
            boot.adjusted[metric] = round(adjusted, 4)
        return cls(runs, run_labels(runs, keys), keys, base, ids, reviews, common, bootstraps)

    def __post_init__(self):
        # per run: segment id -> results row
        self._by_id = [{str(r["id"]): r for r in run.rows} for run in self.runs]

    def header_rows(self) -> list[dict]:
        """Per run: its label, name, options and corpus BLEU/chrF on the segments every run has."""
        rows = []
        for n, (run, label) in enumerate(zip(self.runs, self.labels), 1):
            scored = run.scored()
            corpus = corpus_scores([scored[i]["hypothesis"] for i in self.common],
                                   [scored[i]["reference"] for i in self.common]) if self.common else {}
            rows.append({"run": n, "label": label, "run_name": run.name, "method": run.method, "models": run.models,
                         **{key: run.options.cell(key) for key in self.option_keys},
                         "segments": len(run.rows), "common_segments": len(self.common), "bleu": corpus.get("bleu"),
                         "chrf": corpus.get("chrf"), "comet": run.metrics.get("comet"),
                         "tokens_per_s": run.metrics.get("tokens_per_s"), "complete": run.metrics.get("complete"),
                         **self._significance(n - 1)})
        return rows

    def _significance(self, n: int) -> dict:
        """Run minus baseline in BLEU and chrF with the Holm-adjusted p of the paired bootstrap."""
        boot = self.bootstraps.get(n)
        return {"bleu_delta": boot and boot.bleu_delta, "bleu_p_adj": boot and boot.p("bleu"),
                "chrf_delta": boot and boot.chrf_delta, "chrf_p_adj": boot and boot.p("chrf"),
                "bootstrap_segments": boot and boot.segments}

    def segment_rows(self) -> tuple[list[str], list[list]]:
        """One row per segment: text, and per run its hypothesis and sentence scores (the W&B table)."""
        columns = ["id", "source", "reference"]
        for n in range(1, len(self.runs) + 1):
            columns += [f"run{n}_hypothesis"] + [f"run{n}_{key}" for key, _, _ in SCORES]
        data = []
        for segment in self.ids:
            first = next(self._by_id[n][segment] for n in range(len(self.runs)) if segment in self._by_id[n])
            cells = [segment, first["source"], first.get("reference")]
            for n in range(len(self.runs)):
                row, review = self._by_id[n].get(segment), self.reviews[n].get(segment)
                cells += [row and row["hypothesis"]] + [review and getattr(review, key) for key, _, _ in SCORES]
            data.append(cells)
        return columns, data

    # --- the page ----------------------------------------------------------------------------
    def _header_table(self) -> str:
        rows = self.header_rows()
        keys = ["run", "label", "run_name", *self.option_keys, "segments", "bleu", "chrf", "comet", "tokens_per_s",
                "complete"]  # the label names the models where they differ
        names = {"bleu": f"BLEU ({len(self.common)} common)", "chrf": f"chrF ({len(self.common)} common)",
                 "tokens_per_s": "tokens/s"}
        base = self.baseline + 1
        head = "".join(f"<th>{html.escape(names.get(k, k))}</th>" for k in keys)
        head += f"<th>ΔBLEU vs run {base} (p)</th><th>ΔchrF vs run {base} (p)</th>"

        def cell(key, value):
            if isinstance(value, float):
                return f'<td class="num">{value:.{4 if key == "comet" else 2}f}</td>'
            return f"<td>{'—' if value is None else html.escape(str(value))}</td>"

        def significance(row, metric):
            boot = self.bootstraps.get(row["run"] - 1)
            if boot is None:
                return '<td class="num">—</td>'
            marker = boot.marker(metric)
            text = f'{row[f"{metric}_delta"]:+.2f} (p={row[f"{metric}_p_adj"]:.3f}){" " + marker if marker else ""}'
            return f'<td class="num{" sig" if marker else ""}">{html.escape(text)}</td>'

        body = "".join("<tr>" + "".join(cell(k, row[k]) for k in keys) + significance(row, "bleu")
                       + significance(row, "chrf") + "</tr>" for row in rows)
        tests = 2 * len(self.bootstraps)
        note = (f'<p class="meta">Δ: run minus run {base} on the segments both have; p: sacrebleu paired bootstrap '
                f"(1000 resamples), Holm–Bonferroni-adjusted over the {tests} tests of this table; ▲/▼ where "
                f"p &lt; {SIGNIFICANCE} on at least {BOOTSTRAP_MIN_SEGMENTS} segments.</p>") if tests else ""
        return f'<table class="runs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}'

    def trace_link(self, n: int, segment: str, page_dir: Optional[Path]) -> Optional[str]:
        """The address of run ``n``'s trace page at ``segment`` (its section ``#seg<row>``), relative to
        the compare page's folder; None when the run has no trace page."""
        trace = self.runs[n].results.with_suffix(".trace.html")
        if page_dir is None or not trace.exists():
            return None
        position = next(i for i, r in enumerate(self.runs[n].rows) if str(r["id"]) == segment)
        return f"{Path(os.path.relpath(trace.resolve(), page_dir.resolve())).as_posix()}#seg{position}"

    def _run_cell(self, n: int, segment: str, best_chrf: Optional[float], page_dir: Optional[Path] = None) -> str:
        row, review = self._by_id[n].get(segment), self.reviews[n].get(segment)
        if row is None:
            return '<td class="hyp missing">— not in this run</td>'
        base = self._by_id[self.baseline].get(segment)
        if n == self.baseline or base is None:
            text = html.escape(row["hypothesis"])
        elif row["hypothesis"] == base["hypothesis"]:
            text = f'{html.escape(row["hypothesis"])} <span class="same">= run {self.baseline + 1}</span>'
        else:
            text = diff_marks(row["hypothesis"], base["hypothesis"])
        scores = []
        for key, name, digits in SCORES:
            value = getattr(review, key)
            if value is not None:
                shown = f"{name} {value:.{digits}f}"
                scores.append(f"<b>{shown}</b>" if key == "chrf" and value == best_chrf and len(self.runs) > 1
                              else shown)
        if link := self.trace_link(n, segment, page_dir):
            scores.append(f'<a class="trace" href="{html.escape(link)}">trace</a>')
        return (f'<td class="hyp"><div>{text or "<i>empty</i>"}</div><div class="scores">{" · ".join(scores)}</div>'
                f"{flag_badges(review.flags)}</td>")

    def _segment_row(self, order: int, segment: str, page_dir: Optional[Path] = None) -> str:
        rows = [self._by_id[n].get(segment) for n in range(len(self.runs))]
        reviews = [self.reviews[n].get(segment) for n in range(len(self.runs))]
        first = next(r for r in rows if r is not None)
        data = [f'data-order="{order}"']
        for n, review in enumerate(reviews, 1):
            data += [f'data-{key}{n}="{"" if review is None or getattr(review, key) is None else getattr(review, key)}"'
                     for key, _, _ in SCORES]
        hypotheses = {r["hypothesis"] for r in rows if r is not None}
        data.append(f'data-differ="{int(len(hypotheses) > 1)}"')
        data.append(f'data-flagged="{int(any(r is not None and r.flags for r in reviews))}"')
        chrfs = [r.chrf for r in reviews if r is not None and r.chrf is not None]
        cells = "".join(self._run_cell(n, segment, max(chrfs) if chrfs else None, page_dir)
                        for n in range(len(self.runs)))
        reference = first.get("reference")
        return (f'<tr {" ".join(data)}><td class="num">{order}</td><td class="text"><div class="sid">'
                f'{html.escape(segment)}</div><div>{html.escape(first["source"])}</div>'
                f'<div class="ref">{html.escape(reference) if reference is not None else "<i>no reference</i>"}'
                '</div></td>'
                f'{cells}<td class="num delta"></td></tr>')

    def render(self, title: str, page_dir: Optional[Path] = None) -> str:
        """The page; with ``page_dir`` (where it is written) each hypothesis links to its run's trace page."""
        options = "".join(f'<option value="{n}">{n}: {html.escape(label)}</option>'
                          for n, label in enumerate(self.labels, 1))
        other = next((n for n in range(len(self.runs)) if n != self.baseline), self.baseline)
        run_heads = "".join(f"<th>{n}: {html.escape(label)}</th>" for n, label in enumerate(self.labels, 1))
        body = "".join(self._segment_row(order, segment, page_dir) for order, segment in enumerate(self.ids))
        dataset = next((run.dataset for run in self.runs if run.dataset), "")
        return f"""<!DOCTYPE html>
<html lang="ja"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{PAGE_STYLE}{COMPARE_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="meta">{len(self.runs)} runs on {html.escape(dataset or "?")} · {len(self.ids)} segments, \
{len(self.common)} in
every run with a reference (corpus scores below are on those)</div>
{self._header_table()}
<p class="meta">In each hypothesis, <mark>highlighted</mark> characters differ from run \
{self.baseline + 1}'s hypothesis.
Per segment: sentence chrF and BLEU (sacrebleu, ja-mecab, effective order), COMET where scored; \
the best chrF in bold.</p>
<div class="controls">sort by <select id="metric"><option value="chrf">chrF</option><option value="bleu">BLEU</option>
<option value="comet">COMET</option></select> difference Δ = run <select id="b">{options}</select> − run
<select id="a">{options}</select> <select id="order"><option value="desc">largest Δ first</option>
<option value="asc">smallest Δ first</option><option value="file">file order</option></select>
<label><input type="checkbox" id="differ"> only where hypotheses differ</label>
<label><input type="checkbox" id="flagged"> flagged only</label></div>
<table class="compare"><thead><tr><th>#</th><th>source / reference</th>{run_heads}<th>Δ</th></tr></thead>
<tbody data-segments>{body}</tbody></table>
<script>const DEFAULT_A = {self.baseline + 1}, DEFAULT_B = {other + 1};
{SORT_SCRIPT}{COMPARE_SCRIPT}</script>
</body></html>
"""


COMPARE_STYLE = """
body { max-width: none; }
table.runs { width: 100%; } table.runs td:nth-child(3) { word-break: break-all; font-size: 0.9em; }
table.runs td:nth-child(2), table.compare th { overflow-wrap: anywhere; white-space: normal; }
td.sig { font-weight: bold; } a.trace { font-size: 0.85em; }
table.compare { width: 100%; table-layout: fixed; } table.compare td { vertical-align: top; }
table.compare th:first-child { width: 2.5em; } table.compare th:last-child { width: 4em; }
.hyp div:first-child { font-size: 1.05em; } .ref { color: #555; margin-top: 0.3em; } \
.sid { color: #888; font-size: 0.8em; }
mark { background: #ffe066; } .same { color: #888; font-size: 0.8em; } .missing { color: #999; }
.scores b { color: #064; }
"""

COMPARE_SCRIPT = """
const params = new URLSearchParams(location.search);
for (const [id, fallback] of [["metric", "chrf"], ["a", DEFAULT_A], ["b", DEFAULT_B], ["order", "desc"]])
  document.getElementById(id).value = params.get(id === "metric" ? "sort" : id) || fallback;
for (const id of ["differ", "flagged"]) document.getElementById(id).checked = params.get(id) === "1";
function applyView() {
  const metric = document.getElementById("metric").value;
  const a = document.getElementById("a").value, b = document.getElementById("b").value;
  const order = document.getElementById("order").value;
  const differ = document.getElementById("differ").checked, flagged = document.getElementById("flagged").checked;
  const container = document.querySelector("[data-segments]");
  for (const row of container.children) {
    const x = fusemtValue(row, metric + a), y = fusemtValue(row, metric + b);
    row.dataset.delta = x === null || y === null ? "" : (y - x).toFixed(2);
    row.querySelector(".delta").textContent = row.dataset.delta;
  }
  const keep = row => (!differ || row.dataset.differ === "1") && (!flagged || row.dataset.flagged === "1");
  fusemtReorder(container, order === "file" ? "order" : "delta", order === "desc", keep);
}
for (const id of ["metric", "a", "b", "order", "differ", "flagged"])
  document.getElementById(id).addEventListener("input", applyView);
applyView();
"""


def default_output(paths: list[Path]) -> Path:
    if len(paths) == 1 and paths[0].is_dir():
        return paths[0] / "compare.html"
    return Path(os.path.commonpath([p.resolve().parent for p in paths])) / "compare.html"


def log_compare(comparison: Comparison, page: Path, project: str) -> None:
    """The page as HTML media and the run and segment tables as W&B Tables, in the runs' sweep group."""
    from eval.wandb_logger import LoggerConfig, RunLogger

    sweeps = {run.sweep for run in comparison.runs}
    group = sweeps.pop() if len(sweeps) == 1 else None
    name = f"compare-{len(comparison.runs)}-runs-{page.resolve().parent.name}"
    logger = RunLogger(LoggerConfig(project=project, group=group, tags=["compare"]), name,
                       config={"runs": [run.name for run in comparison.runs],
                               "baseline": comparison.runs[comparison.baseline].name},
                       out_dir=page.parent)
    header = comparison.header_rows()
    columns = list(header[0])
    logger.log_review(tables={"compare_runs": (columns, [[row[c] for c in columns] for row in header]),
                              "compare_segments": comparison.segment_rows()},
                      pages={"compare": page})
    logger.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One HTML page comparing runs segment by segment.")
    parser.add_argument("results", type=Path, nargs="+", help="results JSONL files, or one folder of runs")
    parser.add_argument("-o", "--output", type=Path, help="the page to write (default: compare.html beside the runs)")
    parser.add_argument("--baseline", help="run name (or a part of exactly one) to highlight differences against "
                                           "(default: the first run)")
    parser.add_argument("--wandb", action="store_true", help="also log the page and tables to W&B")
    parser.add_argument("--wandb-project", default="fusemt")
    args = parser.parse_args(argv)
    try:
        comparison = Comparison.build(load_runs(args.results), args.baseline)
        page = args.output or default_output(args.results)
        dataset = next((run.dataset for run in comparison.runs if run.dataset), None)
        title = f"compare: {len(comparison.runs)} runs" + (f" on {dataset}" if dataset else "")
        write_atomically(page, comparison.render(title, page.parent))
    except (FusemtError, OSError) as err:  # an OS error: a read-only folder, a full disk, ...
        fail(err)
    if args.wandb:
        log_compare(comparison, page, args.wandb_project)
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
