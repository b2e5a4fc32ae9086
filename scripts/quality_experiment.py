"""The quality experiment: does ensembling help en->ja, at what cost? One command, resumable.

    make models && python scripts/quality_experiment.py            # the whole matrix, then the report
    python scripts/quality_experiment.py --list                    # the jobs, without running them
    python scripts/quality_experiment.py --dataset sample          # the same matrix on the bundled sample

Runs every job below with ``fusemt`` (one at a time: two CPU cores), each on the fixed WMT24++
slice (``dataset=wmt24pp_en_ja_test``, experiments/wmt24pp_en_ja/test_ids.txt) with the prompt
chosen on the dev slice (``prompt=wmt_en_ja``). A job that already finished is not decoded again
(fusemt resumes). Then it exports each run's hypotheses and metrics as small text files into
experiments/wmt24pp_en_ja/runs/<dataset>/ — what the report is computed from, and what anyone
can re-score with ``fusemt-score ... hyp_file=<run>.jsonl`` without decoding — and writes the report
(report.md, report.csv, report_domains.csv, report.png) there with ``eval.report --member-baselines
--member-ranking``: each ensemble against its member ranked best on the dev slice by sacrebleu's paired
bootstrap, p-values Holm-adjusted over the table.

First, ``fusemt-compat`` runs UniTE's determine-then-ensemble check over the three members on the
dev slice (experiments/wmt24pp_en_ja/compat/). Nothing is tuned on the reported slice: prompts were
chosen on the dev slice, the methods run with their defaults, and the weights sweep (weights fixed in
advance) is on the pair the check rates closest (the smallest score gap among the pairs it accepts,
else among all).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "wmt24pp_en_ja" / "runs"
RESULTS = ROOT / "results" / "quality"
FUSEMT = Path(sys.executable).parent / "fusemt"
COMPAT = Path(sys.executable).parent / "fusemt-compat"
COMPAT_DIR = ROOT / "experiments" / "wmt24pp_en_ja" / "compat"
COMPAT_RESULT = COMPAT_DIR / "wmt24pp_en_ja_dev" / "compat.json"  # the dev slice's check: pairs and member ranking

MEMBERS = ["gemma3_270m", "qwen25_coder_05b", "qwen25_coder_15b"]
PAIRS = ["gemma3_qwen05", "gemma3_qwen15", "qwen15_qwen05"]  # the cheapest pair first
SPECULATIVE_PAIRS = ["qwen15_qwen05", "gemma3_qwen15"]  # target first, draft second
DATASETS = {"wmt24pp": "wmt24pp_en_ja_test", "sample": "sample_en_ja"}
# charwise counts characters, the other methods tokens (96): 128 characters hold more than the longest
# reference of the slice (92 characters), as 96 tokens do.
CHARWISE_MAX_CHARS = 128


PAIR_OF_MEMBERS = {frozenset(("gemma3_270m", "qwen25_coder_05b")): "gemma3_qwen05",
                   frozenset(("gemma3_270m", "qwen25_coder_15b")): "gemma3_qwen15",
                   frozenset(("qwen25_coder_15b", "qwen25_coder_05b")): "qwen15_qwen05"}


def run_compat() -> str:
    """UniTE's check over the members on the dev slice; returns the pair the weights are swept on."""
    target = COMPAT_RESULT
    if not target.exists():
        subprocess.run([str(COMPAT), "models=pair", f"models.members=[{','.join(MEMBERS)}]", "prompt=wmt_en_ja",
                        f"compat.out_dir={COMPAT_DIR}", "logger.group=quality-compat"], cwd=ROOT, check=True)
    pairs = json.loads(target.read_text(encoding="utf-8"))["pairs"]
    accepted = [p for p in pairs if p["compatible"]] or pairs
    best = min(accepted, key=lambda p: p["score_gap"])
    return PAIR_OF_MEMBERS[frozenset(best["models"])]


