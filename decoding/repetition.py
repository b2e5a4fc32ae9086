"""A repetition guard over the decoded text (characters and character n-grams), not over pieces.

Pieces are the wrong unit when tokenizers differ: a byte-level BPE model spells ``メ`` as two
pieces (``\\xe3\\x83`` + ``\\xa1``) and a SentencePiece model as one, so a guard that compares
chosen pieces sees alternating pieces and never fires while the text loops ``メメメ…``. This guard
looks only at the characters a candidate completes, so it behaves the same whatever the pieces.
"""

from __future__ import annotations

from decoding.errors import FusemtError
from decoding.vocab import complete_utf8_prefix


class RepetitionGuard:
    """Forbids a candidate whose bytes would complete a unit of 1..``repeat_unit`` characters
    occurring more than ``max_repeats`` times in a row (``メメメ…``, ``ゼルゼル…``), or a character
    n-gram of size ``no_repeat_ngram_size`` that the text already contains. 0 turns either check
    off. A candidate that ends inside a character is judged on the characters it completes; the
    character it leaves open is judged when it completes."""

    def __init__(self, max_repeats: int = 0, no_repeat_ngram_size: int = 0, repeat_unit: int = 1):
        for option, value, least in (("max_repeats", max_repeats, 0), ("no_repeat_ngram_size", no_repeat_ngram_size, 0),
                                     ("repeat_unit", repeat_unit, 1)):
            if value < least:
                raise FusemtError(f"decoding.{option}={value}: must be at least {least}")
        self.max_repeats = max_repeats
        self.repeat_unit = repeat_unit
        self.no_repeat_ngram_size = no_repeat_ngram_size

    @classmethod
    def from_config(cls, cfg) -> "RepetitionGuard":
        """From a method's ``max_repeats``, ``no_repeat_ngram_size`` and ``repeat_unit`` options."""
        return cls(cfg.max_repeats, cfg.no_repeat_ngram_size, cfg.repeat_unit)

    @property
    def active(self) -> bool:
        return bool(self.max_repeats or self.no_repeat_ngram_size)

    def blocks(self, text: bytes, piece: bytes) -> bool:
        """Whether appending ``piece`` to the generated ``text`` repeats too much."""
        if not self.active:
            return False
        before = len(complete_utf8_prefix(text).decode("utf-8", errors="replace"))
        chars = complete_utf8_prefix(text + piece).decode("utf-8", errors="replace")
        return any(self._repeats_at(chars, i) for i in range(before, len(chars)))

    def _repeats_at(self, chars: str, i: int) -> bool:
        """Whether the character at ``i`` (the text so far being ``chars[:i]``) breaks a limit."""
        end, n = i + 1, self.max_repeats
        for unit in range(1, self.repeat_unit + 1) if n else ():
            span = (n + 1) * unit
            if end >= span and chars[end - span:end] == chars[end - unit:end] * (n + 1):
                return True
        size = self.no_repeat_ngram_size
        return bool(size) and end >= size and chars.find(chars[end - size:end], 0, i) >= 0
