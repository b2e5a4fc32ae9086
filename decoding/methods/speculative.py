"""``decoding=speculative``: a draft model proposes, the target verifies in one pass; traced.

models.members lists the target first and the draft second. Each round, per sequence:
1. the draft proposes up to ``num_draft_tokens`` tokens with its own KV cache (``decoding.speculate.Drafter``,
   the drafting loop the speculative ensembles use too: only tokens that keep the text valid UTF-8,
   ending after an end token or a token below ``draft_confidence``; ``draft_schedule=heuristic``
   adapts each sequence's length);
2. the proposals reach the target in the target's tokens: the same ids when both share a
   vocabulary, else the proposed text re-tokenised by the target (as Hugging Face's universal
   assisted generation does; a character cut off at the end of a proposal is left out);
3. the target scores all of them in one forward pass and accepts the longest agreeing prefix,
   then adds its own next token (correction, or bonus when everything was accepted);
4. rejected tokens are rolled back in both caches (masked out, nothing recomputed) and the draft
   re-syncs to the accepted text.

Greedy: accepted tokens are exactly the target's argmax given its own prefix, so the output is
the target's greedy output. Sampling (``temperature`` > 0, ``top_p``): accept x with
probability min(1, p(x)/q(x)) and on rejection sample from normalise(max(0, p - q)); with a
different tokenizer the proposal is a point mass (q = 1 on x), which keeps the output
distribution equal to the target's p as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from decoding.base import TRUNCATED, DecodeOutput, Decoder, option_alias, renamed_option, trace_step, traced_output
from decoding.errors import FusemtError
from decoding.fusion import unique_names
from decoding.methods import register
from decoding.prompt import find_stop, stop_strings
from decoding.sampling import segment_generators, warp
from decoding.speculate import Drafter, DraftSchedule, check_draft_options
from decoding.stats import SegmentStats, mean, per_model
from decoding.stream import ModelStream, common_prefix_len, open_streams
from decoding.vocab import complete_utf8_prefix, utf8_pending


@dataclass
class SpecState:
    sources: list[str]
    target: ModelStream
    draft: ModelStream
    stops: list[str]
    active: list[int]
    text: list[bytearray]
    steps: list[list] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    draft_passes: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    schedule: Optional[DraftSchedule] = None
    generators: list[torch.Generator] = field(default_factory=list)  # per source, when sampling


@dataclass
class SpeculativeStats(SegmentStats):
    rounds: int = mean()
    acceptance_rate: float = mean()  # drafted tokens the target accepted / drafted tokens proposed
    mean_accepted_length: float = mean()  # accepted drafted tokens per round
    forward_passes: dict[str, int] = per_model()  # the target's verification passes, the draft's drafting passes


@register
class SpeculativeDecoder(Decoder):
    name = "speculative"
    min_models = max_models = 2
    Stats = SpeculativeStats

    @dataclass
    class Config(Decoder.Config):
        num_draft_tokens: int = 5
        # heuristic: per sequence, +2 after a round that accepted every proposal, -1 otherwise (HF's heuristic),
        # up to max_draft_tokens; was adaptive=true
        draft_schedule: str = renamed_option("constant", was="adaptive",
                                             was_values={"constant": False, "heuristic": True})
        max_draft_tokens: int = 16
        # Stop drafting a sequence after a token the draft gives less than this probability (as HF's
        # assistant_confidence_threshold): unlikely proposals cost draft passes and are rarely accepted.
        draft_confidence: float = renamed_option(0.4, was="confidence_threshold")
        temperature: float = 0.0  # 0: greedy (output = target greedy)
        top_p: float = 1.0
        use_cache: bool = True
        seed: int = 0
        adaptive: Optional[bool] = option_alias("draft_schedule")
        confidence_threshold: Optional[float] = option_alias("draft_confidence")

    @classmethod
    def check_config(cls, cfg, n_models: int) -> None:
        super().check_config(cfg, n_models)
        if not 1 <= cfg.num_draft_tokens <= cfg.max_draft_tokens:
            raise FusemtError(f"decoding.num_draft_tokens={cfg.num_draft_tokens}: must be between 1 and "
                              f"decoding.max_draft_tokens ({cfg.max_draft_tokens})")
        check_draft_options(cfg)
        if not 0 <= cfg.temperature < math.inf or not 0 < cfg.top_p <= 1:
            raise FusemtError(f"decoding.temperature={cfg.temperature}, top_p={cfg.top_p}: need temperature >= 0 "
                              "and 0 < top_p <= 1")

    ORIGINS = {"draft": "proposed by the draft model, accepted by the target",
               "target": "the target's own token: its correction of a rejected draft token, or the bonus token"}

    @classmethod
    def origin_meaning(cls, origin: str, models: list[str]) -> str:
        return cls.ORIGINS.get(origin, origin)

    def __init__(self, cfg, models, prompt):
        super().__init__(cfg, models, prompt)
        self.target_model, self.draft_model = models
        self.names = unique_names(models)
        self.same_vocab = self.target_model.vocab.token_bytes == self.draft_model.vocab.token_bytes
        self.drafter = Drafter(cfg.draft_confidence, cfg.temperature, cfg.top_p)

    # --- prepare / step / finish ---------------------------------------------------------------
    def prepare(self, sources: list[str]) -> SpecState:
        streams, truncated = open_streams(self.models, sources, self.prompt,
                                          recompute=not self.cfg.use_cache)
        # The target's stop strings decide where its output ends.
        stops = stop_strings(self.target_model.tokenizer, self.prompt, self.target_model.spec.stop_strings)
        n = len(sources)
        return SpecState(sources=sources, target=streams[0], draft=streams[1], stops=stops, active=list(range(n)),
                         text=[bytearray() for _ in range(n)], steps=[[] for _ in range(n)], rounds=[0] * n,
                         proposed=[0] * n, accepted=[0] * n, draft_passes=[0] * n, truncated=truncated,
                         schedule=DraftSchedule(self.cfg.num_draft_tokens, self.cfg.max_draft_tokens,
                                                self.cfg.draft_schedule == "heuristic"),
                         generators=segment_generators(self.cfg.seed, sources) if self.cfg.temperature > 0 else [])

    @torch.inference_mode()
    def step(self, state: SpecState) -> bool:
        if not state.active:
            return False
        draft = self.drafter.draft(state.draft, self.draft_model.vocab, [bytes(state.text[s]) for s in state.active],
                                   [state.schedule.length(s) for s in state.active],
                                   [state.generators[s] for s in state.active] if state.generators else None)
        for seq, n in zip(state.active, draft.passes):
            state.draft_passes[seq] += n
        draft_ids = draft.ids
        proposals = [self._to_target(state, row, ids) for row, ids in enumerate(draft_ids)]
        for row, props in enumerate(proposals):
            state.target.append(row, props)
        width = max(len(p) for p in proposals) + 1
        target_lp = state.target.logprobs(keep=width)  # [rows, width, V]
        finished = []
        for row, seq in enumerate(state.active):
            props = proposals[row]
            scores = target_lp[row, width - len(props) - 1:]  # predictions of props[0..n-1] and the next token
            q = draft.dists[row] if draft.dists is not None and self.same_vocab else None
            n_acc, next_id = self._verify(props, scores, q, state.generators[seq] if state.generators else None)
            state.rounds[seq] += 1
            state.proposed[seq] += len(props)
            state.accepted[seq] += n_acc
            state.schedule.update(seq, n_acc == len(props))
            done = self._commit(state, row, seq, props, n_acc, next_id, scores, draft_ids[row])
            if done:
                finished.append(row)
        if finished:
            keep = [r for r in range(len(state.active)) if r not in set(finished)]
            state.target.select_rows(keep)
            state.draft.select_rows(keep)
            state.active = [state.active[r] for r in keep]
        return bool(state.active)

    def finish(self, state: SpecState) -> list[DecodeOutput]:
        outputs = []
        for seq in range(len(state.sources)):
            rounds = max(state.rounds[seq], 1)
            stats = SpeculativeStats(rounds=state.rounds[seq],
                                     acceptance_rate=round(state.accepted[seq] / max(state.proposed[seq], 1), 4),
                                     mean_accepted_length=round(state.accepted[seq] / rounds, 4),
                                     forward_passes={self.names[0]: state.rounds[seq],
                                                     self.names[1]: state.draft_passes[seq]})
            outputs.append(traced_output(state.steps[seq], state.stops, stats,
                                         [TRUNCATED] if state.truncated[seq] else [], self.trace))
        return outputs

    # --- one round ---------------------------------------------------------------------------
    def _to_target(self, state: SpecState, row: int, draft_ids: list[int]) -> list[int]:
        """The draft's proposal in the target's tokens."""
        if self.same_vocab:
            return list(draft_ids)
        vocab = self.draft_model.vocab
        ends = [i for i, t in enumerate(draft_ids) if t in vocab.end_ids]
        text = vocab.spell(draft_ids[: ends[0] if ends else None])
        so_far = bytes(state.text[state.active[row]])
        complete = not utf8_pending(so_far + text)
        if not complete:  # leave out a character cut off at the end of the proposal
            text = text[: max(len(complete_utf8_prefix(so_far + text)) - len(so_far), 0)]
        target_vocab = self.target_model.vocab
        props = []
        if text:
            encoded = self.target_model.tokenizer.encode(text.decode("utf-8", errors="replace"),
                                                         add_special_tokens=False)
            props = encoded if target_vocab.spell(encoded) == text else target_vocab.segment(text)
        if ends and complete:  # the draft proposes to stop: so does the target's proposal
            props.append(self.target_model.tokenizer.eos_token_id)
        return props[: self.cfg.max_draft_tokens]

    def _verify(self, props: list[int], scores: torch.Tensor, q: torch.Tensor | None,
                generator: torch.Generator | None) -> tuple[int, int]:
        """(accepted count, the target's own next token) for one row; samples from the row's ``generator``."""
        if self.cfg.temperature <= 0:
            choice = scores.argmax(-1).tolist()  # len(props) + 1: the next token after all of them too
            n = common_prefix_len(props, choice)
            return n, choice[n]
        p = warp(scores, self.cfg.temperature, self.cfg.top_p)
        for n, x in enumerate(props):
            q_x = float(q[n, x]) if q is not None else 1.0  # cross-tokenizer proposals are a point mass
            if float(torch.rand((), generator=generator)) < min(1.0, float(p[n, x]) / q_x):
                continue
            residual = p[n] - (q[n] if q is not None else torch.nn.functional.one_hot(torch.tensor(x), p.shape[-1]))
            residual = residual.clamp_min(0)
            return n, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        return len(props), int(torch.multinomial(p[len(props)], 1, generator=generator))

    def _commit(self, state: SpecState, row: int, seq: int, props: list[int], n_acc: int, next_id: int,
                scores: torch.Tensor, draft_ids: list[int]) -> bool:
        """Write the accepted tokens and the target's own token; roll back and re-sync. True when done."""
        vocab = self.target_model.vocab
        budget = self.cfg.max_new_tokens - len(state.steps[seq])
        new = (props[:n_acc] + [next_id])[:budget]
        state.target.rollback(row, len(props) - n_acc)
        state.target.append(row, new[n_acc:])
        if len(new) <= n_acc:  # the budget ended inside the accepted prefix
            state.target.rollback(row, n_acc - len(new))
        full, traced = self.traces_extras, self.traces_steps
        round_info = {"round": state.rounds[seq],
                      "proposed": [(self.draft_model.vocab.token_bytes[t] or b"").decode("utf-8", "backslashreplace")
                                   for t in draft_ids],
                      "accepted": n_acc} if full else {}
        ends = [j for j, tid in enumerate(new) if tid in vocab.end_ids]
        done = bool(ends)
        written = new[: ends[0] + 1] if ends else new
        start = len(state.text[seq])
        for j, tid in enumerate(written):
            is_end = tid in vocab.end_ids
            piece = b"" if is_end else vocab.token_bytes[tid] or b""
            # The round's last step carries what was proposed and how much of it was accepted.
            extra = {} if not full else dict(round_info) if j == len(written) - 1 else {"round": state.rounds[seq]}
            ids = {self.names[0]: [tid]} if traced else {}
            if traced and self.same_vocab and j < n_acc:
                ids[self.names[1]] = [tid]
            logprob = {self.names[0]: float(scores[j, tid])} if traced else {}
            state.steps[seq].append(trace_step(piece, ids=ids, logprob=logprob,
                                               origin="draft" if j < n_acc else "target", end=is_end, extra=extra))
            state.text[seq].extend(piece)
        if state.stops and len(state.steps[seq]) >= self.cfg.min_new_tokens:
            done = done or find_stop(bytes(state.text[seq]), state.stops, start) is not None
        done = done or len(state.steps[seq]) >= self.cfg.max_new_tokens
        if not done:
            self._sync_draft(state, row, seq)
        return done

    def _sync_draft(self, state: SpecState, row: int, seq: int) -> None:
        """Bring the draft to the accepted text: the target's ids when they share a vocabulary, else bytes."""
        draft = state.draft
        if self.same_vocab:
            draft.sync_to_ids(row, state.target.generated(row))
        else:
            draft.sync_to_bytes(row, bytes(state.text[seq]))
