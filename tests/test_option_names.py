"""One speculation vocabulary: ``num_draft_tokens``, ``draft_schedule``, ``draft_confidence`` for the
``speculative`` method and the speculative ensembles alike; the old names (``speculate``, ``adaptive``,
``confidence_threshold``) still work, and no run's fingerprint (its results file) changes."""

import sys
from pathlib import Path

import pytest
from conftest import build_decoder, compose_run, trace_pieces

import runners.config
from decoding.base import current_options
from decoding.errors import FusemtError
from decoding.methods import decoder_class

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

# Fingerprints computed before the options were renamed (old spellings), which must not change.
KNOWN = [
    (("decoding=speculative", "models=gemma3_smollm2"), "9603cf867214"),
    (("decoding=speculative", "models=gemma3_selfdraft", "decoding.num_draft_tokens=4", "decoding.adaptive=true"),
     "39fada99c6f0"),
    (("decoding=speculative", "models=gemma3_smollm2", "decoding.confidence_threshold=0.2",
      "decoding.max_draft_tokens=8"), "92fc50c79109"),
    (("decoding=unite", "models=gemma3_smollm2"), "b7c48cae5aa3"),
    (("decoding=unite", "models=gemma3_smollm2", "decoding.speculate=4"), "43b60eadab75"),
    (("decoding=tokenwise", "models=gemma3_smollm2", "decoding.speculate=3", "decoding.draft_schedule=heuristic",
      "decoding.draft_confidence=0.1"), "b5248a432bc0"),
    (("decoding=charwise", "models=gemma3_smollm2", "decoding.speculate=2", "decoding.drafter=1",
      "decoding.alternate=true"), "e64246311a6f"),
    (("decoding=unite", "models=gemma3_smollm2", "decoding.num_beams=3"), "c4b2b3f80480"),
]
# The same runs spelled with the current names.
RESPELLED = {
    1: ("decoding=speculative", "models=gemma3_selfdraft", "decoding.num_draft_tokens=4",
        "decoding.draft_schedule=heuristic"),
    2: ("decoding=speculative", "models=gemma3_smollm2", "decoding.draft_confidence=0.2",
        "decoding.max_draft_tokens=8"),
    4: ("decoding=unite", "models=gemma3_smollm2", "decoding.num_draft_tokens=4"),
    5: ("decoding=tokenwise", "models=gemma3_smollm2", "decoding.num_draft_tokens=3",
        "decoding.draft_schedule=heuristic", "decoding.draft_confidence=0.1"),
    6: ("decoding=charwise", "models=gemma3_smollm2", "decoding.num_draft_tokens=2", "decoding.drafter=1",
        "decoding.alternate=true"),
}


@pytest.mark.parametrize("overrides,fingerprint", KNOWN, ids=[" ".join(o) for o, _ in KNOWN])
def test_known_fingerprints_do_not_change(overrides, fingerprint):
    assert compose_run(*overrides).fingerprint == fingerprint


@pytest.mark.parametrize("index", sorted(RESPELLED))
def test_the_current_names_give_the_same_run(index):
    old, fingerprint = KNOWN[index]
    new = compose_run(*RESPELLED[index])
    assert new.fingerprint == fingerprint and new.decoding == compose_run(*old).decoding


def test_the_committed_sample_runs_keep_their_names(monkeypatch):
    """Every job of the quality experiment on the bundled sample composes to its committed run's name
    (the fingerprint is in the name): the committed results stay the results of those commands."""
    from quality_experiment import DATASETS, jobs

    monkeypatch.setattr(runners.config, "check_available", lambda *args: None)  # Qwen packages need not be installed
    committed = {p.name.removesuffix(".metrics.json")
                 for p in (ROOT / "experiments/wmt24pp_en_ja/runs/sample").glob("*.metrics.json")}
    pair = "gemma3_qwen05"  # the weights pair fusemt-compat chose (experiments/wmt24pp_en_ja/compat)
    names = {compose_run(*overrides, f"dataset={DATASETS['sample']}", "prompt=wmt_en_ja").run_name
             for _, overrides in jobs(pair)}
    assert names == committed


def test_old_names_are_aliases_in_the_typed_config():
    spec = decoder_class("speculative").Config(adaptive=True, confidence_threshold=0.1)
    assert (spec.draft_schedule, spec.draft_confidence, spec.adaptive, spec.confidence_threshold) == (
        "heuristic", 0.1, None, None)
    unite = decoder_class("unite").Config(speculate=3)
    assert unite.num_draft_tokens == 3 and unite.speculate is None
    assert "speculate" not in current_options(unite) and "adaptive" not in current_options(spec)


def test_an_option_given_under_both_names_with_different_values_is_refused():
    with pytest.raises(FusemtError, match="set one option twice"):
        compose_run("decoding=unite", "models=gemma3_smollm2", "decoding.speculate=3", "decoding.num_draft_tokens=4")
    with pytest.raises(FusemtError, match="adaptive"):
        compose_run("decoding=speculative", "models=gemma3_smollm2", "decoding.adaptive=false",
                    "decoding.draft_schedule=heuristic")
    same = compose_run("decoding=unite", "models=gemma3_smollm2", "decoding.speculate=3", "decoding.num_draft_tokens=3")
    assert same.decoding.num_draft_tokens == 3


def test_both_spellings_decode_the_same(tiny_pair):
    old = build_decoder("unite", tiny_pair, max_new_tokens=12, speculate=3).decode(["Good morning."])
    new = build_decoder("unite", tiny_pair, max_new_tokens=12, num_draft_tokens=3).decode(["Good morning."])
    assert trace_pieces(old) == trace_pieces(new) and old[0].stats == new[0].stats
    assert 0 <= new[0].stats["speculation"]["acceptance_rate"] <= 1  # the one stat name of speculation
