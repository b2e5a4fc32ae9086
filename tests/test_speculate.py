"""Speculative ensembles (``decoding.speculate=k``): the same output as the plain ensemble for every
fusion method, the fused distribution when sampling, traces that tell drafted from corrected steps."""

from collections import Counter

import pytest
from conftest import build_decoder, compose_run, trace_pieces
from toy_lm import TOY_PROMPT, toy_model

from decoding.errors import FusemtError
from decoding.methods import decoder_class
from decoding.model import load_model
from decoding.speculate import cheapest_member

TINY_SOURCES = ["The weather is nice today.", "Good morning.", "Send the mail."]
TOY_SOURCES = ["ab", "aい", "b a", "あ"]


def run(method, models, sources, prompt=None, **options):
    return build_decoder(method, models, prompt, **options).decode(sources)


@pytest.mark.parametrize("method", ["unite", "tokenwise"])
@pytest.mark.parametrize("options", [{"speculate": 1}, {"speculate": 4}, {"speculate": 3, "drafter": 0},
                                     {"speculate": 3, "alternate": True}, {"speculate": 4, "use_cache": False},
                                     {"speculate": 5, "draft_schedule": "heuristic"},
                                     {"speculate": 4, "draft_confidence": 0.05}])
def test_token_fusion_speculation_gives_the_plain_ensembles_output(tiny_pair, method, options):
    plain = run(method, tiny_pair, TINY_SOURCES, max_new_tokens=30)
    spec = run(method, tiny_pair, TINY_SOURCES, max_new_tokens=30, **options)
    assert trace_pieces(spec) == trace_pieces(plain)
    assert [o.text for o in spec] == [o.text for o in plain]
    for out in spec:
        info = out.stats["speculation"]
        # the counts include a last step that a stop string cut from the trace
        assert len(out.trace) <= info["drafted_steps"] + info["corrected_steps"] <= len(out.trace) + 1
        assert 1 <= info["rounds"] <= info["drafted_steps"] + info["corrected_steps"]
        assert all(s["draft"] in ("drafted", "corrected") for s in out.trace)
        assert out.trace[0]["round"] == 1 and "drafter" in out.trace[0]
        assert info["rounds"] - 1 <= sum("drafter" in s for s in out.trace) <= info["rounds"]


@pytest.mark.parametrize("rule", ["mixture", "product"])
@pytest.mark.parametrize("fast_path", [True, False])
def test_charwise_speculation_gives_the_plain_ensembles_output(rule, fast_path):
    sp, bpe = toy_model("sp", sharpness=3.0), toy_model("bpe", seed=1, sharpness=3.0)
    options = {"rule": rule, "fast_path": fast_path, "max_new_tokens": 12, "max_repeats": 0}
    plain = run("charwise", [sp, bpe], TOY_SOURCES, TOY_PROMPT, **options)
    for spec_options in ({"speculate": 3}, {"speculate": 5, "drafter": 0, "alternate": True}):
        spec = run("charwise", [sp, bpe], TOY_SOURCES, TOY_PROMPT, **options, **spec_options)
        assert [[(s["piece"], s["p"]) for s in o.trace] for o in spec] == \
               [[(s["piece"], s["p"]) for s in o.trace] for o in plain]


def test_a_draft_the_ensemble_follows_saves_passes(tiny_pair):
    """A self-ensemble follows its drafter's greedy text: most steps are drafted, and the other
    member reads the drafter's passes (same model, same context), needing at most one pass of its
    own per round instead of one per step."""
    model = tiny_pair[0]
    plain = run("unite", [model, model], TINY_SOURCES, max_new_tokens=24)
    spec = run("unite", [model, model], TINY_SOURCES, max_new_tokens=24, speculate=6, drafter=1)
    assert trace_pieces(spec) == trace_pieces(plain)
    for p, s in zip(plain, spec):
        info = s.stats["speculation"]
        assert info["acceptance_rate"] > 0.7
        assert s.stats["forward_passes"][model.name] <= info["rounds"] < p.stats["forward_passes"][model.name]


