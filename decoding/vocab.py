"""Byte-level view of a vocabulary: what raw bytes each token id adds to the text.

Ensembling across tokenizers compares candidates by the bytes they add, never by piece strings
(see shared notes: byte-level BPE splits kana/kanji into partial UTF-8 bytes, SentencePiece emits
``<0xE3>``-style byte-fallback pieces, and the two never match as strings).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> raw byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_types(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return set()
    spec = json.loads(backend.decoder.__getstate__())
    found = {spec.get("type")}
    for sub in spec.get("decoders", []) or []:
        found.add(sub.get("type"))
    return found


def utf8_char_len(lead: int) -> int:
    """Bytes of the UTF-8 character that starts with byte ``lead``; 0 for a byte that starts none (a
    continuation byte, or C0, C1, F5..FF, which never occur in UTF-8): the one definition every
    module uses (the trace page's character chips, charwise's character sets, the UTF-8 masks)."""
    if lead < 0x80:
        return 1
    if lead < 0xC2:
        return 0
    if lead < 0xE0:
        return 2
    if lead < 0xF0:
        return 3
    return 4 if lead < 0xF5 else 0


# The byte after these lead bytes has a narrower range than 80..BF: no overlong forms, no
# surrogates, nothing past U+10FFFF.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def utf8_next_byte_range(unfinished: bytes) -> tuple[int, int]:
    """(low, high): the bytes that may follow ``unfinished``, the bytes of a cut-off character
    (anything when it is empty)."""
    if not unfinished:
        return 0x00, 0xFF
    if len(unfinished) == 1:
        return _SECOND_BYTE.get(unfinished[0], (0x80, 0xBF))
    return 0x80, 0xBF


def utf8_pending(data: bytes) -> int:
    """How many continuation bytes the text still needs to end on a complete character."""
    i = len(data) - 1
    seen = 0
    while i >= 0 and seen < 4:
        need = utf8_char_len(data[i])
        if need:
            return max(need - 1 - seen, 0)
        seen += 1
        i -= 1
    return 0


def complete_utf8_prefix(data: bytes) -> bytes:
    """``data`` without a trailing character that is cut off (its lead byte and what follows)."""
    if not utf8_pending(data):
        return data
    cut = len(data) - 1
    while cut > 0 and 0x80 <= data[cut] < 0xC0:
        cut -= 1
    return data[:cut]


def _split_continuation(data: bytes) -> tuple[int, bool]:
    """(leading continuation bytes, whether the rest is a valid UTF-8 prefix)."""
    lead = 0
    while lead < len(data) and 0x80 <= data[lead] < 0xC0:
        lead += 1
    rest = data[lead:]
    i = 0
    while i < len(rest):
        need = utf8_char_len(rest[i])
        if need == 0:
            return lead, False
        chunk = rest[i : i + need]
        if any(not (0x80 <= c < 0xC0) for c in chunk[1:]):
            return lead, False
        low, high = utf8_next_byte_range(chunk[:1])
        if len(chunk) > 1 and not low <= chunk[1] <= high:
            return lead, False
        if len(chunk) == need:
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                return lead, False
        i += need
    return lead, True


@dataclass
class ByteVocab:
    """token id -> raw bytes, plus the tables needed to keep fused text valid UTF-8.

    ``token_bytes[i]`` is None for special/control tokens (they add no text). ``end_ids`` are the
    ids that end a sequence for this model.
    """

    token_bytes: list[bytes | None]
    end_ids: frozenset[int]
    bytes_to_ids: dict[bytes, list[int]]
    lead_continuation: torch.Tensor  # [V] number of leading UTF-8 continuation bytes
    length: torch.Tensor  # [V] byte length (0 for special tokens)
    tail_valid: torch.Tensor  # [V] bytes after the leading continuation bytes form a valid UTF-8 prefix
    is_text: torch.Tensor  # [V] adds text (not a special/control token)
    max_token_bytes: int
    end_id_tensor: torch.Tensor  # end_ids as a sorted index tensor
    first_byte: torch.Tensor  # [V] first byte of each token (-1 for special tokens)

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, extra_end_ids: set[int] | None = None) -> "ByteVocab":
        byte_level = "ByteLevel" in _decoder_types(tokenizer)
        inverse = _byte_level_decoder()
        special_ids = set(tokenizer.all_special_ids)
        for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if added.special:
                special_ids.add(tid)
        # Index only within the tokenizer's real vocabulary: models may pad the embedding matrix.
        pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
        token_bytes: list[bytes | None] = [None] * vocab_size
        for tid, piece in enumerate(pieces):
            if piece is None or tid in special_ids:
                continue
            if byte_level:
                try:
                    token_bytes[tid] = bytes(inverse[ch] for ch in piece)
                except KeyError:  # an added, non-byte-level token: its text is literal
                    token_bytes[tid] = piece.encode("utf-8")
            else:
                m = _BYTE_FALLBACK.match(piece)
                token_bytes[tid] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")
        end_ids = set(extra_end_ids or ())
        if tokenizer.eos_token_id is not None:
            end_ids.add(tokenizer.eos_token_id)
        known = tokenizer.get_vocab()
        for name in ("<|im_end|>", "<end_of_turn>", "</s>", "<|endoftext|>", "<|eot_id|>", "<eos>"):
            if known.get(name, vocab_size) < vocab_size:
                end_ids.add(known[name])
        return cls.build(token_bytes, frozenset(end_ids))

    @classmethod
    def build(cls, token_bytes: list[bytes | None], end_ids: frozenset[int]) -> "ByteVocab":
        bytes_to_ids: dict[bytes, list[int]] = {}
        lead = torch.zeros(len(token_bytes), dtype=torch.int16)
        length = torch.zeros(len(token_bytes), dtype=torch.int16)
        first = torch.full((len(token_bytes),), -1, dtype=torch.int16)
        tail_ok = torch.zeros(len(token_bytes), dtype=torch.bool)
        for tid, data in enumerate(token_bytes):
            if not data:
                continue
            bytes_to_ids.setdefault(data, []).append(tid)
            n_lead, ok = _split_continuation(data)
            lead[tid], length[tid], tail_ok[tid], first[tid] = n_lead, len(data), ok, data[0]
        return cls(
            token_bytes=token_bytes,
            end_ids=end_ids,
            bytes_to_ids=bytes_to_ids,
            lead_continuation=lead,
            length=length,
            tail_valid=tail_ok,
            is_text=length > 0,
            max_token_bytes=int(length.max()) if len(token_bytes) else 0,
            end_id_tensor=torch.tensor(sorted(end_ids), dtype=torch.long),
            first_byte=first,
        )

    def admissible(self, pending: torch.Tensor, unfinished: list[bytes] | None = None) -> torch.Tensor:
        """[B, V] mask of text tokens that keep the text a valid UTF-8 prefix.

        ``pending[b]`` is how many continuation bytes sequence b still needs. A token must first
        supply exactly those (or all of its bytes, if shorter), then continue with valid UTF-8.
        ``unfinished[b]``, the bytes of sequence b's cut-off final character (b"" when none), also
        narrows the byte right after a lead byte (E0, ED, F0, F4 allow less than 80..BF).
        """
        device = self.length.device
        pending = pending.to(device=device, dtype=torch.int16)[:, None]
        lead, length = self.lead_continuation[None, :], self.length[None, :]
        completes = (lead == pending) & self.tail_valid[None, :]
        stays_inside = (length <= pending) & (lead == length)
        allowed = self.is_text[None, :] & (completes | stays_inside)
        if unfinished is not None:
            low, high = torch.tensor([utf8_next_byte_range(u) for u in unfinished], dtype=torch.int16,
                                     device=device).reshape(-1, 2).T
            allowed &= (self.first_byte[None, :] >= low[:, None]) & (self.first_byte[None, :] <= high[:, None])
        return allowed

    def allowed_after(self, texts: list[bytes], may_end: torch.Tensor) -> torch.Tensor:
        """[B, V] mask of the tokens that may follow each text: text tokens that keep it a valid UTF-8
        prefix (``admissible``), and the end tokens where ``may_end`` ([B] bool)."""
        pending = [utf8_pending(text) for text in texts]
        if any(pending):
            allowed = self.admissible(torch.tensor(pending), [text[len(complete_utf8_prefix(text)):] for text in texts])
        else:  # the common case, every text on a character boundary: one mask for all rows
            allowed = self.after_complete_text.expand(len(texts), -1).clone()
        allowed[:, self.end_id_tensor] = may_end.to(allowed.device)[:, None]
        return allowed

    def forbidden_after(self, texts: list[bytes], may_end: torch.Tensor) -> torch.Tensor:
        """``~allowed_after(texts, may_end)``, broadcastable to [B, V]: when every text ends on a complete
        character and every row may end (or none may), one [1, V] mask shared by all rows."""
        if texts and not any(utf8_pending(text) for text in texts) and bool(may_end.all() or not may_end.any()):
            return self.forbidden_after_complete_text[int(may_end[0])]
        return ~self.allowed_after(texts, may_end)

    @cached_property
    def forbidden_after_complete_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, V] forbidden masks after a text ending on a complete character: (may not end, may end)."""
        return tuple(~self.allowed_after([b""], torch.tensor([end])) for end in (False, True))

    @cached_property
    def after_complete_text(self) -> torch.Tensor:
        """[1, V] ``admissible`` mask after a text that ends on a complete character."""
        return self.admissible(torch.zeros(1, dtype=torch.int16), [b""])

    def on(self, device: torch.device) -> "ByteVocab":
        """This vocabulary with its tensors on ``device`` (copied once per device): its masks are then built
        where the log-probabilities they mask are."""
        device = torch.device(device)
        if device == self.length.device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            copies[device] = dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                                          for f in dataclasses.fields(self)
                                                          if isinstance(getattr(self, f.name), torch.Tensor)})
        return copies[device]

    def spell(self, ids) -> bytes:
        """The bytes these token ids add to the text (a token that adds none, as an end token: nothing)."""
        return b"".join(self.token_bytes[t] or b"" for t in ids)

    def longest_prefix_token(self, data: bytes) -> int | None:
        """The id of the longest vocabulary token that is a prefix of ``data``."""
        for n in range(min(len(data), self.max_token_bytes), 0, -1):
            ids = self.bytes_to_ids.get(data[:n])
            if ids:
                return ids[0]
        return None

    def segment(self, data: bytes) -> list[int]:
        """Any byte string as this vocabulary's tokens, longest match first.

        Byte-level BPE and SentencePiece with byte fallback both cover every single byte, so this
        always succeeds for them; it raises for vocabularies that cannot spell ``data``.
        """
        ids = []
        while data:
            tid = self.longest_prefix_token(data)
            if tid is None:
                raise ValueError(f"the vocabulary cannot spell byte {data[:1]!r}")
            ids.append(tid)
            data = data[len(self.token_bytes[tid]) :]
        return ids
