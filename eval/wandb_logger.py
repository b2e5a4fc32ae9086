"""Weights & Biases logging that can never fail a run: every call is guarded and warns instead."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "fusemt"
    entity: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; None: online only with credentials
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


def _has_credentials() -> bool:
    return bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists() and "api.wandb.ai" in (
        Path.home() / ".netrc"
    ).read_text(errors="ignore")


class RunLogger:
    """Logs config, metrics, a table of segments and the results JSONL as an artifact."""

    def __init__(self, cfg: LoggerConfig, run_name: str, config: dict, out_dir: Path):
        self.run = None
        if cfg.name == "none":
            return
        mode = cfg.mode or ("online" if _has_credentials() else "offline")
        try:
            import wandb

            self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=mode, group=cfg.group, tags=cfg.tags,
                                  name=run_name, config=config, dir=str(out_dir), reinit="finish_previous")
        except Exception as err:  # noqa: BLE001 - W&B trouble must never stop a translation run
            log.warning("W&B disabled for this run: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)

    def _guard(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            log.warning("W&B %s failed: %s", what, str(err).splitlines()[0] if str(err) else type(err).__name__)

    def log_results(self, metrics: dict, rows: list[dict], files: list[Path], comet_segments: list[float] | None = None) -> None:
        def _log():
            import wandb

            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.run.summary.update(numeric)
            table = wandb.Table(columns=["id", "source", "reference", "hypothesis"],
                                data=[[r["id"], r["source"], r.get("reference"), r["hypothesis"]] for r in rows])
            logged = {**numeric, "segments": table}
            html_files = [p for p in files if p.suffix == ".html" and p.exists()]
            if html_files:
                logged["trace"] = wandb.Html(html_files[0].read_text(encoding="utf-8"))
            self.run.log(logged)
            artifact = wandb.Artifact(name=f"results-{self.run.name}".replace("/", "_"), type="results")
            for path in files:
                if path.exists():
                    artifact.add_file(str(path))
            self.run.log_artifact(artifact)

        self._guard("logging", _log)

    def finish(self) -> None:
        self._guard("finish", lambda: self.run.finish())
