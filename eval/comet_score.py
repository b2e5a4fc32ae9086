"""COMET scores with unbabel-comet (patched for transformers 5 by ``eval.comet_compat``).

A model is a hub id (``Unbabel/wmt22-comet-da``, used from the local HF cache, downloaded when
the machine is online) or a local checkpoint path (``.../checkpoints/model.ckpt``). When no model
can be had, scoring says so in one line and returns ``None``: a translation run never fails on it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("fusemt")


@dataclass
class CometResult:
    system: float
    segments: list[float]
    model: str


def _checkpoint_path(model: str) -> Path:
    """Local checkpoint, or the hub model's checkpoint from the HF cache (downloading when online)."""
    local = Path(model).expanduser()
    if local.exists():
        return local if local.is_file() else local / "checkpoints" / "model.ckpt"
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True)) / "checkpoints" / "model.ckpt"
    except Exception:  # noqa: BLE001 - not cached: try the hub unless told to stay offline
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
        return Path(snapshot_download(model)) / "checkpoints" / "model.ckpt"


@lru_cache(maxsize=2)
def load_comet(model: str):
    from eval import comet_compat

    comet_compat.apply()  # before loading: the checkpoint's encoder is built at load time
    from comet import load_from_checkpoint

    return load_from_checkpoint(str(_checkpoint_path(model)), reload_hparams=False)


def comet_scores(sources: list[str], hypotheses: list[str], references: list[str], model: str,
                 batch_size: int = 16) -> Optional[CometResult]:
    """System and segment COMET, on the GPU when there is one; None (with one logged line) if unavailable."""
    try:
        scorer = load_comet(model)
    except Exception as err:  # noqa: BLE001 - offline, not cached, not installed: say so, don't fail
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        log.warning("COMET skipped: model '%s' is not available here (%s); set metrics.comet_model to a local "
                    "checkpoint or run online", model, first)
        return None
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references)]
    for noisy in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    out = scorer.predict(data, batch_size=batch_size, gpus=1 if torch.cuda.is_available() else 0, progress_bar=False)
    return CometResult(system=round(float(out.system_score), 4), segments=[round(float(s), 4) for s in out.scores],
                       model=model)
