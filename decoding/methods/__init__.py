"""The registry of decoding methods: one module each; importing this package registers the built-in ones.

A method is a ``Decoder`` subclass decorated with ``@register``; it describes itself (its typed
``Config``, what its trace origins mean, its per-segment stats record), so the runner, the config
schemas and the trace page read it from here instead of listing method names. Adding a method:
its module here, its ``conf/decoding/<name>.yaml``, its entry in docs/methods.md — tests/test_registry.py
fails when one of the three is missing.
"""

from __future__ import annotations

import inspect

from decoding.base import Decoder
from decoding.errors import FusemtError
from decoding.stats import SegmentStats

DECODERS: dict[str, type[Decoder]] = {}


def register(cls: type) -> type:
    """Class decorator: adds a method under its ``name``; refuses a duplicate name, a class that is
    not a concrete ``Decoder`` (so a missing ``origin_meaning`` fails at import, not in the trace page)."""
    if not (inspect.isclass(cls) and issubclass(cls, Decoder)):
        raise TypeError(f"register: {cls!r} is not a Decoder subclass")
    if inspect.isabstract(cls):
        raise TypeError(f"register: {cls.__name__} leaves abstract methods unimplemented: "
                        f"{', '.join(sorted(cls.__abstractmethods__))}")
    stats = getattr(cls, "Stats", None)
    if not (inspect.isclass(stats) and issubclass(stats, SegmentStats)):
        raise TypeError(f"register: {cls.__name__}.Stats must be its per-segment SegmentStats record "
                        "(decoding/stats.py)")
    name = getattr(cls, "name", "")
    if not name:
        raise TypeError(f"register: {cls.__name__} has no name")
    if name in DECODERS and DECODERS[name] is not cls:
        raise TypeError(f"register: decoding method '{name}' is already registered by {DECODERS[name].__qualname__}")
    DECODERS[name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(DECODERS)


def decoder_class(name: str) -> type[Decoder]:
    if name not in DECODERS:
        raise FusemtError(f"unknown decoding method '{name}': use one of {', '.join(method_names())}")
    return DECODERS[name]


# After register is defined: each module registers its method as it is imported.
from decoding.methods import beam, charwise, greedy, pool, speculative, tokenwise, unite  # noqa: E402,F401
