"""The results JSONL: one line per segment, flushed as segments finish, resumable."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from decoding.errors import FusemtError

log = logging.getLogger(__name__)


class ResultsFile:
    """Append-only JSONL of finished segments.

    Opening an existing file resumes it: complete lines are kept, a line cut off by a killed
    process is dropped (the file is truncated back to the last newline), and segments already
    present are reported as done. Lines written with another config fingerprint are refused, so
    two configs never mix in one file.
    """

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = self._read_and_repair()
        other = {r.get("config_hash") for r in self.rows} - {fingerprint}
        if other:
            raise FusemtError(
                f"{path} holds results of another config: pass a new run_name=... (or delete the file to start over)"
            )
        self.done_ids = {r["id"] for r in self.rows}
        self._fh = path.open("a", encoding="utf-8")

    def _read_and_repair(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            log.warning("%s ends in a partial line (interrupted write): dropping it and resuming", self.path)
            with self.path.open("r+b") as fh:
                fh.truncate(len(complete))
        rows = []
        for n, line in enumerate(complete.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise FusemtError(f"{self.path}:{n} is corrupt: fix or delete that line, then rerun to resume") from None
        return rows

    def append(self, row: dict) -> None:
        row = {**row, "config_hash": self.fingerprint}
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        self.rows.append(row)
        self.done_ids.add(row["id"])

    def close(self) -> None:
        self._fh.close()
