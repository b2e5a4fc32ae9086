"""``decoding=unite``: union top-k ensembling (UniTE, "Determine-Then-Ensemble: Necessity of Top-k
Union for LLM Ensembling", ICLR 2025), over bytes so that different tokenizers meet.

The variant implemented, exactly:
1. Each model's next-token distribution is the softmax over its full vocabulary.
2. The union U is the set of byte strings of every model's top-k tokens (all end tokens are one
   candidate).
3. For model m and candidate c in U: p_m(c) is m's probability of c if c is in its top-k. Else
   (``lookup``, the candidate's origin is then ``lookup`` when m has no token with its bytes):
   ``lookup=first_token`` (default, as UniTE): the probability of m's token with exactly the bytes
   of c; else (c is not one token for m) that of the first token of m's spelling of c, i.e. its
   longest token that is a prefix of c (a prefix of the candidate scores it).
   ``lookup=exact``: m's probability that its next bytes start with those of c, summed over all
   its tokenizations of them (``decoding/charprob.py``: a pruned beam of covers, default beam 8 and
   threshold 1e-3; extra forward passes on duplicated rows, one call per level). A candidate that
   is one token of m also counts m's longer tokens and multi-token spellings that start with it.
4. Each model's scores are renormalised over U: q_m(c) = p_m(c) / sum_{c' in U} p_m(c').
5. The fused score is sum_m w_m q_m(c) (weights normalised to sum 1); argmax, or sampling with
   ``temperature`` > 0. Ties go to the candidate the higher-weighted models spell as one token,
   so with weights (1, 0) the output is exactly the first model's greedy output.
6. Optional ``primary`` (index into models.members): only candidates that the primary model
   spells as one token of its own vocabulary can be chosen, so its tokenizer defines the output
   (as in the UniTE reference code); the scores are unchanged.

The trace's ``top`` lists candidates by the fused score of step 5 (what the argmax compares),
leaving out those ``primary`` forbids.
"""

import math
from dataclasses import dataclass
from typing import Optional

from decoding.charprob import CoverConfig, exact_prefix_probs
from decoding.errors import FusemtError
from decoding.fusion import END, Candidate, FusionDecoder
from decoding.methods import register

LOOKUPS = ("first_token", "exact")


@register
class UniteDecoder(FusionDecoder):
    name = "unite"

    @dataclass
    class Config(FusionDecoder.Config):
        top_k: int = 10
        primary: Optional[int] = None  # index of the model whose vocabulary defines the output
        lookup: str = "first_token"  # first_token | exact: how a model scores a candidate it did not propose

    every_meaning = "in every model's top-k (proposed by all)"
    lookup_meaning = ("in some model's top-k; a model that did not propose it was scored by the first token of its "
                      "spelling (an approximation)")
    alone_meaning = "proposed by {models} only (the others scored it with a token of exactly these bytes)"

    @classmethod
    def check_config(cls, cfg, n_models: int) -> None:
        super().check_config(cfg, n_models)
        if cfg.primary is not None and not 0 <= cfg.primary < n_models:
            raise FusemtError(f"decoding.primary={cfg.primary}: must index models.members (0..{n_models - 1})")
        if cfg.lookup not in LOOKUPS:
            raise FusemtError(f"decoding.lookup={cfg.lookup}: use one of {', '.join(LOOKUPS)}")

    def _rescore_lookups(self, candidates, logprobs, streams) -> None:
        if self.cfg.lookup != "exact":
            return
        for m, stream in enumerate(streams):
            slots = [(row, cand) for row, cands in enumerate(candidates) for cand in cands
                     if not cand.proposed[m] and cand.key is not END]
            probs = exact_prefix_probs(stream, logprobs[m], [(row, cand.key) for row, cand in slots],
                                       CoverConfig())
            for (_, cand), p in zip(slots, probs):
                cand.probs[m] = p

    def score(self, candidates: list[Candidate], text: bytes) -> list[float]:
        totals = [sum(c.probs[m] for c in candidates) for m in range(len(self.models))]
        primary = self.cfg.primary
        return [sum(w * (c.probs[m] / totals[m] if totals[m] > 0 else 0.0) for m, w in enumerate(self.weights))
                if primary is None or c.exact[primary] else -math.inf
                for c in candidates]
