"""A repetition guard over the decoded text (characters and character n-grams), not over pieces.

Pieces are the wrong unit when tokenizers differ: a byte-level BPE model spells ``メ`` as two
pieces (``\\xe3\\x83`` + ``\\xa1``) and a SentencePiece model as one, so a guard that compares
chosen pieces sees alternating pieces and never fires while the text loops ``メメメ…``. This guard
looks only at the characters a candidate completes, so it behaves the same whatever the pieces.
"""

from __future__ import annotations

from decoding.vocab import complete_utf8_prefix


class RepetitionGuard:
    """Forbids a candidate whose bytes would complete a run of more than ``max_char_repeats``
    equal characters, or a character n-gram of size ``no_repeat_ngram_size`` that the text already
    contains. 0 turns either check off. A candidate that ends inside a character is judged on the
    characters it completes; the character it leaves open is judged when it completes."""

    def __init__(self, max_char_repeats: int = 0, no_repeat_ngram_size: int = 0):
        self.max_char_repeats = max_char_repeats
        self.no_repeat_ngram_size = no_repeat_ngram_size

    @property
    def active(self) -> bool:
        return bool(self.max_char_repeats or self.no_repeat_ngram_size)

    def blocks(self, text: bytes, piece: bytes) -> bool:
        """Whether appending ``piece`` to the generated ``text`` repeats too much."""
        if not self.active:
            return False
        before = len(complete_utf8_prefix(text).decode("utf-8", errors="replace"))
        chars = complete_utf8_prefix(text + piece).decode("utf-8", errors="replace")
        return any(self._repeats_at(chars, i) for i in range(before, len(chars)))

    def _repeats_at(self, chars: str, i: int) -> bool:
        """Whether the character at ``i`` (the text so far being ``chars[:i]``) breaks a limit."""
        n = self.max_char_repeats
        if n and i >= n and chars[i - n:i + 1] == chars[i] * (n + 1):
            return True
        size = self.no_repeat_ngram_size
        return bool(size) and i + 1 >= size and chars.find(chars[i + 1 - size:i + 1], 0, i) >= 0
