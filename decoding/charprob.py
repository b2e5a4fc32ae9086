"""Next-character probabilities of a token-level language model, summed over its tokenizations.

The exact quantity (see ``shared/notes/character-level-fusion.md``): for text ``s`` (bytes after
the model's *anchor*, the prompt tokens it conditions on), a *cover* is a token sequence whose
bytes start with ``s`` and whose bytes without its last token are a proper prefix of ``s``. The
probability that the model's output starts with ``s`` is the sum of the covers' probabilities,
and P(next character c | s) = P(prefix s·c) / P(prefix s); END is the probability that the output
is exactly ``s`` (a tokenization of ``s``, then an end token). Every model then speaks the same
alphabet, whatever its tokenizer (SentencePiece with ``<0xE3>`` byte fallback and ``▁``, byte-level
BPE with partial UTF-8 pieces, duplicate spellings of one byte string).

Data structures
  * ``CharTables`` (once per vocabulary): the text tokens sorted by their bytes, so the tokens that
    start with any byte string are one contiguous range, and the probability mass of a range is a
    difference of two entries of a cumulative sum. Precomputed groups of that order: by first
    character (all characters the vocabulary can start with), by leading continuation bytes (to
    complete a character another token started), and, cached per open prefix, by the character
    after it.
  * ``Node``: a token path T after the anchor with weight P(T), the text offset where its bytes
    end, and, once *scored* (one forward pass), the cumulative next-token probabilities. A node
    whose bytes end before the end of ``s`` is a cover hypothesis: its covers are T plus one token
    that starts with the rest of ``s`` (the *open* bytes), of mass ``weight × M(open)``. A node
    ending exactly at ``s`` is a closed token (it waits for the next character); a node ending
    inside the next character is *ahead* (it holds the character's first bytes).
  * ``CoverBeam``: the nodes of one model for one sequence. The next character's masses: from a
    cover hypothesis, the tokens that extend its open bytes by a whole character; from a closed
    node, every first character of a token, and END; from an ahead node, the tokens that complete
    its character. Tokens that end inside the next character create ahead nodes, which need a
    forward pass of their own: scoring proceeds in levels (at most one per byte of a character,
    usually one or two), every level one batched call per model. What a scored node adds is kept
    in arrays, not per character or per token in Python: its ahead children (``Children``: one per
    token that ends inside a character, hundreds for a byte-level BPE, nearly all below the pruning
    floor) become ``Node`` objects only when one is needed on its own, in the place in the beam's
    order it was given; its masses of characters outside the root (``CharMasses.add``) are summed
    per character with numpy, in the order they were added. The results are bit for bit those of
    a node and a dictionary entry each.
  * ``advance(bytes)``: the text grows; nodes whose bytes the new text continues stay, scored ones
    spawn their closing children (T + a token that ends inside the new text), unscored ones stay
    pending with their weight as an upper bound until they are scored. Pruning (the named
    approximation): cover hypotheses are kept if among the ``beam_size`` largest and at least
    ``prune_threshold`` of the total; unscored nodes below the threshold are never scored. With
    ``beam_size=0`` (no limit) and ``prune_threshold=0`` everything is exact.
  * ``RowBook``: the rows of the model's ``ModelStream`` hold token paths; a new path duplicates the
    row that shares its longest prefix (``select_rows`` with repeated indices), rolls back and
    appends, so every forward pass of a level, for every node of every sequence, is one call.

Masses of bytes that cannot be valid UTF-8 (a token that breaks a character), of special tokens
other than end tokens, and of pruned nodes are left out; ``CharMasses.probs`` renormalises over
the characters and END.
"""

from __future__ import annotations

import bisect
import codecs
import heapq
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from decoding.errors import FusemtError
from decoding.stream import ModelStream, common_prefix_len
from decoding.vocab import ByteVocab, utf8_char_len


def is_char(data: bytes) -> bool:
    """Exactly one valid UTF-8 character."""
    try:
        return len(data.decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


def is_partial_char(data: bytes) -> bool:
    """A proper prefix of some valid UTF-8 character."""
    if not data or not 0 < len(data) < utf8_char_len(data[0]):
        return False
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=False) == ""
    except UnicodeDecodeError:
        return False


def _is_continuation(data: bytes) -> bool:
    return all(0x80 <= b < 0xC0 for b in data)


@dataclass
class Groups:
    """Ranges ``lo[i]..hi[i]`` of the sorted vocabulary whose tokens share ``keys[i]`` at one offset."""

    keys: list[bytes]
    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def of(cls, items: list[tuple[bytes, int, int]]) -> "Groups":
        return cls([k for k, _, _ in items], np.array([lo for _, lo, _ in items], dtype=np.int64),
                   np.array([hi for _, _, hi in items], dtype=np.int64))

    def masses(self, cum: np.ndarray, offset: int = 0) -> np.ndarray:
        return cum[self.hi - offset] - cum[self.lo - offset]


@dataclass
class Pieces:
    """Tokens that stop inside a character: their sorted positions, ids and the bytes each adds to it."""

    positions: np.ndarray
    ids: np.ndarray
    rests: list[bytes]

    @classmethod
    def of(cls, items: list[tuple[int, bytes]], order: np.ndarray) -> "Pieces":
        positions = np.array([pos for pos, _ in items], dtype=np.int64)
        return cls(positions, order[positions], [rest for _, rest in items])


@dataclass
class Plan:
    """How the tokens that start with an open byte string continue: grouped by the next character,
    and the tokens that stop inside it (with the bytes after the open string)."""

    chars: Groups
    partials: Pieces


