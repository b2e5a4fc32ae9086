"""``decoding=pool``: a sequence-level ensemble. Each segment gets a pool of finished translations
(the members' own greedy, beam n-best and sampled outputs, and other runs' outputs), and one rule
picks from it:

- ``mbr``: highest expected utility against the pool as pseudo-references (counts as weights);
- ``likelihood``: highest joint score, each member scoring every candidate in its own tokenization
  after its own prompt (``decoding/rescore.py``), length-normalised per character and weighted by
  ``decoding.weights``: the exact sequence-level ensemble across tokenizers;
- ``model_mbr``: MBR with pseudo-references weighted by softmax of that joint score (Jinnai et al. 2024);
- ``oracle``: the best sentence chrF against the reference: an upper bound, not a translation method.

Selection and tie rules: ``decoding/mbr.py``. The runner passes the other runs' outputs (loaded and
checked by ``runners/candidates.py``) and the segments (ids to match them, references for the oracle).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from decoding.base import DecodeOutput, Decoder, trace_step
from decoding.errors import FusemtError
from decoding.generate import GenerateDecoder
from decoding.mbr import (
    PairwiseUtility,
    argmax_first,
    build_pool,
    check_comet_checkpoint,
    expected_utility,
    mbr_weights,
    model_weights,
    parse_utility,
)
from decoding.methods import register
from decoding.rescore import sequence_logprobs
from decoding.sampling import segment_seed
from decoding.stats import SegmentStats, mean, per_model

RULES = ("mbr", "likelihood", "model_mbr", "oracle")
GENERATION = re.compile(r"^(greedy|beam:(\d+)|samples:(\d+))$")
ORACLE_WARNING = "oracle: chosen by its chrF against the reference (an upper bound, not a translation method)"


class _Generation(GenerateDecoder):
    """One member's generations of one kind, through Hugging Face generate."""

    name = "pool-generation"
    search = "pool generation"

    def __init__(self, cfg: Decoder.Config, model, prompt, kwargs: dict):
        super().__init__(cfg, [model], prompt)
        self.kwargs = kwargs

    def generation_kwargs(self) -> dict:
        return self.kwargs


@dataclass
class PoolState:
    sources: list[str]
    segments: list[Any]
    pools: list[list] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    forward_passes: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, list[list[float]]] = field(default_factory=dict)
    outputs: list[DecodeOutput] = field(default_factory=list)


@dataclass
class PoolStats(SegmentStats):
    candidates: int = mean()  # distinct texts in the segment's pool
    generations: int = mean()  # texts that entered it (duplicates included)
    forward_passes: dict[str, int] = per_model()  # generate's steps and the scoring passes, per member


