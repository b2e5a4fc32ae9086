"""Finished outputs of other runs as pool candidates (``decoding.runs`` of ``decoding=pool``).

An entry is a fusemt results JSONL (matched by segment id; its sources must be this dataset's),
a run name (``results/<group>/ensemble/<name>.jsonl``), or a plain hypothesis file with one line per
dataset row (WMT submissions: canary line included). A ``decoding=pool`` run's rows give their whole
pool, each candidate as often as it was generated, with its origins under the run's (``run:<stem>/<origin>``):
one run's samples can then join a larger pool without being generated again. Everything is read and checked before any
model loads; a file that is missing, misaligned or of another dataset stops the run with one line.
"""

from __future__ import annotations

from pathlib import Path

from decoding.errors import FusemtError
from runners.data import DatasetConfig, Segment, load_records
from runners.score import read_hypotheses, read_results_rows


def _resolve(entry: str, results_dir: Path, dataset: DatasetConfig) -> Path:
    path = Path(entry).expanduser()
    if path.exists():
        return path
    named = results_dir / dataset.results_group / "ensemble" / f"{entry}.jsonl"
    if named.exists():
        return named
    raise FusemtError(f"decoding.runs: '{entry}' is neither a file nor a run in {named.parent}: "
                      "give a results JSONL, a run name or a hypothesis file with one line per dataset row")


def origin_name(path: Path) -> str:
    return f"run:{path.stem}"


def load_run_candidates(runs: list[str], dataset: DatasetConfig, segments: list[Segment],
                        results_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """segment id -> [(origin, text)] for every selected segment, in ``runs`` order."""
    out: dict[str, list[tuple[str, str]]] = {s.id: [] for s in segments}
    paths = [_resolve(entry, results_dir, dataset) for entry in runs]
    names = [origin_name(p) for p in paths]
    if len(set(names)) != len(names):
        raise FusemtError(f"decoding.runs lists two files named {next(n for n in names if names.count(n) > 1)[4:]}: "
                          "each run once (rename one file)")
    records = None
    for path, origin in zip(paths, names):
        if path.suffix != ".jsonl":
            by_row, _ = read_hypotheses(path)
            records = records if records is not None else load_records(dataset)
            if len(by_row) != len(records):
                raise FusemtError(f"decoding.runs: {path} has {len(by_row)} lines but dataset '{dataset.name}' has "
                                  f"{len(records)} rows: a hypothesis file needs exactly one line per dataset row")
            for seg in segments:
                out[seg.id].append((origin, by_row[seg.row].strip()))
            continue
        rows = read_results_rows(path)
        missing = [s.id for s in segments if s.id not in rows]
        if missing:
            raise FusemtError(f"decoding.runs: {path} has no output for {len(missing)} selected segment(s) of dataset "
                              f"'{dataset.name}' (first: {missing[0]}): finish that run or select its segments")
        foreign = [s.id for s in segments if rows[s.id].get("source", s.source) != s.source]
        if foreign:
            raise FusemtError(f"decoding.runs: {path} translated another text for segment {foreign[0]}: it is a run of "
                              f"another dataset than '{dataset.name}'")
        for seg in segments:
            out[seg.id] += _row_candidates(rows[seg.id], origin)
    return out


def _row_candidates(row: dict, origin: str) -> list[tuple[str, str]]:
    """A results row's candidates: its hypothesis, or every generation of a pool run's pool."""
    if not row.get("pool"):
        return [(origin, row["hypothesis"])]
    return [(f"{origin}/{inner}", cand["text"]) for cand in row["pool"]
            for inner, count in cand["origins"].items() for _ in range(count)]