def test_adaptive_drafts_are_shorter_where_they_fail(tiny_pair):
    """The random tiny pair rarely follows a draft: HF's heuristic schedule shrinks the drafts to
    one token, and a confidence the random drafter never reaches ends each draft after its first
    token (as HF's assistant_confidence_threshold); the output stays the plain ensemble's."""
    plain = run("unite", tiny_pair, TINY_SOURCES, max_new_tokens=20)
    drafting = tiny_pair[cheapest_member(tiny_pair)]
    drafter = drafting.name
    one_token = {(piece or b"").decode("utf-8", "backslashreplace") for piece in drafting.vocab.token_bytes}
    passes = {}
    for options in ({}, {"draft_schedule": "heuristic"}, {"draft_confidence": 0.9}):
        spec = run("unite", tiny_pair, TINY_SOURCES, max_new_tokens=20, speculate=5, **options)
        assert [o.text for o in spec] == [o.text for o in plain]
        passes[tuple(options)] = sum(o.stats["forward_passes"][drafter] for o in spec)
        if options.get("draft_confidence"):
            assert all(s["drafted_text"] in one_token for o in spec for s in o.trace if "drafted_text" in s)
    assert passes[("draft_confidence",)] < passes[("draft_schedule",)] < passes[()]


def test_sampling_keeps_the_fused_distribution():
    """chi-square homogeneity: the first three characters sampled with and without speculation
    (disjoint seeds) come from one distribution; and with one seed the samples are identical."""
    sp, bpe = toy_model("sp", sharpness=1.0), toy_model("bpe", seed=1, sharpness=1.0)
    options = {"temperature": 1.0, "max_new_tokens": 3, "max_repeats": 0, "top_k": 4}

    def sample(seed, **extra):
        (out,) = run("tokenwise", [sp, bpe], ["a"], TOY_PROMPT, seed=seed, **options, **extra)
        return out.text

    assert [sample(s) for s in range(20)] == [sample(s, speculate=3) for s in range(20)]
    draws = 600
    plain = Counter(sample(s) for s in range(draws))
    spec = Counter(sample(draws + s, speculate=3) for s in range(draws))
    keys = [k for k in plain | spec if plain[k] + spec[k] >= 10]  # pool rare outcomes
    rare = lambda c: sum(v for k, v in c.items() if k not in keys)  # noqa: E731
    table = [[plain[k] for k in keys] + [rare(plain)], [spec[k] for k in keys] + [rare(spec)]]
    cols = [c for c in zip(*table) if sum(c) > 0]
    total = 2 * draws
    chi2 = sum((obs - sum(col) / 2) ** 2 / (sum(col) / 2) for col in cols for obs in col)
    dof = len(cols) - 1
    assert dof >= 3
    # chi-square critical value at p = 0.001 (Wilson-Hilferty approximation)
    z = 3.09
    critical = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < critical, (table, chi2, critical, total)


def test_bad_speculation_options_are_user_errors(tiny_pair):
    for options, needle in (({"num_draft_tokens": -1}, "decoding.num_draft_tokens=-1"),
                            ({"num_draft_tokens": 2, "drafter": 2}, "decoding.drafter=2"),
                            ({"num_draft_tokens": 2, "draft_schedule": "fast"}, "decoding.draft_schedule=fast"),
                            ({"num_draft_tokens": 2, "draft_confidence": 1.0}, "decoding.draft_confidence=1.0")):
        with pytest.raises(FusemtError, match=needle):
            run("unite", tiny_pair, TINY_SOURCES, **options)


# --- embedded pair (slow) --------------------------------------------------------------------------------

SOURCES = ["The weather is nice today.", "Please restart your computer."]


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("unite", []), ("tokenwise", []), ("charwise", ["decoding.rule=mixture"])])
def test_embedded_pair_speculation_equals_the_plain_ensemble(method, extra):
    outs = {}
    for k in (0, 4):
        cfg = compose_run("models=gemma3_smollm2", f"decoding={method}", "decoding.max_new_tokens=24",
                          f"decoding.speculate={k}", *extra)
        models = [load_model(spec) for spec in cfg.models]
        outs[k] = decoder_class(cfg.decoding_name)(cfg.decoding, models, cfg.prompt).decode(SOURCES)
    assert [o.text for o in outs[4]] == [o.text for o in outs[0]]
    assert all(o.stats["speculation"]["rounds"] >= 1 for o in outs[4])
