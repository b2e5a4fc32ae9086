"""End-to-end ``fusemt`` time with and without the shared prompt prefix's KV cache (``prompt_cache``).

    python scripts/bench_prompt_cache.py [--rounds 3] [--dataset wmt24pp_en_ja_test] [--prompt wmt_en_ja]
                                         [--limit 0] [--jobs greedy:models=gemma3_270m
                                                             unite:models=gemma3_smollm2,decoding=unite]

Each job (``label:override,override``) runs as a whole ``fusemt`` command with ``prompt_cache=false``
and ``=true``, in ``--rounds`` interleaved rounds, each run in its own results folder under a temporary
directory (both settings share one run name: the second would resume the first). Per run it records
the command's wall time (model loading and scoring included) and the decoding time (the sum of the
rows' batch times), checks that the hypotheses are the same with and without the cache, and prints
medians [min-max] per job and setting. Last line: ``<label>_total_ratio= <label>_decode_ratio=`` per
job (cache on / off; below 1: the cache saves time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JOBS = ["greedy:models=gemma3_270m", "unite:models=gemma3_smollm2,decoding=unite"]


def run_once(overrides: list[str], results_dir: Path) -> tuple[float, float, list[str]]:
    """(wall seconds, decoding seconds, hypotheses by segment id) of one ``fusemt`` command."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runners.translate", *overrides, f"paths.results_dir={results_dir}",
                           "logger=none", "metrics.comet=false"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"fusemt {' '.join(overrides)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    (results,) = [p for p in results_dir.glob("*/ensemble/*.jsonl") if not p.name.endswith(".comet.jsonl")]
    rows = sorted((json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()),
                  key=lambda row: str(row["id"]))
    return wall, sum(row["time_s"] for row in rows), [row["hypothesis"] for row in rows]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dataset", default="wmt24pp_en_ja_test")
    parser.add_argument("--prompt", default="wmt_en_ja")
    parser.add_argument("--limit", type=int, default=0, help="dataset.limit (0: the whole dataset)")
    parser.add_argument("--jobs", nargs="+", default=DEFAULT_JOBS, help="label:override,override ...")
    args = parser.parse_args()
    common = [f"dataset={args.dataset}", f"prompt={args.prompt}"]
    common += [f"dataset.limit={args.limit}"] if args.limit else []
    jobs = {label: overrides.split(",") for label, overrides in (job.split(":", 1) for job in args.jobs)}
    times: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    outputs: dict[str, set[tuple[str, ...]]] = {}
    with tempfile.TemporaryDirectory(prefix="fusemt-prompt-cache-") as tmp:
        for round_ in range(args.rounds):
            for label, overrides in jobs.items():
                # alternate which setting goes first, so a slow spell does not favour one
                for cache in ((False, True) if round_ % 2 == 0 else (True, False)):
                    folder = Path(tmp) / f"{label}_{cache}_{round_}"
                    wall, decode, hyps = run_once(common + overrides + [f"prompt_cache={str(cache).lower()}"], folder)
                    times.setdefault((label, cache), []).append((wall, decode))
                    outputs.setdefault(label, set()).add(tuple(hyps))
                    print(f"round {round_ + 1} {label} prompt_cache={str(cache).lower()}: total {wall:.1f} s, "
                          f"decoding {decode:.1f} s", flush=True)
    summary = []
    for label in jobs:
        same = "identical" if len(outputs[label]) == 1 else "DIFFERENT"
        for cache in (False, True):
            walls, decodes = zip(*times[(label, cache)])
            print(f"{label} prompt_cache={str(cache).lower()}: total {spread(walls)} s, decoding {spread(decodes)} s")
        on, off = times[(label, True)], times[(label, False)]
        # (total, decoding): cache on / off
        ratio = [statistics.median(t[k] for t in on) / statistics.median(t[k] for t in off) for k in (0, 1)]
        print(f"{label}: hypotheses {same} with and without the cache; on/off total {ratio[0]:.3f}, "
              f"decoding {ratio[1]:.3f}")
        summary += [f"{label}_total_ratio={ratio[0]:.3f}", f"{label}_decode_ratio={ratio[1]:.3f}"]
        if same != "identical":
            sys.exit(f"{label}: the prompt cache changed the hypotheses")
    print(" ".join(summary))


if __name__ == "__main__":
    main()
