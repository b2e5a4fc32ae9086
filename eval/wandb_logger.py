"""Weights & Biases logging that can never fail a run: every call is guarded and warns instead."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlsplit

from eval.metrics import segment_scores

log = logging.getLogger(__name__)

# How long the W&B server may take to accept a TCP connection before the run logs offline instead:
# wandb.init itself waits 90 s (Settings.init_timeout) and retries before giving up.
REACHABLE_TIMEOUT_S = 3.0
# Summary keys that the run's W&B config already holds.
NOT_IN_SUMMARY = ("config", "provenance")

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


def _server_url() -> str:
    """The W&B server wandb.init would talk to (WANDB_BASE_URL, wandb's settings files, its default)."""
    import wandb

    settings = wandb.Settings()
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    return settings.base_url


def _has_credentials(host: str) -> bool:
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or netrc.exists() and host in netrc.read_text(errors="ignore")


def unreachable(url: str, timeout: float = REACHABLE_TIMEOUT_S) -> Optional[str]:
    """Why a TCP connection to ``url``'s host fails within ``timeout`` seconds (None: it connects)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        return f"{parts.hostname}:{port} {'did not answer' if isinstance(err, TimeoutError) else 'unreachable'} ({err})"
    return None


def choose_mode(cfg: "LoggerConfig") -> str:
    """``logger.mode``, else WANDB_MODE, else online with credentials and offline without; an online
    run whose server does not answer within a few seconds logs offline (``wandb sync`` uploads it later)."""
    mode = cfg.mode or os.environ.get("WANDB_MODE")
    url = None
    if mode is None:
        url = _server_url()
        mode = "online" if _has_credentials(urlsplit(url).hostname or "") else "offline"
    if mode == "online" and (problem := unreachable(url or _server_url())):
        log.warning("W&B server %s: logging offline; upload later with `wandb sync <dir>/wandb/offline-run-*`", problem)
        return "offline"
    return mode


def run_id(run_name: str, fingerprint: str) -> str:
    """The W&B run id of a fusemt run: its config hash and a hash of its name, so every invocation of
    one run (a resume, a shard, a rerun with a larger dataset.limit) continues the same W&B run."""
    return f"{fingerprint}-{hashlib.sha256(run_name.encode('utf-8')).hexdigest()[:8]}"


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
    """Logs config, live progress, metrics, a table of segments and the results files as an artifact.

    With ``run_id`` the W&B run is resumed when it exists (``resume="allow"``): a fusemt run that is
    interrupted and resumed, or decoded in shards, is one W&B run. ``job_type`` and ``tags`` are
    what W&B groups and filters runs by (the method, the models)."""

    def __init__(self, cfg: LoggerConfig, run_name: str, config: dict, out_dir: Path, run_id: Optional[str] = None,
                 job_type: Optional[str] = None, tags: tuple[str, ...] = ()):
        self.run = None
        self.run_name = run_name
        if cfg.name == "none":
            return
        try:
            import wandb

            self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=choose_mode(cfg), group=cfg.group,
                                  tags=list(dict.fromkeys([*cfg.tags, *tags])), job_type=job_type, name=run_name,
                                  config=config, dir=str(out_dir), id=run_id, resume="allow" if run_id else None,
                                  reinit="finish_previous")
        except Exception as err:  # noqa: BLE001 - W&B trouble must never stop a translation run
            log.warning("W&B disabled for this run: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)

    def _guard(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            log.warning("W&B %s failed: %s", what, str(err).splitlines()[0] if str(err) else type(err).__name__)

    def log_progress(self, step: int, values: Mapping[str, float]) -> None:
        """One point of live history at ``step`` (segments finished in the results file)."""
        self._guard("progress", lambda: self.run.log(dict(values), step=step))

    def log_results(self, metrics: dict, rows: list[dict], files: list[Path],
                    segment_comet: Optional[Mapping[str, float]] = None) -> None:
        """``metrics`` goes to the run summary (signatures, ``comet`` null with ``comet_skipped``
        included; not its config and provenance, which the run's config holds), its numbers also to
        the history at the step of its last segment; ``segment_comet`` maps segment id to COMET score.
        Each part is guarded on its own, so one W&B failure loses only that part."""

        def _metrics_and_table():
            import wandb

            table = SegmentTable.build(rows, segment_comet)
            summary = {k: v for k, v in metrics.items() if k not in NOT_IN_SUMMARY}
            self.run.summary.update({**summary, **table.signatures})
            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            logged = {**numeric, "segments": wandb.Table(columns=table.columns, data=table.data,
                                                         allow_mixed_types=True)}
            html_files = [p for p in files if p.suffix == ".html" and p.exists()]
            if html_files:
                logged["trace"] = wandb.Html(html_files[0].read_text(encoding="utf-8"))
            self.run.log(logged, step=max(len(rows), self.run.step))

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

    def finish(self, exit_code: Optional[int] = None) -> None:
        self._guard("finish", lambda: self.run.finish(exit_code=exit_code))
