"""Multirun support: which job this is, where it runs, and a sweep that survives failing jobs.

In a sweep, a job that fails is recorded in ``<sweep dir>/failures.jsonl`` and a job that finishes
in ``<sweep dir>/jobs.jsonl`` (one line each, appended atomically, so it works the same from joblib
workers, submitit/SLURM jobs or the basic launcher); the other jobs go on. ``SweepReport``, a Hydra
callback, ends the sweep with a table of its jobs (run name, the options that differ, segments,
scores, tokens/s, status; also written to ``<sweep dir>/summary.md``) and the commands that open
the report and the compare page for exactly these runs, lists the failures and exits with code 1
if there were any.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

from decoding.errors import FusemtError

FAILURES = "failures.jsonl"
JOBS = "jobs.jsonl"
SUMMARY = "summary.md"
SUMMARY_SCORES = ("segments", "bleu", "chrf", "comet", "tokens_per_s")


@dataclass
class JobInfo:
    multirun: bool
    num: int
    sweep_dir: Path | None
    overrides: list[str]

    @property
    def sweep_group(self) -> str | None:
        """The W&B group of a sweep: its folder, e.g. outputs_multiruns_2026-11-24_10-00-00-123456-4242."""
        return self.sweep_dir.as_posix().replace("/", "_").strip("_") if self.sweep_dir else None

    def place_on_devices(self, run):
        """Spread a sweep's jobs over the visible GPUs: members on ``device: auto`` go to GPU job.num mod n.

        Members given an explicit device (e.g. one model per GPU for a large pair) keep it.
        """
        import torch

        count = torch.cuda.device_count()
        if not self.multirun or count < 2:
            return run
        gpu = f"cuda:{self.num % count}"
        return replace(run, models=[replace(m, device=gpu) if m.device == "auto" else m for m in run.models])


@contextmanager
def job_context():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    yield JobInfo(multirun=multirun, num=hc.job.num if multirun else 0,
                  sweep_dir=Path(hc.sweep.dir) if multirun else None, overrides=list(hc.overrides.task))


def _append_line(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write() on an O_APPEND file: lines from concurrent jobs never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def record_failure(job: JobInfo, err: Exception) -> None:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not isinstance(err, FusemtError):
        message = f"{type(err).__name__}: {message}"
    print(f"fusemt: job {job.num} failed: {message}", file=sys.stderr)
    _append_line(job.sweep_dir / FAILURES, {"job": job.num, "overrides": job.overrides, "error": message,
                                            "traceback": None if isinstance(err, FusemtError)
                                            else traceback.format_exc()})


def record_job(job: JobInfo, results_path: Path, metrics: dict) -> None:
    """A finished job of a sweep: its results file and the scores the sweep's summary shows."""
    if job.sweep_dir is None:
        return
    _append_line(job.sweep_dir / JOBS, {"job": job.num, "overrides": job.overrides, "run_name": metrics.get("run_name"),
                                        "results": str(results_path.resolve()), "complete": metrics.get("complete"),
                                        "missing_segments": metrics.get("missing_segments"),
                                        **{key: metrics.get(key) for key in SUMMARY_SCORES}})


def _read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def differing_overrides(jobs: list[dict]) -> list[str]:
    """The override keys whose values differ between the sweep's jobs (what the sweep varied)."""
    values: dict[str, set] = {}
    for job in jobs:
        for override in job["overrides"]:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    counted = {key: len(v) + any(key not in {o.partition("=")[0] for o in job["overrides"]} for job in jobs)
               for key, v in values.items()}
    return [key for key in values if counted[key] > 1]


def _cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def sweep_summary(sweep_dir: Path) -> Optional[str]:
    """The sweep's jobs as a markdown table and the commands that review exactly its runs (None: no job ran)."""
    finished, failed = _read_lines(sweep_dir / JOBS), _read_lines(sweep_dir / FAILURES)
    jobs = sorted(finished + failed, key=lambda j: j["job"])
    if not jobs:
        return None
    keys = differing_overrides(jobs)
    header = ["job", "run_name", *keys, *SUMMARY_SCORES, "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job in jobs:
        given = dict(o.partition("=")[::2] for o in job["overrides"])
        if "error" in job:
            status = f"failed: {job['error']}"
        else:
            status = "complete" if job.get("complete") else f"{job.get('missing_segments')} segments missing"
        cells = [str(job["job"]), job.get("run_name") or "—", *(given.get(k, "(default)") for k in keys),
                 *(_cell(job.get(k)) for k in SUMMARY_SCORES), status]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    # Runs of a sweep, once each (two jobs may share a run: shards), in job order.
    results = list(dict.fromkeys(job["results"] for job in sorted(finished, key=lambda j: j["job"])))
    if results:
        files = " ".join(shlex.quote(os.path.relpath(r)) for r in results)
        lines += ["", "Review exactly these runs:",
                  f"  python -m eval.report {files} -o {shlex.quote(os.path.relpath(sweep_dir))}"]
        if len(results) > 1:
            lines.append(f"  python -m eval.compare {files} "
                         f"-o {shlex.quote(os.path.relpath(sweep_dir / 'compare.html'))}")
    return "\n".join(lines) + "\n"


class SweepReport(Callback):
    """At the end of a sweep: its summary table and review commands, then the failed jobs (exit 1 if any)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = sweep_summary(sweep_dir)
        if summary:
            (sweep_dir / SUMMARY).write_text(summary, encoding="utf-8")
            print(f"\nfusemt: sweep summary ({sweep_dir / SUMMARY}):\n{summary}", flush=True)
        path = sweep_dir / FAILURES
        if not path.exists():
            return
        failures = _read_lines(path)
        print(f"fusemt: {len(failures)} job(s) of the sweep failed (listed in {path}):", file=sys.stderr)
        for f in sorted(failures, key=lambda f: f["job"]):
            print(f"  job {f['job']} [{' '.join(f['overrides'])}]: {f['error']}", file=sys.stderr)
        sys.exit(1)
