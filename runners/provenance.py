"""What a reviewer needs to reproduce a run, recorded in its metrics file and its W&B config."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from runners.cli import fusemt_version

SOURCE_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def git_state() -> dict:
    """Commit of the fusemt source tree and whether it had uncommitted changes (None outside a checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _hydra_state() -> dict:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {"overrides": None, "hydra_run_dir": None}
    hc = HydraConfig.get()
    return {"overrides": list(hc.overrides.task), "hydra_run_dir": hc.runtime.output_dir}


def provenance(run) -> dict:
    dataset = run.dataset
    return {
        **git_state(),
        "fusemt_version": fusemt_version(),
        "versions": {name: _package_version(name) for name in ("torch", "transformers", "sacrebleu")},
        "seed": run.seed,
        **_hydra_state(),
        "results_path": str(run.results_path),
        "config_hash": run.fingerprint,
        "dataset_selection": {"name": dataset.name, "path": dataset.path, "hub_id": dataset.hub_id,
                              "limit": dataset.limit, "shard": dataset.shard, "domains": list(dataset.domains)},
    }