def jobs(weights_pair: str = "<pair chosen by fusemt-compat>") -> list[tuple[str, list[str]]]:
    """(label, fusemt overrides) for every run of the matrix, cheaper jobs first."""
    weight_jobs = [(f"{weights_pair} charwise-mixture w={weights}",
                    [f"models={weights_pair}", "decoding=charwise", "decoding.rule=mixture",
                     f"decoding.weights={weights}", f"decoding.max_new_tokens={CHARWISE_MAX_CHARS}"])
                   for weights in ("[0.7,0.3]", "[0.3,0.7]")]
    # ensemble beam search on the same pair, against its greedy runs and each member's beam 4
    beam_jobs = [(f"{weights_pair} {method} beam4",
                  [f"models={weights_pair}", f"decoding={method}", "decoding.num_beams=4"])
                 for method in ("unite", "tokenwise")]
    speculative_jobs = [(f"{pair} speculative", [f"models={pair}", "decoding=speculative"])
                        for pair in SPECULATIVE_PAIRS]
    out = []
    for member in MEMBERS:
        out.append((f"{member} greedy", [f"models={member}", "decoding=greedy"]))
        out.append((f"{member} beam4", [f"models={member}", "decoding=beam", "decoding.num_beams=4"]))
    out += weight_jobs + speculative_jobs + beam_jobs  # before the pairs with the 1.5B model, the most expensive jobs
    for pair in PAIRS:
        out.append((f"{pair} unite", [f"models={pair}", "decoding=unite"]))
        out.append((f"{pair} tokenwise", [f"models={pair}", "decoding=tokenwise"]))
        for rule in ("mixture", "product"):
            out.append((f"{pair} charwise-{rule}", [f"models={pair}", "decoding=charwise", f"decoding.rule={rule}",
                                                    f"decoding.max_new_tokens={CHARWISE_MAX_CHARS}"]))
    return out


def export(results_dir: Path, target: Path) -> int:
    """Copy each run's rows without traces (id, domain, source, reference, hypothesis, tokens, time,
    stats) and its metrics.json: small files that re-score and re-report without decoding."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    n = 0
    for results in sorted(results_dir.glob("*/ensemble/*.jsonl")):
        if results.name.endswith((".comet.jsonl",)) or results.name.startswith("."):
            continue
        metrics = results.with_suffix(".metrics.json")
        if not metrics.exists():
            continue
        keep = ("id", "domain", "source", "reference", "hypothesis", "n_new_tokens", "time_s", "stats", "warnings")
        rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]
        (target / results.name).write_text("".join(json.dumps({k: r.get(k) for k in keep}, ensure_ascii=False) + "\n"
                                                   for r in rows), encoding="utf-8")
        shutil.copy(metrics, target / metrics.name)
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="wmt24pp")
    parser.add_argument("--list", action="store_true", help="print the jobs and exit")
    parser.add_argument("--only", default="", help="run only the jobs whose label contains this text")
    parser.add_argument("--report-only", action="store_true", help="export and report what has finished")
    args = parser.parse_args()
    if args.list:
        print("\n".join(f"{label}: fusemt {' '.join(over)}" for label, over in jobs() if args.only in label))
        return
    selected = [(label, over) for label, over in jobs(run_compat()) if args.only in label]
    results_dir = RESULTS / args.dataset
    common = [f"dataset={DATASETS[args.dataset]}", "prompt=wmt_en_ja", f"paths.results_dir={results_dir}",
              "logger.group=quality-" + args.dataset]
    failed = []
    if not args.report_only:
        for n, (label, over) in enumerate(selected, 1):
            start = time.perf_counter()
            print(f"[{n}/{len(selected)}] {label}", flush=True)
            proc = subprocess.run([str(FUSEMT), *over, *common], cwd=ROOT)
            print(f"[{n}/{len(selected)}] {label}: exit {proc.returncode}, {time.perf_counter() - start:.0f} s",
                  flush=True)
            if proc.returncode != 0:
                failed.append(label)
    target = OUT / args.dataset
    print(f"exported {export(results_dir, target)} runs to {target}")
    # The baseline member of each ensemble is the one the compatibility check ranks best on the dev slice.
    report = subprocess.run([sys.executable, "-m", "eval.report", str(target), "--member-baselines",
                             "--member-ranking", str(COMPAT_RESULT)], cwd=ROOT)
    if failed or report.returncode:
        sys.exit(f"failed: {', '.join(failed) or 'the report'}")


if __name__ == "__main__":
    main()
