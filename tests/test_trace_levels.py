"""The run's ``trace`` option (full | top | off) changes what each output records, never the output:
same texts, token counts and stats for every method; ``top`` keeps each step's chosen piece, ids,
log-probabilities and origin exactly as ``full`` records them, without the method's extras; ``off``
keeps no steps. Fast, on the tiny random models."""

import pytest
from conftest import build_decoder, compose_run
from tiny_models import tiny_gemma3, tiny_llama

from decoding.base import TRACE_LEVELS
from decoding.errors import FusemtError
from eval.trace import render_html

SOURCES = ["Good morning.", "The weather is nice today.", "ルール"]
STEP_KEYS = {"piece", "piece_bytes", "ids", "logprob", "origin", "end", "stop"}  # "stop": where a stop string cut


@pytest.fixture(scope="module")
def pair():
    return [tiny_gemma3(), tiny_llama()]


def decode_levels(method: str, models, **options) -> dict:
    outputs = {}
    for level in TRACE_LEVELS:
        decoder = build_decoder(method, models, max_new_tokens=12, **options)
        decoder.trace = level
        outputs[level] = decoder.decode(SOURCES)
    return outputs


@pytest.mark.parametrize("method,members,options", [
    ("greedy", 1, {}), ("beam", 1, {"num_beams": 3}),
    ("unite", 2, {}), ("unite", 2, {"num_beams": 2}), ("unite", 2, {"num_draft_tokens": 3}),
    ("unite", 2, {"temperature": 0.8}), ("tokenwise", 2, {}),
    ("speculative", 2, {}), ("charwise", 2, {}), ("charwise", 2, {"num_draft_tokens": 2}),
    ("pool", 2, {"generate": ["greedy", "samples:2"], "select": "model_mbr"}),
])
def test_trace_levels_keep_outputs_and_drop_only_the_record(pair, method, members, options):
    out = decode_levels(method, pair[:members], **options)
    full, top, off = out["full"], out["top"], out["off"]
    for level in (top, off):
        assert [(o.text, o.n_new_tokens, o.stats, o.warnings, o.pool) for o in level] == \
               [(o.text, o.n_new_tokens, o.stats, o.warnings, o.pool) for o in full]
    assert all(o.trace == [] for o in off)
    for f, t in zip(full, top):
        assert [{k: v for k, v in step.items() if k in STEP_KEYS} for step in f.trace] == t.trace
    if method not in ("greedy", "beam"):  # the single-model HF paths have no extras to drop
        assert any(set(step) - STEP_KEYS for o in full for step in o.trace)


def test_trace_option_is_typed_and_outside_the_fingerprint():
    runs = [compose_run(f"trace={level}") for level in TRACE_LEVELS]
    assert [r.trace for r in runs] == list(TRACE_LEVELS)
    assert len({r.fingerprint for r in runs}) == 1 and len({r.run_name for r in runs}) == 1
    with pytest.raises(FusemtError, match="trace=some: must be one of full, top, off"):
        compose_run("trace=some")


def test_trace_page_renders_rows_without_steps():
    row = {"id": "0", "source": "Good morning.", "reference": "おはよう。", "hypothesis": "おはよう。",
           "models": ["a", "b"], "n_new_tokens": 3, "time_s": 0.1, "warnings": [], "stats": {}, "trace": []}
    page = render_html([row], {"bleu": 100.0, "chrf": 100.0}, "run")
    assert "no trace" in page and "おはよう。" in page
