"""Where a tokenizer's encoding of a growing text stops changing: canonical re-encoding of the tail only.

``ModelStream.sync_canonical`` keeps every row's ids equal to the model's own encoding of the
generated text. Encoding the whole text every step costs O(length) per step; instead a row
remembers a **cut**: a byte offset ``c`` of a text ``H`` (its anchor) such that for every text ``T``
that extends ``H``, ``encode(T) == encode(H)[:n] + encode(T[c:])``. The step then encodes only
``T[c:]``. A rule per tokenizer family says which cuts are safe:

* SentencePiece-style BPE (Gemma: the normalizer turns spaces into ``▁``, no effective
  pre-tokenization, byte fallback): BPE merges join adjacent symbols into vocabulary tokens, so a
  character boundary whose two characters occur next to each other in no vocabulary token (added
  tokens included) is never crossed by a merge, whatever follows; both sides encode alone.
* Byte-level BPE with the GPT-2 pre-tokenizer regex and no normalizer (SmolLM2): merges never cross
  pre-token boundaries, and the regex (no look-behind, one character of look-ahead) decides a
  pre-token from the characters up to the one after it, so appending text changes at most the last
  two pre-tokens of ``H``: the start of the second-to-last one is a cut (unless an added token,
  which is split out before pre-tokenization, could span it or the tail holds one).

Any other tokenizer has no rule and is encoded whole, as before. tests/test_canonical.py checks
tail encoding == whole encoding on random and real texts for both embedded tokenizers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

SPACE_PIECE = "\u2581"


def _state(component) -> Optional[dict]:
    return None if component is None else json.loads(component.__getstate__())


def _char_before(text: bytes, p: int) -> str:
    q = p - 1
    while q > 0 and text[q] & 0xC0 == 0x80:
        q -= 1
    return text[q:p].decode("utf-8", errors="replace")


def _char_at(text: bytes, p: int) -> str:
    q = p + 1
    while q < len(text) and text[q] & 0xC0 == 0x80:
        q += 1
    return text[p:q].decode("utf-8", errors="replace")


@dataclass
class Cut:
    """``ids`` tokens spelling ``text[:offset]`` of the anchor ``text`` are final for any extension of it."""

    ids: int
    offset: int
    text: bytes


class TailRule:
    """The safe cuts of one tokenizer family (``of`` returns None for a tokenizer without a rule)."""

    family = ""

    def __init__(self, tokenizer):
        self.backend = tokenizer.backend_tokenizer
        added = [t.content for t in tokenizer.added_tokens_decoder.values()]
        self.added = [a for a in added if a]
        self.added_pairs = {a[i:i + 2] for a in self.added for i in range(len(a) - 1)}

    @staticmethod
    def of(tokenizer) -> Optional["TailRule"]:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or type(backend.model).__name__ != "BPE" or _state(backend.model).get("dropout"):
            return None
        normalizer, pre = _state(backend.normalizer), _state(backend.pre_tokenizer)
        if normalizer == {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_PIECE} and (
                pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})):
            return MergePairRule(tokenizer)
        if normalizer is None and pre is not None and pre.get("type") == "ByteLevel" and pre.get("use_regex") \
                and not pre.get("add_prefix_space"):
            return PreTokenRule(tokenizer)
        return None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The encodings of ``texts`` (tails of a few characters): one call each. The batch API
        (``encode_batch``) hands them to a thread pool, which for texts this short costs more than it
        saves: 1.25-1.62 against 0.83-0.86 ms per fused step at batch 8 here (docs/benchmarks.md)."""
        return [self.backend.encode(text, add_special_tokens=False).ids for text in texts]

    def encode_from(self, texts: list[bytes], cuts: list[Optional[Cut]], ids: list[list[int]],
                    token_bytes) -> list[Optional[list[int]]]:
        """Per text, its encoding given a cut of an anchor that it extends and ``ids`` that start with the
        cut's ids: those ids, then the encoding of the rest; None when that does not spell the text."""
        bases = [cut.offset if cut else 0 for cut in cuts]
        tails = self.encode([text[base:].decode("utf-8", errors="replace") for text, base in zip(texts, bases)])
        return [None if b"".join(token_bytes[t] or b"" for t in tail) != text[base:]
                else (own[:cut.ids] if cut else []) + tail
                for text, cut, own, base, tail in zip(texts, cuts, ids, bases, tails)]

    def advance(self, text: bytes, cut: Optional[Cut], ids: list[int], token_bytes) -> Optional[Cut]:
        """The latest safe cut of ``text`` given its encoding ``ids`` (searched after ``cut``; ``cut`` when none is)."""
        n, offset = (cut.ids, cut.offset) if cut else (0, 0)
        boundaries = []
        for tid in ids[n:]:
            offset += len(token_bytes[tid] or b"")
            boundaries.append(offset)
        found = self.last_cut(text, cut.offset if cut else 0, boundaries)
        return cut if found is None else Cut(n + boundaries.index(found) + 1, found, text)

    def last_cut(self, text: bytes, start: int, boundaries: list[int]) -> Optional[int]:
        """The latest safe cut among ``boundaries`` (byte offsets of token boundaries of ``text``'s
        encoding, increasing, all >= ``start``, the offset of a cut already known to be safe)."""
        raise NotImplementedError


class MergePairRule(TailRule):
    family = "sentencepiece-bpe"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.pairs = {piece[i:i + 2] for piece in self.backend.get_vocab(with_added_tokens=True)
                      for i in range(len(piece) - 1)}

    def last_cut(self, text: bytes, start: int, boundaries: list[int]) -> Optional[int]:
        for p in reversed(boundaries):
            if p <= start or p >= len(text) or text[p] & 0xC0 == 0x80:
                continue
            pair = (_char_before(text, p) + _char_at(text, p)).replace(" ", SPACE_PIECE)
            if pair not in self.pairs:
                return p
        return None


class PreTokenRule(TailRule):
    family = "byte-level-bpe"

    def last_cut(self, text: bytes, start: int, boundaries: list[int]) -> Optional[int]:
        tail = text[start:].decode("utf-8")
        if any(a in tail for a in self.added):
            return None
        spans = self.backend.pre_tokenizer.pre_tokenize_str(tail)
        if len(spans) < 3:
            return None
        cut = start + len(tail[:spans[-2][1][0]].encode("utf-8"))
        if cut not in boundaries or _char_before(text, cut) + _char_at(text, cut) in self.added_pairs:
            return None
        return cut
