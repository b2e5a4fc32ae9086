"""Sequence-level ensembles (``decoding=pool``) in the quality experiment. One command per part, resumable.

    python scripts/pool_experiment.py syscomb     # the five WMT24 en-ja submissions: MBR vs the best system
    python scripts/pool_experiment.py members     # our members on the WMT24++ test slice
    python scripts/pool_experiment.py sample      # our members on the bundled sample
    python scripts/pool_experiment.py members --only self-mbr   # one job (labels: --list)

``syscomb`` combines the official WMT24 en-ja system outputs (../shared/data/wmt24_en_ja/systems/, 997
segments, official references) without loading a model: each system alone (a one-candidate pool
returns it), MBR with the chrF and with the BLEU utility, and the oracle (an upper bound). ``members``
and ``sample`` pool the committed greedy and beam-4 outputs of the three members
(experiments/wmt24pp_en_ja/runs/wmt24pp/ or runs/sample/): MBR, likelihood, model_mbr and the oracle
choose among those six; Qwen 1.5B's own samples give self-MBR; the pool of all three members' greedy,
beam and sample candidates (the 0.5B's and Gemma's samples drawn there, Qwen 1.5B's taken from the
self-MBR run's pool) gets every rule again. Each part exports its runs (rows with their pools, metrics)
to ``TARGETS`` and writes the report there with sacrebleu's paired bootstrap against the baseline (the
best single system / the best member's greedy run). ``syscomb`` keeps only the metrics and the report
(outside runs/) (its 997-segment rows are 15 MB; this command remakes them in minutes, without a model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Relative to the repository root (the jobs' working directory): the paths recorded in the runs' configs.
WMT24 = Path(os.path.relpath(Path(os.environ.get("FUSEMT_SHARED", ROOT.parent / "shared")) / "data" / "wmt24_en_ja",
                             ROOT))
SYSTEMS = ["Claude-3.5", "GPT-4", "IKUN-C", "Team-J", "Unbabel-Tower70B"]
MEMBER_RUNS = {"members": ROOT / "experiments" / "wmt24pp_en_ja" / "runs" / "wmt24pp",
               "sample": ROOT / "experiments" / "wmt24pp_en_ja" / "runs" / "sample"}
MEMBERS = ["gemma3_270m", "qwen25_coder_05b", "qwen25_coder_15b"]
EXPERIMENT = ROOT / "experiments" / "wmt24pp_en_ja"
# syscomb keeps no rows, so its metrics live outside runs/ (where every metrics file sits beside its rows)
TARGETS = {"syscomb": EXPERIMENT / "pool_syscomb", "members": EXPERIMENT / "runs" / "pool_members",
           "sample": EXPERIMENT / "runs" / "pool_sample"}
RESULTS = ROOT / "results" / "pool"


def syscomb_jobs() -> list[tuple[str, list[str]]]:
    files = [str(WMT24 / "systems" / f"{name}.txt") for name in SYSTEMS]
    pool = ["decoding=pool", "decoding.generate=[]", f"decoding.runs=[{','.join(files)}]"]
    jobs = [(f"single_{name}", ["decoding=pool", "decoding.generate=[]", f"decoding.runs=[{path}]"])
            for name, path in zip(SYSTEMS, files)]
    jobs += [("mbr_chrf", pool + ["decoding.utility=chrf"]), ("mbr_bleu", pool + ["decoding.utility=bleu"]),
             ("oracle_UPPER_BOUND", pool + ["decoding.select=oracle"])]
    return jobs


def member_runs(part: str) -> list[str]:
    """The committed greedy and beam-4 runs of the three members on the part's dataset."""
    folder = MEMBER_RUNS[part]
    runs = sorted(str(p.relative_to(ROOT)) for p in folder.glob("*.jsonl")
                  if p.name.split("__")[0] in ("greedy", "beam") and p.name.split("__")[1] in MEMBERS)
    if len(runs) != 2 * len(MEMBERS):
        sys.exit(f"expected the greedy and beam runs of {', '.join(MEMBERS)} in {folder}")
    return runs


def members_jobs(part: str) -> list[tuple[str, list[str]]]:
    runs = f"decoding.runs=[{','.join(member_runs(part))}]"
    three = "models.members=[gemma3_270m,qwen25_coder_05b,qwen25_coder_15b]"
    finished = ["decoding=pool", "decoding.generate=[]", runs]
    # The whole pool: the six outputs, Qwen 1.5B's samples (from the self-MBR run's pool) and the other two's samples.
    everything = ["decoding=pool", "decoding.generate=[]", "decoding.runs=[all_mbr_chrf]"]
    return [
        ("runs_mbr_chrf", finished + ["decoding.utility=chrf"]),
        ("runs_oracle_UPPER_BOUND", finished + ["decoding.select=oracle"]),
        ("runs_likelihood", finished + [three, "decoding.select=likelihood"]),
        ("runs_model_mbr", finished + [three, "decoding.select=model_mbr"]),
        ("self-mbr_qwen15_samples4", ["decoding=pool", "models=qwen25_coder_15b", "decoding.generate=[samples:4]",
                                      "batch_size=24"]),
        ("all_mbr_chrf", ["decoding=pool", "models=gemma3_qwen05", "decoding.generate=[samples:4]",
                          f"decoding.runs=[{','.join(member_runs(part))},self-mbr_qwen15_samples4]", "batch_size=24"]),
        ("all_likelihood", everything + [three, "decoding.select=likelihood"]),
        ("all_model_mbr", everything + [three, "decoding.select=model_mbr"]),
        ("all_oracle_UPPER_BOUND", everything + ["decoding.select=oracle"]),
    ]


