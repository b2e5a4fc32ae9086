"""Speculative ensembles across tokenizers: the fused distribution is the target, one member drafts.

Speculative Ensemble (Fu et al. 2025) verifies drafts against the fused distribution of members
that share a vocabulary. Here the members need not: a round is
1. ``Drafter``: one member (``decoding.drafter``, default the one with the fewest parameters;
   ``decoding.alternate`` takes each member in turn) drafts up to ``decoding.num_draft_tokens`` tokens
   greedily, from its own canonical encoding of the text (on the member's stream in the token
   fusion methods, on a stream of its own in ``charwise``). Each drafting pass gives that
   member's next-token distribution after the text and after each drafted token.
   As Hugging Face's assisted generation, the draft can be shortened where it is likely to be
   wasted: ``decoding.draft_confidence=c`` stops a row's draft before a token the drafter gives
   less than probability c, and ``decoding.draft_schedule=heuristic`` adapts each sequence's draft
   length (+2 after a round that followed the whole draft, -1 otherwise, from 1 up to ``num_draft_tokens``).
   The options and the stat are the ``speculative`` method's (``num_draft_tokens``,
   ``draft_schedule``, ``draft_confidence``; ``acceptance_rate``); ``speculate`` is the old name of
   ``num_draft_tokens``.
2. Every other member receives the drafted **text** (bytes), encoded canonically by its own
   tokenizer, and scores all of it in one pass that keeps every position (``Lookahead``: the
   distributions by token context).
3. The method takes its ordinary fused steps for every sequence still on its draft, reading each
   member's distribution from the lookahead when that member's context (its canonical tokens of
   the text so far) is one the passes ran; a context they did not run (a fused piece that splits
   a member's token differently) costs an ordinary pass. A sequence leaves the round when its
   fused text leaves the draft (the fused choice is kept: a *corrected* step) or uses it all up.

The fused steps are the plain ensemble's own steps on the same distributions, so greedy output is
the plain ensemble's output, and sampling draws from the fused distribution at every step (the
draft is a point-mass proposal: the step agrees with it with the fused probability of the
drafted piece, which is what rejection sampling against a point mass accepts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch

from decoding.errors import FusemtError
from decoding.stats import SpeculationStats
from decoding.stream import ModelStream, open_streams
from decoding.vocab import utf8_pending

DRAFT_SCHEDULES = ("constant", "heuristic")


def check_draft_options(cfg) -> None:
    """The drafting options the speculative method and the speculative ensembles share."""
    if cfg.draft_schedule not in DRAFT_SCHEDULES:
        raise FusemtError(f"decoding.draft_schedule={cfg.draft_schedule}: use one of {', '.join(DRAFT_SCHEDULES)}")
    if not 0 <= cfg.draft_confidence < 1:
        raise FusemtError(f"decoding.draft_confidence={cfg.draft_confidence}: must be in [0, 1) (0: off)")


def check_speculation_options(cfg, n_models: int) -> None:
    if cfg.num_draft_tokens < 0:
        raise FusemtError(f"decoding.num_draft_tokens={cfg.num_draft_tokens}: draft tokens per round must be >= 0 "
                          "(0: off)")
    check_draft_options(cfg)
    if cfg.drafter is not None and not 0 <= cfg.drafter < n_models:
        raise FusemtError(f"decoding.drafter={cfg.drafter}: must index models.members (0..{n_models - 1})")


def cheapest_member(models) -> int:
    """The member with the fewest parameters (ties: the first)."""
    sizes = [sum(p.numel() for p in m.model.parameters()) for m in models]
    return sizes.index(min(sizes))


class Lookahead:
    """Next-token log-probabilities already computed this round, by model and full token context."""

    def __init__(self):
        self.table: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def get(self, model, context) -> Optional[torch.Tensor]:
        return self.table.get((id(model), tuple(context)))

    def put(self, model, context, logprobs: torch.Tensor) -> None:
        self.table[(id(model), tuple(context))] = logprobs

    def run(self, stream: ModelStream) -> None:
        """One pass of ``stream`` over all its rows' pending tokens, every position remembered."""
        for entries in stream.prefix_logprobs():
            for context, logprobs in entries:
                self.put(stream.model, context, logprobs)

    def clear(self) -> None:
        self.table.clear()


