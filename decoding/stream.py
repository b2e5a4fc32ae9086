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

    def select_rows(self, keep: list[int]) -> None:
        """Keep only these rows (finished sequences leave the batch)."""
        self.tokens = [self.tokens[i] for i in keep]
        self.prompt_len = [self.prompt_len[i] for i in keep]
        self.cached = [self.cached[i] for i in keep]
        self.columns = [self.columns[i] for i in keep]
        self.rollbacks = [self.rollbacks[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long)
        self.column_mask = self.column_mask[index]
        if self.cache is not None and self.cache.get_seq_length() > 0:
            self.cache.batch_select_indices(index.to(self.model.device))

    def _pad_id(self) -> int:
        return self.model.tokenizer.pad_token_id or 0

    def logprobs(self) -> torch.Tensor:
        """Log-probabilities of the next token for every row: [rows, vocab], on the CPU."""
        self.forward_passes += 1
        return (self._full_forward() if self.recompute else self._incremental_forward()).cpu()

    def _incremental_forward(self) -> torch.Tensor:
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
        out = self.model.forward(ids.to(device), self.column_mask.to(device), positions.to(device), self.cache)
        for r, new in enumerate(pending):
            self.columns[r].extend(range(start + width - len(new), start + width))
            self.cached[r] += len(new)
        return out[:, -1]

    def _full_forward(self) -> torch.Tensor:
        width = max(len(t) for t in self.tokens)
        ids = torch.full((self.rows, width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros(self.rows, width, dtype=torch.long)
        positions = torch.zeros(self.rows, width, dtype=torch.long)
        for r, row in enumerate(self.tokens):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
            positions[r, width - len(row):] = torch.arange(len(row))
        device = self.model.device
        return self.model.forward(ids.to(device), mask.to(device), positions.to(device), None)[:, -1]
