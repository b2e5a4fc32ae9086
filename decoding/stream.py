"""Per-model incremental decoding state for a batch: token ids, KV cache and rollbacks.

Every sequence keeps its own token ids, and the batch shares one HF ``DynamicCache`` in which
each row owns the columns whose entry in ``column_pos`` (the position of the token held there)
is not -1. Appending a different number of tokens per row pads the new chunk on the left
(masked); rolling a row back masks its last columns out. Masked columns cost a little memory
but no recomputation, so per-step cost stays flat however often a model's tokenisation changes.
``recompute=True`` is the slow reference path: a full forward pass over every sequence at every
step, no cache.

Sliding-window layers (Gemma 3: 512 tokens) would see masked columns as part of their window:
HF builds that window over cache columns and its sliding cache layers keep only the last
window of columns. For such models every layer keeps all its columns and the attention masks
are built here from token positions, so a query sees exactly the tokens of its own row within
``window`` positions, and the cached path equals the recompute path at any length.

Canonical streams: ``sync_canonical`` keeps a row's ids equal to the model's own tokenizer's
encoding of the generated text (checked against the prompt boundary of the embedded models:
the prompt's ids followed by the encoding of the generated text alone are the encoding of the
whole text), except over an unfinished final character; it rolls back only the tail that changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from decoding.canonical import Cut, TailRule
from decoding.prompt import prompt_rows, render_prompt
from decoding.vocab import complete_utf8_prefix, utf8_pending

RETOKENIZE_WINDOW = 4  # own tokens re-tokenised together with newly appended bytes (append_bytes)
# pending tokens of a batch (rows x widest) that an accelerator's pass takes at about the cost of one
# token per row (ModelStream._run_ahead)
ACCELERATOR_FREE_TOKENS = 1024


def common_prefix_len(a: Sequence, b: Sequence) -> int:
    """How many leading items ``a`` and ``b`` share (token ids, cover paths): the one helper for it."""
    if type(a) is not type(b):  # slices of a tuple and a list never compare equal
        a, b = list(a), list(b)
    # bisection over slice comparisons (C loops): a few Python steps however long the sequences are
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def fill_rows(cache: DynamicCache, layers: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> DynamicCache:
    """``cache`` given ``layers``' keys and values ([1, heads, tokens, dim] per layer) in each of ``rows``
    rows: how a shared prompt prefix starts every row of a batch."""
    for i, (keys, values) in enumerate(layers):
        cache.update(keys.expand(rows, -1, -1, -1).contiguous(), values.expand(rows, -1, -1, -1).contiguous(), i)
    return cache


def sliding_window(config) -> int | None:
    """The window of a decoder whose layers are full or sliding-window attention, with at least one
    sliding layer (Gemma 2/3, Mistral, ...); None otherwise (the column mask alone is then exact)."""
    text_config = config.get_text_config(decoder=True)
    layer_types, kwargs = get_layer_types_and_kwargs(text_config)
    windows = {k["sliding_window"] for t, k in zip(layer_types, kwargs) if t == "sliding_attention"}
    if not windows or not set(layer_types) <= {"full_attention", "sliding_attention"}:
        return None
    assert len(windows) == 1, f"one sliding window per model expected, got {windows}"
    return windows.pop()


class ModelStream:
    def __init__(self, model, prompt_ids: list[list[int]], recompute: bool = False):
        self.model = model
        self.recompute = recompute
        self.tokens = [list(row) for row in prompt_ids]  # current tokenisation of prompt + output
        self.prompt_len = [len(row) for row in prompt_ids]
        self.cached = [0] * len(prompt_ids)  # how many of tokens[r] sit in valid cache columns
        # position of the token in each cache column of each row; -1: masked (padding or rolled back)
        self.column_pos = torch.zeros(len(prompt_ids), 0, dtype=torch.long)
        config = model.model.config
        self.window = sliding_window(config)
        # With a sliding window every layer keeps all its columns (masks come from positions).
        self.cache = None if recompute else DynamicCache() if self.window else DynamicCache(config=config)
        self.forward_passes = 0
        self.rollbacks = [0] * len(prompt_ids)  # per row: how many times cached tokens were dropped
        # per row: (id, column) of tokens rolled back whose KV is still in place, in position order
        # from len(tokens[r]); appending the same ids again re-validates them instead of recomputing
        # (a speculative round rolls drafted text back, then accepts it piece by piece)
        self.shadow: list[list[tuple[int, int]]] = [[] for _ in prompt_ids]
        # per row: generated ids that stay canonical whatever text follows (decoding/canonical.py)
        self.cut: list[Cut | None] = [None] * len(prompt_ids)
        self.tail_rule = tail_rule(model)
        prompt_cache = getattr(model, "prompt_cache", None)
        if prompt_cache is not None and not recompute:
            self._start_from_prefix(prompt_cache)

    def _start_from_prefix(self, prompt_cache) -> None:
        """Rows that start with the model's shared prompt prefix (decoding.prefix) start from a copy of
        its cache: its columns hold positions 0..n-1 of every row."""
        n = prompt_cache.shared_len(self.tokens, reserve=1)  # the first pass needs a pending token per row
        if n == 0:
            return
        fill_rows(self.cache, prompt_cache.layers(n), self.rows)
        self.column_pos = torch.arange(n).repeat(self.rows, 1)
        self.cached = [n] * self.rows

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def generated(self, row: int) -> list[int]:
        return self.tokens[row][self.prompt_len[row]:]

    def append(self, row: int, ids: list[int]) -> None:
        shadow = self.shadow[row]
        reused = 0
        if shadow and self.cached[row] == len(self.tokens[row]):
            while reused < min(len(ids), len(shadow)) and ids[reused] == shadow[reused][0]:
                _, column = shadow[reused]
                self.column_pos[row, column] = self.cached[row] + reused
                reused += 1
            self.cached[row] += reused
        self.shadow[row] = shadow[reused:] if reused == len(ids) else []
        self.tokens[row].extend(ids)

    def rollback(self, row: int, n: int) -> None:
        """Drop the last ``n`` tokens of ``row`` (never into the prompt); their cache columns go invalid."""
        if n <= 0:
            return
        assert n <= len(self.generated(row)), "rollback into the prompt"
        removed = self.tokens[row][-n:]
        del self.tokens[row][-n:]
        keep = min(self.cached[row], len(self.tokens[row]))
        if keep < self.cached[row]:
            positions = self.column_pos[row]
            dropped = (positions >= keep).nonzero().flatten()
            columns = dropped[positions[dropped].argsort()].tolist()  # positions keep..cached-1, in order
            self.shadow[row] = list(zip(removed, columns)) + self.shadow[row]
            positions[dropped] = -1
            self.cached[row] = keep
            self.rollbacks[row] += 1
        cut = self.cut[row]
        if cut is not None and cut.ids > len(self.tokens[row]) - self.prompt_len[row]:
            self.cut[row] = None

    def append_bytes(self, row: int, data: bytes) -> tuple[list[int], int]:
        """Append text given as bytes in this model's own tokenisation: (ids appended, tokens rolled back).

        The model re-tokenises its last few tokens plus ``data``, starting at a character
        boundary, and only the tokens that changed are rolled back. When that tail is complete
        UTF-8 the model's tokenizer encodes it (checked to spell exactly those bytes); otherwise
        the new bytes are spelled longest-match and re-tokenised once the character completes.
        """
        vocab = self.model.vocab
        generated = self.generated(row)
        start = max(len(generated) - RETOKENIZE_WINDOW, 0)
        while start > 0 and (vocab.token_bytes[generated[start]] or b"\x00")[0] & 0xC0 == 0x80:
            start -= 1
        old_tail = generated[start:]
        tail_bytes = vocab.spell(old_tail) + data
        new, drop = None, 0
        if not utf8_pending(tail_bytes):
            new_tail = self.encode(tail_bytes)
            if new_tail is not None:
                common = common_prefix_len(old_tail, new_tail)
                new, drop = new_tail[common:], len(old_tail) - common
        if new is None:
            new = vocab.segment(data)
        self.rollback(row, drop)
        self.append(row, new)
        return new, drop

    def encode(self, text: bytes) -> list[int] | None:
        """This model's tokenizer's encoding of ``text``; None when it does not spell exactly those
        bytes (a tokenizer that normalises the text, or ``text`` that is not valid UTF-8)."""
        ids = self.model.tokenizer.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False)
        return ids if self.model.vocab.spell(ids) == text else None

    def encode_many(self, texts: list[bytes]) -> list[list[int] | None]:
        """``encode`` of each text, in one batch call of the tokenizer: the path of tokenizers without a
        tail rule, which encode whole texts (a fast tokenizer encodes a batch of paragraphs in parallel:
        8 of 600 characters, SmolLM2's, 0.86 ms against 1.5 one by one here)."""
        if not texts:
            return []
        encoded = self.model.tokenizer([t.decode("utf-8", errors="replace") for t in texts],
                                       add_special_tokens=False)["input_ids"]
        return [ids if self.model.vocab.spell(ids) == text else None for ids, text in zip(encoded, texts)]

    def sync_to_ids(self, row: int, ids: list[int]) -> tuple[list[int], int]:
        """Make this row's generated tokens equal ``ids``: roll back past the common prefix, append
        the rest. Returns (ids appended, tokens rolled back)."""
        generated = self.generated(row)
        common = common_prefix_len(generated, ids)
        self.rollback(row, len(generated) - common)
        self.append(row, ids[common:])
        return ids[common:], len(generated) - common

    def sync_to_bytes(self, row: int, text: bytes) -> None:
        """Make this row's generated tokens spell ``text``: keep the longest prefix of tokens that
        spells a prefix of it, roll back the rest, append the remainder in this model's tokens."""
        keep, spelled = self._spelling_prefix(row, text)
        self.rollback(row, len(self.generated(row)) - keep)
        if spelled < len(text):
            self.append_bytes(row, text[spelled:])

    def sync_canonical(self, row: int, text: bytes) -> tuple[list[int], int]:
        """Make this row's generated tokens the model's canonical tokens for the generated ``text``.

        Complete ``text``: exactly ``encode(text)``. Text ending inside a character: the row's own
        tokens that already spell the text and reach into that character are kept (the piece a
        model chose itself, or byte tokens from an earlier step), the text before them is encoded,
        and the bytes still missing are spelled longest-match (byte tokens); the next sync after
        the character completes replaces them by the canonical encoding. Only the tail that differs
        is rolled back. Returns (ids appended, tokens rolled back), as ``sync_to_ids``.

        A tokenizer that normalises text (its encoding does not spell the bytes) falls back to
        ``sync_to_bytes``.
        """
        return self.sync_canonical_rows([row], [text])[0]

    def sync_canonical_rows(self, rows: list[int], texts: list[bytes]) -> list[tuple[list[int], int]]:
        """``sync_canonical`` of each of ``rows`` (distinct) to its text, as a step syncs every row of its
        batch: every row planned, then the texts encoded (one batch call for a tokenizer without a tail
        rule; tails one call each, ``TailRule.encode``), then each row rolled back and appended."""
        assert len(set(rows)) == len(rows) == len(texts), "one text per row, each row once"
        vocab, rule, token_bytes = self.model.vocab, self.tail_rule, self.model.vocab.token_bytes
        plans = []  # per row: generated[first:keep] is kept, text[:start] encoded, text[spelled:] spelled
        for row, text in zip(rows, texts):
            generated = self.generated(row)
            complete = len(complete_utf8_prefix(text))
            cut = self.cut[row] if self.cut[row] is not None and text.startswith(self.cut[row].text) else None
            keep, spelled = self._spelling_prefix(row, text, cut)
            first, start = keep, spelled
            if spelled > complete:  # own tokens reach into the unfinished character: keep them
                while start > complete or (start < len(text) and text[start] & 0xC0 == 0x80):
                    first -= 1
                    start -= len(token_bytes[generated[first]])
            else:
                start = spelled = complete
            cut = cut if cut is not None and start >= len(cut.text) else None
            plans.append((generated, first, keep, start, spelled, cut))
        heads = [text[:plan[3]] for text, plan in zip(texts, plans)]
        encoded = (self.encode_many(heads) if rule is None
                   else rule.encode_from(heads, [plan[5] for plan in plans], [plan[0] for plan in plans], token_bytes))
        synced = []
        for row, text, (generated, first, keep, start, spelled, cut), head in zip(rows, texts, plans, encoded):
            if head is None:
                self.sync_to_bytes(row, text)
                after = self.generated(row)
                common = common_prefix_len(generated, after)
                synced.append((after[common:], len(generated) - common))
                continue
            synced.append(self.sync_to_ids(row, head + generated[first:keep] + vocab.segment(text[spelled:])))
            if rule is not None:
                self.cut[row] = rule.advance(text[:start], cut, head, token_bytes)
        return synced

    def _spelling_prefix(self, row: int, text: bytes, cut: Cut | None = None) -> tuple[int, int]:
        """(tokens, bytes): the longest prefix of this row's generated tokens that spells a prefix of
        ``text`` (from ``cut`` on when given: its tokens spell the start of ``text``)."""
        vocab, spelled, keep = self.model.vocab, 0, 0
        generated = self.generated(row)
        if cut is not None:
            spelled, keep = cut.offset, cut.ids
        for tid in generated[keep:]:
            piece = vocab.token_bytes[tid] or b""
            if not piece or not text.startswith(piece, spelled):
                break
            spelled += len(piece)
            keep += 1
        return keep, spelled

    def select_rows(self, keep: list[int]) -> None:
        """Keep only these rows (finished sequences leave the batch); a row listed twice is copied."""
        self.tokens = [list(self.tokens[i]) for i in keep]
        self.prompt_len = [self.prompt_len[i] for i in keep]
        self.cached = [self.cached[i] for i in keep]
        self.rollbacks = [self.rollbacks[i] for i in keep]
        self.shadow = [list(self.shadow[i]) for i in keep]
        self.cut = [self.cut[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long)
        self.column_pos = self.column_pos[index]
        if self.cache is not None and self.cache.get_seq_length() > 0:
            # the cache's reorder (index_select per layer, as beam search reorders) copies the rows a
            # few times faster on the CPU than its batch_select_indices (advanced indexing), same values
            self.cache.reorder_cache(index.to(self.model.device))

    def _pad_id(self) -> int:
        return self.model.tokenizer.pad_token_id or 0

    def pending(self, row: int) -> int:
        """Tokens of ``row`` not yet run through the model (the next pass scores them all)."""
        return len(self.tokens[row]) - self.cached[row]

    def logprobs(self, keep: int | None = None, on_device: bool = False) -> torch.Tensor:
        """Next-token log-probabilities of every row: [rows, vocab] after the last position, or with
        ``keep`` after each of the last ``keep`` positions, [rows, keep, vocab]. Row r's pending tokens
        are its last ``pending(r)`` positions; earlier kept positions of a shorter row are padding.
        On the CPU, or with ``on_device`` where the model ran (the fused step ranks them there)."""
        self.forward_passes += 1
        n = keep or 1
        out = self._full_forward(n) if self.recompute else self._incremental_forward(n)
        out = out if on_device else out.cpu()
        return out[:, -1] if keep is None else out

    def prefix_logprobs(self) -> list[list[tuple[tuple[int, ...], torch.Tensor]]]:
        """One pass keeping every position: per row, (context, next-token log-probabilities after it)
        for each prefix of its tokens that the pass ran (its pending tokens; the last one when none),
        on the model's device (speculation keeps them there until a step reads them)."""
        counts = [max(self.pending(r), 1) for r in range(self.rows)]
        out = self.logprobs(keep=max(counts), on_device=True)
        width = out.shape[1]
        return [[(tuple(self.tokens[r][: len(self.tokens[r]) - j]), out[r, width - 1 - j]) for j in range(counts[r])]
                for r in range(self.rows)]

    def _incremental_forward(self, keep: int) -> torch.Tensor:
        for r in range(self.rows):
            if self.cached[r] == len(self.tokens[r]):
                # Nothing new (the text was already spelled): score the last token again.
                self.column_pos[r][self.column_pos[r] == self.cached[r] - 1] = -1
                self.cached[r] -= 1
        pending = [self.tokens[r][self.cached[r]:] for r in range(self.rows)]
        assert min(len(p) for p in pending) > 0, "every row needs at least one new token per step"
        self._run_ahead(pending, keep)
        pending = [self.tokens[r][self.cached[r]:] for r in range(self.rows)]
        ids, chunk_pos = self._chunk(list(range(self.rows)), pending)
        start, width = self.column_pos.shape[1], ids.shape[1]
        self.column_pos = torch.cat([self.column_pos, chunk_pos], dim=1)
        device = self.model.device
        mask = self._attention_masks(start, width, self.column_pos)
        out = self.model.forward(ids.to(device), mask, chunk_pos.clamp_min(0).to(device), self.cache, keep)
        for r, new in enumerate(pending):
            self.cached[r] += len(new)
        return self._pad_keep(out, keep)

    def _chunk(self, rows: list[int], pending: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and positions of the rows' pending tokens, left-padded to the widest (position -1)."""
        width, pad = max(len(p) for p in pending), self._pad_id()
        # built as Python lists and made tensors once: a few small tensor operations per row cost more
        ids = torch.tensor([[pad] * (width - len(new)) + new for new in pending], dtype=torch.long)
        chunk_pos = torch.tensor([[-1] * (width - len(new)) + list(range(self.cached[r], self.cached[r] + len(new)))
                                  for r, new in zip(rows, pending)], dtype=torch.long)
        return ids, chunk_pos

    def _run_ahead(self, pending: list[list[int]], keep: int) -> None:
        """Ragged batches: when a few rows have many more pending tokens than the rest (a member
        ingesting another member's long piece as several tokens), padding every row to the widest
        wastes most of the call. Those rows first run their extra tokens in a call of their own, on
        a cache of their rows only; the other rows get masked columns for that chunk, and the batch
        call is then as wide as the others' pending tokens (at least ``keep``)."""
        widths = sorted(len(p) for p in pending)
        narrow = max(keep, widths[(len(widths) - 1) // 2])  # half the rows fit in this width
        wide = [r for r, p in enumerate(pending) if len(p) > narrow]
        extra = max((len(pending[r]) - narrow for r in wide), default=0)
        padded, split = self.rows * widths[-1], len(wide) * extra + self.rows * narrow
        if not wide or self.cache.get_seq_length() == 0 or split + self.rows > 0.75 * padded:
            return
        device = self.model.device
        # A CPU's pass costs in proportion to its tokens; an accelerator's, at decoding widths, hardly
        # depends on them but a second call costs its launches and HF's per-layer Python again (host
        # time): there only a chunk too large to be nearly free is split (a bound reasoned, not measured).
        if device.type != "cpu" and padded <= ACCELERATOR_FREE_TOKENS:
            return
        ids, chunk_pos = self._chunk(wide, [pending[r][: len(pending[r]) - narrow] for r in wide])
        index = torch.tensor(wide)
        sub_pos = torch.cat([self.column_pos[index], chunk_pos], dim=1)
        sub = DynamicCache()
        for i, layer in enumerate(self.cache.layers):  # index_select: as select_rows, faster than indexing
            at = index.to(layer.keys.device)
            sub.update(layer.keys.index_select(0, at), layer.values.index_select(0, at), i)
        start, width = self.column_pos.shape[1], ids.shape[1]
        mask = self._attention_masks(start, width, sub_pos)
        self.model.forward(ids.to(device), mask, chunk_pos.clamp_min(0).to(device), sub, 1)
        for layer, ahead in zip(self.cache.layers, sub.layers):
            for name in ("keys", "values"):
                full = getattr(layer, name)
                new = full.new_zeros(full.shape[0], full.shape[1], width, full.shape[3])
                new.index_copy_(0, index.to(full.device), getattr(ahead, name)[:, :, -width:])
                setattr(layer, name, torch.cat([full, new], dim=2))
        columns = torch.full((self.rows, width), -1, dtype=torch.long)
        columns[index] = chunk_pos
        self.column_pos = torch.cat([self.column_pos, columns], dim=1)
        for r in wide:
            self.cached[r] += len(pending[r]) - narrow

    def _attention_masks(self, start: int, width: int, column_pos: torch.Tensor):
        """Masks for the chunk in columns ``start..start+width`` given each cache column's position
        (``column_pos``; -1: invalid). Without sliding-window layers: the [rows, columns] mask of the
        valid columns (the model adds causality). With them, in the format of the model's attention
        implementation: a query attends to the valid columns of its row at positions up to its own
        (and within ``window`` of it for sliding layers); padding queries attend to themselves only."""
        device = self.model.device
        pos = column_pos.to(device)
        if not self.window:
            return (pos >= 0).long()
        config = self.model.model.config
        text_config = config.get_text_config(decoder=True)

        def visible(window: int | None):
            def mask_function(batch_idx, head_idx, q_idx, kv_idx):
                q_pos, kv_pos = pos[batch_idx, q_idx], pos[batch_idx, kv_idx]
                seen = (kv_pos >= 0) & (kv_pos <= q_pos)
                if window is not None:
                    seen = seen & (q_pos - kv_pos < window)
                return seen | (q_idx == kv_idx)
            return mask_function

        build = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
        masks = {kind: build(batch_size=pos.shape[0], q_length=width, kv_length=pos.shape[1], q_offset=start,
                             kv_offset=0, mask_function=visible(window), attention_mask=None,
                             allow_is_causal_skip=False,
                             dtype=self.model.model.dtype, config=text_config, device=device)
                 for kind, window in (("full_attention", None), ("sliding_attention", self.window))}
        if getattr(text_config, "layer_types", None) is None:  # a single-type model takes one mask tensor
            return masks["sliding_attention"]
        return masks

    @staticmethod
    def _pad_keep(out: torch.Tensor, keep: int) -> torch.Tensor:
        """Left-pad to ``keep`` positions when the pass had fewer (rows shorter than keep)."""
        if out.shape[1] >= keep:
            return out[:, -keep:]
        pad = out.new_full((out.shape[0], keep - out.shape[1], out.shape[2]), float("-inf"))
        return torch.cat([pad, out], dim=1)

    def _full_forward(self, keep: int) -> torch.Tensor:
        width = max(len(t) for t in self.tokens)
        ids = torch.full((self.rows, width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros(self.rows, width, dtype=torch.long)
        positions = torch.zeros(self.rows, width, dtype=torch.long)
        for r, row in enumerate(self.tokens):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
            positions[r, width - len(row):] = torch.arange(len(row))
        for r, row in enumerate(self.tokens):  # nothing is cached on this path: every token was just run
            self.cached[r] = len(row)
        device = self.model.device
        return self._pad_keep(self.model.forward(ids.to(device), mask.to(device), positions.to(device), None, keep),
                              keep)


def tail_rule(model) -> TailRule | None:
    """The model's rule for re-encoding only the tail of the text (None: encode it whole); one per model."""
    if not hasattr(model, "_tail_rule"):
        model._tail_rule = TailRule.of(model.tokenizer)
    return model._tail_rule


def open_streams(models, sources: list[str], prompt, recompute: bool):
    """One stream per model over the batch's rendered prompts, and which sources any model truncated."""
    streams, truncated = [], [False] * len(sources)
    for model in models:
        batch = render_prompt(model, sources, prompt)
        rows = prompt_rows(batch)
        streams.append(ModelStream(model, rows, recompute=recompute))
        truncated = [a or b for a, b in zip(truncated, batch["truncated"])]
    return streams, truncated