@register
class PoolDecoder(Decoder):
    name = "pool"
    min_models, max_models = 0, None
    Stats = PoolStats

    @classmethod
    def origin_meaning(cls, origin: str, models: list[str]) -> str:
        if origin.startswith("run:"):
            return (f"the chosen candidate is the output of the finished run {origin[4:]} "
                    "(and of any other origin in its pool row)")
        model, _, kind = origin.partition(":")
        return f"the chosen candidate is one of {model}'s own {kind} generations (see the pool table below the segment)"

    @dataclass
    class Config(Decoder.Config):
        select: str = "mbr"  # mbr | likelihood | model_mbr | oracle (an upper bound)
        utility: str = "chrf"  # chrf | bleu | comet | a weighted sum such as chrf:0.5+bleu:0.5
        # What each member generates: greedy, beam:K (its K-best), samples:N; [] with runs: system combination.
        generate: list[str] = field(default_factory=lambda: ["greedy", "beam:4", "samples:8"])
        runs: list[str] = field(default_factory=list)  # results JSONL files, run names, or plain hypothesis files
        epsilon_cutoff: float = 0.02  # samples: epsilon sampling (Freitag et al. 2023); 0: temperature/top_p instead
        temperature: float = 1.0
        top_p: float = 1.0
        weights: list[float] = field(default_factory=list)  # likelihood: one per member; empty: equal
        include_self: bool = False  # MBR: count a candidate as its own pseudo-reference
        comet_model: str = ""  # local COMET checkpoint for utility=comet
        comet_batch_size: int = 16
        seed: int = 0  # set from the run's one seed (runners/config.py): seeds each segment's samples

    @classmethod
    def uses_models(cls, cfg: "PoolDecoder.Config") -> bool:
        return bool(cfg.generate) or cfg.select in ("likelihood", "model_mbr")

    @classmethod
    def samples(cls, cfg: "PoolDecoder.Config") -> bool:
        return any(spec.startswith("samples:") for spec in cfg.generate)

    @classmethod
    def check_config(cls, cfg: "PoolDecoder.Config", n_models: int) -> None:
        super().check_config(cfg, n_models)
        if cfg.select not in RULES:
            raise FusemtError(f"decoding.select='{cfg.select}': use one of {', '.join(RULES)}")
        bad = [g for g in cfg.generate if not GENERATION.match(g) or g.endswith(":0")]
        if bad:
            raise FusemtError(f"decoding.generate: '{bad[0]}' is not greedy, beam:K or samples:N (K, N >= 1)")
        if not cfg.generate and not cfg.runs:
            raise FusemtError("decoding=pool has an empty pool: list generations in decoding.generate "
                              "(e.g. [greedy,beam:4,samples:8]) and/or finished runs in decoding.runs")
        if cls.uses_models(cfg) and n_models < 1:
            raise FusemtError(f"decoding.select={cfg.select} with decoding.generate={cfg.generate} needs models: "
                              "set models.members")
        if cfg.weights and (len(cfg.weights) != n_models or any(w < 0 for w in cfg.weights) or sum(cfg.weights) <= 0):
            raise FusemtError(f"decoding.weights={cfg.weights}: give {n_models} non-negative weights (one per member), "
                              "or [] for equal weights")
        if not 0 <= cfg.epsilon_cutoff < 1 or cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
            raise FusemtError("decoding.epsilon_cutoff must be in [0, 1), temperature > 0 and top_p in (0, 1]")
        if "comet" in parse_utility(cfg.utility) and cfg.select in ("mbr", "model_mbr"):
            check_comet_checkpoint(cfg.comet_model)

    def __init__(self, cfg: "PoolDecoder.Config", models: list, prompt,
                 external: dict[str, list[tuple[str, str]]] | None = None):
        super().__init__(cfg, models, prompt)
        self.external = external or {}
        self.utility = PairwiseUtility(cfg.utility, cfg.comet_model, cfg.comet_batch_size)
        total = sum(cfg.weights) if cfg.weights else len(models)
        self.weights = [w / total for w in cfg.weights] if cfg.weights else [1.0 / max(total, 1)] * len(models)

    def _sampling_kwargs(self, n: int) -> dict:
        kwargs = {"do_sample": True, "num_beams": 1, "num_return_sequences": n, "top_k": 0,
                  "temperature": self.cfg.temperature, "top_p": self.cfg.top_p}
        if self.cfg.epsilon_cutoff > 0:
            kwargs.update(epsilon_cutoff=self.cfg.epsilon_cutoff, temperature=1.0, top_p=1.0)
        return kwargs

    def generation_kwargs(self, spec: str) -> tuple[int, dict]:
        """(sequences per source, generate kwargs) of one ``decoding.generate`` entry."""
        if spec == "greedy":
            return 1, {"do_sample": False, "num_beams": 1}
        kind, n = spec.split(":")
        if kind == "beam":
            return int(n), {"do_sample": False, "num_beams": int(n), "num_return_sequences": int(n),
                            "early_stopping": True}
        return int(n), self._sampling_kwargs(int(n))

    def decode(self, sources: list[str], segments: list | None = None) -> list[DecodeOutput]:
        state = self.prepare(sources, segments)
        while self.step(state):
            pass
        return self.finish(state)

    def prepare(self, sources: list[str], segments: list | None = None) -> PoolState:
        """Generate every member's candidates and gather the finished runs' ones: the pools."""
        if (self.cfg.runs or self.cfg.select == "oracle") and segments is None:
            raise FusemtError("decoding=pool needs the segments (ids, references) from the runner")
        entries: list[list[tuple]] = [[] for _ in sources]
        new_tokens = [0] * len(sources)
        passes: dict[str, int] = {}
        base = Decoder.Config(max_new_tokens=self.cfg.max_new_tokens, min_new_tokens=self.cfg.min_new_tokens)
        for model in self.models:
            for spec in self.cfg.generate:
                per_source, kwargs = self.generation_kwargs(spec)
                generation = _Generation(base, model, self.prompt, kwargs)
                generation.trace = "off"  # a candidate keeps its text; the pool is the row's record
                # Samples: one call per source with torch's generator seeded from (seed, source), so that
                # they do not depend on batching, shards or resumes (decoding/sampling.py).
                calls = [[source] for source in sources] if kwargs.get("do_sample") else [sources]
                outputs = []
                for call in calls:
                    if kwargs.get("do_sample"):
                        torch.manual_seed(segment_seed(self.cfg.seed, call[0]))
                    outs = generation.decode(call)
                    passes[model.name] = passes.get(model.name, 0) + outs[0].stats["forward_passes"][model.name]
                    outputs += outs
                for k, out in enumerate(outputs):
                    s = k // per_source
                    entries[s].append((f"{model.name}:{spec}", out.text))
                    new_tokens[s] += out.n_new_tokens
        for s, seg in enumerate(segments or []):
            for origin, text in self.external.get(str(seg.id), []):
                entries[s].append((origin, text))
        return PoolState(sources=sources, segments=list(segments or []), pools=[build_pool(e) for e in entries],
                         new_tokens=new_tokens, forward_passes=passes)

    def step(self, state: PoolState) -> bool:
        """Every loaded member scores every candidate (one batched teacher-forced pass per chunk)."""
        texts = [[c.text for c in pool] for pool in state.pools]
        for model in self.models:
            state.logprobs[model.name], n = sequence_logprobs(model, self.prompt, state.sources, texts)
            state.forward_passes[model.name] = state.forward_passes.get(model.name, 0) + n
        return False

    def finish(self, state: PoolState) -> list[DecodeOutput]:
        for s, pool in enumerate(state.pools):
            seg = state.segments[s] if state.segments else None
            state.outputs.append(self._choose(state, s, pool, seg))
        return state.outputs

    def _choose(self, state: PoolState, s: int, pool: list, seg) -> DecodeOutput:
        texts = [c.text for c in pool]
        names = [m.name for m in self.models]
        logprob = {m: state.logprobs[m][s] for m in names}
        joint = ([sum(w * logprob[m][k] / (len(texts[k]) + 1) for w, m in zip(self.weights, names))
                  for k in range(len(pool))]
                 if names else None)
        reference = getattr(seg, "reference", None)
        ref_chrf = ([self.utility.chrf.sentence_score(t, [reference]).score for t in texts]
                    if reference is not None else None)
        utility = None
        select = self.cfg.select
        if select in ("mbr", "model_mbr"):
            matrix = self.utility.matrix(texts, state.sources[s])
            weights = (mbr_weights([c.count for c in pool], self.cfg.include_self) if select == "mbr"
                       else model_weights(joint, self.cfg.include_self))
            utility = expected_utility(matrix, *weights).tolist()
            score = utility
        elif select == "likelihood":
            score = joint
        else:
            if ref_chrf is None:
                raise FusemtError(f"decoding.select=oracle needs references: segment {getattr(seg, 'id', s)} has none")
            score = ref_chrf
        best = argmax_first(score)
        chosen = pool[best]
        rows = [{"text": c.text, "origins": c.origins, "count": c.count, "score": round(score[k], 6),
                 "utility": None if utility is None else round(utility[k], 6),
                 "logprob": {m: round(logprob[m][k], 6) for m in names},
                 "joint": None if joint is None else round(joint[k], 6),
                 "ref_chrf": None if ref_chrf is None else round(ref_chrf[k], 4), "chosen": k == best}
                for k, c in enumerate(pool)]
        extra = {"score": round(score[best], 6), "candidates": len(pool)} if self.traces_extras else {}
        step = trace_step(chosen.text.encode("utf-8"), ids={}, logprob={m: logprob[m][best] for m in names},
                          origin=next(iter(chosen.origins)), end=True, extra=extra)
        stats = PoolStats(candidates=len(pool), generations=sum(c.count for c in pool),
                          forward_passes=dict(state.forward_passes)).to_json()
        warnings = [ORACLE_WARNING] if select == "oracle" else []
        return DecodeOutput(text=chosen.text, n_new_tokens=state.new_tokens[s],
                            trace=[step.to_json()] if self.traces_steps else [], stats=stats, warnings=warnings,
                            pool=rows)
