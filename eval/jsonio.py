"""Reading fusemt's JSON files with one-line errors: a corrupt file names itself, the line, and the fix."""

from __future__ import annotations

import json
from pathlib import Path

from decoding.errors import FusemtError


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


def parse_jsonl_line(raw: bytes, where: str, fix: str, required: tuple[str, ...] = ()) -> dict | None:
    """One line of a JSONL file: its object (with the ``required`` keys), or None for a blank line."""
    text = _decode(raw, where, fix)
    if not text.strip():
        return None
    row = _object(text, where, fix, one_line=True)
    missing = [key for key in required if key not in row]
    if missing:
        raise FusemtError(f"{where} has no {', '.join(repr(k) for k in missing)}: {fix}")
    return row


def read_jsonl_objects(path: Path, fix: str, required: tuple[str, ...] = ()) -> list[dict]:
    """One JSON object per non-blank line (a results JSONL), each with the ``required`` keys;
    errors name ``path:line``."""
    rows = (parse_jsonl_line(raw, f"{path}:{n}", fix, required) for n, raw in enumerate(path.read_bytes().split(b"\n"), 1))
    return [row for row in rows if row is not None]
