"""What the benchmark scripts share: configs composed as the CLI composes them, and interleaved timing."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runners.config import CONF_DIR, build_run_config, register_schemas  # noqa: E402

T = TypeVar("T")


def compose(*overrides: str):
    """The typed RunConfig of ``fusemt <overrides>``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return build_run_config(hydra_compose("translate", overrides=list(overrides)))


def interleaved(jobs: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[tuple[float, T]]]:
    """(seconds, result) of every job in each of ``rounds`` rounds (A B C, A B C, ...), after one
    warm-up round: a slow spell of the machine hits all the jobs alike."""
    for job in jobs.values():
        job()
    timed: dict[str, list[tuple[float, T]]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            result = job()
            timed[name].append((time.perf_counter() - t0, result))
    return timed
