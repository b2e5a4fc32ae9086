"""Datasets: WMT24++ (hub or local JSONL), the official WMT24 layout, and the bundled sample."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from decoding import hub
from decoding.errors import FusemtError
from eval.jsonio import parse_jsonl_line

SAMPLE_PATH = Path(__file__).parent / "resources" / "sample_en_ja.jsonl"


@dataclass
class DatasetConfig:
    name: str = "sample_en_ja"
    path: Optional[str] = None  # local JSONL; None: the hub dataset (or the bundled sample)
    hub_id: Optional[str] = None  # e.g. google/wmt24pp
    hub_config: Optional[str] = None  # e.g. en-ja_JP
    split: str = "train"
    reference_field: str = "target"  # WMT24++: target (post-edited) or original_target
    limit: Optional[int] = None
    domains: list[str] = field(default_factory=list)  # keep only these domains (empty: all)
    ids_file: Optional[str] = None  # keep only the segment ids listed in this file (one per line, # comments)
    shard: Optional[str] = None  # "i/n": the i-th of n interleaved shards (0-based)
    results_group: str = "sample"  # results/<results_group>/ensemble/<run_name>.jsonl


@dataclass
class Segment:
    id: str
    source: str
    reference: Optional[str]
    domain: Optional[str] = None
    doc_id: Optional[str] = None
    row: int = 0  # line of the record in its file (aligns hypothesis files)


CANARY_DOMAIN = "canary"


def _text_field(rec: dict, key: str, row: int, required: bool) -> Optional[str]:
    value = rec.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        problem = ("is missing" if key not in rec
                   else f"is {'null' if value is None else type(value).__name__}, not text")
        raise FusemtError(f"dataset line {row + 1}: '{key}' {problem}: every row needs a '{key}' string")
    return value


def _record_to_segment(rec: dict, row: int, reference_field: str) -> Optional[Segment]:
    """Map one record of any supported layout to a Segment; None for rows to drop."""
    if "segment_id" in rec or "is_bad_source" in rec:  # WMT24++ (google/wmt24pp)
        if rec.get("is_bad_source"):
            return None
        if reference_field not in rec:
            raise FusemtError(f"dataset has no field '{reference_field}': "
                              "use dataset.reference_field=target or original_target")
        return Segment(id=str(rec["segment_id"]), source=_text_field(rec, "source", row, True),
                       reference=_text_field(rec, reference_field, row, False), domain=rec.get("domain"),
                       doc_id=rec.get("document_id"), row=row)
    if rec.get("domain") == CANARY_DOMAIN or rec.get("doc_id") == CANARY_DOMAIN:  # official WMT24 canary line
        return None
    return Segment(id=str(rec.get("id", row)), source=_text_field(rec, "source", row, True),
                   reference=_text_field(rec, "reference", row, False), domain=rec.get("domain"),
                   doc_id=rec.get("doc_id"), row=row)


def _read_jsonl(path: Path) -> list:
    if not path.exists():
        raise FusemtError(f"dataset file {path} not found: check dataset.path")
    with path.open("rb") as f:
        records = [parse_jsonl_line(raw, f"{path}:{n}",
                                    "expected one JSON object per line (WMT24, WMT24++ or fusemt layout)")
                   for n, raw in enumerate(f, 1)]
    return [rec for rec in records if rec is not None]


def _read_hub(cfg: DatasetConfig) -> list[dict]:
    # A hub that cannot be reached is known within a second (decoding/hub.py): then only the local
    # datasets cache is read, instead of retrying the hub for half a minute before the same answer.
    unreachable = hub.unavailable_reason()
    try:
        import datasets

        offline = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = offline or unreachable is not None
        try:
            return list(datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=cfg.split))
        finally:
            datasets.config.HF_HUB_OFFLINE = offline
    except Exception as err:  # offline, unknown id, ...: one line, with the fix
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        why = f" ({unreachable})" if unreachable else ""
        raise FusemtError(
            f"cannot load hub dataset {cfg.hub_id}/{cfg.hub_config}: {first}{why} — offline, pass a local copy with "
            "dataset.path=<file.jsonl>"
        ) from None


def read_ids_file(path: Path) -> list[str]:
    """Segment ids, one per line; blank lines and ``#`` comments ignored."""
    if not path.is_file():
        raise FusemtError(f"dataset.ids_file {path} not found: give a file of segment ids, one per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FusemtError(f"dataset.ids_file {path} is not UTF-8 text: "
                          "give a file of segment ids, one per line") from None
    ids = [line.split("#", 1)[0].strip() for line in lines]
    ids = [i for i in ids if i]
    if len(set(ids)) != len(ids):
        raise FusemtError(f"dataset.ids_file {path} lists an id twice: each segment once")
    if not ids:
        raise FusemtError(f"dataset.ids_file {path} lists no ids")
    return ids


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise FusemtError(f"dataset.shard='{shard}' is not 'i/n' (e.g. 0/4)") from None
    if not 0 <= index < count:
        raise FusemtError(f"dataset.shard='{shard}': need 0 <= i < n")
    return index, count


