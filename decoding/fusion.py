"""The shared engine of token-level ensembles across different tokenizers.

Each step, every model scores its next token with one incremental forward pass
(``ModelStream``). Candidates are the **bytes** a token adds to the text, so
``▁東京`` (SentencePiece) and ``Ġ`` + partial-UTF-8 pieces (byte-level BPE) meet on equal
terms; all end tokens are one ``END`` candidate. A method (``tokenwise``, ``unite``) only
scores the candidates; the highest score wins (ties: the candidate the higher-weighted models
spell as one token), and the trace's ``top`` lists candidates by that same score.

Canonical streams: after the choice, every model's ids are its own tokenizer's encoding of the
generated text (``ModelStream.sync_canonical``), rolling back only the tail that differs. A model
keeps its own token boundaries only over an unfinished final character: the model that proposed
a piece ending inside a character keeps its piece, the others spell those bytes with byte tokens,
and all of them are re-encoded as soon as the character completes. (Keeping non-canonical ids,
``<0xE3><0x83><0xAB>`` for ``ル`` or ``を``+``送`` for ``を送``, puts a model in contexts its
tokenizer never produces; it then proposes single bytes and loops.)

Text stays a valid UTF-8 prefix at every step: tokens that would break a character are masked
before top-k, so the final hypothesis has no U+FFFD unless a model chose that character itself.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import torch

from decoding.base import (
    TRUNCATED,
    DecodeOutput,
    Decoder,
    later_option,
    option_alias,
    own_choice_meaning,
    renamed_option,
    trace_step,
    traced_output,
)
from decoding.errors import FusemtError
from decoding.keys import NO_KEY, KeyTables
from decoding.prompt import ensemble_stop_strings, find_stop
from decoding.sampling import segment_generators
from decoding.search import BeamSearch, Extension, Live
from decoding.speculate import Speculation, check_speculation_options, start_speculation
from decoding.stats import BeamStats, FusionStats
from decoding.stream import ModelStream, common_prefix_len, open_streams

END = None  # the candidate key shared by every model's end tokens
NOT_EXACT, EXACT, PROPOSED = 0, 1, 2  # how a member scored a candidate (_candidates' flags)


def first_occurrences(keys: torch.Tensor) -> torch.Tensor:
    """[R, L] -> [R, L]: each row's distinct keys (NO_KEY aside) in order of first occurrence, packed at the
    front and padded with NO_KEY."""
    ordered, order = keys.sort(dim=1, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered != NO_KEY
    later = ~torch.zeros_like(first).scatter(1, order, first)  # back in the rows' order
    packing = later.to(torch.uint8).argsort(dim=1, stable=True)  # first occurrences first, in order
    return keys.gather(1, packing).masked_fill(later.gather(1, packing), NO_KEY)


@dataclass
class Candidate:
    key: Optional[bytes]  # bytes added to the text, or END
    probs: list[float]  # per model: probability of this candidate (own token or looked up)
    exact: list[bool]  # per model: scored with a token of exactly these bytes
    proposed: list[bool]  # per model: in that model's top-k
    ids: list[Optional[int]]  # per model: the id it proposed (when proposed)

    def origin(self, names: list[str]) -> str:
        if all(self.proposed):
            return "both" if len(names) == 2 else "all"
        if not all(self.exact):
            return "lookup"
        return "+".join(n for n, p in zip(names, self.proposed) if p)


@dataclass
class FusionState:
    sources: list[str]
    streams: list[ModelStream]
    stops: list[str]
    active: list[int]  # original index of each live stream row
    text: list[bytearray]
    steps: list[list] = field(default_factory=list)
    agree: list[int] = field(default_factory=list)
    rollbacks: list[list[int]] = field(default_factory=list)  # [seq][model]
    forward_passes: list[list[int]] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    speculation: Optional[Speculation] = None
    search: Optional[BeamSearch] = None  # beam search (num_beams > 1): sequences are hypothesis slots
    source_of: list[int] = field(default_factory=list)  # per sequence (slot): its source
    generators: list[torch.Generator] = field(default_factory=list)  # per source, when sampling


def unique_names(models) -> list[str]:
    names, seen = [], {}
    for m in models:
        seen[m.name] = seen.get(m.name, 0) + 1
        names.append(m.name if seen[m.name] == 1 else f"{m.name}#{seen[m.name]}")
    return names


def check_fusion_options(cfg, n_models: int) -> None:
    """The options every fusion method shares (FusionDecoder.Config): top_k, temperature, weights."""
    if cfg.top_k < 1:
        raise FusemtError(f"decoding.top_k={cfg.top_k}: must be at least 1")
    if not 0 <= cfg.temperature < math.inf:
        raise FusemtError(f"decoding.temperature={cfg.temperature}: must be finite and >= 0 (0: argmax)")
    weights = cfg.weights
    if weights is not None and (len(weights) != n_models or not all(0 <= w < math.inf for w in weights)
                                or sum(weights) <= 0):
        raise FusemtError(f"decoding.weights={list(weights)}: need {n_models} finite non-negative weights, not all 0")
    check_speculation_options(cfg, n_models)
    if cfg.num_beams < 1:
        raise FusemtError(f"decoding.num_beams={cfg.num_beams}: must be at least 1")
    if cfg.num_beams > 1 and (cfg.temperature > 0 or cfg.num_draft_tokens):
        raise FusemtError(f"decoding.num_beams={cfg.num_beams} searches deterministically: set decoding.temperature=0 "
                          "and decoding.num_draft_tokens=0")


def normalized_weights(weights: Optional[list[float]], n_models: int) -> list[float]:
    """Member weights summing to 1 (equal when not given)."""
    weights = weights if weights is not None else [1.0] * n_models
    return [w / sum(weights) for w in weights]


class FusionDecoder(Decoder):
    """Base of the token-level ensembles: subclasses implement ``score``."""

    min_models, max_models = 1, None  # one member: its own decoding through the fusion engine (beam = HF beam)
    Stats = FusionStats
    # The trace legend of the origins this engine records; each method says how it scores them.
    every_meaning = ""  # "both"/"all": in every member's top-k
    lookup_meaning = ""  # "lookup": another member scored it through the first token of its spelling
    alone_meaning = ""  # "<a>+<b>": proposed by those members only; {models} names them

    @classmethod
    def origin_meaning(cls, origin: str, models: list[str]) -> str:
        if len(models) == 1 and origin in models:
            return own_choice_meaning(origin, "greedy")
        if origin in ("both", "all"):
            return cls.every_meaning
        if origin == "lookup":
            return cls.lookup_meaning
        return cls.alone_meaning.format(models=" and ".join(origin.split("+")))

    @dataclass
    class Config(Decoder.Config):
        top_k: int = 10
        weights: Optional[list[float]] = None  # one per model, in models.members order; None: equal
        temperature: float = 0.0  # 0: argmax; >0: sample from the fused scores
        use_cache: bool = True  # False: slow full-recompute reference path (for testing)
        seed: int = 0
        # >0: a speculative ensemble, this many drafted tokens per round (same output); was `speculate`
        num_draft_tokens: int = renamed_option(0, was="speculate", later=True)
        # index of the drafting member; None: the one with the fewest parameters
        drafter: Optional[int] = later_option(None)
        alternate: bool = later_option(False)  # members take turns drafting, round by round
        draft_schedule: str = later_option("constant")  # constant | heuristic: HF's adaptive draft length
        # >0: a draft ends after a token the drafter gives less probability (as HF's assistant_confidence_threshold)
        draft_confidence: float = later_option(0.0)
        num_beams: int = later_option(1)  # >1: beam search over fused hypotheses (decoding/search.py)
        length_penalty: float = later_option(1.0)  # as Hugging Face: score / length ** length_penalty
        early_stopping: bool = later_option(True)  # as Hugging Face: stop a source once num_beams hypotheses finished
        speculate: Optional[int] = option_alias("num_draft_tokens")

    @classmethod
    def check_config(cls, cfg, n_models: int) -> None:
        super().check_config(cfg, n_models)
        check_fusion_options(cfg, n_models)

    def __init__(self, cfg, models, prompt):
        super().__init__(cfg, models, prompt)
        self.names = unique_names(models)
        self.weights = normalized_weights(cfg.weights, len(models))

    # --- method hook -------------------------------------------------------------------------
    @abstractmethod
    def score(self, candidates: list[Candidate], text: bytes) -> list[float]:
        """Fused score of each candidate (higher is better; -inf forbids). ``text``: the generated bytes so far."""

    # --- prepare / step / finish -------------------------------------------------------------
    def prepare(self, sources: list[str]) -> FusionState:
        streams, truncated = open_streams(self.models, sources, self.prompt,
                                          recompute=not self.cfg.use_cache)
        stops = ensemble_stop_strings(self.models, self.prompt)
        n = len(sources)
        return FusionState(sources=sources, streams=streams, stops=stops, active=list(range(n)),
                           text=[bytearray() for _ in range(n)], steps=[[] for _ in range(n)],
                           agree=[0] * n, rollbacks=[[0] * len(self.models) for _ in range(n)],
                           forward_passes=[[0] * len(self.models) for _ in range(n)], truncated=truncated,
                           speculation=start_speculation(self.cfg, self.models, self.names, sources, self.prompt,
                                                         streams),
                           search=(BeamSearch(n, self.cfg.num_beams, self.cfg.length_penalty, self.cfg.early_stopping)
                                   if self.cfg.num_beams > 1 else None),
                           source_of=list(range(n)),
                           generators=segment_generators(self.cfg.seed, sources) if self.cfg.temperature > 0 else [])

    @torch.inference_mode()
    def step(self, state: FusionState) -> bool:
        if not state.active:
            return False
        if state.search:
            self._beam_step(state)
            return bool(state.active)
        finished = (state.speculation.round(self, state) if state.speculation
                    else self.advance(state, list(state.active)))
        if finished:
            keep = [r for r, seq in enumerate(state.active) if seq not in set(finished)]
            for stream in state.streams:
                stream.select_rows(keep)
            if state.speculation:
                state.speculation.select_rows(keep)
            state.active = [state.active[r] for r in keep]
        return bool(state.active)

    def advance(self, state: FusionState, seqs: list[int]) -> list[int]:
        """One fused step for the live sequences ``seqs``; returns those that finished."""
        chosen = self._rank(state, seqs)
        done = self._apply(state, [(state.active.index(seq), seq, *chosen[seq]) for seq in seqs])
        return [seq for seq, finished in zip(seqs, done) if finished]

    def _rank(self, state: FusionState, seqs: list[int]) -> dict[int, tuple[Candidate, list[tuple[float, Candidate]]]]:
        """Each sequence's choice (argmax, or a sample) and its candidates by fused score, best first."""
        rows = [state.active.index(seq) for seq in seqs]
        texts = [bytes(state.text[seq]) for seq in seqs]
        may_end = torch.tensor([len(state.steps[seq]) >= self.cfg.min_new_tokens for seq in seqs])
        # beam search needs enough candidates per hypothesis to fill its 2 * num_beams best
        top_k = max(self.cfg.top_k, 2 * self.cfg.num_beams) if self.cfg.num_beams > 1 else self.cfg.top_k
        logprobs = [self._logprobs(state, m, rows) for m in range(len(self.models))]
        found, agree = self._candidates(logprobs, rows, texts, may_end, top_k)
        candidates: list[list[Candidate]] = [[] for _ in state.active]
        for row, cands in zip(rows, found):
            candidates[row] = cands
        self._rescore_lookups(candidates, logprobs, state.streams)
        chosen = {}
        for row, seq, agreed in zip(rows, seqs, agree):
            generator = state.generators[state.source_of[seq]] if state.generators else None
            chosen[seq] = self._choose(candidates[row], bytes(state.text[seq]), generator)
            state.agree[seq] += agreed
        return chosen

    def _beam_step(self, state: FusionState) -> None:
        """One step of beam search (``decoding/search.py``): every live hypothesis's candidates,
        scored by the fused score, then the strategy's selection; hypotheses that live on (and
        those that finish, for their last trace step) are new slots forked from their parents,
        their rows copied from the parents' rows (KV cache included)."""
        search = state.search
        chosen = self._rank(state, list(state.active))
        picked: list[tuple[int, Extension]] = []
        for source, beams in enumerate(search.sources):
            if beams.done:
                continue
            options = [Extension(hyp, cand, hyp.score + (math.log(score) if score > 0 else -math.inf),
                                 self._ends(state, hyp.slot, cand), chosen[hyp.slot][1])
                       for hyp in beams.live for score, cand in chosen[hyp.slot][1]]
            going_on, finishing = search.select(source, options)
            picked += [(source, ext) for ext in going_on + finishing]
        parents = [state.active.index(ext.parent.slot) for _, ext in picked]
        for stream in state.streams:
            stream.select_rows(parents)
        state.active = [self._fork(state, ext.parent.slot) for _, ext in picked]
        outcome: dict[int, tuple[list[Live], list[tuple[float, int]]]] = {s: ([], []) for s, _ in picked}
        self._apply(state, [(row, slot, ext.candidate, ext.ranked)
                            for row, ((_, ext), slot) in enumerate(zip(picked, state.active))])
        for (source, ext), slot in zip(picked, state.active):
            length = ext.parent.length + 1
            if ext.finishes:
                outcome[source][1].append((search.normalised(ext.score, length), slot))
            else:
                outcome[source][0].append(Live(slot, ext.score, length))
        for source, (going_on, finished) in outcome.items():
            search.update(source, going_on, finished)
        live = {h.slot for beams in search.sources if not beams.done for h in beams.live}
        keep = [r for r, slot in enumerate(state.active) if slot in live]
        for stream in state.streams:
            stream.select_rows(keep)
        state.active = [state.active[r] for r in keep]

    def _fork(self, state: FusionState, slot: int) -> int:
        """A new hypothesis slot that copies ``slot``'s text, trace and counts."""
        state.source_of.append(state.source_of[slot])
        state.text.append(bytearray(state.text[slot]))
        state.steps.append(list(state.steps[slot]))
        state.agree.append(state.agree[slot])
        state.rollbacks.append(list(state.rollbacks[slot]))
        state.forward_passes.append(list(state.forward_passes[slot]))
        return len(state.text) - 1

    def _logprobs(self, state: FusionState, m: int, rows: list[int]) -> torch.Tensor:
        """Member ``m``'s next-token log-probabilities for every live row ([rows, vocab]; only
        ``rows`` are used): one pass (on the model's device), or when speculating, read from the
        round's lookahead where its passes ran this context (a pass for all rows otherwise)."""
        stream = state.streams[m]
        if state.speculation is None:
            self._count_pass(state, m)
            return stream.logprobs(on_device=True)
        lookahead = state.speculation.lookahead
        if any(lookahead.get(stream.model, stream.tokens[r]) is None for r in rows):
            self._count_pass(state, m)
            for r, lp in enumerate(stream.logprobs(on_device=True)):
                lookahead.put(stream.model, stream.tokens[r], lp)
        served = {r: lookahead.get(stream.model, stream.tokens[r]) for r in rows}
        return torch.stack([served[r] if r in served else torch.zeros_like(served[rows[0]])
                            for r in range(stream.rows)])

    def _count_pass(self, state: FusionState, m: int) -> None:
        for seq in state.active:
            state.forward_passes[seq][m] += 1

    def verify(self, state: FusionState, seqs: list[int], drafted: list[bytes], drafter_model) -> None:
        """Each member other than the drafter's model scores text + draft (its canonical tokens) in
        one pass; then its rows go back to their own tokens for the text (the drafted tokens' KV
        waits in the stream's shadow and is taken back as the fused steps accept them)."""
        rows = [state.active.index(seq) for seq in seqs]
        for m, stream in enumerate(state.streams):
            if stream.model is drafter_model:
                continue
            own = {row: list(stream.generated(row)) for row in rows}
            stream.sync_canonical_rows(rows, drafted)
            self._count_pass(state, m)
            state.speculation.lookahead.run(stream)
            for row in rows:
                stream.sync_to_ids(row, own[row])

    def finish(self, state: FusionState) -> list[DecodeOutput]:
        outputs = []
        for source in range(len(state.sources)):
            seq, beam_score = state.search.best(source) if state.search else (source, None)
            n_steps = len(state.steps[seq])
            stats = FusionStats(steps=n_steps, agreement_rate=round(state.agree[seq] / max(n_steps, 1), 4),
                                cache_crops=dict(zip(self.names, state.rollbacks[seq])),
                                forward_passes=dict(zip(self.names, state.forward_passes[seq])))
            if state.speculation:
                stats.speculation = state.speculation.stats(seq, stats.forward_passes)
            if state.search:
                stats.beam = BeamStats(num_beams=self.cfg.num_beams, score=round(beam_score, 6))
            outputs.append(traced_output(state.steps[seq], state.stops, stats,
                                         [TRUNCATED] if state.truncated[source] else [], self.trace))
        return outputs

    # --- candidates ----------------------------------------------------------------------------
    @cached_property
    def key_tables(self) -> KeyTables:
        """The members' candidate keys and lookups (built on first use for a set of members: a second or so
        for Gemma's 262k tokens)."""
        return KeyTables.of([model.vocab for model in self.models])

    def _candidates(self, logprobs: list[torch.Tensor], rows: list[int], texts: list[bytes], may_end: torch.Tensor,
                    top_k: int) -> tuple[list[list[Candidate]], list[bool]]:
        """Each row's candidates and whether the members' top-1 tokens agree (add the same bytes).

        ``logprobs``: per member, [live rows, V_m] on any device; ``rows``: the live rows to rank, whose texts
        are ``texts`` and ``may_end`` ([len(rows)] bool). Each member takes its top-k of the tokens that keep
        the text valid UTF-8 (``ByteVocab.forbidden_after``). The candidates of a row are the keys of all of
        them (``decoding/keys.py``), in the order member 0's top-k proposes them (best first), then the keys
        member 1 adds, and so on: ties keep that order, the sort being stable. Member m scores a candidate
        by its likelier token with that key when it proposed one, else by its lookup (``KeyTables.lookup``:
        the likeliest token of exactly its bytes, or the first token of its spelling). All of this stays on
        the members' devices; the [rows, candidates, members] result comes to the host in one transfer.
        """
        home = logprobs[0].device
        tops, selected = [], []
        for m, lp in enumerate(logprobs):
            device = lp.device
            if rows != list(range(lp.shape[0])):
                lp = lp[torch.tensor(rows, device=device)]
            masked = lp.masked_fill(self.models[m].vocab.on(device).forbidden_after(texts, may_end), -math.inf)
            values, ids = masked.topk(min(top_k, masked.shape[1]), dim=-1)  # [R, k_m], best first
            keys = self.key_tables.on(device).key_of[m][ids].masked_fill(values == -math.inf, NO_KEY)
            tops.append((values, ids, keys))
            selected.append(lp)
        union = first_occurrences(torch.cat([keys.to(home) for _, _, keys in tops], dim=1))  # [R, L]
        top1 = torch.stack([keys[:, 0].to(home) for _, _, keys in tops], dim=1)  # [R, M]
        # valid top-1 keys are >= 0, so the largest is one of them when any is
        best = top1.max(dim=1, keepdim=True).values
        agree = ((top1 == best) | (top1 == NO_KEY)).all(dim=1) & (best[:, 0] != NO_KEY)
        values, ids, flags = [], [], []
        for m, ((top_values, top_ids, keys), lp) in enumerate(zip(tops, selected)):
            tables = self.key_tables.on(lp.device)
            wanted = union.to(lp.device)
            slot = wanted.clamp_min(0)
            match = (wanted[:, :, None] == keys[:, None, :]) & (wanted[:, :, None] != NO_KEY)  # [R, L, k_m]
            proposed = match.any(dim=-1)
            first = match.int().argmax(dim=-1)  # the first match in top-k order: the likelier token with that key
            options = tables.lookup[m][slot]  # [R, L, P_m]
            looked_up = lp.gather(1, options.clamp_min(0).flatten(1)).view(options.shape).exp().amax(dim=-1)
            looked_up = looked_up.masked_fill(options[:, :, 0] == NO_KEY, 0.0)
            # a proposal keeps its log-probability (the host exponentiates it in double precision, as the
            # scores always did); a lookup is its probability
            values.append(torch.where(proposed, top_values.gather(1, first), looked_up).double().to(home))
            ids.append(torch.where(proposed, top_ids.gather(1, first), NO_KEY).to(home))
            flags.append(torch.where(proposed, PROPOSED, torch.where(tables.exact[m][slot], EXACT, NOT_EXACT)).to(home))
        slots = torch.cat([union[:, :, None].double(), torch.stack(values, -1), torch.stack(ids, -1).double(),
                           torch.stack(flags, -1).double()], dim=-1)  # [R, L, 1 + 3M]
        tail = torch.zeros_like(slots[:, :1])  # [R, 1, 1 + 3M]: the agreement rides in the key channel
        tail[:, 0, 0] = agree.double()
        return self._unpack(torch.cat([slots, tail], dim=1))

    def _unpack(self, packed: torch.Tensor) -> tuple[list[list[Candidate]], list[bool]]:
        """Candidates and agreement from ``_candidates``'s [R, L + 1, 1 + 3M] result, brought to the host in
        one transfer: per union slot its key, then per member the log-probability (proposed) or probability
        (looked up), the proposed ids and the flags; the last slot's key is the agreement."""
        n, key_bytes = len(self.models), self.key_tables.key_bytes
        candidates, agree = [], []
        for row in packed.tolist():
            cands = []
            for slot in row[:-1]:
                if slot[0] == NO_KEY:  # the union is packed at the front of the row
                    break
                values, ids, flags = slot[1:1 + n], slot[1 + n:1 + 2 * n], slot[1 + 2 * n:]
                own = [flag == PROPOSED for flag in flags]
                cands.append(Candidate(key_bytes[int(slot[0])], [math.exp(v) if o else v for v, o in zip(values, own)],
                                       [flag != NOT_EXACT for flag in flags], own,
                                       [int(t) if o else None for t, o in zip(ids, own)]))
            candidates.append(cands)
            agree.append(bool(row[-1][0]))
        return candidates, agree

    def _rescore_lookups(self, candidates: list[list[Candidate]], logprobs: list[torch.Tensor],
                         streams: list[ModelStream]) -> None:
        """A method that scores the candidates a member did not propose otherwise than ``_candidates``
        (``unite`` with ``lookup=exact``) replaces their probabilities here. ``candidates``: per live row
        (empty for rows not ranked); ``logprobs``: per member, [live rows, V_m]; ``streams``: the members'
        rows, in that order."""

    def _choose(self, candidates: list[Candidate], text: bytes,
                generator: Optional[torch.Generator]) -> tuple[Candidate, list[tuple[float, Candidate]]]:
        """The chosen candidate (sampled from the source's own ``generator`` at temperature > 0) and every
        candidate with its score, best first (the greedy choice)."""
        scores = self.score(candidates, text)
        # Ties (e.g. a candidate scored by the first token of its spelling) go to the candidate that
        # the higher-weighted models can spell exactly as one token; sorting is stable.
        ranked = sorted(zip(scores, candidates), reverse=True,
                        key=lambda sc: (sc[0], sum(w for w, e in zip(self.weights, sc[1].exact) if e)))
        if self.cfg.temperature > 0:
            weights = torch.tensor([s if s > -math.inf else 0.0 for s in scores], dtype=torch.float64)
            weights = weights.clamp_min(0) ** (1.0 / self.cfg.temperature)
            if weights.sum() > 0:
                return candidates[int(torch.multinomial(weights, 1, generator=generator))], ranked
        return ranked[0][1], ranked

    # --- appending -------------------------------------------------------------------------
    def _apply(self, state: FusionState, picks: list[tuple[int, int, Candidate, list[tuple[float, Candidate]]]]
               ) -> list[bool]:
        """Append each pick (row, sequence, choice, ranked candidates) to every model, a member's rows synced to
        their texts together (``ModelStream.sync_canonical_rows``); per pick, whether its sequence is finished."""
        done = [self._ends(state, seq, choice) for _, seq, choice, _ in picks]
        traced = self.traces_steps  # the ids and log-probabilities only the trace records
        going = [(row, seq, choice) for row, seq, choice, _ in picks if choice.key is not END]
        texts = [bytes(state.text[seq]) + choice.key for _, seq, choice in going]
        appended: list[dict] = [{} for _ in going]
        dropped: list[dict] = [{} for _ in going]
        rows = [row for row, _, _ in going]
        for m, stream in enumerate(state.streams):
            before = [stream.generated(row) for row in rows] if traced else []
            rollbacks = [stream.rollbacks[row] for row in rows]
            for row, _, choice in going:
                if choice.proposed[m]:  # its own piece: kept if canonical, or over an unfinished character
                    stream.append(row, [choice.ids[m]])
            stream.sync_canonical_rows(rows, texts)
            for i, (row, seq, _) in enumerate(going):
                state.rollbacks[seq][m] += stream.rollbacks[row] - rollbacks[i]
                if traced:
                    after = stream.generated(row)
                    common = common_prefix_len(before[i], after)
                    appended[i][self.names[m]] = after[common:]
                    if len(before[i]) > common:
                        dropped[i][self.names[m]] = len(before[i]) - common
        index_of = {seq: i for i, (_, seq, _) in enumerate(going)}
        for _, seq, choice, ranked in picks:
            logprob = ({n: (math.log(p) if p > 0 else None) for n, p in zip(self.names, choice.probs)}
                       if traced else {})
            extra = {"top": [["<end>" if c.key is END else c.key.decode("utf-8", "backslashreplace"), round(score, 4)]
                             for score, c in ranked[:3] if score > -math.inf],
                     "union": len(ranked)} if self.traces_extras else {}
            if choice.key is END:
                ids = {n: [choice.ids[m]] if choice.ids[m] is not None else [] for m, n in enumerate(self.names)}
                state.steps[seq].append(trace_step(b"", ids=ids if traced else {}, logprob=logprob,
                                                   origin=choice.origin(self.names), end=True, extra=extra))
                continue
            i = index_of[seq]
            if dropped[i] and self.traces_extras:
                extra["retokenized"] = dropped[i]
            state.steps[seq].append(trace_step(choice.key, ids=appended[i], logprob=logprob,
                                               origin=choice.origin(self.names), extra=extra))
            state.text[seq].extend(choice.key)
        return done

    def _ends(self, state: FusionState, seq: int, choice: Candidate) -> bool:
        """Whether appending ``choice`` finishes the sequence: the end, a stop string (once
        ``min_new_tokens`` steps are taken), or ``max_new_tokens`` steps."""
        if choice.key is END:
            return True
        steps, text = len(state.steps[seq]) + 1, bytes(state.text[seq])
        if (steps >= self.cfg.min_new_tokens and state.stops
                and find_stop(text + choice.key, state.stops, len(text)) is not None):
            return True
        return steps >= self.cfg.max_new_tokens
