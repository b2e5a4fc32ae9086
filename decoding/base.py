"""The one interface every decoding method implements, its typed output, and the registry.

A method is a class with a nested ``Config`` dataclass. The runner only calls
``decode(sources)``, which is ``prepare`` -> ``step`` until done -> ``finish``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from decoding.errors import FusemtError
from decoding.prompt import find_stop
from decoding.stats import SegmentStats
from decoding.vocab import complete_utf8_prefix

if TYPE_CHECKING:
    from decoding.model import LoadedModel
    from decoding.prompt import PromptConfig


@dataclass
class TraceStep:
    """One decoding step: the text piece it added and where it came from."""

    piece: str  # the added text (partial UTF-8 bytes shown with backslash escapes)
    piece_bytes: str  # hex of the raw bytes added; trace pieces concatenate to the raw output
    ids: dict[str, list[int]]  # per model: the token ids it appended for this piece
    logprob: dict[str, float | None]  # per model: log-probability of the choice (None: not scored)
    origin: str  # "both" / "all", a model name, "lookup", or for speculative "draft"/"target"
    end: bool = False  # the step chose an end token
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific (candidates, union size...)

    def to_json(self) -> dict:
        row = {"piece": self.piece, "piece_bytes": self.piece_bytes, "ids": self.ids, "logprob": self.logprob,
               "origin": self.origin}
        if self.end:
            row["end"] = True
        row.update(self.extra)
        return row


@dataclass
class DecodeOutput:
    text: str
    n_new_tokens: int
    trace: list[dict]
    stats: dict[str, Any] = field(default_factory=dict)  # the method's Stats record, as JSON
    warnings: list[str] = field(default_factory=list)
    pool: list[dict] | None = None  # methods that choose among finished texts: every candidate, scored


def show_bytes(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


def trace_step(data: bytes, **kwargs) -> TraceStep:
    return TraceStep(piece=show_bytes(data), piece_bytes=data.hex(), **kwargs)


def finalize_text(data: bytes) -> str:
    """The hypothesis: drop a character cut off at max_new_tokens, strip surrounding spaces."""
    return complete_utf8_prefix(data).decode("utf-8", errors="replace").strip()


def clip_trace(steps: list[TraceStep], stop_strings: list[str]) -> tuple[list[TraceStep], bytes, str | None]:
    """Cut the trace where a stop string starts; returns (steps, raw bytes, the stop that fired)."""
    raw = b"".join(bytes.fromhex(s.piece_bytes) for s in steps)
    cut = find_stop(raw, stop_strings)
    if cut is None:
        return steps, raw, None
    stop = next(s for s in stop_strings if s and raw.startswith(s.encode("utf-8"), cut))
    kept, offset = [], 0
    for step in steps:
        data = bytes.fromhex(step.piece_bytes)
        if offset + len(data) > cut:
            head = data[: cut - offset]
            if head:
                kept.append(TraceStep(piece=show_bytes(head), piece_bytes=head.hex(), ids=step.ids,
                                      logprob=step.logprob, origin=step.origin, extra={**step.extra, "stop": stop}))
            break
        kept.append(step)
        offset += len(data)
    return kept, raw[:cut], stop


# How much of each step an output keeps (the run's ``trace`` option): ``full`` every step with the
# method's extras (the ranked candidates, union size, rounds, covers), ``top`` every step's chosen piece,
# ids, log-probabilities and origin only, ``off`` no steps (the output keeps text, counts and stats).
TRACE_LEVELS = ("full", "top", "off")


def traced_output(steps: list[TraceStep], stop_strings: list[str], stats: SegmentStats, warnings: list[str],
                  trace: str = "full") -> DecodeOutput:
    """A sequence's output from its steps: cut at the first stop string, text finalised; the steps kept
    as the output's trace unless ``trace`` is off."""
    kept, raw, _ = clip_trace(steps, stop_strings)
    return DecodeOutput(text=finalize_text(raw), n_new_tokens=len(kept),
                        trace=[] if trace == "off" else [s.to_json() for s in kept],
                        stats=stats.to_json(), warnings=warnings)


TRUNCATED = "prompt truncated to the model's max_input_tokens"


def own_choice_meaning(origin: str, search: str) -> str:
    """The legend of a step a single model chose by itself (greedy, beam, an ensemble of one)."""
    return f"{origin}'s own {search} choice (single model)"


