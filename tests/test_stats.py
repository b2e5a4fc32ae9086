"""Run-level statistics: every method's per-segment stats record, combined over a two-segment run as
its fields declare (decoding/stats.py), and the committed experiment metrics agree with their rows."""

import json
from pathlib import Path

import pytest
from conftest import build_decoder
from toy_lm import TOY_PROMPT, toy_model

from decoding.methods import DECODERS, decoder_class
from decoding.stats import CONSTANT, MEAN, PART, PER_MODEL_SUM, SUM, BeamStats, SegmentStats
from runners.translate import summarize_stats

ROOT = Path(__file__).resolve().parent.parent
TWO_SOURCES = ["ab", "aい"]
TINY_TWO = ["The weather is nice today.", "Good morning."]

# (method, options): every method, and the optional parts of the records (speculation, beam search).
RUNS = [("greedy", {}), ("beam", {"num_beams": 3}), ("tokenwise", {}), ("unite", {}), ("charwise", {}),
        ("speculative", {"num_draft_tokens": 3}), ("unite", {"speculate": 3}), ("charwise", {"speculate": 2}),
        ("tokenwise", {"num_beams": 3}), ("unite", {"num_beams": 2}), ("pool", {"generate": ["greedy", "beam:2"]})]


@pytest.fixture(scope="module")
def toy_pair():
    return [toy_model("sp", sharpness=3.0), toy_model("bpe", seed=1, sharpness=3.0)]


def two_segment_stats(method, options, toy_pair, tiny_pair) -> list[dict]:
    if method in ("greedy", "beam"):  # Hugging Face generate: a tiny transformer, not the scripted LM
        outs = build_decoder(method, tiny_pair[:1], max_new_tokens=8, **options).decode(TINY_TWO)
    elif method == "pool":  # the members generate with Hugging Face generate and score every candidate
        outs = build_decoder(method, tiny_pair, max_new_tokens=8, **options).decode(TINY_TWO)
    else:
        outs = build_decoder(method, toy_pair, TOY_PROMPT, max_new_tokens=8, **options).decode(TWO_SOURCES)
    return [out.stats for out in outs]


def expected(record: type[SegmentStats], segments: list[dict]) -> dict:
    """What the run-level figures must be, computed here field by field from the declared kinds."""
    out = {}
    for name, kind in record.combine_kinds().items():
        values = [s[name] for s in segments if name in s]
        if not values:
            continue
        if kind == MEAN:
            out[name] = pytest.approx(sum(values) / len(values), abs=1e-4)
        elif kind == SUM:
            out[name] = sum(values)
        elif kind == CONSTANT:
            assert len(set(values)) == 1, (name, values)
            out[name] = values[0]
        elif kind == PER_MODEL_SUM:
            out[name] = {m: sum(v[m] for v in values) for m in values[0]}
        else:
            assert kind == PART
            out[name] = expected(getattr(record, "__dataclass_fields__")[name].metadata["record"], values)
    return out


@pytest.mark.parametrize("method,options", RUNS,
                         ids=[f"{m}-{'-'.join(map(str, o.values())) or 'plain'}" for m, o in RUNS])
def test_run_level_stats_of_a_two_segment_run(method, options, toy_pair, tiny_pair):
    segments = two_segment_stats(method, options, toy_pair, tiny_pair)
    record = decoder_class(method).Stats
    fields = record.combine_kinds()
    assert all(set(s) <= set(fields) for s in segments), "a method records only the fields its record declares"
    rows = [{"stats": s} for s in segments] + [{"stats": {}}]  # an empty source's row has no stats
    summary = summarize_stats(method, rows)
    assert summary == expected(record, segments)
    assert set(summary) == set().union(*segments)
    if options.get("num_beams", 1) > 1 and method != "beam":
        assert summary["beam"]["num_beams"] == options["num_beams"]  # a setting, not summed over the segments
    for rate in ("agreement_rate", "acceptance_rate", "fastpath_share", "resolved_share"):
        if rate in summary:
            assert 0 <= summary[rate] <= 1
    if "speculation" in summary:
        spec = summary["speculation"]
        assert 0 <= spec["acceptance_rate"] <= 1
        assert spec["rounds"] == sum(s["speculation"]["rounds"] for s in segments) >= 2
    names = {name for s in segments for name in s.get("forward_passes", {})}
    assert names and all(summary["forward_passes"][n] == sum(s["forward_passes"][n] for s in segments) for n in names)


def test_every_registered_method_is_covered_and_declares_a_record():
    assert {method for method, _ in RUNS} == set(DECODERS)
    for cls in DECODERS.values():
        assert issubclass(cls.Stats, SegmentStats) and cls.Stats.combine_kinds()


def test_a_constant_that_differs_between_rows_is_listed_never_summed():
    rows = [BeamStats(num_beams=4, score=-1.0).to_json(), BeamStats(num_beams=8, score=-3.0).to_json()]
    assert BeamStats.summarize(rows) == {"num_beams": [4, 8], "score": -2.0}


def test_committed_experiment_metrics_agree_with_their_rows():
    """The committed metrics files' stats are what summarize_stats gives over their JSONL (no decoding)."""
    metrics_files = sorted((ROOT / "experiments").glob("**/runs/**/*.metrics.json"))
    assert metrics_files
    for path in metrics_files:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        rows = [json.loads(line) for line in path.with_name(path.name.replace(".metrics.json", ".jsonl"))
                .read_text(encoding="utf-8").splitlines() if line.strip()]
        fields = decoder_class(metrics["method"]).Stats.combine_kinds()
        assert {k: v for k, v in metrics.items() if k in fields} == summarize_stats(metrics["method"], rows), path.name