class CharTables:
    """Per-vocabulary tables: text tokens in byte order and their groupings (built once, cached)."""

    def __init__(self, vocab: ByteVocab):
        ids = sorted((i for i, b in enumerate(vocab.token_bytes) if b), key=lambda i: vocab.token_bytes[i])
        self.order = torch.tensor(ids, dtype=torch.long)  # sorted position -> token id
        self._order = self.order.numpy()
        self.keys: list[bytes] = [vocab.token_bytes[i] for i in ids]
        self.end_ids = torch.tensor(sorted(vocab.end_ids), dtype=torch.long)
        root = self._walk(b"", 0, len(self.keys))
        self.root = root.chars
        self.root_index = {k: i for i, k in enumerate(root.chars.keys)}
        # Every character the tables have met, numbered: the root characters first, in their order.
        self.chars: list[bytes] = list(root.chars.keys)
        self.char_index = dict(self.root_index)
        self.root_partials = root.partials
        lo, hi = bisect.bisect_left(self.keys, b"\x80"), bisect.bisect_left(self.keys, b"\xc0")
        self.continuations = (lo, hi)  # the tokens that start with a continuation byte
        # Tokens made of continuation bytes only: completions of a character another token started.
        self.completions = {n: self._completions(lo, hi, n) for n in (1, 2, 3)}
        self.short_continuations = [(i, self.keys[i]) for i in range(lo, hi)
                                    if len(self.keys[i]) <= 2 and _is_continuation(self.keys[i])]
        self._plans: dict[bytes, Plan] = {}
        self._completion_ids: dict[bytes, np.ndarray] = {}
        self._group_ids: dict[int, tuple[Groups, np.ndarray]] = {}
        self._partial: dict[bytes, Pieces] = {}
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(``order``, ``end_ids``, the root groups' ``lo`` and ``hi``, the root pieces' positions) on
        ``device`` (copied once per device): nodes are scored where the log-probabilities are."""
        if device not in self._on:
            self._on[device] = tuple(torch.as_tensor(t).to(device) for t in (
                self.order, self.end_ids, self.root.lo, self.root.hi, self.root_partials.positions))
        return self._on[device]

    # --- ranges ------------------------------------------------------------------------------------
    def range_of(self, prefix: bytes, lo: int = 0, hi: int | None = None) -> tuple[int, int]:
        """Sorted positions of the tokens that start with ``prefix``."""
        hi = len(self.keys) if hi is None else hi
        start = bisect.bisect_left(self.keys, prefix, lo, hi)
        return start, self._range_end(prefix, start, hi)

    def _range_end(self, prefix: bytes, lo: int, hi: int) -> int:
        stripped = prefix.rstrip(b"\xff")
        if not stripped:
            return hi
        return bisect.bisect_left(self.keys, stripped[:-1] + bytes([stripped[-1] + 1]), lo, hi)

    def exact(self, data: bytes, lo: int = 0, hi: int | None = None) -> range:
        """Sorted positions of the tokens whose bytes are exactly ``data`` (a vocabulary may spell one
        byte string with several ids, e.g. ``A`` and ``<0x41>``)."""
        hi = len(self.keys) if hi is None else hi
        start = bisect.bisect_left(self.keys, data, lo, hi)
        return range(start, bisect.bisect_right(self.keys, data, start, hi))

    # --- groupings ---------------------------------------------------------------------------------
    def _walk(self, prefix: bytes, lo: int, hi: int) -> Plan:
        """Group the tokens in ``lo..hi`` (all starting with ``prefix``) by the character after it."""
        n, chars, partials = len(prefix), [], []
        i = lo
        while i < hi and len(self.keys[i]) == n:
            i += 1  # the token that is exactly ``prefix`` closes there: not a continuation
        while i < hi:
            rest = self.keys[i][n:]
            size = utf8_char_len(rest[0])
            if size and len(rest) < size:
                if is_partial_char(rest):
                    partials.append((i, rest))
                i += 1
                continue
            key = rest[:size] if size else rest[:1]
            end = self._range_end(prefix + key, i, hi)
            if size and is_char(key):
                chars.append((key, i, end))
            i = end
        return Plan(Groups.of(chars), Pieces.of(partials, self._order))

    def _completions(self, lo: int, hi: int, n: int) -> Groups:
        """Tokens whose first ``n`` bytes are continuation bytes, grouped by those bytes."""
        items, i = [], lo
        while i < hi:
            key = self.keys[i][:n]
            if len(key) == n and _is_continuation(key):
                end = self._range_end(key, i, hi)
                items.append((key, i, end))
                i = end
            else:
                i += 1
        return Groups.of(items)

    def plan(self, open_bytes: bytes) -> Plan:
        """The grouping of the tokens that extend ``open_bytes`` (cached per byte string)."""
        plan = self._plans.get(open_bytes)
        if plan is None:
            if len(self._plans) > 200_000:
                self._plans.clear()
            plan = self._plans[open_bytes] = self._walk(open_bytes, *self.range_of(open_bytes))
        return plan

    def partial_continuations(self, started: bytes) -> Pieces:
        """The short continuation-byte tokens that leave the character ``started`` still unfinished
        (cached per first bytes)."""
        found = self._partial.get(started)
        if found is None:
            need = utf8_char_len(started[0]) - len(started)
            found = self._partial[started] = Pieces.of([(pos, key) for pos, key in self.short_continuations
                                                        if len(key) < need and is_partial_char(started + key)],
                                                       self._order)
        return found

    def char_id(self, char: bytes) -> int:
        """The number of a character (given on first sight)."""
        found = self.char_index.get(char)
        if found is None:
            found = self.char_index[char] = len(self.chars)
            self.chars.append(char)
        return found

    def char_ids(self, groups: Groups) -> np.ndarray:
        """The numbers of the characters ``groups`` are keyed by (cached per groups)."""
        entry = self._group_ids.get(id(groups))
        if entry is None or entry[0] is not groups:
            if len(self._group_ids) > 200_000:
                self._group_ids.clear()
            entry = self._group_ids[id(groups)] = (groups, np.array([self.char_id(k) for k in groups.keys],
                                                                    dtype=np.int64))
        return entry[1]

    def completion_ids(self, started: bytes) -> np.ndarray:
        """Over ``completions[n]``: the number of the character ``started`` + its key, or -1 where that is
        not one character (cached per first bytes)."""
        ids = self._completion_ids.get(started)
        if ids is None:
            groups = self.completions[utf8_char_len(started[0]) - len(started)]
            ids = self._completion_ids[started] = np.array(
                [self.char_id(started + k) if is_char(started + k) else -1 for k in groups.keys], dtype=np.int64)
        return ids


_TABLES: dict[int, tuple[ByteVocab, CharTables]] = {}


def char_tables(vocab: ByteVocab) -> CharTables:
    """The tables of a vocabulary, built on first use (a second for a 262k vocabulary)."""
    entry = _TABLES.get(id(vocab))
    if entry is None or entry[0] is not vocab:
        entry = _TABLES[id(vocab)] = (vocab, CharTables(vocab))
    return entry[1]


@dataclass
class ClosedSums:
    """A closed token's cumulative next-token probabilities over the whole sorted vocabulary, left
    where they were computed (row ``row`` of a level's ``sums``, on the model's device). The host
    gets only what the next character's masses need (``root``: the masses of the root characters;
    ``pieces``: the probabilities of ``CharTables.root_partials``), in the level's transfer; once
    the character is chosen, the slice of the tokens that start with its first byte (``fetch_sums``)."""

    sums: torch.Tensor
    row: int
    root: np.ndarray
    pieces: np.ndarray


@dataclass
class Node:
    """A token path after the anchor, its weight (P(path), divided by the beam's scale) and where
    its bytes end in the text. Scored nodes hold cumulative next-token probabilities over the sorted
    positions ``lo..`` (only the range they still need once they are cover hypotheses; a closed
    token's stay on the device, ``ClosedSums``, until the next character is chosen)."""

    path: tuple[int, ...]
    weight: float
    start: int  # text offset where the path's bytes end (past the text for an ahead node)
    started: bytes = b""  # ahead node: the first bytes of the next character, inside its last token
    cum: np.ndarray | ClosedSums | None = None
    lo: int = 0
    end: float = 0.0  # P(END | path)
    mass: float = 1.0  # cover hypothesis: M(open bytes), the mass of the tokens that extend them
    spawned: int = 0  # text offset up to which its closing children exist
    expanded: int = -1  # text length its next-character expansion was added at
    judged: bool = False  # checked against the tokenizer's own encoding (canonical covers only)
    rank: int = 0  # its place in the beam's order (``CoverBeam.nodes`` is kept in rank order)

    @property
    def scored(self) -> bool:
        return self.cum is not None

    def allows(self, char: bytes | None) -> bool:
        """Whether this node's covers can spell ``char`` (END: only from a node at a token boundary
        of the text or before it, not from one inside the next character)."""
        return not self.started if char is None else char.startswith(self.started)

    def prob(self, pos: int) -> float:
        return float(self.cum[pos + 1 - self.lo] - self.cum[pos - self.lo])

    def range_mass(self, lo: int, hi: int) -> float:
        return float(self.cum[hi - self.lo] - self.cum[lo - self.lo])


class CharMasses:
    """Unnormalised next-character masses of one model (relative to its beam's scale): from closed
    tokens, root characters as a dense vector over ``CharTables.root``; from the other nodes, arrays
    of (character number, mass) in the order the nodes added them, summed per character when asked
    (in that order, so each sum is what adding them one by one gives); and END."""

    def __init__(self, tables: CharTables):
        self.tables = tables
        self.dense = np.zeros(len(tables.root.keys))
        self.end = 0.0
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._extra: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, ids: np.ndarray, masses: np.ndarray) -> None:
        """Add ``masses`` to the characters numbered ``ids`` (one node's)."""
        if len(ids):
            self._parts.append((ids, masses))
            self._extra = None

    def _summed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(character numbers in increasing order, their summed added masses, the order they were first added)."""
        if self._extra is None:
            if not self._parts:
                empty = np.zeros(0, dtype=np.int64)
                self._extra = (empty, np.zeros(0), empty)
            else:
                ids = np.concatenate([i for i, _ in self._parts])
                chars, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
                # bincount adds each character's masses one by one, in the order given
                sums = np.bincount(inverse, weights=np.concatenate([m for _, m in self._parts]), minlength=len(chars))
                self._extra = (chars, sums, np.argsort(first, kind="stable"))
        return self._extra

    def _added(self, char: bytes) -> float:
        chars, sums, _ = self._summed()
        i = self.tables.char_index.get(char)
        if i is None or not len(chars):
            return 0.0
        at = int(np.searchsorted(chars, i))
        return float(sums[at]) if at < len(chars) and chars[at] == i else 0.0

    def mass(self, char: bytes | None) -> float:
        if char is None:
            return self.end
        i = self.tables.root_index.get(char)
        return (float(self.dense[i]) if i is not None else 0.0) + self._added(char)

    @property
    def total(self) -> float:
        """Mass of every character and END (invalid, special and pruned mass left out)."""
        _, sums, first = self._summed()
        return float(self.dense.sum()) + sum(sums[first].tolist()) + self.end

    def prob(self, char: bytes | None) -> float:
        total = self.total
        return self.mass(char) / total if total > 0 else 0.0

    def top(self, k: int) -> list[tuple[bytes | None, float]]:
        """The ``k`` most likely characters (END included) with their masses, best first."""
        best: dict[bytes | None, float] = {None: self.end} if self.end > 0 else {}
        nonzero = np.flatnonzero(self.dense)
        if len(nonzero) > k:
            nonzero = nonzero[np.argpartition(-self.dense[nonzero], k)[:k]]
        for i in nonzero:
            best[self.tables.root.keys[i]] = float(self.dense[i])
        chars, sums, _ = self._summed()
        roots = chars < len(self.dense)
        masses = np.where(roots, self.dense[np.where(roots, chars, 0)], 0.0) + sums
        if len(masses) > k:  # only those at least the k-th largest can be among the k best
            kept = np.flatnonzero(masses >= np.partition(masses, len(masses) - k)[len(masses) - k])
            chars, masses = chars[kept], masses[kept]
        for i, mass in zip(chars.tolist(), masses.tolist()):
            best[self.tables.chars[i]] = mass
        return heapq.nsmallest(k, best.items(), key=lambda cm: (-cm[1], cm[0] is None, cm[0] or b""))


LIKELY = 0.1  # share of the mass above which a node inside the next character keeps its KV row


@dataclass
class Children:
    """The nodes inside the next character that one scored node spawns (its tokens that stop inside
    that character), kept as arrays: a closed token has one per token of the vocabulary that ends
    inside a character (hundreds for a byte-level BPE), nearly all far below the pruning floor, and
    all but a few dropped when the character is chosen. A child becomes a ``Node`` only when it is
    needed as one (``CoverBeam._take``), with the rank it was given here, so the beam's order (and
    every sum over its nodes) is what it would be had every child been a node from the start."""

    parent: tuple[int, ...]
    ids: np.ndarray
    weights: np.ndarray
    ranks: np.ndarray
    started: list[bytes]  # each child's first bytes of the next character
    start: int  # the text length when they were spawned (a child ends len(started) bytes past it)
    waiting: np.ndarray  # not yet a node

    def node(self, i: int) -> Node:
        return Node(self.parent + (int(self.ids[i]),), float(self.weights[i]), self.start + len(self.started[i]),
                    started=self.started[i], rank=int(self.ranks[i]))


@dataclass
class CoverConfig:
    beam_size: int = 8  # cover hypotheses kept per model and sequence; 0: no limit
    prune_threshold: float = 1e-3  # drop hypotheses (and never score nodes) below this share of the mass


class CoverBeam:
    """The cover hypotheses of one model for one sequence, and the nodes of its next character."""

    def __init__(self, tables: CharTables, cfg: CoverConfig,
                 encode: Callable[[bytes], tuple[int, ...] | None] | None = None,
                 restart: Callable[[bytes], tuple[int, ...]] | None = None):
        self.tables, self.cfg = tables, cfg
        self.encode = encode  # canonical covers only: the tokenizer's own encoding of a text
        self.restart = restart  # the model's own encoding of a text: where to go on when no cover spells it
        self.restarts = 0
        self.root: tuple[int, ...] = ()  # the node the text's covers start from (the anchor, or a restart)
        self.text = bytearray()
        self.nodes: dict[tuple[int, ...], Node] = {(): Node((), 1.0, 0)}
        self.children: dict[tuple[int, ...], Children] = {}  # by parent: its children not yet nodes
        self.ranks = 1  # the next node's rank
        self.log_scale = 0.0  # log of the factor every weight was divided by
        self._masses: CharMasses | None = None
        # distributions scored ahead of their node (a guessed token inside the next character)
        self.prefetched: dict[tuple[int, ...], torch.Tensor] = {}

    # --- queries -----------------------------------------------------------------------------------
    def hypotheses(self) -> list[Node]:
        """Cover hypotheses of the text (the anchor itself while the text is empty)."""
        n = len(self.text)
        return [node for node in self.nodes.values() if node.start < n or (node.start == n and node.path == self.root)]

    def bound(self) -> float:
        """An upper bound of P(prefix text) / scale (exact once every hypothesis is scored)."""
        return sum(h.weight * h.mass if h.scored else h.weight for h in self.hypotheses())

    def prefix_logprob(self) -> float:
        """log P(the output starts with the text), summed over the scored covers (score the frontier
        first: unscored hypotheses left then are those below the pruning threshold)."""
        total = sum(h.weight * h.mass for h in self.hypotheses() if h.scored)
        return self.log_scale + math.log(total) if total > 0 else -math.inf

    def frontier(self, next_char: bool = True) -> list[Node]:
        """Unscored nodes worth a forward pass (weight at least the threshold share of the mass).
        For the next character, after expanding the scored ones (which creates its ahead nodes);
        otherwise only the cover hypotheses of the text (all that P(prefix text) needs)."""
        if next_char:
            self.masses()
            while self.prefetched:
                for path in self.prefetched:
                    self.node(path)
                ready = [n.path for n in self.nodes.values() if not n.scored and n.path in self.prefetched]
                if not ready:
                    break
                for path in ready:
                    self.score(path, self.prefetched.pop(path))
                self.masses()
        floor = self.cfg.prune_threshold * self.bound()
        if next_char:
            self._take(lambda weights: (weights > 0) & (weights >= floor))
        nodes = self.nodes.values() if next_char else self.hypotheses()
        return [node for node in nodes if not node.scored and node.weight > 0 and node.weight >= floor]

    def needed_paths(self) -> list[tuple[int, ...]]:
        """Token paths whose KV should stay in a row: scored nodes (of the nodes inside the next
        character, only the likely ones: the others rarely have children worth a pass, and one that
        does is rebuilt from a shorter row), the parents of the unscored nodes worth scoring, and the
        anchor (every sequence keeps a row)."""
        bound, n = self.bound(), len(self.text)
        floor = self.cfg.prune_threshold * bound
        self._take(lambda weights: weights >= floor)
        return [()] + [node.path if node.scored else node.path[:-1] for node in self.nodes.values()
                if (node.scored and (node.start <= n or node.weight >= LIKELY * bound))
                or (not node.scored and node.weight >= floor)]

    def best_path(self) -> tuple[int, ...]:
        """The complete tokens of the most probable cover hypothesis."""
        return max(self.hypotheses(), key=lambda h: h.weight * h.mass if h.scored else 0.0).path

    def node(self, path: tuple[int, ...]) -> Node | None:
        """The node of ``path`` (made from its parent's children if it is one of them), or None."""
        node = self.nodes.get(path)
        block = self.children.get(path[:-1]) if node is None and path else None
        if block is not None:
            found = np.flatnonzero((block.ids == path[-1]) & block.waiting)
            if len(found):
                self._take_from(block, found)
                node = self.nodes[path]
        return node

    def _take(self, wanted: Callable[[np.ndarray], np.ndarray]) -> None:
        """Make nodes of the children whose weights ``wanted`` selects."""
        for block in list(self.children.values()):
            self._take_from(block, np.flatnonzero(wanted(block.weights) & block.waiting))

    def _take_from(self, block: Children, indices: np.ndarray) -> None:
        if not len(indices):
            return
        last = next(reversed(self.nodes.values())).rank if self.nodes else -1
        for i in indices.tolist():
            node = block.node(i)
            if node.path not in self.nodes:
                self.nodes[node.path] = node
        block.waiting[indices] = False
        if not block.waiting.any():
            del self.children[block.parent]
        if block.ranks[indices[0]] < last:  # back in rank order
            self.nodes = dict(sorted(self.nodes.items(), key=lambda item: item[1].rank))

    def _add(self, node: Node) -> None:
        node.rank, self.ranks = self.ranks, self.ranks + 1
        self.nodes[node.path] = node

    def masses(self) -> CharMasses:
        """Next-character masses from every scored node (new ahead nodes are added unscored)."""
        if self._masses is None:
            self._masses = CharMasses(self.tables)
        for node in list(self.nodes.values()):
            if node.scored and node.expanded != len(self.text):
                node.expanded = len(self.text)
                self._expand(node, self._masses)
        return self._masses

    # --- scoring -----------------------------------------------------------------------------------
    def score(self, path: tuple[int, ...], logprobs: torch.Tensor) -> None:
        """Attach the next-token distribution after ``path`` (one forward pass) to its node."""
        score_nodes([(self, path)], logprobs[None], [(0,)])

    def span(self, path: tuple[int, ...]) -> tuple[int, int]:
        """The sorted positions whose probabilities the node can ever need once scored: every token
        for a closed token (any character may follow it); for a cover hypothesis the tokens that
        start with its first open byte (its closings inside the text, and the tokens that extend its
        open bytes); for a node inside the next character the tokens that start with a continuation
        byte (those that complete or continue its character)."""
        node, n = self.nodes[path], len(self.text)
        if node.start < n:
            return self.tables.range_of(bytes(self.text[node.start:node.start + 1]))
        return (0, len(self.tables.keys)) if node.start == n else self.tables.continuations

    def attach(self, path: tuple[int, ...], end: float, cum: np.ndarray, lo: int) -> None:
        """Score the node: P(END | path), and the cumulative next-token probabilities over the sorted
        positions ``lo..`` of its ``span``."""
        node = self.nodes[path]
        node.end, node.cum, node.lo = end, cum, lo
        n = len(self.text)
        if node.start <= n:
            self._spawn_closings(node)
            if node.start < n:
                self._open(node)

    def _spawn_closings(self, node: Node) -> None:
        """Children T + t for every token t that closes inside the text (after what was spawned)."""
        text, n = bytes(self.text), len(self.text)
        for j in range(max(node.spawned, node.start) + 1, n + 1):
            for pos in self.tables.exact(text[node.start:j]):
                path = node.path + (int(self.tables.order[pos]),)
                if path not in self.nodes:
                    self._add(Node(path, node.weight * node.prob(pos), j, spawned=j))
        node.spawned = n

    def _open(self, node: Node) -> None:
        """Make a scored node a cover hypothesis of the text: the mass of its open bytes, and only
        the cumulative sums it still needs; a node no token extends is dropped."""
        lo, hi = self.tables.range_of(bytes(self.text[node.start:]), node.lo, node.lo + len(node.cum) - 1)
        node.mass = node.range_mass(lo, hi)
        if node.mass <= 0:
            del self.nodes[node.path]
            return
        node.cum, node.lo = node.cum[lo - node.lo: hi - node.lo + 1], lo

    def _expand(self, node: Node, out: CharMasses) -> None:
        """Add a scored node's next-character masses to ``out``; create its ahead children."""
        n, tables, w = len(self.text), self.tables, node.weight
        if node.start < n:  # cover hypothesis: tokens that extend its open bytes
            plan = tables.plan(bytes(self.text[node.start:]))
            masses = plan.chars.masses(node.cum, node.lo)
            found = np.flatnonzero(masses > 0)
            out.add(tables.char_ids(plan.chars)[found], w * masses[found])
            children = plan.partials
        elif node.start == n:  # closed token: any first character, or the end
            out.dense += w * node.cum.root
            out.end += w * node.end
            children = tables.root_partials
        else:  # ahead node: tokens that complete its character
            need = utf8_char_len(node.started[0]) - len(node.started)
            ids = tables.completion_ids(node.started)
            masses = tables.completions[need].masses(node.cum, node.lo)
            found = np.flatnonzero((ids >= 0) & (masses > 0))
            out.add(ids[found], w * masses[found])
            children = tables.partial_continuations(node.started)
        if not len(children.positions):
            return
        probs = (node.cum.pieces if node.start == n else
                 node.cum[children.positions + 1 - node.lo] - node.cum[children.positions - node.lo])
        kept = np.flatnonzero(probs > 0)
        if len(kept):
            head = node.started if node.start > n else b""
            self.children[node.path] = Children(
                node.path, children.ids[kept], w * probs[kept], self.ranks + np.arange(len(kept)),
                [head + children.rests[i] for i in kept.tolist()], n, np.ones(len(kept), dtype=bool))
            self.ranks += len(kept)

    def release(self) -> None:
        """The sequence has ended: let go of its closed tokens' sums on the device (a level's sums, for
        all its closed tokens, live as long as one of them holds them)."""
        for node in self.nodes.values():
            if isinstance(node.cum, ClosedSums):
                node.cum = None

    # --- the text grows ----------------------------------------------------------------------------
    def closed_ranges(self, data: bytes) -> list[tuple[Node, int, int]]:
        """The closed tokens whose sums are still on the device, with the positions they need once
        ``data`` is appended: the tokens that start with its first byte (its closings, and the tokens
        that extend it, are among them)."""
        lo, hi = self.tables.range_of(data[:1])
        return [(node, lo, hi) for node in self.nodes.values() if isinstance(node.cum, ClosedSums)]

    def advance(self, data: bytes) -> None:
        """Append ``data`` (a character, or any bytes for a forced prefix) to the text, keep the nodes
        it is consistent with, spawn closings, prune and rescale."""
        fetch_sums(self.closed_ranges(data))  # (unless the step fetched them for every sequence at once)
        old = len(self.text)
        self.text += data
        n = len(self.text)
        for block in list(self.children.values()):  # children of another character are dropped unmade
            going_on = np.array([data.startswith(started) for started in block.started], dtype=bool)
            self._take_from(block, np.flatnonzero(going_on & block.waiting))
        self.children.clear()
        for node in list(self.nodes.values()):
            if node.start > old and not (node.start <= n and data.startswith(node.started)):
                del self.nodes[node.path]  # an ahead node for another character
                continue
            node.started = b""
            if node.scored:
                self._spawn_closings(node)
        for node in list(self.nodes.values()):
            if node.scored and node.start < n and node.path in self.nodes:
                self._open(node)
        if self.encode is not None:
            self._keep_canonical()
        self._prune()
        if not self.hypotheses() and self.restart is not None:
            self._restart()
        self._masses = None
        self.prefetched.clear()

    def _restart(self) -> None:
        """No kept cover spells the text: this model gave the appended character no probability (a
        mixture took another member's character) or its covers were pruned. It goes on from its own
        tokenizer's encoding of the text, as the token-level streams do: a new root at the text's end,
        from which its next-character probabilities are conditional on the text it was given."""
        self.root = tuple(self.restart(bytes(self.text)))
        self.nodes, self.children = {}, {}
        self._add(Node(self.root, 1.0, len(self.text)))
        self.restarts += 1

    def _keep_canonical(self) -> None:
        """Drop the nodes whose tokens are not the tokenizer's own encoding of their bytes (judged
        once the character they end in is complete: a half-kanji token must begin that encoding)."""
        text, n = bytes(self.text), len(self.text)
        for node in list(self.nodes.values()):
            end = node.start
            while end < n and 0x80 <= text[end] < 0xC0:
                end += 1
            if node.judged or end > n or not node.path:
                continue
            node.judged = True
            own = self.encode(text[:end])
            if own is not None and own[: len(node.path)] != node.path:
                del self.nodes[node.path]

    def _prune(self) -> None:
        n = len(self.text)
        hyps = sorted(self.hypotheses(), key=lambda h: -(h.weight * h.mass if h.scored else h.weight))
        contrib = [h.weight * h.mass if h.scored else h.weight for h in hyps]
        total = sum(contrib)
        if total <= 0:
            return
        floor, limit = self.cfg.prune_threshold * total, self.cfg.beam_size or len(hyps)
        for rank, (h, c) in enumerate(zip(hyps, contrib)):
            if rank >= limit or c < floor:
                del self.nodes[h.path]
        for node in list(self.nodes.values()):
            if node.start == n and n > 0 and node.weight < floor:
                del self.nodes[node.path]  # a closed token too unlikely to ever be scored
            else:
                node.weight /= total
        self.log_scale += math.log(total)


class RowBook:
    """Which token path each row of a ``ModelStream`` holds, and one forward call for many new paths.

    Paths are token ids after a sequence's anchor (``base`` tokens of its rows). To score a path,
    the row of the same sequence sharing its longest prefix is duplicated (``select_rows`` with
    repeated indices copies a row and its KV cache), rolled back to the shared prefix and extended;
    paths still needed later stay a prefix of some row. The first ``pinned`` rows are kept as they
    are (another method's rows, restored by ``release``).
    """

    def __init__(self, stream, seqs: list[int], pinned: int = 0):
        self.stream = stream
        self.seq = list(seqs)
        self.paths: list[tuple[int, ...]] = [() for _ in seqs]
        self.base = {s: len(stream.tokens[r]) for r, s in enumerate(seqs)}
        self.pinned = pinned
        self.calls: dict[int, int] = {s: 0 for s in seqs}  # forward calls each sequence took part in
        self.crops: dict[int, int] = {s: 0 for s in seqs}  # rows rolled back over cached tokens

    def score(self, requests: list[tuple[int, tuple[int, ...]]], keep: list[tuple[int, tuple[int, ...]]]
              ) -> tuple[torch.Tensor, dict[tuple[int, tuple[int, ...]], tuple[int, int]]]:
        """Next-token log-probabilities after each requested (sequence, path), in one call: the
        call's ``[rows, positions, vocab]`` (on the model's device) and each request's (row, position)
        in it. A path requested together with its one-token extension is read off that extension's
        row, one position earlier (both tokens are run in that row)."""
        requests = list(dict.fromkeys(requests))
        wanted = set(requests)
        parents = {(seq, path[:-1]): (seq, path) for seq, path in requests
                   if len(path) > 1 and (seq, path[:-1]) in wanted}
        own = [key for key in requests if key not in parents]
        self._place(own, keep, carries={path for seq, path in parents.values()})
        logprobs = self.stream.logprobs(keep=2 if parents else None, on_device=True)
        if not parents:
            logprobs = logprobs[:, None]
        for seq in {seq for seq, _ in requests}:
            self.calls[seq] += 1
        row_of = {(self.seq[r], self.paths[r]): r for r in range(len(self.paths) - 1, self.pinned - 1, -1)}
        at = {key: (row_of[key], -1) for key in own}
        at.update({key: (row_of[child], -2) for key, child in parents.items()})
        return logprobs, at

    def score_chains(self, chains: dict[int, tuple[int, ...]], keep: list[tuple[int, tuple[int, ...]]]
                     ) -> dict[tuple[int, tuple[int, ...]], torch.Tensor]:
        """Each sequence's path run in one row of one call, every position kept: the next-token
        log-probabilities after each prefix of it that the call ran (the prefixes past the row it
        was built from)."""
        self._place(list(chains.items()), keep, carries=set())
        out = {}
        for row, entries in enumerate(self.stream.prefix_logprobs()):
            seq = self.seq[row]
            if row < self.pinned or chains.get(seq) != self.paths[row]:
                continue
            for context, logprobs in entries:
                if len(context) >= self.base[seq]:  # (a first call also runs the anchor's own tokens)
                    out[(seq, context[self.base[seq]:])] = logprobs
        for seq in chains:
            self.calls[seq] += 1
        return out

    def _place(self, own: list[tuple[int, tuple[int, ...]]], keep: list[tuple[int, tuple[int, ...]]],
               carries: set[tuple[int, ...]]) -> None:
        """Rows for the pinned rows, the ``own`` paths (each built from its sequence's closest row)
        and the ``keep`` paths no other row holds; ``carries`` run their last two tokens."""
        targets = [(r, self.paths[r]) for r in range(self.pinned)]
        targets += [(self._closest_row(seq, path), path) for seq, path in own]
        for seq, path in keep:
            if not any(self.seq[src] == seq and p[:len(path)] == path for src, p in targets):
                src = self._closest_row(seq, path)
                targets.append((src, self.paths[src] if self.paths[src][:len(path)] == path else path))
        stream, sources = self.stream, [src for src, _ in targets]
        if sources != list(range(stream.rows)):
            stream.select_rows(sources)
        for row, (src, path) in enumerate(targets):
            old = self.paths[src]
            common = common_prefix_len(old, path)
            if path in carries and row >= self.pinned:
                common = min(common, len(path) - 2)  # the parent's position must be run too
            if common < len(old):
                stream.rollback(row, len(old) - common)
                self.crops[self.seq[src]] += 1
            stream.append(row, list(path[common:]))
        self.seq = [self.seq[src] for src in sources]
        self.paths = [path for _, path in targets]

    def _closest_row(self, seq: int, path: tuple[int, ...]) -> int:
        best, best_len = None, -1
        for r in range(len(self.paths)):
            if self.seq[r] != seq:
                continue
            p = self.paths[r]
            common = common_prefix_len(p, path)
            if common > best_len or (common == best_len and len(p) < len(self.paths[best])):
                best, best_len = r, common
        assert best is not None, f"sequence {seq} has no row"
        return best

    def release(self) -> None:
        """Back to the pinned rows only."""
        self.stream.select_rows(list(range(self.pinned)))
        self.seq, self.paths = self.seq[: self.pinned], self.paths[: self.pinned]


def split_anchor(vocab: ByteVocab, prompt_ids: list[int], backoff: int) -> tuple[list[int], bytes]:
    """(anchor ids, the prompt bytes after them): the last ``backoff`` text tokens of the prompt are
    re-covered, so a token may span the prompt's end (``:`` + `` 今`` as ``: 今``); more are backed
    off while the rest would start inside a character; special tokens and the first token stay."""
    cut, data = len(prompt_ids), b""
    while cut > 1 and (len(prompt_ids) - cut < backoff or (data and 0x80 <= data[0] < 0xC0)):
        piece = vocab.token_bytes[prompt_ids[cut - 1]]
        if not piece:
            break
        cut, data = cut - 1, piece + data
    return prompt_ids[:cut], data


class CharModel:
    """One member over a batch: the stream rows that hold its contexts and a cover beam per sequence."""

    def __init__(self, model, prompt_ids: list[list[int]], cfg: CoverConfig, backoff: int, recompute: bool,
                 canonical: bool = False):
        self.model = model
        self.tables = char_tables(model.vocab)
        split = [split_anchor(model.vocab, ids, backoff) for ids in prompt_ids]
        self.stream = ModelStream(model, [anchor for anchor, _ in split], recompute=recompute)
        self.book = RowBook(self.stream, list(range(len(split))))
        self.anchors = [tuple(anchor) for anchor, _ in split]
        self.beams = [CoverBeam(self.tables, cfg, self.canonical_path if canonical else None, self.own_cover)
                      for _ in split]
        self.prefix_len = [len(prefix) for _, prefix in split]
        for beam, (_, prefix) in zip(self.beams, split):
            if prefix:
                beam.advance(prefix)

    def score(self, selection: dict[int, list[tuple[int, ...]]], live: list[int], lookahead=None) -> bool:
        """Score the selected nodes (paths per sequence) in one forward call, keeping the rows every
        ``live`` sequence still needs; nodes whose distribution a speculative round's ``lookahead``
        already holds are scored from it. False when there was nothing to score."""
        requests = [(seq, self.beams[seq], path) for seq, paths in selection.items() for path in paths]
        if lookahead is not None:
            rest, held = [], []
            for seq, beam, path in requests:
                logprobs = lookahead.get(self.model, self.anchors[seq] + path)
                if logprobs is None:
                    rest.append((seq, beam, path))
                elif (node := beam.node(path)) is None:
                    beam.prefetched[path] = logprobs
                elif not node.scored:
                    held.append((beam, path, logprobs))
            if held:
                score_nodes([(beam, path) for beam, path, _ in held], torch.stack([lp for _, _, lp in held]),
                            [(i,) for i in range(len(held))])
            requests = rest
        return score_level(self.book, requests, [(s, self.beams[s]) for s in live])

    def look_ahead(self, texts: dict[int, bytes], live: list[int], lookahead) -> None:
        """Run each sequence's own encoding of ``texts[seq]`` (its text after the anchor) in one call,
        every position into ``lookahead`` (a speculative round's drafted text)."""
        chains = {seq: path for seq, text in texts.items() if (path := self.canonical_path(text))}
        if not chains:
            return
        needed = [(s, p) for s in live for p in self.beams[s].needed_paths()]
        for (seq, path), logprobs in self.book.score_chains(chains, needed).items():
            lookahead.put(self.model, self.anchors[seq] + path, logprobs)

    def own_cover(self, text: bytes) -> tuple[int, ...]:
        """This model's own encoding of ``text`` (after its anchor; a complete character ends it)."""
        ids = self.canonical_path(text)
        if ids is None:
            raise FusemtError(f"model '{self.model.name}' cannot spell {text[-24:]!r} exactly with its tokenizer: "
                              "use decoding.rule=product or a model whose tokenizer covers every character")
        return ids

    def canonical_path(self, text: bytes) -> tuple[int, ...] | None:
        """This model's own encoding of ``text`` (after its anchor), if it spells exactly those bytes."""
        ids = self.model.tokenizer.encode(text.decode("utf-8"), add_special_tokens=False)
        return tuple(ids) if self.model.vocab.spell(ids) == text else None


def score_level(book: RowBook, requests: list[tuple[int, CoverBeam, tuple[int, ...]]],
                live: list[tuple[int, CoverBeam]]) -> bool:
    """One level: the requested nodes (sequence, beam, path; several beams may share a sequence's
    rows) scored in one call; the paths the ``live`` beams still need keep their rows."""
    if not requests:
        return False
    wanted: dict[tuple[int, tuple[int, ...]], list[CoverBeam]] = {}
    for seq, beam, path in requests:
        wanted.setdefault((seq, path), []).append(beam)
    keep = [(seq, path) for seq, beam in live for path in beam.needed_paths()]
    logprobs, at = book.score(list(wanted), keep)
    nodes, where = [], []
    for key, beams in wanted.items():
        for beam in beams:
            if beam.node(key[1]) is not None:
                nodes.append((beam, key[1]))
                where.append(at[key])
            else:  # a guess: kept until (unless) the node exists
                beam.prefetched[key[1]] = logprobs[at[key]]
    score_nodes(nodes, logprobs, where)
    return True


def score_nodes(nodes: list[tuple[CoverBeam, tuple[int, ...]]], logprobs: torch.Tensor,
                at: list[tuple[int, ...]]) -> None:
    """Score each (beam, path) node from ``logprobs[at[i]]`` (next-token log-probabilities of one
    model; the beams share its tables), where ``logprobs`` lies: closed tokens (any character may
    follow) get the cumulative sums over the whole sorted vocabulary, computed there for all of them
    at once; every other node needs only its ``span``, a few thousand positions, gathered with the
    end tokens of every node in one flat indexing. Two transfers to the host per call."""
    if not nodes:
        return
    tables = nodes[0][0].tables
    device, vocab = logprobs.device, logprobs.shape[-1]
    order, end_ids, root_lo, root_hi, pieces = tables.on(device)
    flat = logprobs.reshape(-1, vocab)
    rows = np.ravel_multi_index(tuple(np.array(d) for d in zip(*at)), logprobs.shape[:-1], mode="wrap").tolist()
    spans = [beam.span(path) for beam, path in nodes]
    whole = [i for i, span in enumerate(spans) if span == (0, len(tables.keys))]
    if whole:
        picked = flat[torch.tensor([rows[i] for i in whole], device=device)[:, None], order[None, :]]
        sums = torch.zeros(len(whole), len(tables.keys) + 1, dtype=torch.float64, device=device)
        torch.cumsum(picked.double().exp_(), dim=1, out=sums[:, 1:])
        # what the next character's masses need, [whole, root characters + root pieces], in one transfer
        needs = torch.cat([sums[:, root_hi] - sums[:, root_lo], sums[:, pieces + 1] - sums[:, pieces]], dim=1)
        needs = needs.cpu().numpy()
        n_root = len(tables.root.keys)
    whole_set = set(whole)
    parts = [positions + row * vocab for i, (row, (lo, hi)) in enumerate(zip(rows, spans))
             for positions in ((end_ids,) if i in whole_set else (order[lo:hi], end_ids))]
    probs = flat.reshape(-1).take(torch.cat(parts)).double().exp_().cpu().numpy()
    offset, n_end, next_whole = 0, len(end_ids), 0
    for i, ((beam, path), (lo, hi)) in enumerate(zip(nodes, spans)):
        if i in whole_set:
            if beam.nodes[path].start == len(beam.text):
                row = needs[next_whole]
                cum = ClosedSums(sums, next_whole, row[:n_root], row[n_root:])
            else:  # a node given the whole vocabulary though not closed (a test widens every span)
                cum = sums[next_whole].cpu().numpy()
            next_whole += 1
        else:
            cum = np.zeros(hi - lo + 1)
            np.cumsum(probs[offset: offset + hi - lo], out=cum[1:])
            offset += hi - lo
        beam.attach(path, float(probs[offset: offset + n_end].sum()), cum, lo)
        offset += n_end


def fetch_sums(needed: list[tuple[Node, int, int]]) -> None:
    """Bring each closed token's sums over positions ``lo..hi`` to the host, for all of them in one
    transfer (``CoverBeam.closed_ranges``)."""
    if not needed:
        return
    host = torch.cat([node.cum.sums[node.cum.row, lo:hi + 1] for node, lo, hi in needed]).cpu().numpy()
    offset = 0
    for node, lo, hi in needed:
        node.cum, node.lo = host[offset: offset + hi - lo + 1], lo
        offset += hi - lo + 1


def exact_prefix_probs(stream, logprobs: torch.Tensor, queries: list[tuple[int, bytes]],
                       cfg: CoverConfig) -> list[float]:
    """P(the next bytes of row ``r`` start with ``data``) for each query (r, data): summed over the
    model's tokenizations of ``data`` from the row's context (``logprobs[r]``: its next-token
    log-probabilities). The extra forward passes use duplicates of the stream's rows, one call per
    level for all queries; the stream is left as it was."""
    tables = char_tables(stream.model.vocab)
    book = RowBook(stream, list(range(stream.rows)), pinned=stream.rows)
    beams = [(row, CoverBeam(tables, cfg)) for row, _ in queries]
    score_nodes([(beam, ()) for _, beam in beams], logprobs, [(row,) for row, _ in beams])
    fetch_sums([needed for (_, beam), (_, data) in zip(beams, queries) for needed in beam.closed_ranges(data)])
    for (_, beam), (_, data) in zip(beams, queries):
        beam.advance(data)
    while score_level(book, [(row, beam, node.path) for row, beam in beams
                             for node in beam.frontier(next_char=False)], []):
        pass
    book.release()
    return [math.exp(beam.prefix_logprob()) for _, beam in beams]