def dataset_location(cfg: DatasetConfig) -> str:
    """Where the dataset is read from, for messages."""
    if cfg.path:
        return str(Path(cfg.path).expanduser())
    return f"hub {cfg.hub_id}/{cfg.hub_config}" if cfg.hub_id else str(SAMPLE_PATH)


def dataset_segments(cfg: DatasetConfig, records: list) -> dict[str, Segment]:
    """Every segment of the dataset by id, whatever the selection (domains, ids_file, limit, shard)."""
    return {s.id: s for s in load_segments(replace(cfg, limit=None, shard=None, domains=[], ids_file=None), records)}


def load_records(cfg: DatasetConfig) -> list:
    if cfg.path:
        return _read_jsonl(Path(cfg.path).expanduser())
    if cfg.hub_id:
        return _read_hub(cfg)
    return _read_jsonl(SAMPLE_PATH)


def load_segments(cfg: DatasetConfig, records: Optional[list] = None) -> list[Segment]:
    """Read (or take ``records``), drop canary/bad-source rows, check ids, then select: domains, limit, shard."""
    if cfg.limit is not None and cfg.limit < 1:
        raise FusemtError(f"dataset.limit={cfg.limit}: must be a positive number of segments, or null for all")
    if records is None:
        records = load_records(cfg)
    segments = [s for row, rec in enumerate(records) if (s := _record_to_segment(rec, row, cfg.reference_field))]
    seen: dict[str, int] = {}
    for s in segments:
        if s.id in seen:
            raise FusemtError(f"dataset '{cfg.name}': segment id '{s.id}' appears on lines {seen[s.id] + 1} and "
                              f"{s.row + 1}: ids must be unique (results are matched by id)")
        seen[s.id] = s.row
    if cfg.domains:
        segments = [s for s in segments if s.domain in set(cfg.domains)]
    if cfg.ids_file:
        wanted = read_ids_file(Path(cfg.ids_file).expanduser())
        unknown = sorted(set(wanted) - {s.id for s in segments})
        if unknown:
            raise FusemtError(f"dataset.ids_file {cfg.ids_file}: {len(unknown)} id(s) not in dataset '{cfg.name}' "
                              f"(first: {unknown[0]}): check dataset.path/domains or the file")
        order = {seg_id: n for n, seg_id in enumerate(wanted)}
        segments = sorted((s for s in segments if s.id in order), key=lambda s: order[s.id])
    if cfg.limit is not None:
        segments = segments[: cfg.limit]
    if cfg.shard:  # last, so that the shards of a run partition exactly its selection
        index, count = parse_shard(cfg.shard)
        segments = segments[index::count]
    if not segments:
        raise FusemtError(f"dataset '{cfg.name}' selects no segments: check dataset.domains/shard/limit")
    return segments