# part: (jobs, common overrides, report baseline, second baseline (or None), keep the rows in the export)
PARTS = {
    "syscomb": (syscomb_jobs, ["dataset=wmt24_en_ja", f"dataset.path={WMT24 / 'wmt24_en_ja.jsonl'}"],
                "single_Claude-3.5", None, False),
    "members": (lambda: members_jobs("members"), ["dataset=wmt24pp_en_ja_test", "prompt=wmt_en_ja"],
                "greedy__qwen25_coder_15b", "beam__qwen25_coder_15b", True),
    "sample": (lambda: members_jobs("sample"), ["dataset=sample_en_ja", "prompt=wmt_en_ja"],
               "greedy__qwen25_coder_15b", "beam__qwen25_coder_15b", True),
}


def second_baseline_table(folder: Path, baseline: str) -> Path:
    """Every run against a second baseline (the best member's beam 4), by the same paired bootstrap."""
    sys.path.insert(0, str(ROOT))
    from eval.report import find_runs, paired_bootstrap, pick_run

    runs = find_runs(folder)
    base = pick_run(runs, baseline)
    lines = [f"Paired bootstrap (sacrebleu, 1000 resamples) against {base.name}:", "",
             "| run | BLEU | chrF | Δ BLEU (p) | Δ chrF (p) |", "|---|---:|---:|---|---|"]
    for run in sorted(runs, key=lambda r: r.name):
        result = paired_bootstrap(base, run)
        delta = (f"{result.bleu_delta:+.2f} ({result.bleu_p:.3f}) | {result.chrf_delta:+.2f} ({result.chrf_p:.3f})"
                 if result else "— | —")
        lines.append(f"| {run.name} | {run.metrics.get('bleu', 0):.2f} | {run.metrics.get('chrf', 0):.2f} | {delta} |")
    path = folder / f"vs_{baseline}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def export(results_dir: Path, target: Path, extra: list[Path]) -> int:
    """Each run's rows (with their pools, without token traces) and metrics; ``extra`` runs copied as they are."""
    target.mkdir(parents=True, exist_ok=True)
    n = 0
    for results in sorted(results_dir.glob("*/ensemble/*.jsonl")):
        metrics = results.with_suffix(".metrics.json")
        if results.name.endswith(".comet.jsonl") or results.name.startswith(".") or not metrics.exists():
            continue
        keep = ("id", "domain", "source", "reference", "hypothesis", "n_new_tokens", "time_s", "stats", "warnings",
                "pool")
        rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]
        (target / results.name).write_text("".join(json.dumps({k: r.get(k) for k in keep if k in r}, ensure_ascii=False)
                                                   + "\n" for r in rows), encoding="utf-8")
        shutil.copy(metrics, target / metrics.name)
        n += 1
    for path in extra:
        for file in (path, path.with_suffix(".metrics.json")):
            shutil.copy(file, target / file.name)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--list", action="store_true", help="print the jobs and exit")
    parser.add_argument("--only", default="", help="run only the jobs whose label contains this text")
    parser.add_argument("--report-only", action="store_true", help="export and report what has finished")
    args = parser.parse_args()
    make_jobs, common, baseline, second, keep_rows = PARTS[args.part]
    jobs = [(label, over) for label, over in make_jobs() if args.only in label]
    results_dir = RESULTS / args.part
    if args.list:
        print("\n".join(f"{label}: fusemt {' '.join(over + common)}" for label, over in jobs))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    failed = []
    if not args.report_only:
        for n, (label, over) in enumerate(jobs, 1):
            start = time.perf_counter()
            print(f"[{n}/{len(jobs)}] {label}", flush=True)
            argv = [sys.executable, "-m", "runners.translate", *over, *common, f"run_name={label}",
                    f"paths.results_dir={results_dir}", "logger=none", "metrics.comet=false"]
            proc = subprocess.run(argv, cwd=ROOT, env=env)
            print(f"[{n}/{len(jobs)}] {label}: exit {proc.returncode}, {time.perf_counter() - start:.0f} s", flush=True)
            if proc.returncode != 0:
                failed.append(label)
    target = TARGETS[args.part]
    extra = [ROOT / r for r in member_runs(args.part)] if args.part in MEMBER_RUNS else []
    print(f"exported {export(results_dir, target, extra)} runs to {target}")
    report = subprocess.run([sys.executable, "-m", "eval.report", str(target), "--baseline", baseline],
                            cwd=ROOT, env=env)
    if second:
        print(f"wrote {second_baseline_table(target, second)}")
    if not keep_rows:
        for rows in target.glob("*.jsonl"):
            rows.unlink()
    if failed or report.returncode:
        sys.exit(f"failed: {', '.join(failed) or 'the report'}")


if __name__ == "__main__":
    main()
