"""The determine-then-ensemble check: rules and measures (``eval/compat.py``, fast) and
``fusemt-compat`` end to end on the embedded pair (slow)."""

import json
import subprocess
import sys

import pytest

from eval.compat import CompatRules, ModelProfile, agreement_rate, fertility, judge, length_ratio, write_report

FERT = {"en_chars_per_token": 4.0, "en_words_per_token": 0.8, "ja_chars_per_token": 1.2, "ja_words_per_token": 0.7}


def profile(name, chrf, ratio=1.0, latin=0.0):
    return ModelProfile(name=name, scores={"bleu": chrf / 2, "chrf": chrf}, length_ratio=ratio, fertility=FERT,
                        latin_share=latin, non_japanese_share=0.0)


def test_scores_within_ten_percent_and_similar_lengths_may_be_ensembled():
    verdict = judge(profile("a", 30.0), profile("b", 28.0, ratio=1.2), 0.6, CompatRules(), 25)
    assert verdict.compatible and verdict.score_gap == pytest.approx(2 / 30, abs=1e-4)
    assert ("gap 7% of the better (a) <= 10%" in verdict.reasons[0]
            and "agreement on reference prefixes 60%" in verdict.reasons[-1])


def test_a_large_gap_or_a_different_style_is_refused_with_reasons():
    gap = judge(profile("gemma", 29.6), profile("smollm2", 2.0, latin=0.9), None, CompatRules(), 25)
    assert not gap.compatible and "> 10%" in gap.reasons[0] and any("smollm2 leaves 90%" in r for r in gap.reasons)
    style = judge(profile("a", 30.0, ratio=0.6), profile("b", 30.0, ratio=1.0), None, CompatRules(), 25)
    assert not style.compatible and "factor 1.67 > 1.3" in style.reasons[1]
    assert judge(profile("a", 30.0), profile("b", 25.0), None, CompatRules(max_score_gap=0.2), 25).compatible


def test_too_few_segments_give_no_verdict_and_say_so(tmp_path):
    """On 2 segments a pair the 25-segment check refuses looked compatible: below min_segments, no verdict."""
    few = judge(profile("a", 30.0), profile("b", 29.0), None, CompatRules(), 2)
    assert few.compatible is None
    assert few.reasons[0] == ("only 2 segments: a verdict needs at least 20 (compat.rules.min_segments); "
                              "use a larger slice")
    assert judge(profile("a", 30.0), profile("b", 29.0), None, CompatRules(), 20).compatible is True
    json_path, md_path = write_report(tmp_path, [profile("a", 30.0), profile("b", 29.0)], [few], CompatRules(), "x")
    assert json.loads(json_path.read_text())["pairs"][0]["compatible"] is None
    assert "| a + b | no verdict | only 2 segments" in md_path.read_text()
    assert "a verdict needs at least 20 segments" in md_path.read_text()


def test_measures():
    assert length_ratio(["ab", "c"], ["abcd", "ef"]) == 0.5
    assert agreement_rate([[b"a", b"b", None]], [[b"a", b"c", None]]) == pytest.approx(0.6667, abs=1e-4)
    assert fertility(lambda t: list(t.replace(" ", "")), ["ab cd"], str.split) == {"chars_per_token": 1.25,
                                                                                   "words_per_token": 0.5}


def test_report_files(tmp_path):
    verdicts = [judge(profile("a", 30.0), profile("b", 10.0), 0.5, CompatRules(), 25)]
    json_path, md_path = write_report(tmp_path, [profile("a", 30.0), profile("b", 10.0)], verdicts, CompatRules(), "x")
    assert json.loads(json_path.read_text())["pairs"][0]["compatible"] is False
    assert "| a + b | do not ensemble |" in md_path.read_text()


@pytest.mark.slow
def test_fusemt_compat_refuses_gemma3_smollm2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runners.compat", "models=gemma3_smollm2", "dataset=sample_en_ja",
                           "dataset.limit=6", "compat.rules.min_segments=6", "compat.agreement_segments=2",
                           "compat.max_new_tokens=32", "logger=none",
                           f"paths.results_dir={tmp_path}", f"paths.output_dir={tmp_path}/out"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gemma3_270m + smollm2_135m: do not ensemble (on 6 segments)" in proc.stdout
    report = json.loads((tmp_path / "compat" / "sample_en_ja" / "compat.json").read_text())
    (pair,) = report["pairs"]
    assert pair["compatible"] is False and 0.0 <= pair["next_char_agreement"] <= 1.0
    assert {m["name"] for m in report["models"]} == {"gemma3_270m", "smollm2_135m"}
