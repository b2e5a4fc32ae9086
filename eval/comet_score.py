"""COMET scores with unbabel-comet (patched for transformers 5 by ``eval.comet_compat``).

A model is a local checkpoint path (``.../checkpoints/model.ckpt`` or the folder holding
``checkpoints/``) or a hub id (``Unbabel/wmt22-comet-da``) taken from the local HF cache, or
downloaded when the hub answers. Whether a model can be had is decided before comet is even
imported, in well under a second; when it cannot, the result carries the one-line reason
instead of scores: a translation run never fails on COMET.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from decoding import hub

CHECKPOINT = "checkpoints/model.ckpt"  # where a COMET model keeps its weights, locally and on the hub


@dataclass
class CometResult:
    """System and segment scores, or, when no COMET model could be had or run, ``skipped``: why not."""

    model: str
    system: Optional[float] = None
    segments: list[float] = field(default_factory=list)
    skipped: Optional[str] = None


class CometUnavailable(Exception):
    """No COMET model here; the message is the one-line reason."""


@dataclass(frozen=True)
class CometSource:
    checkpoint: Path
    local_files_only: bool  # the hub cannot be reached: comet must not ask it for the encoder's files either


def locate_checkpoint(model: str) -> CometSource:
    """Local checkpoint, else the HF cache, else the hub only if it answers; raises CometUnavailable."""
    local = Path(model).expanduser()
    if local.exists():
        checkpoint = local if local.is_file() else local / CHECKPOINT
        if not checkpoint.is_file():
            raise CometUnavailable(f"{local} holds no {CHECKPOINT}: set metrics.comet_model to a COMET checkpoint")
        return CometSource(checkpoint, local_files_only=False)
    if model.startswith((".", "/", "~")) or model.endswith(".ckpt") or hub.repo_id_problem(model):
        raise CometUnavailable(f"COMET model {model} is neither a local checkpoint nor a hub id: "
                               "check metrics.comet_model")
    offline = hub.unavailable_reason()
    cached = hub.cached_file(model, CHECKPOINT)
    if cached is not None:
        return CometSource(Path(cached), local_files_only=offline is not None)
    if offline is not None:
        raise CometUnavailable(f"'{model}' is not in the HF cache and {offline}: set metrics.comet_model to a local "
                               "checkpoint, download the model where the hub is reachable, or metrics.comet=false")
    from huggingface_hub import snapshot_download

    try:
        return CometSource(Path(snapshot_download(model)) / CHECKPOINT, local_files_only=False)
    except Exception as err:  # noqa: BLE001 - unknown or gated repo, interrupted download: say which
        raise CometUnavailable(f"cannot download '{model}': {_first_line(err)}") from None


@lru_cache(maxsize=2)
def load_comet(model: str):
    source = locate_checkpoint(model)
    try:
        from eval import comet_compat

        comet_compat.apply()  # before loading: the checkpoint's encoder is built at load time
        from comet import load_from_checkpoint
    except ImportError as err:
        raise CometUnavailable(f"unbabel-comet is not installed ({_first_line(err)}): run `make install`") from None
    try:
        return load_from_checkpoint(str(source.checkpoint), reload_hparams=False,
                                    local_files_only=source.local_files_only)
    except Exception as err:  # noqa: BLE001 - a broken checkpoint or an encoder missing from the cache
        raise CometUnavailable(f"cannot load COMET model '{model}': {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def comet_scores(sources: list[str], hypotheses: list[str], references: list[str], model: str,
                 batch_size: int = 16) -> CometResult:
    """System and segment COMET, on the GPU when there is one; or the reason there are none."""
    try:
        scorer = load_comet(model)
    except CometUnavailable as err:
        return CometResult(model=model, skipped=str(err))
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references)]
    for noisy in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    out = scorer.predict(data, batch_size=batch_size, gpus=1 if torch.cuda.is_available() else 0, progress_bar=False)
    return CometResult(model=model, system=round(float(out.system_score), 4),
                       segments=[round(float(s), 4) for s in out.scores])
