"""The compare page: runs side by side per segment, scores, highlighting, sorting by a score
difference, the header table of corpus scores and options; its errors and its W&B run."""

import json
import os
import re
import subprocess
import sys

import pytest

from eval.compare import Comparison, diff_marks, load_runs
from eval.metrics import corpus_scores, segment_scores
from eval.plots import chromium, screenshot

SEGMENTS = [("sample-000", "The weather is nice today.", "今日は天気がいいです。"),
            ("sample-001", "I would like a cup of coffee, please.", "コーヒーを一杯お願いします。"),
            ("sample-002", "Where is the <b>train</b> station?", "駅はどこですか？"),
            ("sample-003", "This book is very interesting.", "この本はとても面白いです。")]
HYPOTHESES = {
    "greedy": ["今日は天気がいいです。", "コーヒーをお願いします。", "駅はどこ？", "この本はとても面白い。"],
    "beam": ["今日は天気がいいです。", "コーヒーを一杯ください。", "<script>x</script>", "この本は面白いです。"],
    "charwise": ["今朝の天気は良いです。", "コーヒーを一杯お願いします。", "駅" + "メ" * 10,
                 "この本はとても面白いです。"],
}
DECODING = {"greedy": {"name": "greedy", "max_new_tokens": 96},
            "beam": {"name": "beam", "max_new_tokens": 96, "num_beams": 4},
            "charwise": {"name": "charwise", "max_new_tokens": 96, "rule": "mixture", "top_k": 10, "weights": None}}


def char_trace(text: str) -> list[dict]:
    return [{"piece": ch, "piece_bytes": ch.encode().hex(), "ids": {"gemma3_270m": [1]},
             "logprob": {"gemma3_270m": -0.1}, "origin": "both"} for ch in text]


def write_run(folder, method, hypotheses=None, dataset="sample_en_ja", segments=SEGMENTS, comet=None):
    name = f"{method}__gemma3_270m__{dataset}__0000"
    hypotheses = hypotheses or HYPOTHESES[method]
    rows = [{"id": sid, "source": src, "reference": ref, "hypothesis": hyp, "method": method, "models": ["gemma3_270m"],
             "n_new_tokens": len(hyp), "time_s": 0.1, "warnings": [], "stats": {}, "trace": char_trace(hyp)}
            for (sid, src, ref), hyp in zip(segments, hypotheses)]
    jsonl = folder / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    metrics = {"run_name": name, "method": method, "models": ["gemma3_270m"], "dataset": dataset, "bleu": 10.0,
               "chrf": 30.0, "comet": None, "tokens_per_s": 5.0, "complete": True, "sweep": "multirun/x",
               "config": {"decoding": DECODING[method], "prompt": {}, "seed": 0}}
    jsonl.with_suffix(".metrics.json").write_text(json.dumps(metrics, ensure_ascii=False), encoding="utf-8")
    if comet:
        jsonl.with_suffix(".comet.jsonl").write_text("".join(json.dumps({"id": sid, "comet": c}) + "\n"
                                                             for sid, c in comet.items()))
    return jsonl


@pytest.fixture
def sweep(tmp_path):
    paths = [write_run(tmp_path, "greedy"), write_run(tmp_path, "beam"),
             write_run(tmp_path, "charwise", comet={"sample-000": 0.7, "sample-001": 0.9, "sample-002": 0.2,
                                                    "sample-003": 0.95})]
    return tmp_path, paths


def test_page_shows_every_run_side_by_side_with_scores_and_highlights(sweep):
    folder, paths = sweep
    comparison = Comparison.build(load_runs(paths))
    page = comparison.render("compare")
    assert comparison.labels == ["greedy", "beam num_beams=4",
                                 "charwise weights=null top_k=10"]
    assert comparison.option_keys == ["weights", "top_k", "num_beams"]
    for method, hyps in HYPOTHESES.items():
        scores = segment_scores(hyps, [ref for _, _, ref in SEGMENTS])
        n = list(HYPOTHESES).index(method) + 1
        attrs = re.findall(rf'data-chrf{n}="([^"]*)"', page)
        assert [float(a) for a in attrs] == scores.chrf  # the sort data is each run's sentence chrF
        assert [float(a) for a in re.findall(rf'data-bleu{n}="([^"]*)"', page)] == scores.bleu
    assert re.findall(r'data-comet3="([^"]*)"', page) == ["0.7", "0.9", "0.2", "0.95"]
    assert set(re.findall(r'data-comet1="([^"]*)"', page)) == {""}
    # characters that differ from run 1 are marked; an identical hypothesis says so
    assert diff_marks("コーヒーを一杯ください。", "コーヒーをお願いします。") == "コーヒーを<mark>一杯くださ</mark>い。"
    assert "今日は天気がいいです。 <span class=\"same\">= run 1</span>" in page
    assert "⚠ runaway repetition: &#x27;メ&#x27; ×10" in page
    # escaping of source and model text
    assert "<b>train</b>" not in page and "&lt;b&gt;train&lt;/b&gt;" in page and "<script>x" not in page
    assert page.count("<script>") == 1


