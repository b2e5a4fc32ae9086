"""``decoding=charwise``: character-level ensembling across tokenizers, from each member's exact
probability of string prefixes (``decoding/charprob.py``).

The variant implemented, exactly:
1. Each member m gives P_m(c | text) for every character c and END: its probability that the output
   starts with text·c (summed over the tokenizations that cover it) over that of text, after its
   prompt's anchor (the prompt without its last ``prompt_backoff`` text tokens, whose bytes are
   re-covered, so a token may span the prompt's end). Covers are kept as a beam per member and
   sequence (``beam_size`` hypotheses, ``prune_threshold`` share; 0 and 0: exact), or, with
   ``covers=canonical`` (as CharED), only covers whose complete tokens are the member's own
   encoding of their bytes (the last, open token is free). Mass on bytes that are
   not valid UTF-8, on special tokens other than end tokens, and on pruned covers is left out
   and the rest renormalised.
2. Candidates: the union of the members' ``top_k`` characters, and END.
3. ``rule=mixture``: score(c) = sum_m w_m P_m(c). ``rule=product``: prod_m P_m(c)^w_m, renormalised
   over the candidates (a weighted geometric mean). Weights: ``weights``, normalised to sum 1.
4. The repetition guard (``max_repeats``/``repeat_unit``, ``no_repeat_ngram_size``, over characters of the
   text) forbids candidates; END is forbidden before ``min_new_tokens`` characters.
5. ``temperature=0``: the best score (ties: the smaller character, END last). ``temperature>0``:
   a sample with probability proportional to score^(1/temperature).
6. Certified early choice (greedy only, ``fast_path``): every unscored node can add at most its
   weight to the characters it can spell and to the normaliser, so the scored nodes give each
   P_m(c) a lower and an upper bound. The candidate whose fused lower bound beats the fused upper
   bound of every other candidate, and of any character outside the candidates, is the argmax of
   the fully scored rule: it is emitted at once; until then only the nodes that can move the
   leader's or a contender's bounds are scored. The covers left unscored stay in the beam and are
   scored when needed later (nothing is lost). The fast path of the issue is the simplest such
   certificate (a lower bound above 1/2 in every weighted member; ``fastpath_share``); trace
   steps decided before everything was scored have ``resolved: false`` and lower bounds as
   probabilities and scores (``resolved_share`` counts the others).
7. Stops at END, a stop string (as the other methods), or ``max_new_tokens`` **characters**.

Cost: every member scores the nodes a level needs (closed tokens, tokens ending inside the next
character, pending covers) for every row of the batch in one forward call; a character needs one
level, sometimes two (a byte-level BPE model that splits a kanji in two tokens), and none when the
fast path fires before the first. The trace has one step per character: each member's probability
of it, the fused score, ``top`` (candidates ranked by the fused score the choice was made by), the
number of cover hypotheses per member, whether the fast path fired, each member's
most likely character (``argmax``); ``ids`` are the tokens the member's most probable cover
completed at that step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from decoding.base import TRUNCATED, DecodeOutput, Decoder, trace_step, traced_output
from decoding.charprob import CharMasses, CharModel, CoverBeam, CoverConfig, Node, fetch_sums
from decoding.errors import FusemtError
from decoding.fusion import FusionDecoder, check_fusion_options, normalized_weights, unique_names
from decoding.methods import register
from decoding.prompt import ensemble_stop_strings, find_stop, prompt_rows, render_prompt, uses_chat_template
from decoding.repetition import RepetitionGuard
from decoding.sampling import segment_generators
from decoding.speculate import Speculation, start_speculation
from decoding.stats import SegmentStats, SpeculationStats, mean, part, per_model
from decoding.stream import common_prefix_len
from decoding.vocab import complete_utf8_prefix

END = None  # the end candidate
RULES = ("mixture", "product")
COVERS = ("all", "canonical")


@dataclass
class CharwiseState:
    sources: list[str]
    members: list[CharModel]
    stops: list[str]
    active: list[int]
    text: list[bytearray]
    steps: list[list] = field(default_factory=list)
    agree: list[int] = field(default_factory=list)
    fast: list[int] = field(default_factory=list)  # steps decided by the fast path (LB > 1/2 in every member)
    resolved: list[int] = field(default_factory=list)  # steps decided with every node above the threshold scored
    truncated: list[bool] = field(default_factory=list)
    speculation: Optional[Speculation] = None
    generators: list[torch.Generator] = field(default_factory=list)  # per source, when sampling


@dataclass
class Choice:
    char: Optional[bytes]  # the character's bytes, or END
    probs: list[float]  # per member: P_m(char | text) (a lower bound on the fast path)
    score: float
    ranked: list[tuple[Optional[bytes], float]]  # candidates by fused score, best first
    tops: list[Optional[bytes]]  # per member: its most likely character
    resolved: bool  # every node above the threshold was scored: probs and scores are exact
    fast: bool = False  # the fast path: a lower bound above 1/2 in every weighted member


class Bounds:
    """What one member knows so far about P_m(c | text): the masses of its scored nodes, and its
    unscored nodes, each of which can add at most its weight to the characters it allows (and to
    the normaliser)."""

    def __init__(self, beam: CoverBeam):
        self.pending: list[Node] = beam.frontier()
        self.masses: CharMasses = beam.masses()
        self.low = self.masses.total  # the normaliser, once everything is scored, is at least this
        self.high = self.low + sum(node.weight for node in self.pending)
        self.chain = self._heaviest_chain()

    def lower(self, char: Optional[bytes]) -> float:
        return self.masses.mass(char) / self.high if self.high > 0 else 0.0

    def upper(self, char: Optional[bytes]) -> float:
        if self.low <= 0:
            return 1.0
        return min(1.0, (self.masses.mass(char) + sum(n.weight for n in self.pending if n.allows(char))) / self.low)

    def upper_rest(self, top: list[tuple[Optional[bytes], float]], k: int) -> float:
        """An upper bound for any character outside this member's ``top`` list (its ``k`` best)."""
        if self.low <= 0:
            return 1.0
        below = top[-1][1] if len(top) >= k else 0.0
        anywhere = sum(node.weight for node in self.pending if not node.started)
        return min(1.0, (below + anywhere + sum(node.weight for node in self.chain)) / self.low)

    def heaviest_half(self) -> list[Node]:
        """The heaviest unscored nodes that hold at least half of the unscored weight."""
        chosen, total, half = [], 0.0, sum(node.weight for node in self.pending) / 2
        for node in sorted(self.pending, key=lambda n: -n.weight):
            if total >= half:
                break
            chosen.append(node)
            total += node.weight
        return chosen

    def _heaviest_chain(self) -> list[Node]:
        """The unscored nodes inside the next character that one character can be compatible with
        at once (their first bytes are prefixes of each other), of the largest total weight."""
        ahead = [node for node in self.pending if node.started]
        by_start: dict[bytes, list[int]] = {}
        for i, node in enumerate(ahead):
            by_start.setdefault(node.started, []).append(i)
        best, best_weight = [], 0.0
        for started in by_start:  # a partial character has at most 3 bytes: its prefixes key the chain
            members = sorted(i for k in range(1, len(started) + 1) for i in by_start.get(started[:k], ()))
            chain = [ahead[i] for i in members]
            weight = sum(other.weight for other in chain)
            if weight > best_weight:
                best, best_weight = chain, weight
        return best


