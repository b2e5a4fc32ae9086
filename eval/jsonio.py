"""fusemt's files: reading JSON with one-line errors (a corrupt file names itself, the line, and the fix),
writing derived files atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from decoding.errors import FusemtError, os_error


def _json_kind(value) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _decode(raw: bytes, where: str, fix: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = f"byte 0x{raw[err.start]:02x} at offset {err.start}"
        raise FusemtError(f"{where} is not UTF-8 text ({byte}): {fix}") from None


def _object(text: str, where: str, fix: str, one_line: bool) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        position = f"column {err.colno}" if one_line else f"line {err.lineno} column {err.colno}"
        raise FusemtError(f"{where} is not valid JSON ({err.msg} at {position}): {fix}") from None
    if not isinstance(value, dict):
        raise FusemtError(f"{where} holds {_json_kind(value)}, not a JSON object: {fix}")
    return value


def read_json_object(path: Path, fix: str) -> dict:
    """One JSON object (a ``*.metrics.json``); ``fix`` says what to do when it is corrupt."""
    return _object(_decode(path.read_bytes(), str(path), fix), str(path), fix, one_line=False)


def parse_jsonl_line(raw: bytes, where: str, fix: str, required: tuple[str, ...] = (),
                     segment: bool = False) -> dict | None:
    """One line of a JSONL file: its object (with the ``required`` keys), or None for a blank line.
    ``segment``: a line of a results file, checked by ``results_row``."""
    text = _decode(raw, where, fix)
    if not text.strip():
        return None
    row = _object(text, where, fix, one_line=True)
    missing = [key for key in required if key not in row]
    if missing:
        raise FusemtError(f"{where} has no {', '.join(repr(k) for k in missing)}: {fix}")
    return results_row(row, where, fix) if segment else row


def results_row(row: dict, where: str, fix: str) -> dict:
    """A results line as every reader needs it: its ``id`` as text, compared as the dataset's ids are
    (a hand edit from "1" to 1 stays segment "1"), and its ``hypothesis`` text (a missing, null or
    numeric one is refused: scoring it as empty, or skipping it, would report a wrong result)."""
    sid = row.get("id")
    if isinstance(sid, bool) or not isinstance(sid, (str, int)):
        raise FusemtError(f"{where}: 'id' is {_json_kind(sid) if 'id' in row else 'missing'}, not a segment id: {fix}")
    hypothesis = row.get("hypothesis")
    if not isinstance(hypothesis, str):
        kind = _json_kind(hypothesis) if "hypothesis" in row else "missing"
        raise FusemtError(f"{where}: 'hypothesis' is {kind}, not text: {fix}")
    return {**row, "id": str(sid)} if not isinstance(sid, str) else row


def read_jsonl_objects(path: Path, fix: str, required: tuple[str, ...] = (), segment: bool = False) -> list[dict]:
    """One JSON object per non-blank line (a results JSONL), each with the ``required`` keys (and,
    ``segment``, checked by ``results_row``); errors name ``path:line``."""
    rows = (parse_jsonl_line(raw, f"{path}:{n}", fix, required, segment)
            for n, raw in enumerate(path.read_bytes().split(b"\n"), 1))
    return [row for row in rows if row is not None]


def write_atomically(path: Path, text: str) -> None:
    """Write a derived file (metrics, trace page, report) whole or not at all: a full disk or a
    read-only folder keeps the old file, leaves no temporary file, and is one line naming the path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise os_error(err, path) from None