class Drafter:
    """Greedy drafts by one member at a time over the live sequences: on the member's own stream
    where the method shares its streams (token fusion: the stream stays current, and a fused piece
    that splits the drafter's tokens costs a pass over that piece only), else on a stream of its own."""

    def __init__(self, models, streams: dict[int, ModelStream], order: list[int], names: list[str], confidence: float,
                 shared: bool):
        self.models, self.streams, self.order, self.names = models, streams, order, names
        self.confidence, self.shared = confidence, shared
        self.turn = 0
        self.current = order[0]

    def draft(self, texts: list[bytes], lengths: list[int], lookahead: Lookahead) -> tuple[list[bytes], list[int]]:
        """Up to ``lengths[row]`` greedy tokens after each text (rows in the streams' order), as
        bytes, each with probability at least ``confidence``, and the drafting passes each row took
        part in. The drafting member's distributions go to ``lookahead``."""
        self.current = self.order[self.turn % len(self.order)]
        self.turn += 1
        stream, vocab = self.streams[self.current], self.models[self.current].vocab
        for row, text in enumerate(texts):
            stream.sync_canonical(row, text)
        own = [list(stream.generated(row)) for row in range(len(texts))]
        drafts = [bytearray(text) for text in texts]
        drafting = [n > 0 for n in lengths]
        passes = [0] * len(texts)
        min_logprob = math.log(self.confidence) if self.confidence > 0 else -math.inf
        for depth in range(max(lengths)):
            logprobs = stream.logprobs()
            # as in the fused step: only tokens that keep the text valid UTF-8, the end only after a whole character
            texts_so_far = [bytes(d) for d in drafts]
            allowed = vocab.allowed_after(texts_so_far, torch.tensor([not utf8_pending(t) for t in texts_so_far]))
            best, picks = logprobs.masked_fill(~allowed, -math.inf).max(-1)
            for row, (tid, lp) in enumerate(zip(picks.tolist(), best.tolist())):
                lookahead.put(stream.model, stream.tokens[row], logprobs[row])
                passes[row] += 1
                if not drafting[row]:
                    continue
                piece = vocab.token_bytes[tid]
                if tid in vocab.end_ids or not piece or lp < min_logprob:
                    drafting[row] = False
                    continue
                stream.append(row, [tid])
                drafts[row] += piece
                drafting[row] = depth + 1 < lengths[row]
            if not any(drafting):
                break
        # back to the text: the drafted tokens' KV waits in the shadow until the fused steps accept them
        if self.shared:
            for row, ids in enumerate(own):
                stream.sync_to_ids(row, ids)
        return [bytes(d[len(text):]) for d, text in zip(drafts, texts)], passes

    def select_rows(self, keep: list[int]) -> None:
        """Drop finished rows from the drafter's own streams (shared ones are the method's to select)."""
        if not self.shared:
            for stream in self.streams.values():
                stream.select_rows(keep)


class SpeculativeMethod(Protocol):
    """What a fusion method offers the round (``FusionDecoder`` and ``CharwiseDecoder``)."""

    def verify(self, state, seqs: list[int], drafted: list[bytes], drafter_model) -> None:
        """Score each sequence's text + its draft in one pass per member (into the lookahead); members
        of the drafter's model may rely on its drafting passes."""

    def advance(self, state, seqs: list[int]) -> list[int]:
        """One fused step for these sequences; returns those that finished."""


