"""Speculative ensembles across tokenizers: the fused distribution is the target, one member drafts.

Speculative Ensemble (Fu et al. 2025) verifies drafts against the fused distribution of members
that share a vocabulary. Here the members need not: a round is
1. One member (``decoding.drafter``, default the one with the fewest parameters;
   ``decoding.alternate`` takes each member in turn) drafts up to ``decoding.num_draft_tokens`` tokens
   greedily with the ``Drafter`` the ``speculative`` method drafts with too, from its own canonical
   encoding of the text (on the member's stream in the token fusion methods, on a stream of its own
   in ``charwise``). Each drafting pass gives that member's next-token distribution after the text
   and after each drafted token. As in Hugging Face's assisted generation, the draft can be
   shortened where it is likely to be wasted: ``decoding.draft_confidence=c`` ends a row's draft
   after a token the drafter gives less than probability c, and ``decoding.draft_schedule=heuristic``
   adapts each sequence's draft length (+2 after a round that followed the whole draft, -1
   otherwise, from 1 up to ``num_draft_tokens``). The options and the stat are the ``speculative``
   method's (``num_draft_tokens``, ``draft_schedule``, ``draft_confidence``; ``acceptance_rate``);
   ``speculate`` is the old name of ``num_draft_tokens``.
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
from decoding.sampling import warp
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


@dataclass
class Draft:
    """What one drafting round proposed, per row."""

    ids: list[list[int]]  # drafted token ids; an end token, when drafted, is the last
    text: list[bytes]  # their text (the end token adds none)
    dists: Optional[list[torch.Tensor]]  # when sampling: [drafted, vocab] distributions the ids were drawn from
    passes: list[int]  # drafting passes the row took part in


class Drafter:
    """The one drafting loop of speculation: the ``speculative`` method's draft model and the
    speculative ensembles' drafting member both draft with it.

    Each pass scores every row of ``stream`` once; a drafting row takes the token it picks (greedy,
    or a sample from the row's own generator after temperature and top-p), only among tokens that
    keep its text valid UTF-8 (the end only after a whole character). A row stops after ``lengths[row]``
    tokens, after an end token, or after a token the drafter gave less than probability ``confidence``
    (as Hugging Face's ``assistant_confidence_threshold``: the token is already paid for, the target
    judges it in the same verification pass)."""

    def __init__(self, confidence: float, temperature: float = 0.0, top_p: float = 1.0):
        self.min_logprob = math.log(confidence) if confidence > 0 else -math.inf
        self.temperature, self.top_p = temperature, top_p

    def draft(self, stream: ModelStream, vocab, texts: list[bytes], lengths: list[int],
              generators: Optional[list[torch.Generator]] = None, lookahead: Optional[Lookahead] = None) -> Draft:
        """Draft after each row's ``texts`` (the text ``stream``'s row holds); drafted tokens stay
        appended to the stream. ``lookahead`` receives the drafter's distribution at every context it ran."""
        rows = len(texts)
        ids: list[list[int]] = [[] for _ in range(rows)]
        dists: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        drafted = [bytearray(text) for text in texts]
        drafting = [n > 0 for n in lengths]
        passes = [0] * rows
        for depth in range(max(lengths, default=0)):
            logprobs = stream.logprobs(on_device=True)  # [rows, vocab], where the drafter ran
            device = logprobs.device
            so_far = [bytes(d) for d in drafted]
            masked = logprobs.masked_fill(vocab.on(device).forbidden_after(
                so_far, torch.tensor([not utf8_pending(t) for t in so_far])), -math.inf)
            if self.temperature > 0:
                # the rows' generators are CPU generators: sampling draws on the host
                probs = warp(masked, self.temperature, self.top_p).cpu()
                picks = torch.tensor([int(torch.multinomial(probs[row], 1, generator=generators[row]))
                                      if drafting[row] else 0 for row in range(rows)], device=device)
            else:
                picks = masked.argmax(-1)
            # the picks and their log-probabilities come to the host together (ids are exact in float64)
            picked = torch.stack([picks.double(), logprobs.gather(-1, picks[:, None]).squeeze(-1).double()])
            picks, picked_logprobs = picked.tolist()
            picks = [int(tid) for tid in picks]
            for row in range(rows):
                if lookahead is not None:
                    lookahead.put(stream.model, stream.tokens[row], logprobs[row])
                passes[row] += 1
                if not drafting[row]:
                    continue
                tid = picks[row]
                ids[row].append(tid)
                if self.temperature > 0:
                    dists[row].append(probs[row])
                if tid in vocab.end_ids:
                    drafting[row] = False
                    continue
                stream.append(row, [tid])
                drafted[row] += vocab.token_bytes[tid]
                drafting[row] = depth + 1 < lengths[row] and picked_logprobs[row] >= self.min_logprob
            if not any(drafting):
                break
        return Draft(ids=ids, text=[bytes(d[len(text):]) for d, text in zip(drafted, texts)],
                     dists=[torch.stack(d) if d else torch.empty(0) for d in dists] if self.temperature > 0 else None,
                     passes=passes)