class Decoder(ABC):
    """A decoding method over one or more models (``LoadedModel``), behind prepare/step/finish."""

    name: ClassVar[str]
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = 1
    Stats: ClassVar[type[SegmentStats]]  # the per-segment stats record (decoding/stats.py): fields and how they combine
    # The run's ``trace`` level (TRACE_LEVELS), set by the runner like a model's prompt cache: it changes
    # what the outputs record, never the outputs, so methods skip the step work only the trace needs.
    trace: str = "full"

    @property
    def traces_steps(self) -> bool:
        """The outputs keep their steps (ids, log-probabilities, origin): ``trace`` is not ``off``."""
        return self.trace != "off"

    @property
    def traces_extras(self) -> bool:
        """The steps keep the method's extras (candidates, probabilities, rounds): ``trace=full``."""
        return self.trace == "full"

    @dataclass
    class Config:
        name: str = ""
        max_new_tokens: int = 128
        min_new_tokens: int = 0  # end tokens and stop strings are ignored before this many steps

        def __post_init__(self) -> None:
            """An option given under its old name (``option_alias``) becomes the current one; the old reads None."""
            resolved = resolve_aliases(type(self), {f.name: getattr(self, f.name) for f in fields(self)})
            for f in fields(self):
                setattr(self, f.name, resolved.get(f.name))

    @classmethod
    def check_config(cls, cfg: "Decoder.Config", n_models: int) -> None:
        """Checks that need no model, run at start-up before any model loads; subclasses add theirs."""
        if n_models < cls.min_models or (cls.max_models is not None and n_models > cls.max_models):
            want = (f"{cls.min_models}" if cls.max_models == cls.min_models
                    else f"{cls.min_models}..{cls.max_models or 'N'}")
            raise FusemtError(f"decoding={cls.name} takes {want} model(s), got {n_models}: "
                              "pick a matching models= config")
        if cfg.max_new_tokens < 1:
            raise FusemtError(f"decoding.max_new_tokens={cfg.max_new_tokens}: must be at least 1")
        if not 0 <= cfg.min_new_tokens <= cfg.max_new_tokens:
            raise FusemtError(f"decoding.min_new_tokens={cfg.min_new_tokens}: must be between 0 and max_new_tokens")

    @classmethod
    def uses_models(cls, cfg: "Decoder.Config") -> bool:
        """Whether this configuration needs the members loaded (not so for a combination of finished runs)."""
        return True

    @classmethod
    def samples(cls, cfg: "Decoder.Config") -> bool:
        """Whether this configuration draws random samples (its run's fingerprint then names the sampler)."""
        return getattr(cfg, "temperature", 0) > 0

    @classmethod
    @abstractmethod
    def origin_meaning(cls, origin: str, models: list[str]) -> str:
        """What a trace step's ``origin`` means for this method: the trace page's legend text for that
        colour. ``models``: the run's member names (an origin may be one of them, or several joined by +)."""

    def __init__(self, cfg: "Decoder.Config", models: list["LoadedModel"], prompt: "PromptConfig") -> None:
        self.check_config(cfg, len(models))
        self.cfg = cfg
        self.models = models
        self.prompt = prompt

    @abstractmethod
    def prepare(self, sources: list[str]) -> Any:
        """Render and encode prompts; return the batch state."""

    @abstractmethod
    def step(self, state: Any) -> bool:
        """Advance every unfinished sequence; return True while any work remains."""

    @abstractmethod
    def finish(self, state: Any) -> list[DecodeOutput]:
        """Turn the final state into one output per source, in order."""

    def decode(self, sources: list[str], segments: list | None = None) -> list[DecodeOutput]:
        """``segments``: the runner's segments of ``sources`` (``id``, ``reference``), for methods that
        match other runs' outputs by id or read references; the others ignore them."""
        state = self.prepare(sources)
        while self.step(state):
            pass
        return self.finish(state)


def later_option(default):
    """A decoding option added after results existed, whose default reproduces the behaviour from
    before it: left out of a run's fingerprint while at that default (``fingerprint_values``), so
    adding it does not rename, and orphan, the finished results of every run."""
    return field(default=default, metadata={"later": True})


def renamed_option(default, was: str, was_values: dict | None = None, later: bool = False):
    """An option that had another name, ``was`` (still accepted: an ``option_alias`` field of the same
    Config). The fingerprint spells it as ``was``, its value mapped through ``was_values`` where the
    old option took other values (draft_schedule=heuristic was adaptive=true), so the finished results
    of runs from before the rename keep their file."""
    return field(default=default, metadata={"later": later, "was": was, "was_values": was_values or {}})


def option_alias(of: str):
    """The old name of option ``of``: a value given under it (not None) is the value of ``of``."""
    return field(default=None, metadata={"alias_of": of})


def resolve_aliases(schema: type, values: dict) -> dict:
    """``values`` with each option given under an old name (``option_alias``) moved to its current
    name, the old names dropped; the two names given different values is a user mistake."""
    spec = {f.name: f for f in fields(schema)}
    out = dict(values)
    for name, f in spec.items():
        canonical = f.metadata.get("alias_of")
        given = out.pop(name, None) if canonical else None
        if given is None:
            continue
        target = spec[canonical]
        value = {old: new for new, old in target.metadata["was_values"].items()}.get(given, given)
        current = out.get(canonical, target.default)
        if current != target.default and current != value:
            raise FusemtError(f"decoding.{name}={given} and decoding.{canonical}={current} set one option twice: "
                              f"keep decoding.{canonical} ({name} is its old name)")
        out[canonical] = value
    return out


def fingerprint_values(schema: type, values: dict) -> dict:
    """``values`` (a method's decoding options) as the run's fingerprint has always spelled them: old
    names resolved, later options at their default left out, renamed options under their old name."""
    spec = {f.name: f for f in fields(schema)}
    out = {}
    for key, value in resolve_aliases(schema, values).items():
        meta = spec[key].metadata if key in spec else {}
        if meta.get("later") and value == spec[key].default:
            continue
        if meta.get("was"):
            key, value = meta["was"], meta["was_values"].get(value, value)
        out[key] = value
    return out


def current_options(cfg) -> dict:
    """A method's typed Config as a dict of its current option names (old-name aliases left out)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if not f.metadata.get("alias_of")}


def typed_config(schema: type, values: dict, what: str):
    """Merge ``values`` into the dataclass ``schema``: unknown keys and bad types fail here, at start-up."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        msg = str(err).strip().splitlines()[0]
        raise FusemtError(f"bad {what} option: {msg}") from None
