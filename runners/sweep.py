"""Multirun support: which job this is, where it runs, and a sweep that survives failing jobs.

In a sweep, a job that fails is recorded in ``<sweep dir>/failures.jsonl`` (one line, appended
atomically, so it works the same from joblib workers, submitit/SLURM jobs or the basic launcher)
and the other jobs go on. ``SweepReport``, a Hydra callback, lists the failures when the sweep
ends and exits with code 1.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from decoding.errors import FusemtError

FAILURES = "failures.jsonl"


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


def record_failure(job: JobInfo, err: Exception) -> None:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not isinstance(err, FusemtError):
        message = f"{type(err).__name__}: {message}"
    print(f"fusemt: job {job.num} failed: {message}", file=sys.stderr)
    line = json.dumps({"job": job.num, "overrides": job.overrides, "error": message,
                       "traceback": None if isinstance(err, FusemtError) else traceback.format_exc()},
                      ensure_ascii=False) + "\n"
    job.sweep_dir.mkdir(parents=True, exist_ok=True)
    # One write() on an O_APPEND file: lines from concurrent jobs never interleave.
    fd = os.open(job.sweep_dir / FAILURES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


class SweepReport(Callback):
    """At the end of a sweep: list the failed jobs and exit non-zero if there were any."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / FAILURES
        if not path.exists():
            return
        failures = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        print(f"fusemt: {len(failures)} job(s) of the sweep failed (listed in {path}):", file=sys.stderr)
        for f in sorted(failures, key=lambda f: f["job"]):
            print(f"  job {f['job']} [{' '.join(f['overrides'])}]: {f['error']}", file=sys.stderr)
        sys.exit(1)