@dataclass
class CharwiseStats(SegmentStats):
    steps: int = mean()  # characters
    agreement_rate: float = mean()  # steps where every member's most likely character was the same
    fastpath_share: float = mean()  # steps the fast path decided
    resolved_share: float = mean()  # steps that scored every candidate exactly
    forward_passes: dict[str, int] = per_model()
    cache_crops: dict[str, int] = per_model()
    restarts: dict[str, int] = per_model()  # cover beams rebuilt from the text
    speculation: SpeculationStats | None = part(SpeculationStats)


@register
class CharwiseDecoder(Decoder):
    name = "charwise"
    min_models, max_models = 1, None
    Stats = CharwiseStats

    @dataclass
    class Config(FusionDecoder.Config):
        rule: str = "mixture"  # mixture | product
        top_k: int = 10  # candidates: each member's top_k characters, and END
        beam_size: int = 8  # cover hypotheses per member and sequence; 0: no limit
        prune_threshold: float = 1e-3  # covers below this share of a member's mass are dropped
        covers: str = "all"  # all | canonical (complete tokens = the member's own encoding, as CharED)
        fast_path: bool = True
        prompt_backoff: int = 1  # plain prompts: text tokens re-covered (a token may span the prompt's end)
        max_repeats: int = 7  # most times a unit of up to repeat_unit characters may occur in a row; 0: off
        repeat_unit: int = 4
        no_repeat_ngram_size: int = 0  # no character n-gram of this size twice; 0: off

    @classmethod
    def check_config(cls, cfg, n_models: int) -> None:
        super().check_config(cfg, n_models)
        check_fusion_options(cfg, n_models)
        if cfg.num_beams > 1:
            raise FusemtError(f"decoding=charwise searches greedily (decoding.num_beams={cfg.num_beams}): "
                              "for beam search over fused hypotheses use decoding=unite or decoding=tokenwise")
        if cfg.rule not in RULES:
            raise FusemtError(f"decoding.rule={cfg.rule}: use one of {', '.join(RULES)}")
        if cfg.covers not in COVERS:
            raise FusemtError(f"decoding.covers={cfg.covers}: use one of {', '.join(COVERS)}")
        if cfg.beam_size < 0 or cfg.prune_threshold < 0:
            raise FusemtError("decoding.beam_size and decoding.prune_threshold must be >= 0")
        RepetitionGuard.from_config(cfg)  # refuses bad limits at start-up

    @classmethod
    def origin_meaning(cls, origin: str, models: list[str]) -> str:
        if origin in ("both", "all"):
            return "every member's most likely next character (the members agree)"
        if origin == "fused":
            return "no member's most likely character: the fused score chose it"
        return f"the most likely next character of {' and '.join(origin.split('+'))} only; the fused score chose it"

    def __init__(self, cfg, models, prompt):
        super().__init__(cfg, models, prompt)
        self.weights = normalized_weights(cfg.weights, len(models))
        self.names = unique_names(models)
        self.guard = RepetitionGuard.from_config(cfg)
        self.covers = CoverConfig(beam_size=cfg.beam_size, prune_threshold=cfg.prune_threshold)

    # --- prepare / step / finish -------------------------------------------------------------------
    def prepare(self, sources: list[str]) -> CharwiseState:
        members, truncated = [], [False] * len(sources)
        for model in self.models:
            batch = render_prompt(model, sources, self.prompt)
            rows = prompt_rows(batch)
            # A chat template's generation prompt ("<|im_start|>assistant\n") ends where its training
            # text always had a token boundary: re-covering its newline lets tokens such as "\n\n"
            # span it, which the model never saw there (Qwen then gave a first "\n" ~0.9).
            backoff = 0 if uses_chat_template(model.tokenizer) else self.cfg.prompt_backoff
            members.append(CharModel(model, rows, self.covers, backoff, recompute=not self.cfg.use_cache,
                                     canonical=self.cfg.covers == "canonical"))
            truncated = [a or b for a, b in zip(truncated, batch["truncated"])]
        stops = ensemble_stop_strings(self.models, self.prompt)
        n = len(sources)
        return CharwiseState(sources=sources, members=members, stops=stops, active=list(range(n)),
                             text=[bytearray() for _ in range(n)], steps=[[] for _ in range(n)], agree=[0] * n,
                             fast=[0] * n, resolved=[0] * n, truncated=truncated,
                             speculation=start_speculation(self.cfg, self.models, self.names, sources, self.prompt),
                             generators=segment_generators(self.cfg.seed, sources) if self.cfg.temperature > 0 else [])

    @torch.inference_mode()
    def step(self, state: CharwiseState) -> bool:
        """One character for every live sequence (a speculative round: one or more)."""
        if not state.active:
            return False
        finished = (state.speculation.round(self, state) if state.speculation
                    else self.advance(state, list(state.active)))
        if finished:
            if state.speculation:
                state.speculation.select_rows([r for r, seq in enumerate(state.active) if seq not in finished])
            state.active = [seq for seq in state.active if seq not in finished]
            self._let_go(state, finished)
        return bool(state.active)

    @staticmethod
    def _let_go(state: CharwiseState, seqs: list[int]) -> None:
        """Sequences no longer live let go of what their beams hold on the device (``CoverBeam.release``);
        not before: a speculative round's later levels still keep rows for every live sequence."""
        for member in state.members:
            for seq in seqs:
                member.beams[seq].release()

    def advance(self, state: CharwiseState, seqs: list[int]) -> list[int]:
        """One character for the live sequences ``seqs``: score levels of nodes until each is decided."""
        choices = self._decide(state, seqs)
        for member in state.members:  # the sums the closed tokens need next, for every sequence in one transfer
            fetch_sums([needed for seq, choice in choices.items() if choice.char is not END
                        for needed in member.beams[seq].closed_ranges(choice.char)])
        return [seq for seq in seqs if self._apply(state, seq, choices[seq])]

    def verify(self, state: CharwiseState, seqs: list[int], drafted: list[bytes], drafter_model) -> None:
        """Every member runs its own encoding of each text + draft (complete characters) in one call."""
        for member in state.members:
            texts = {seq: bytes(member.beams[seq].text) + complete_utf8_prefix(full)[len(state.text[seq]):]
                     for seq, full in zip(seqs, drafted)}
            member.look_ahead(texts, state.active, state.speculation.lookahead)

    def _decide(self, state: CharwiseState, seqs: list[int]) -> dict[int, Choice]:
        """The next character of each of ``seqs``: levels of nodes scored (one forward call per
        member and level, for all of them) until each sequence's choice is decided."""
        lookahead = state.speculation.lookahead if state.speculation else None
        choices: dict[int, Choice] = {}
        todo = list(seqs)
        while todo:
            wanted: list[dict[int, list[tuple[int, ...]]]] = [{} for _ in state.members]
            for seq in todo:
                choice, paths = self._plan(state, seq)
                if choice is not None:
                    choices[seq] = choice
                for m, member_paths in enumerate(paths):
                    if member_paths:
                        wanted[m][seq] = member_paths
            todo = [seq for seq in todo if seq not in choices]
            for member, selection in zip(state.members, wanted):
                member.score(selection, state.active, lookahead)
        return choices

    @torch.inference_mode()
    def reference_argmax(self, sources: list[str], references: list[str]) -> list[list[list[Optional[bytes]]]]:
        """Teacher forcing: for each sequence, at each character of its reference and at its end,
        every member's most likely next character (``None``: the end) given the reference so far,
        from the members' exact character probabilities. Needs ``fast_path=false`` (every member
        fully scored at every position, not just enough to certify the fused choice)."""
        if self.cfg.fast_path:
            raise ValueError("reference_argmax needs a charwise decoder with fast_path=false")
        state = self.prepare(sources)
        targets: list[list[Optional[bytes]]] = [[ch.encode("utf-8") for ch in ref] + [END] for ref in references]
        tops: list[list[list[Optional[bytes]]]] = [[] for _ in sources]
        while state.active:
            choices = self._decide(state, state.active)
            for seq in list(state.active):
                tops[seq].append(choices[seq].tops)
                char = targets[seq][len(tops[seq]) - 1]
                if char is END:
                    state.active.remove(seq)
                    self._let_go(state, [seq])
                    continue
                for member in state.members:
                    member.beams[seq].advance(char)
        return tops

    def finish(self, state: CharwiseState) -> list[DecodeOutput]:
        outputs = []
        for seq in range(len(state.sources)):
            n_steps = len(state.steps[seq])
            stats = CharwiseStats(steps=n_steps, agreement_rate=round(state.agree[seq] / max(n_steps, 1), 4),
                                  fastpath_share=round(state.fast[seq] / max(n_steps, 1), 4),
                                  resolved_share=round(state.resolved[seq] / max(n_steps, 1), 4),
                                  forward_passes={n: m.book.calls[seq] for n, m in zip(self.names, state.members)},
                                  cache_crops={n: m.book.crops[seq] for n, m in zip(self.names, state.members)},
                                  restarts={n: m.beams[seq].restarts for n, m in zip(self.names, state.members)})
            if state.speculation:
                stats.speculation = state.speculation.stats(seq, stats.forward_passes)
            outputs.append(traced_output(state.steps[seq], state.stops, stats,
                                         [TRUNCATED] if state.truncated[seq] else [], self.trace))
        return outputs

    # --- choosing ----------------------------------------------------------------------------------
    def _may_end(self, state: CharwiseState, seq: int) -> bool:
        return len(state.steps[seq]) >= self.cfg.min_new_tokens

    def _allowed(self, state: CharwiseState, seq: int, char: Optional[bytes]) -> bool:
        if char is END:
            return self._may_end(state, seq)
        return not self.guard.blocks(bytes(state.text[seq]), char)

    def _fuse(self, probs: list[float]) -> float:
        if self.cfg.rule == "mixture":
            return sum(w * p for w, p in zip(self.weights, probs))
        if any(p <= 0 for w, p in zip(self.weights, probs) if w > 0):
            return 0.0
        return math.exp(sum(w * math.log(p) for w, p in zip(self.weights, probs) if w > 0))

    def _plan(self, state: CharwiseState, seq: int) -> tuple[Optional[Choice], list[list[tuple[int, ...]]]]:
        """Decide the sequence's next character now, or say which nodes each member must score first.

        Fully scored: the choice by the fused scores (``_choose``). Greedy with ``fast_path``: the
        candidate whose fused lower bound beats every other candidate's fused upper bound (and that
        of any character outside the candidates) is certified; otherwise the nodes that can still
        change the leader's or a contender's bounds are scored. Otherwise: every unscored node.
        """
        bounds = [Bounds(member.beams[seq]) for member in state.members]
        if all(not b.pending for b in bounds):
            return self._choose(state, seq), []
        if not (self.cfg.fast_path and self.cfg.temperature == 0):
            return None, [[node.path for node in b.pending] for b in bounds]
        tops = [b.masses.top(self.cfg.top_k) for b in bounds]
        candidates = [c for c in dict.fromkeys([c for top in tops for c, _ in top] + [END])
                      if self._allowed(state, seq, c)]
        lows = {c: [b.lower(c) for b in bounds] for c in candidates}
        order = sorted(candidates, key=lambda c: (-self._fuse(lows[c]), c is END, c or b""))
        leader = order[0] if order else END
        lead = self._fuse(lows.get(leader, [0.0] * len(bounds)))
        caps = [1.0 - x for x in lows.get(leader, [0.0] * len(bounds))]  # any other character's probability
        contenders = [c for c in candidates if c != leader
                      and self._fuse([min(b.upper(c), cap) for b, cap in zip(bounds, caps)]) >= lead]
        rest = self._fuse([min(b.upper_rest(top, self.cfg.top_k), cap)
                           for b, top, cap in zip(bounds, tops, caps)]) >= lead
        if lead > 0 and not contenders and not rest:
            probs = lows[leader]
            fast = all(p > 0.5 for p, w in zip(probs, self.weights) if w > 0)
            return Choice(leader, probs, lead, [(c, self._fuse(lows[c])) for c in order], fast=fast, resolved=False,
                          tops=[top[0][0] if top else END for top in tops]), []
        watched = [leader] + contenders
        wanted = [[node for node in b.pending if any(node.allows(c) for c in watched)
                   or (rest and (not node.started or node in b.chain))] for b in bounds]
        if not any(wanted):  # only the normalisers are uncertain: score the heaviest half of the unscored mass
            wanted = [b.heaviest_half() for b in bounds]
        paths = []
        for member, nodes in zip(state.members, wanted):
            paths.append([node.path for node in nodes])
            # A closed token's next token is most likely the leader's first bytes, when the member
            # spells them as a token of their own (a byte-level BPE half kanji): run it in the same
            # row, saving the level after.
            guess = self._first_piece(member, leader)
            n = len(member.beams[seq].text)
            if guess is not None:
                paths[-1] += [node.path + (guess,) for node in nodes
                              if node.path and node.start == n and not node.started]
        return None, paths

    @staticmethod
    def _first_piece(member: CharModel, char: Optional[bytes]) -> Optional[int]:
        """The member's longest token of two or more bytes that is a proper prefix of ``char``."""
        for j in range(len(char or b"") - 1, 1, -1):
            positions = member.tables.exact(char[:j])
            if positions:
                return int(member.tables.order[positions[0]])
        return None

    def _choose(self, state: CharwiseState, seq: int) -> Choice:
        masses: list[CharMasses] = [member.beams[seq].masses() for member in state.members]
        tops = [m.top(self.cfg.top_k) for m in masses]
        candidates = list(dict.fromkeys([c for top in tops for c, _ in top] + [END]))
        probs = [[m.prob(c) for m in masses] for c in candidates]
        scores = [self._fuse(p) for p in probs]
        if self.cfg.rule == "product" and sum(scores) > 0:
            scores = [s / sum(scores) for s in scores]
        scores = [s if self._allowed(state, seq, c) else -math.inf for c, s in zip(candidates, scores)]
        order = sorted(range(len(candidates)), key=lambda i: (-scores[i], candidates[i] is END, candidates[i] or b""))
        ranked = [(candidates[i], scores[i]) for i in order]
        pick = order[0]
        if scores[pick] <= 0 and self._may_end(state, seq):
            pick = candidates.index(END)  # nothing allowed has any probability: end
        elif self.cfg.temperature > 0:
            weights = torch.tensor([max(s, 0.0) ** (1.0 / self.cfg.temperature) for s in scores], dtype=torch.float64)
            if weights.sum() > 0:
                pick = int(torch.multinomial(weights, 1, generator=state.generators[seq]))
        return Choice(candidates[pick], probs[pick], scores[pick], ranked, resolved=True,
                      tops=[top[0][0] if top else END for top in tops])

    # --- appending ---------------------------------------------------------------------------------
    def _apply(self, state: CharwiseState, seq: int, choice: Choice) -> bool:
        """Append the choice to every member's beam; True when the sequence is finished."""
        agree = all(t == choice.char for t in choice.tops)
        state.agree[seq] += len(set(choice.tops)) == 1
        state.fast[seq] += choice.fast
        state.resolved[seq] += choice.resolved
        origin = ("both" if len(self.names) == 2 else "all") if agree else \
            "+".join(n for n, t in zip(self.names, choice.tops) if t == choice.char) or "fused"
        traced = self.traces_steps  # the ids and log-probabilities only the trace records
        extra = {} if not self.traces_extras else {"p": {n: round(p, 6) for n, p in zip(self.names, choice.probs)},
                 "score": round(choice.score, 6),
                 "top": [["<end>" if c is END else c.decode("utf-8", "backslashreplace"), round(s, 6)]
                         for c, s in choice.ranked[:5] if s > -math.inf],
                 "argmax": {n: "<end>" if t is END else t.decode("utf-8", "backslashreplace")
                            for n, t in zip(self.names, choice.tops)},
                 "covers": {n: len(m.beams[seq].hypotheses()) for n, m in zip(self.names, state.members)},
                 "fastpath": choice.fast,
                 "resolved": choice.resolved}
        logprob = {n: (math.log(p) if p > 0 else None) for n, p in zip(self.names, choice.probs)} if traced else {}
        if choice.char is END:
            state.steps[seq].append(trace_step(b"", ids={n: [] for n in self.names} if traced else {}, logprob=logprob,
                                               origin=origin, end=True, extra=extra))
            return True
        ids, retokenized = {}, {}
        for m, member in enumerate(state.members):
            beam = member.beams[seq]
            before = beam.best_path() if traced else None
            beam.advance(choice.char)
            if traced:
                after = beam.best_path()
                common = common_prefix_len(before, after)
                ids[self.names[m]] = list(after[common:])
                if common < len(before):
                    retokenized[self.names[m]] = len(before) - common
        if retokenized and self.traces_extras:
            extra["retokenized"] = retokenized
        state.steps[seq].append(trace_step(choice.char, ids=ids, logprob=logprob, origin=origin, extra=extra))
        start = len(state.text[seq])
        state.text[seq].extend(choice.char)
        if (self._may_end(state, seq) and state.stops
                and find_stop(bytes(state.text[seq]), state.stops, start) is not None):
            return True
        return len(state.steps[seq]) >= self.cfg.max_new_tokens