@dataclass
class DraftSchedule:
    """How many tokens each sequence drafts next: ``start``, or with ``adaptive``
    (``decoding.draft_schedule=heuristic``, Hugging Face's heuristic) +2 after a round that followed
    the whole draft and -1 otherwise, between 1 and ``cap``."""

    start: int
    cap: int
    adaptive: bool
    lengths: dict[int, int] = field(default_factory=dict)  # [seq]

    def length(self, seq: int) -> int:
        return self.lengths.get(seq, self.start)

    def update(self, seq: int, followed_all: bool) -> None:
        if self.adaptive:
            n = self.length(seq)
            self.lengths[seq] = min(self.cap, n + 2) if followed_all else max(1, n - 1)


class SpeculativeMethod(Protocol):
    """What a fusion method offers the round (``FusionDecoder`` and ``CharwiseDecoder``)."""

    def verify(self, state, seqs: list[int], drafted: list[bytes], drafter_model) -> None:
        """Score each sequence's text + its draft in one pass per member (into the lookahead); members
        of the drafter's model may rely on its drafting passes."""

    def advance(self, state, seqs: list[int]) -> list[int]:
        """One fused step for these sequences; returns those that finished."""


@dataclass
class Speculation:
    """A fusion method's speculative state: which member drafts, on which stream, and per-sequence counts.

    The drafting member works on the method's own stream of it where the method shares its streams
    (token fusion: the stream stays current, and a fused piece that splits the drafter's tokens
    costs a pass over that piece only), else on a stream of its own (``charwise``)."""

    drafter: Drafter
    schedule: DraftSchedule
    models: list
    names: list[str]
    streams: dict[int, ModelStream]  # [member]: the stream it drafts on
    order: list[int]  # drafting members, in turn
    shared: bool  # the streams are the method's own
    lookahead: Lookahead = field(default_factory=Lookahead)
    turn: int = 0
    rounds: dict[int, int] = field(default_factory=dict)
    drafted: dict[int, int] = field(default_factory=dict)  # fused steps that followed the draft
    corrected: dict[int, int] = field(default_factory=dict)  # fused steps that left it
    draft_passes: dict[int, dict[int, int]] = field(default_factory=dict)  # [seq][member]: drafting passes

    def _draft(self, member: int, texts: list[bytes], lengths: list[int]) -> Draft:
        """The drafting member's drafts after the texts (rows in the streams' order), from its own
        canonical encoding of each text."""
        stream = self.streams[member]
        stream.sync_canonical_rows(list(range(len(texts))), texts)
        own = [list(stream.generated(row)) for row in range(len(texts))]
        draft = self.drafter.draft(stream, self.models[member].vocab, texts, lengths, lookahead=self.lookahead)
        if self.shared:  # back to the text: the drafted tokens' KV waits in the shadow until fused steps accept them
            for row, ids in enumerate(own):
                stream.sync_to_ids(row, ids)
        return draft

    def round(self, method: SpeculativeMethod, state) -> list[int]:
        """One round for every live sequence (``state.active``, ``state.text``, ``state.steps``);
        returns the sequences that finished."""
        seqs = list(state.active)
        texts = [bytes(state.text[s]) for s in seqs]
        self.lookahead.clear()
        member = self.order[self.turn % len(self.order)]
        self.turn += 1
        draft = self._draft(member, texts, [self.schedule.length(s) for s in seqs])
        for seq, n in zip(seqs, draft.passes):
            counts = self.draft_passes.setdefault(seq, {})
            counts[member] = counts.get(member, 0) + n
            self.rounds[seq] = self.rounds.get(seq, 0) + 1
        method.verify(state, seqs, [t + d for t, d in zip(texts, draft.text)], self.models[member])
        start = dict(zip(seqs, texts))
        target = {s: t + d for s, t, d in zip(seqs, texts, draft.text)}
        first = set(seqs)
        on, finished = list(seqs), []
        while on:
            done = method.advance(state, on)
            finished += done
            still = []
            for seq in on:
                text, full = bytes(state.text[seq]), target[seq]
                follows = full.startswith(text) and len(text) > len(start[seq])
                if method.traces_extras:
                    step = state.steps[seq][-1]
                    step.extra["round"] = self.rounds[seq]
                    step.extra["draft"] = "drafted" if follows else "corrected"
                    if seq in first:  # the round's first step shows what was drafted, and by whom
                        step.extra["drafter"] = self.names[member]
                        step.extra["drafted_text"] = full[len(start[seq]):].decode("utf-8", "backslashreplace")
                first.discard(seq)
                counter = self.drafted if follows else self.corrected
                counter[seq] = counter.get(seq, 0) + 1
                if seq not in done and follows and len(text) < len(full):
                    still.append(seq)
                else:
                    self.schedule.update(seq, follows and text == full)
            on = still
        return finished

    def select_rows(self, keep: list[int]) -> None:
        """Drop finished rows from the drafting streams of its own (shared ones are the method's to select)."""
        if not self.shared:
            for stream in self.streams.values():
                stream.select_rows(keep)

    def stats(self, seq: int, forward_passes: dict[str, int]) -> SpeculationStats:
        """The sequence's speculation figures; ``forward_passes`` (by member name) gains the drafting passes."""
        for m, n in self.draft_passes.get(seq, {}).items():
            forward_passes[self.names[m]] += n
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
    return Speculation(Drafter(cfg.draft_confidence),
                       DraftSchedule(cfg.num_draft_tokens, cfg.num_draft_tokens, cfg.draft_schedule == "heuristic"),
                       models, names, streams, order, shared=member_streams is not None)
