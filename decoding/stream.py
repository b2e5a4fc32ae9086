"""Per-model incremental decoding state for a batch: token ids, KV cache and rollbacks.

Every sequence keeps its own token ids, and the batch shares one HF ``DynamicCache`` in which
each row owns the columns marked valid in ``column_mask``. Appending a different number of
tokens per row pads the new chunk on the left (masked); rolling a row back masks its last
columns out. Masked columns cost a little memory but no recomputation, so per-step cost stays
flat however often a model's tokenisation changes. ``recompute=True`` is the slow reference
path: a full forward pass over every sequence at every step, no cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from decoding.prompt import render_prompt
from decoding.vocab import utf8_pending

RETOKENIZE_WINDOW = 4  # own tokens re-tokenised together with newly appended bytes


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class ModelStream:
    def __init__(self, model, prompt_ids: list[list[int]], recompute: bool = False):
        self.model = model
        self.recompute = recompute
        self.tokens = [list(row) for row in prompt_ids]  # current tokenisation of prompt + output
        self.prompt_len = [len(row) for row in prompt_ids]
        self.cached = [0] * len(prompt_ids)  # how many of tokens[r] sit in valid cache columns
        self.columns: list[list[int]] = [[] for _ in prompt_ids]  # cache column of each cached token
        self.column_mask = torch.zeros(len(prompt_ids), 0, dtype=torch.long)
        self.cache = None if recompute else DynamicCache(config=model.model.config)
        self.forward_passes = 0
        self.rollbacks = [0] * len(prompt_ids)  # per row: how many times cached tokens were dropped

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def generated(self, row: int) -> list[int]:
        return self.tokens[row][self.prompt_len[row]:]

    def append(self, row: int, ids: list[int]) -> None:
        self.tokens[row].extend(ids)

    def rollback(self, row: int, n: int) -> None:
        """Drop the last ``n`` tokens of ``row`` (never into the prompt); their cache columns go invalid."""
        if n <= 0:
            return
        assert n <= len(self.generated(row)), "rollback into the prompt"
        del self.tokens[row][-n:]
        keep = min(self.cached[row], len(self.tokens[row]))
        if keep < self.cached[row]:
            self.column_mask[row, self.columns[row][keep:]] = 0
            del self.columns[row][keep:]
            self.cached[row] = keep
            self.rollbacks[row] += 1

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
        tail_bytes = b"".join(vocab.token_bytes[t] or b"" for t in old_tail) + data
        new, drop = None, 0
        if not utf8_pending(tail_bytes):
            new_tail = self.model.tokenizer.encode(tail_bytes.decode("utf-8", errors="replace"), add_special_tokens=False)
            if b"".join(vocab.token_bytes[t] or b"" for t in new_tail) == tail_bytes:
                common = common_prefix_len(old_tail, new_tail)
                new, drop = new_tail[common:], len(old_tail) - common
        if new is None:
            new = vocab.segment(data)
        self.rollback(row, drop)
        self.append(row, new)
        return new, drop

    def sync_to_ids(self, row: int, ids: list[int]) -> None:
        """Make this row's generated tokens equal ``ids``: roll back past the common prefix, append the rest."""
        generated = self.generated(row)
        common = common_prefix_len(generated, ids)
        self.rollback(row, len(generated) - common)
        self.append(row, ids[common:])

    def sync_to_bytes(self, row: int, text: bytes) -> None:
        """Make this row's generated tokens spell ``text``: keep the longest prefix of tokens that
        spells a prefix of it, roll back the rest, append the remainder in this model's tokens."""
        vocab, spelled, keep = self.model.vocab, 0, 0
        for tid in self.generated(row):
            piece = vocab.token_bytes[tid] or b""
            if not piece or not text.startswith(piece, spelled):
                break
            spelled += len(piece)
            keep += 1
        self.rollback(row, len(self.generated(row)) - keep)
        if spelled < len(text):
            self.append_bytes(row, text[spelled:])

    def select_rows(self, keep: list[int]) -> None:
        """Keep only these rows (finished sequences leave the batch); a row listed twice is copied."""
        self.tokens = [list(self.tokens[i]) for i in keep]
        self.prompt_len = [self.prompt_len[i] for i in keep]
        self.cached = [self.cached[i] for i in keep]
        self.columns = [list(self.columns[i]) for i in keep]
        self.rollbacks = [self.rollbacks[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long)
        self.column_mask = self.column_mask[index]
        if self.cache is not None and self.cache.get_seq_length() > 0:
            self.cache.batch_select_indices(index.to(self.model.device))

    def _pad_id(self) -> int:
        return self.model.tokenizer.pad_token_id or 0

    def pending(self, row: int) -> int:
        """Tokens of ``row`` not yet run through the model (the next pass scores them all)."""
        return len(self.tokens[row]) - self.cached[row]

    def logprobs(self, keep: int | None = None) -> torch.Tensor:
        """Next-token log-probabilities of every row, on the CPU: [rows, vocab] after the last
        position, or with ``keep`` after each of the last ``keep`` positions, [rows, keep, vocab].
        Row r's pending tokens are its last ``pending(r)`` positions; earlier kept positions of a
        shorter row are padding."""
        self.forward_passes += 1
        n = keep or 1
        out = (self._full_forward(n) if self.recompute else self._incremental_forward(n)).cpu()
        return out[:, -1] if keep is None else out

    def _incremental_forward(self, keep: int) -> torch.Tensor:
        for r in range(self.rows):
            if self.cached[r] == len(self.tokens[r]):
                # Nothing new (the text was already spelled): score the last token again.
                self.column_mask[r, self.columns[r].pop()] = 0
                self.cached[r] -= 1
        pending = [self.tokens[r][self.cached[r]:] for r in range(self.rows)]
        width = max(len(p) for p in pending)
        assert min(len(p) for p in pending) > 0, "every row needs at least one new token per step"
        ids = torch.full((self.rows, width), self._pad_id(), dtype=torch.long)
        chunk_mask = torch.zeros(self.rows, width, dtype=torch.long)
        positions = torch.zeros(self.rows, width, dtype=torch.long)
        for r, new in enumerate(pending):
            n = len(new)
            ids[r, width - n:] = torch.tensor(new)
            chunk_mask[r, width - n:] = 1
            positions[r, width - n:] = torch.arange(self.cached[r], self.cached[r] + n)
        start = self.column_mask.shape[1]
        self.column_mask = torch.cat([self.column_mask, chunk_mask], dim=1)
        device = self.model.device
        out = self.model.forward(ids.to(device), self.column_mask.to(device), positions.to(device), self.cache, keep)
        for r, new in enumerate(pending):
            self.columns[r].extend(range(start + width - len(new), start + width))
            self.cached[r] += len(new)
        return self._pad_keep(out, keep)

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
        return self._pad_keep(self.model.forward(ids.to(device), mask.to(device), positions.to(device), None, keep), keep)


def open_streams(models, sources: list[str], prompt, render_input_text: bool, recompute: bool):
    """One stream per model over the batch's rendered prompts, and which sources any model truncated."""
    streams, truncated = [], [False] * len(sources)
    for model in models:
        batch = render_prompt(model, sources, prompt, render_input_text)
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        streams.append(ModelStream(model, rows, recompute=recompute))
        truncated = [a or b for a, b in zip(truncated, batch["truncated"])]
    return streams, truncated
