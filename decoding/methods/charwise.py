"""``decoding=charwise``: character-level ensembling across tokenizers, from each member's exact
probability of string prefixes (``decoding/charprob.py``).

The variant implemented, exactly:
1. Each member m gives P_m(c | text) for every character c and END: its probability that the output
   starts with text·c (summed over the tokenizations that cover it) over that of text, after its
   prompt's anchor (the prompt without its last ``prompt_backoff`` text tokens, whose bytes are
   re-covered, so a token may span the prompt's end). Covers are kept as a beam per member and
   sequence (``beam_size`` hypotheses, ``prune_threshold`` share; 0 and 0: exact), or only the
   member's own canonical tokenization (``covers=canonical``, as CharED). Mass on bytes that are
   not valid UTF-8, on special tokens other than end tokens, and on pruned covers is left out
   and the rest renormalised.
2. Candidates: the union of the members' ``top_k`` characters, and END.
3. ``rule=mixture``: score(c) = sum_m w_m P_m(c). ``rule=product``: prod_m P_m(c)^w_m, renormalised
   over the candidates (a weighted geometric mean). Weights: ``weights``, normalised to sum 1.
4. The repetition guard (``max_char_repeats``, ``no_repeat_ngram_size``, over characters of the
   text) forbids candidates; END is forbidden before ``min_new_tokens`` characters.
5. ``temperature=0``: the best score (ties: the smaller character, END last). ``temperature>0``:
   a sample with probability proportional to score^(1/temperature).
6. Fast path (greedy only, ``fast_path``): when, for one allowed candidate, a lower bound of P_m(c)
   from the covers scored so far exceeds 1/2 for every member with a positive weight, c is the
   argmax of either rule: it is emitted without scoring the other candidates, and the covers it
   leaves unscored are scored later (nothing is lost). Counted in the stat ``fastpath_share``.
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

from decoding.base import TRUNCATED, DecodeOutput, Decoder, find_stop, register, trace_step, traced_output
from decoding.charprob import CharMasses, CharModel, CoverConfig
from decoding.errors import FusemtError
from decoding.fusion import FusionDecoder, unique_names
from decoding.prompt import render_prompt, stop_strings
from decoding.repetition import RepetitionGuard

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
    fast: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)


@dataclass
class Choice:
    char: Optional[bytes]  # the character's bytes, or END
    probs: list[float]  # per member: P_m(char | text) (a lower bound on the fast path)
    score: float
    ranked: list[tuple[Optional[bytes], float]]  # candidates by fused score, best first
    fast: bool
    tops: list[Optional[bytes]]  # per member: its most likely character


@register
class CharwiseDecoder(Decoder):
    name = "charwise"
    min_models, max_models = 1, None

    @dataclass
    class Config(FusionDecoder.Config):
        rule: str = "mixture"  # mixture | product
        top_k: int = 10  # candidates: each member's top_k characters, and END
        beam_size: int = 8  # cover hypotheses per member and sequence; 0: no limit
        prune_threshold: float = 1e-3  # covers below this share of a member's mass are dropped
        covers: str = "all"  # all | canonical (the member's own tokenization only, as CharED)
        fast_path: bool = True
        prompt_backoff: int = 1  # prompt text tokens re-covered (a token may span the prompt's end)
        max_char_repeats: int = 7  # most times one character may appear in a row; 0: off
        no_repeat_ngram_size: int = 0  # no character n-gram of this size twice; 0: off

    def __init__(self, cfg, models, prompt, render_input_text=False):
        super().__init__(cfg, models, prompt, render_input_text)
        if cfg.rule not in RULES:
            raise FusemtError(f"decoding.rule={cfg.rule}: use one of {', '.join(RULES)}")
        if cfg.covers not in COVERS:
            raise FusemtError(f"decoding.covers={cfg.covers}: use one of {', '.join(COVERS)}")
        if cfg.beam_size < 0 or cfg.prune_threshold < 0 or cfg.top_k < 1:
            raise FusemtError("decoding.beam_size and decoding.prune_threshold must be >= 0, decoding.top_k >= 1")
        weights = cfg.weights if cfg.weights is not None else [1.0] * len(models)
        if len(weights) != len(models) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise FusemtError(f"decoding.weights={list(weights)}: need {len(models)} non-negative weights, not all 0")
        self.weights = [w / sum(weights) for w in weights]
        self.names = unique_names(models)
        self.guard = RepetitionGuard(cfg.max_char_repeats, cfg.no_repeat_ngram_size)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.covers = CoverConfig(beam_size=cfg.beam_size, prune_threshold=cfg.prune_threshold)

    # --- prepare / step / finish -------------------------------------------------------------------
    def prepare(self, sources: list[str]) -> CharwiseState:
        members, truncated = [], [False] * len(sources)
        for model in self.models:
            batch = render_prompt(model, sources, self.prompt, self.render_input_text)
            rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
            members.append(CharModel(model, rows, self.covers, self.cfg.prompt_backoff, recompute=not self.cfg.use_cache))
            truncated = [a or b for a, b in zip(truncated, batch["truncated"])]
        stops = list(dict.fromkeys(s for m in self.models for s in stop_strings(m.tokenizer, self.prompt, m.spec.stop_strings)))
        n = len(sources)
        return CharwiseState(sources=sources, members=members, stops=stops, active=list(range(n)),
                             text=[bytearray() for _ in range(n)], steps=[[] for _ in range(n)], agree=[0] * n,
                             fast=[0] * n, truncated=truncated)

    @torch.inference_mode()
    def step(self, state: CharwiseState) -> bool:
        """One character for every live sequence: score levels until each is decided."""
        if not state.active:
            return False
        choices: dict[int, Choice] = {}
        todo = list(state.active)
        while todo:
            if self.cfg.fast_path and self.cfg.temperature == 0:
                for seq in todo:
                    fast = self._fast_choice(state, seq)
                    if fast is not None:
                        choices[seq] = fast
                todo = [seq for seq in todo if seq not in choices]
            scored = [member.score_frontier(todo, state.active) for member in state.members]
            if not any(scored):
                break
        for seq in todo:
            choices[seq] = self._choose(state, seq)
        finished = [seq for seq in state.active if self._apply(state, seq, choices[seq])]
        state.active = [seq for seq in state.active if seq not in finished]
        return bool(state.active)

    def finish(self, state: CharwiseState) -> list[DecodeOutput]:
        outputs = []
        for seq in range(len(state.sources)):
            n_steps = len(state.steps[seq])
            stats = {"steps": n_steps, "agreement_rate": round(state.agree[seq] / max(n_steps, 1), 4),
                     "fastpath_share": round(state.fast[seq] / max(n_steps, 1), 4),
                     "forward_passes": {n: m.book.calls[seq] for n, m in zip(self.names, state.members)},
                     "cache_crops": {n: m.book.crops[seq] for n, m in zip(self.names, state.members)}}
            outputs.append(traced_output(state.steps[seq], state.stops, stats, [TRUNCATED] if state.truncated[seq] else []))
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

    def _fast_choice(self, state: CharwiseState, seq: int) -> Optional[Choice]:
        """The certified choice, if one allowed character has a lower bound above 1/2 in every weighted member."""
        bests = []
        for member, w in zip(state.members, self.weights):
            if w > 0:
                beam = member.beams[seq]
                top = beam.masses().top(1)
                if not top or top[0][1] <= beam.bound() / 2:
                    return None
                bests.append(top[0][0])
        char = bests[0]
        if any(b != char for b in bests) or not self._allowed(state, seq, char):
            return None
        probs = [m.beams[seq].masses().mass(char) / m.beams[seq].bound() for m in state.members]
        score = self._fuse(probs)
        return Choice(char, probs, score, [(char, score)], fast=True, tops=[char] * len(probs))

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
                pick = int(torch.multinomial(weights, 1, generator=self.generator))
        return Choice(candidates[pick], probs[pick], scores[pick], ranked, fast=False,
                      tops=[top[0][0] if top else END for top in tops])

    # --- appending ---------------------------------------------------------------------------------
    def _apply(self, state: CharwiseState, seq: int, choice: Choice) -> bool:
        """Append the choice to every member's beam; True when the sequence is finished."""
        agree = all(t == choice.char for t in choice.tops)
        state.agree[seq] += len(set(choice.tops)) == 1
        state.fast[seq] += choice.fast
        origin = ("both" if len(self.names) == 2 else "all") if agree else \
            "+".join(n for n, t in zip(self.names, choice.tops) if t == choice.char) or "fused"
        extra = {"p": {n: round(p, 6) for n, p in zip(self.names, choice.probs)},
                 "score": round(choice.score, 6),
                 "top": [["<end>" if c is END else c.decode("utf-8", "backslashreplace"), round(s, 6)]
                         for c, s in choice.ranked[:5] if s > -math.inf],
                 "argmax": {n: "<end>" if t is END else t.decode("utf-8", "backslashreplace")
                            for n, t in zip(self.names, choice.tops)},
                 "covers": {n: len(m.beams[seq].hypotheses()) for n, m in zip(self.names, state.members)},
                 "fastpath": choice.fast}
        logprob = {n: (math.log(p) if p > 0 else None) for n, p in zip(self.names, choice.probs)}
        if choice.char is END:
            state.steps[seq].append(trace_step(b"", ids={n: [] for n in self.names}, logprob=logprob, origin=origin,
                                               end=True, extra=extra))
            return True
        ids, retokenized = {}, {}
        for m, member in enumerate(state.members):
            beam = member.beams[seq]
            canonical = None
            if self.cfg.covers == "canonical":
                canonical = member.canonical_path(bytes(beam.text) + choice.char)
            before = beam.best_path()
            beam.advance(choice.char, canonical)
            after = beam.best_path()
            common = 0
            while common < min(len(before), len(after)) and before[common] == after[common]:
                common += 1
            ids[self.names[m]] = list(after[common:])
            if common < len(before):
                retokenized[self.names[m]] = len(before) - common
        if retokenized:
            extra["retokenized"] = retokenized
        state.steps[seq].append(trace_step(choice.char, ids=ids, logprob=logprob, origin=origin, extra=extra))
        start = len(state.text[seq])
        state.text[seq].extend(choice.char)
        if self._may_end(state, seq) and state.stops and find_stop(bytes(state.text[seq]), state.stops, start) is not None:
            return True
        return len(state.steps[seq]) >= self.cfg.max_new_tokens