def test_header_table_has_corpus_scores_on_common_segments_and_options(tmp_path):
    paths = [write_run(tmp_path, "greedy"), write_run(tmp_path, "beam", segments=SEGMENTS[:3],
                                                      hypotheses=HYPOTHESES["beam"][:3])]
    comparison = Comparison.build(load_runs(paths))
    assert comparison.common == ["sample-000", "sample-001", "sample-002"]
    header = comparison.header_rows()
    expected = corpus_scores(HYPOTHESES["greedy"][:3], [ref for _, _, ref in SEGMENTS[:3]])
    assert header[0]["bleu"] == expected["bleu"] and header[0]["chrf"] == expected["chrf"]
    assert header[1]["num_beams"] == "4" and header[0]["num_beams"] == "—" and header[1]["segments"] == 3
    page = comparison.render("c")
    assert "BLEU (3 common)" in page and "— not in this run" in page
    columns, data = comparison.segment_rows()
    assert columns[:5] == ["id", "source", "reference", "run1_hypothesis", "run1_chrf"] and len(data) == 4
    assert data[3][columns.index("run2_hypothesis")] is None


def test_baseline_choice_moves_the_highlighting(sweep):
    _, paths = sweep
    comparison = Comparison.build(load_runs(paths), baseline="charwise")
    assert comparison.baseline == 2
    page = comparison.render("c")
    assert "characters differ from run 3's hypothesis" in page
    assert "const DEFAULT_A = 3, DEFAULT_B = 1;" in page


def test_a_folder_of_runs(sweep):
    folder, _ = sweep
    (folder / "failures.jsonl").write_text('{"job": 1}\n')  # a sweep's failure list is not a run
    runs = load_runs([folder])
    assert sorted(run.method for run in runs) == ["beam", "charwise", "greedy"]


def _cli(*args, cwd):
    from conftest import ROOT

    return subprocess.run([sys.executable, "-m", "eval.compare", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}, timeout=180)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("fusemt: error: ")
    return line


def test_errors_are_one_line(tmp_path):
    greedy = write_run(tmp_path, "greedy")
    assert "a comparison needs two or more" in _one_error_line(_cli(greedy, cwd=tmp_path))
    other = write_run(tmp_path, "beam", dataset="wmt24_en_ja")
    assert "the runs translate different datasets (sample_en_ja, wmt24_en_ja)" in _one_error_line(
        _cli(greedy, other, cwd=tmp_path))
    other.write_bytes(b'{"id": "x", "source": "s", "hypothesis": "h"}\n{"id": \n')
    line = _one_error_line(_cli(greedy, other, cwd=tmp_path))
    assert f"{other}:2 is not valid JSON" in line and "fix or delete that line" in line
    other.unlink()
    line = _one_error_line(_cli(tmp_path, cwd=tmp_path))
    assert f"{other} is missing (its metrics file is there)" in line
    assert "--baseline zzz matches no run" in _one_error_line(
        _cli(greedy, write_run(tmp_path, "charwise"), "--baseline", "zzz", cwd=tmp_path))


