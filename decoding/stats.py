"""Per-segment method statistics: typed records whose fields declare how they combine over a run.

A method's ``Decoder.Stats`` is a dataclass of ``SegmentStats``; every field is declared with one of
``mean()``, ``total()``, ``constant()``, ``per_model()`` or ``part()`` (a nested record). A segment's
record goes into its results row as JSON (``to_json``: fields that are None left out, as a method
records its optional parts, e.g. ``speculation``, only when it uses them); ``summarize`` combines the
rows of a run into the run-level figures of the metrics file:

- ``mean``: averaged over the segments that have it (rates, per-segment step counts), 4 decimals;
- ``sum``: summed over the run (totals);
- ``constant``: one value for the whole run (a setting echoed per segment, e.g. beam's ``num_beams``);
  a run whose rows disagree reports the distinct values as a list, never a sum;
- ``per_model_sum``: ``{member name: count}`` summed member by member (forward passes, cache crops);
- ``part``: a nested record, combined field by field over the rows that have it.

A row field the record does not declare is left out of the summary (rows are read back from
results files that earlier versions wrote).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

MEAN, SUM, CONSTANT, PER_MODEL_SUM, PART = "mean", "sum", "constant", "per_model_sum", "part"


def mean(default: Any = MISSING, was: str | None = None):
    """``was``: the field's name in rows written before it was renamed."""
    return field(default=default, metadata={"combine": MEAN, "was": was})


def total(default: Any = MISSING):
    return field(default=default, metadata={"combine": SUM})


def constant(default: Any = MISSING):
    return field(default=default, metadata={"combine": CONSTANT})


def per_model():
    return field(default_factory=dict, metadata={"combine": PER_MODEL_SUM})


def part(record: type["SegmentStats"]):
    """An optional nested record (None: the segment has no such part)."""
    return field(default=None, metadata={"combine": PART, "record": record})


@dataclass
class SegmentStats:
    """Base of every method's stats record."""

    ROUND: ClassVar[int] = 4  # decimals of a mean

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = value.to_json() if isinstance(value, SegmentStats) else (
                dict(value) if isinstance(value, dict) else value)
        return out

    @classmethod
    def combine_kinds(cls) -> dict[str, str]:
        """Field name -> how it combines (nested parts as ``part``): what docs and tests read."""
        return {f.name: f.metadata["combine"] for f in fields(cls)}

    @classmethod
    def summarize(cls, rows: list[dict]) -> dict:
        """The run-level figures of these per-segment records (each a row's ``stats`` dict)."""
        out: dict = {}
        for f in fields(cls):
            was = f.metadata.get("was")
            values = [value for row in rows if (value := row.get(f.name, row.get(was) if was else None)) is not None]
            if not values:
                continue
            kind = f.metadata["combine"]
            if kind == MEAN:
                out[f.name] = round(sum(values) / len(values), cls.ROUND)
            elif kind == SUM:
                out[f.name] = sum(values)
            elif kind == CONSTANT:
                distinct = list(dict.fromkeys(values))
                out[f.name] = distinct[0] if len(distinct) == 1 else distinct
            elif kind == PER_MODEL_SUM:
                per_model_totals: dict[str, Any] = {}
                for counts in values:
                    for name, n in counts.items():
                        per_model_totals[name] = per_model_totals.get(name, 0) + n
                out[f.name] = per_model_totals
            else:
                out[f.name] = f.metadata["record"].summarize(values)
        return out


@dataclass
class SingleModelStats(SegmentStats):
    """greedy, beam: Hugging Face ``generate`` over one model."""

    forward_passes: dict[str, int] = per_model()  # generate's steps (each a pass over the batch)


@dataclass
class SpeculationStats(SegmentStats):
    """A speculative ensemble's figures (``num_draft_tokens`` > 0). ``acceptance_rate`` is the same
    stat as the ``speculative`` method's: the share of the draft that verification kept (here, fused
    steps that followed the draft); rows written before it was renamed call it ``draft_acceptance``."""

    rounds: int = total()
    drafted_steps: int = total()  # fused steps that took the draft's piece
    corrected_steps: int = total()  # fused steps that left the draft
    acceptance_rate: float = mean(was="draft_acceptance")


@dataclass
class BeamStats(SegmentStats):
    num_beams: int = constant()
    score: float = mean()  # the chosen hypothesis's length-penalised log-probability


@dataclass
class FusionStats(SegmentStats):
    """tokenwise, unite (``decoding/fusion.py``)."""

    steps: int = mean()
    agreement_rate: float = mean()  # steps where every model's own top-1 was the same piece
    cache_crops: dict[str, int] = per_model()
    forward_passes: dict[str, int] = per_model()
    speculation: SpeculationStats | None = part(SpeculationStats)
    beam: BeamStats | None = part(BeamStats)