@dataclass
class Speculation:
    """A fusion method's speculative state: the drafter, the lookahead and per-sequence counts."""

    drafter: Drafter
    max_draft: int  # decoding.num_draft_tokens
    adaptive: bool  # decoding.draft_schedule=heuristic
    lookahead: Lookahead = field(default_factory=Lookahead)
    draft_length: dict[int, int] = field(default_factory=dict)  # [seq]: tokens to draft next round
    rounds: dict[int, int] = field(default_factory=dict)
    drafted: dict[int, int] = field(default_factory=dict)  # fused steps that followed the draft
    corrected: dict[int, int] = field(default_factory=dict)  # fused steps that left it
    draft_passes: dict[int, dict[int, int]] = field(default_factory=dict)  # [seq][member]: drafting passes

    def round(self, method: SpeculativeMethod, state) -> list[int]:
        """One round for every live sequence (``state.active``, ``state.text``, ``state.steps``);
        returns the sequences that finished."""
        seqs = list(state.active)
        texts = [bytes(state.text[s]) for s in seqs]
        self.lookahead.clear()
        lengths = {s: self.draft_length.get(s, self.max_draft) for s in seqs}
        drafts, passes = self.drafter.draft(texts, [lengths[s] for s in seqs], self.lookahead)
        name = self.drafter.names[self.drafter.current]
        for seq, n in zip(seqs, passes):
            counts = self.draft_passes.setdefault(seq, {})
            counts[self.drafter.current] = counts.get(self.drafter.current, 0) + n
            self.rounds[seq] = self.rounds.get(seq, 0) + 1
        method.verify(state, seqs, [t + d for t, d in zip(texts, drafts)], self.drafter.models[self.drafter.current])
        start = dict(zip(seqs, texts))
        target = {s: t + d for s, t, d in zip(seqs, texts, drafts)}
        first = set(seqs)
        on, finished = list(seqs), []
        while on:
            done = method.advance(state, on)
            finished += done
            still = []
            for seq in on:
                text, full = bytes(state.text[seq]), target[seq]
                follows = full.startswith(text) and len(text) > len(start[seq])
                step = state.steps[seq][-1]
                step.extra["round"] = self.rounds[seq]
                step.extra["draft"] = "drafted" if follows else "corrected"
                if seq in first:  # the round's first step shows what was drafted, and by whom
                    step.extra["drafter"] = name
                    step.extra["drafted_text"] = full[len(start[seq]):].decode("utf-8", "backslashreplace")
                    first.discard(seq)
                counter = self.drafted if follows else self.corrected
                counter[seq] = counter.get(seq, 0) + 1
                if seq not in done and follows and len(text) < len(full):
                    still.append(seq)
                elif self.adaptive:  # HF's heuristic schedule: longer drafts while they are followed to the end
                    self.draft_length[seq] = min(self.max_draft, lengths[seq] + 2) if follows and text == full \
                        else max(1, lengths[seq] - 1)
            on = still
        return finished

    def stats(self, seq: int, forward_passes: dict[str, int]) -> SpeculationStats:
        """The sequence's speculation figures; ``forward_passes`` (by member name) gains the drafting passes."""
        for m, n in self.draft_passes.get(seq, {}).items():
            forward_passes[self.drafter.names[m]] += n
        drafted, corrected = self.drafted.get(seq, 0), self.corrected.get(seq, 0)
        return SpeculationStats(rounds=self.rounds.get(seq, 0), drafted_steps=drafted, corrected_steps=corrected,
                                acceptance_rate=round(drafted / max(drafted + corrected, 1), 4))


def start_speculation(cfg, models, names: list[str], sources: list[str], prompt,
                      member_streams: Optional[list[ModelStream]] = None) -> Optional[Speculation]:
    """The speculative state of a fusion method's batch (None when ``decoding.speculate`` is 0);
    ``member_streams``: the method's own streams, one per member, for the drafter to share."""
    if not cfg.num_draft_tokens:
        return None
    first = cfg.drafter if cfg.drafter is not None else cheapest_member(models)
    order = [first] + ([i for i in range(len(models)) if i != first] if cfg.alternate else [])
    if member_streams is not None:
        streams = {i: member_streams[i] for i in order}
    else:
        streams = {i: open_streams([models[i]], sources, prompt, recompute=not cfg.use_cache)[0][0] for i in order}
    drafter = Drafter(models, streams, order, names, cfg.draft_confidence, shared=member_streams is not None)
    return Speculation(drafter, cfg.num_draft_tokens, cfg.draft_schedule == "heuristic")