def test_compare_command_writes_the_page_and_logs_it_to_wandb(sweep):
    folder, _ = sweep
    proc = _cli(folder, "--wandb", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = folder / "compare.html"
    assert proc.stdout.strip() == f"wrote {page}" and "コーヒーを一杯お願いします。" in page.read_text(encoding="utf-8")
    (html_file,) = folder.glob("wandb/offline-run-*/files/media/html/compare_*.html")
    assert "data-chrf3" in html_file.read_text(encoding="utf-8")
    (runs_table,) = folder.glob("wandb/offline-run-*/files/media/table/compare_runs_*.table.json")
    table = json.loads(runs_table.read_text(encoding="utf-8"))
    assert {"label", "run_name", "num_beams", "bleu", "chrf"} <= set(table["columns"]) and len(table["data"]) == 3
    assert list(folder.glob("wandb/offline-run-*/files/media/table/compare_segments_*.table.json"))


@pytest.mark.skipif(chromium() is None,
                    reason="Chromium is not installed (Debian: apt-get install chromium; make fonts)")
def test_compare_page_sorts_by_score_difference_in_headless_chromium(sweep, tmp_path):
    _, paths = sweep
    page = tmp_path / "compare.html"
    page.write_text(Comparison.build(load_runs(paths)).render("compare"), encoding="utf-8")
    refs = [ref for _, _, ref in SEGMENTS]
    greedy, charwise = (segment_scores(HYPOTHESES[m], refs).chrf for m in ("greedy", "charwise"))
    deltas = [c - g for g, c in zip(greedy, charwise)]
    expected = sorted(range(4), key=lambda i: (-round(deltas[i], 2), i))
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--dump-dom",
                           page.as_uri() + "?sort=chrf&a=1&b=3&order=desc"],
                          capture_output=True, text=True, timeout=120)
    rows = re.findall(r'<tr data-order="(\d)".*?<td class="num delta">([^<]*)</td>', proc.stdout, re.S)
    assert [int(order) for order, _ in rows] == expected
    assert [float(delta) for _, delta in rows] == [round(deltas[i], 2) for i in expected]
    shot = screenshot(page, tmp_path / "compare.png", 1400, 1000)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000


def test_cells_link_to_the_trace_page_at_that_segment(tmp_path):
    from eval.trace import render_html

    paths = [write_run(tmp_path, "greedy"), write_run(tmp_path, "beam", segments=list(reversed(SEGMENTS)),
                                                       hypotheses=list(reversed(HYPOTHESES["beam"])))]
    beam_rows = [json.loads(line) for line in paths[1].read_text(encoding="utf-8").splitlines()]
    paths[1].with_suffix(".trace.html").write_text(render_html(beam_rows, {}, "beam"), encoding="utf-8")
    comparison = Comparison.build(load_runs(paths))
    out = tmp_path / "pages"
    out.mkdir()
    page = comparison.render("compare", out)
    links = re.findall(r'<a class="trace" href="([^"]+)">', page)
    # only the run with a trace page links; sample-000 is that run's last row, its section seg3
    assert len(links) == 4 and links[0] == f"../{paths[1].stem}.trace.html#seg3"
    trace_page = paths[1].with_suffix(".trace.html").read_text(encoding="utf-8")
    section = re.search(r'<section id="seg3".*?</section>', trace_page, re.S).group(0)
    assert "sample-000" in section
    assert comparison.render("compare").count('class="trace"') == 0  # no page folder: no links


def test_header_has_corpus_significance_against_the_baseline_holm_corrected(tmp_path):
    from eval.report import holm

    segments = [(f"s{i}", f"source {i}", f"今日は天気がいいので、{i}番目の駅まで歩いて行きます。") for i in range(30)]
    refs = [ref for _, _, ref in segments]
    paths = [write_run(tmp_path, "greedy", [r[:6] + "電車" for r in refs], segments=segments),
             write_run(tmp_path, "beam", refs, segments=segments),
             write_run(tmp_path, "charwise", [r[:6] + "電車" for r in refs], segments=segments)]
    comparison = Comparison.build(load_runs(paths))
    rows = comparison.header_rows()
    assert rows[0]["bleu_delta"] is None  # the baseline itself
    boot = comparison.bootstraps[1]
    raw = [boot.bleu_p, boot.chrf_p, comparison.bootstraps[2].bleu_p, comparison.bootstraps[2].chrf_p]
    assert rows[1]["chrf_p_adj"] == round(holm(raw)[1], 4) and rows[1]["chrf_delta"] > 0
    page = comparison.render("compare")
    assert "ΔchrF vs run 1 (p)" in page and "Holm–Bonferroni-adjusted over the 4 tests" in page
    assert re.search(r'<td class="num sig">\+[\d.]+ \(p=0\.\d+\) ▲</td>', page)
    assert "table.runs td:nth-child(2), table.compare th { overflow-wrap: anywhere; white-space: normal; }" in page
