"""Candidate keys across the members' vocabularies, as tensors: the fused step's union and lookups
run per batch on the members' device instead of walking dictionaries per row.

A key is what a candidate adds to the text: its bytes, or ``END`` (key 0) for every end token.
Tokens of all members with identical bytes share one key id. Each member scores a key it did not
propose with its tokens of exactly those bytes (the likelier one counts) or, when it has none, with
the first token of its spelling of them (``ByteVocab.longest_prefix_token``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import numpy as np
import torch

from decoding.vocab import ByteVocab

END_KEY = 0
NO_KEY = -1  # a token that adds no text (masked before top-k), a padding slot, a key with no lookup token
RECENT_SETS = 4  # vocabulary sets whose tables are kept (``KeyTables.of``)


@dataclass
class KeyTables:
    key_bytes: list[Optional[bytes]]  # [K] each key's bytes; None for END_KEY
    key_of: list[torch.Tensor]  # per member m: [V_m] long, the key of each token (NO_KEY: adds no text)
    # per member n: [K, P_n] long, the tokens that score each key: those with exactly its bytes, padded by
    # repeating the first (a max over them is unchanged), else the first token of its spelling; NO_KEY: none
    lookup: list[torch.Tensor]
    exact: list[torch.Tensor]  # per member n: [K] bool, ``lookup`` spells exactly the key (always for END)
    copies: dict = field(default_factory=dict, repr=False)  # device -> these tables on it

    @classmethod
    def of(cls, vocabs: list[ByteVocab]) -> "KeyTables":
        """The tables of these vocabularies, built once for the last few sets: every decoder over the same
        members (a sweep's or a pool's jobs in one process) shares them."""
        ident = tuple(id(v) for v in vocabs)
        for i, (held, tables) in enumerate(_RECENT):
            if tuple(id(v) for v in held) == ident:  # ``held`` keeps them alive: an id is not reused meanwhile
                _RECENT.insert(0, _RECENT.pop(i))
                return tables
        tables = cls.build(vocabs)
        _RECENT.insert(0, (tuple(vocabs), tables))
        del _RECENT[RECENT_SETS:]
        return tables

    @classmethod
    def build(cls, vocabs: list[ByteVocab]) -> "KeyTables":
        """The tables of these vocabularies, on the CPU (vectorised but for the first-token search: about a
        second for Gemma 3's 262k tokens with SmolLM2's 49k)."""
        index: dict[bytes, int] = {}
        spellings = []  # per member: (the key of each distinct byte string it spells, its tokens' keys, ids, ranks)
        for vocab in vocabs:
            keys = np.array([index.setdefault(data, len(index) + 1) for data in vocab.bytes_to_ids], dtype=np.int64)
            counts = np.array([len(ids) for ids in vocab.bytes_to_ids.values()], dtype=np.int64)
            tids = np.fromiter(chain.from_iterable(vocab.bytes_to_ids.values()), dtype=np.int64, count=counts.sum())
            # each token's rank among the tokens of its bytes (bytes_to_ids lists them in id order)
            ranks = np.arange(len(tids)) - np.repeat(np.cumsum(counts) - counts, counts)
            spellings.append((keys, np.repeat(keys, counts), tids, ranks))
        key_bytes = [None, *index]
        key_of, lookup, exact = [], [], []
        for vocab, (keys, token_keys, tids, ranks) in zip(vocabs, spellings):
            table = np.full(len(vocab.token_bytes), NO_KEY, dtype=np.int64)
            table[tids] = token_keys
            table[vocab.end_id_tensor.numpy()] = END_KEY  # an end token is END whatever bytes it may have
            key_of.append(torch.from_numpy(table))
            ends = sorted(vocab.end_ids)
            ids = np.full((len(key_bytes), max(len(ends), int(ranks.max(initial=0)) + 1)), NO_KEY, dtype=np.int64)
            ids[token_keys, ranks] = tids
            ids[END_KEY, :len(ends)] = ends
            spelled = np.zeros(len(key_bytes), dtype=bool)
            spelled[keys] = spelled[END_KEY] = True
            missing = np.flatnonzero(~spelled)
            first = [vocab.longest_prefix_token(key_bytes[key]) for key in missing]
            ids[missing, 0] = [NO_KEY if tid is None else tid for tid in first]
            # pad with the first id: a max over the row is unchanged
            lookup.append(torch.from_numpy(np.where(ids == NO_KEY, ids[:, :1], ids)))
            exact.append(torch.from_numpy(spelled))
        return cls(key_bytes, key_of, lookup, exact)

    def on(self, device: torch.device) -> "KeyTables":
        """These tables on ``device`` (copied once per device)."""
        device = torch.device(device)
        if self.key_of[0].device == device:
            return self
        if device not in self.copies:
            self.copies[device] = KeyTables(self.key_bytes, *([t.to(device) for t in tables] for tables in
                                                               (self.key_of, self.lookup, self.exact)))
        return self.copies[device]


_RECENT: list[tuple[tuple[ByteVocab, ...], KeyTables]] = []  # most recently used first
