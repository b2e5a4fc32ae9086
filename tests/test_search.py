"""Beam search over fused hypotheses (``decoding.num_beams`` on unite/tokenwise, ``decoding/search.py``):
beam 1 through the search is the greedy fusion, one member is Hugging Face's beam search, and
batched sources search independently."""

import json

import pytest
from conftest import build_decoder, compose_run, trace_pieces

from decoding.errors import FusemtError
from decoding.methods import decoder_class
from decoding.model import load_model
from decoding.search import BeamSearch

TINY_SOURCES = ["The weather is nice today.", "Good morning.", "Send the mail."]


@pytest.mark.parametrize("method", ["unite", "tokenwise"])
def test_beam_1_through_the_search_is_the_greedy_fusion(tiny_pair, method):
    greedy = build_decoder(method, tiny_pair, max_new_tokens=30)
    searched = build_decoder(method, tiny_pair, max_new_tokens=30)
    state = searched.prepare(TINY_SOURCES)
    state.search = BeamSearch(len(TINY_SOURCES), num_beams=1, length_penalty=1.0, early_stopping=True)
    while searched.step(state):
        pass
    assert trace_pieces(searched.finish(state)) == trace_pieces(greedy.decode(TINY_SOURCES))


@pytest.mark.parametrize("method", ["unite", "tokenwise"])
def test_batched_sources_search_independently(tiny_pair, method):
    batched = build_decoder(method, tiny_pair, num_beams=3, max_new_tokens=20).decode(TINY_SOURCES)
    single = [build_decoder(method, tiny_pair, num_beams=3, max_new_tokens=20).decode([s])[0] for s in TINY_SOURCES]
    assert trace_pieces(batched) == trace_pieces(single)
    assert all(o.stats["beam"]["num_beams"] == 3 for o in batched)


def test_wider_beams_find_texts_the_fusion_scores_at_least_as_high(tiny_pair):
    """With no length penalty and no early stop, each output is the best-scoring finished hypothesis
    the search saw, and the greedy path is among those beam 1 sees: beam 4 scores at least as high."""
    scores = {}
    for beams in (1, 4):
        decoder = build_decoder("tokenwise", tiny_pair, max_new_tokens=16, length_penalty=0.0, early_stopping=False)
        state = decoder.prepare(TINY_SOURCES)
        state.search = BeamSearch(len(TINY_SOURCES), beams, 0.0, False)
        while decoder.step(state):
            pass
        scores[beams] = [o.stats["beam"]["score"] for o in decoder.finish(state)]
    assert all(b >= g - 1e-9 for b, g in zip(scores[4], scores[1]))


def test_bad_beam_options_are_user_errors(tiny_pair):
    cases = [("unite", {"num_beams": 0}, "decoding.num_beams=0"),
             ("tokenwise", {"num_beams": 2, "temperature": 0.7}, "deterministically"),
             ("unite", {"num_beams": 2, "speculate": 3}, "deterministically"),
             ("charwise", {"num_beams": 2}, "decoding=charwise searches greedily")]
    for method, options, needle in cases:
        with pytest.raises(FusemtError, match=needle):
            build_decoder(method, tiny_pair, **options)


# --- embedded models (slow) --------------------------------------------------------------------------------

SOURCES = ["The weather is nice today.", "Where is the train station?", "Please restart your computer."]


@pytest.mark.slow
def test_one_member_beam_on_gemma_is_hugging_face_beam_search():
    outs = {}
    for method, extra in (("beam", []), ("tokenwise", ["decoding.max_repeats=0"])):
        run = compose_run("models=gemma3_smollm2", "models.members=[gemma3_270m]", f"decoding={method}",
                          "decoding.num_beams=4", "decoding.max_new_tokens=32", *extra)
        models = [load_model(spec) for spec in run.models]
        outs[method] = [o.text for o in
                        decoder_class(run.decoding_name)(run.decoding, models, run.prompt).decode(SOURCES)]
    assert outs["tokenwise"] == outs["beam"]


@pytest.mark.slow
def test_ensemble_beam_search_and_speculation_run_from_the_cli(tmp_path):
    from test_cli import fusemt

    fusemt(tmp_path, "-m", "models=gemma3_smollm2", "decoding=unite", "decoding.max_new_tokens=16", "dataset.limit=2",
           "logger=none", "decoding.num_beams=1,4", "decoding.speculate=0")
    fusemt(tmp_path, "models=gemma3_smollm2", "decoding=tokenwise", "decoding.max_new_tokens=16", "dataset.limit=2",
           "logger=none", "decoding.speculate=4")
    runs = {}
    for path in (tmp_path / "results" / "sample" / "ensemble").glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["id"] for r in rows] == ["sample-000", "sample-001"] and all(r["hypothesis"] for r in rows)
        runs[path.name.split("__")[0]] = runs.get(path.name.split("__")[0], []) + [rows]
    assert sorted(len(v) for v in runs.values()) == [1, 2]
    assert any("beam" in r["stats"] for rows in runs["unite"] for r in rows)
    assert all("speculation" in r["stats"] for r in runs["tokenwise"][0])
