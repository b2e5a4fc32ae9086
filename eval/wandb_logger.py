"""Weights & Biases logging that can never fail a run: every call is guarded and warns instead."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from eval.metrics import segment_scores

log = logging.getLogger(__name__)

# wandb 0.31 (wandb/sdk/artifacts/artifact.py, _validators.py): an artifact name matches
# ^[a-zA-Z0-9_\-.]+$ and has at most 128 characters; anything else raises in Artifact().
ARTIFACT_NAME_MAX = 128
_NOT_IN_ARTIFACT_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


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


def artifact_name(run_name: str) -> str:
    """``results-<run_name>`` in the characters W&B allows (``unite__a+b__d`` -> ``results-unite__a-b__d-<hash>``).
    A name that had to change ends in a short hash of the run name, so run names that differ only
    in replaced characters (``a+b``, ``a-b``) or past the length limit keep separate artifacts."""
    name = f"results-{run_name}"
    safe = _NOT_IN_ARTIFACT_NAME.sub("-", name)
    if safe == name and len(name) <= ARTIFACT_NAME_MAX:
        return name
    digest = hashlib.sha256(run_name.encode("utf-8")).hexdigest()[:8]
    return f"{safe[: ARTIFACT_NAME_MAX - len(digest) - 1]}-{digest}"


def _flatten(value: Mapping, prefix: str) -> dict:
    """Nested stats as ``prefix.key.sub`` columns; lists as JSON text (a table cell holds one value)."""
    flat: dict = {}
    for key, item in value.items():
        name = f"{prefix}.{key}"
        if isinstance(item, Mapping):
            flat.update(_flatten(item, name))
        else:
            flat[name] = json.dumps(item, ensure_ascii=False) if isinstance(item, (list, tuple)) else item
    return flat


@dataclass
class SegmentTable:
    """The per-segment table: one row per results row, the same columns for every row."""

    columns: list[str]
    data: list[list]
    signatures: dict[str, str]  # sacrebleu signatures of the sentence-level scores

    @classmethod
    def build(cls, rows: list[dict], segment_comet: Optional[Mapping[str, float]] = None) -> "SegmentTable":
        """Text, sentence BLEU/chrF (rows with a reference), COMET (when scored), tokens, time,
        warnings and the method's stats flattened to ``stats.<key>[.<sub>]`` (None where a row lacks one)."""
        scored = [i for i, r in enumerate(rows) if r.get("reference") is not None]
        sentence = segment_scores([rows[i]["hypothesis"] for i in scored], [rows[i]["reference"] for i in scored])
        bleu = dict(zip(scored, sentence.bleu))
        chrf = dict(zip(scored, sentence.chrf))
        stats = [_flatten(r.get("stats") or {}, "stats") for r in rows]
        stat_columns = sorted({key for flat in stats for key in flat})
        columns = ["id", "source", "reference", "hypothesis", "bleu", "chrf"]
        columns += ["comet"] if segment_comet is not None else []
        columns += ["n_new_tokens", "time_s", "warnings", *stat_columns]
        data = []
        for i, (row, flat) in enumerate(zip(rows, stats)):
            cells = [row["id"], row["source"], row.get("reference"), row["hypothesis"], bleu.get(i), chrf.get(i)]
            cells += [segment_comet.get(row["id"])] if segment_comet is not None else []
            cells += [row.get("n_new_tokens"), row.get("time_s"), "; ".join(row.get("warnings") or [])]
            data.append(cells + [flat.get(key) for key in stat_columns])
        signatures = {f"segment_{metric}_signature": signature for metric, signature in
                      (("bleu", sentence.bleu_signature), ("chrf", sentence.chrf_signature)) if signature}
        return cls(columns=columns, data=data, signatures=signatures)


class RunLogger:
    """Logs config, metrics, a table of segments and the results files as an artifact."""

    def __init__(self, cfg: LoggerConfig, run_name: str, config: dict, out_dir: Path):
        self.run = None
        self.run_name = run_name
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

    def log_results(self, metrics: dict, rows: list[dict], files: list[Path],
                    segment_comet: Optional[Mapping[str, float]] = None) -> None:
        """``metrics`` goes to the run summary whole (signatures, ``comet`` null with ``comet_skipped``
        included), its numbers also to the history; ``segment_comet`` maps segment id to COMET score.
        Each part is guarded on its own, so one W&B failure loses only that part."""

        def _metrics_and_table():
            import wandb

            table = SegmentTable.build(rows, segment_comet)
            self.run.summary.update({**metrics, **table.signatures})
            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            logged = {**numeric, "segments": wandb.Table(columns=table.columns, data=table.data,
                                                         allow_mixed_types=True)}
            html_files = [p for p in files if p.suffix == ".html" and p.exists()]
            if html_files:
                logged["trace"] = wandb.Html(html_files[0].read_text(encoding="utf-8"))
            self.run.log(logged)

        def _artifact():
            import wandb

            artifact = wandb.Artifact(name=artifact_name(self.run_name), type="results",
                                      metadata={"run_name": self.run_name})
            for path in files:
                if path.exists():
                    artifact.add_file(str(path))
            self.run.log_artifact(artifact)

        self._guard("logging", _metrics_and_table)
        self._guard("artifact", _artifact)

    def log_review(self, tables: Optional[Mapping[str, tuple[list[str], list[list]]]] = None,
                   pages: Optional[Mapping[str, Path]] = None, images: Optional[Mapping[str, Path]] = None) -> None:
        """Review material in one step: ``tables`` (key -> columns, rows) as W&B Tables, ``pages``
        (key -> HTML file) as HTML media, ``images`` (key -> PNG) as images; each guarded on its own."""

        def _tables():
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=data, allow_mixed_types=True)
                          for key, (columns, data) in (tables or {}).items()})

        def _media():
            import wandb

            logged = {key: wandb.Html(path.read_text(encoding="utf-8")) for key, path in (pages or {}).items()
                      if path.exists()}
            logged.update({key: wandb.Image(str(path)) for key, path in (images or {}).items() if path.exists()})
            self.run.log(logged)

        if tables:
            self._guard("tables", _tables)
        if pages or images:
            self._guard("pages", _media)

    def finish(self) -> None:
        self._guard("finish", lambda: self.run.finish())
