"""Trace page (chips per character, legend, tooltips, per-segment scores, diff, flags, sorting), fonts,
and the sweep report (config columns, per-domain scores, paired bootstrap, plot labels), on results
files built here."""

import csv
import json
import os
import re
import subprocess
import sys
import warnings

import pytest

from decoding.errors import FusemtError
from eval.metrics import corpus_scores, segment_scores
from eval.plots import chromium, screenshot
from eval.report import Report, RunOptions, distinguishing_options, find_runs, holm, read_member_ranking, short_labels
from eval.trace import (
    character_chips,
    chip_tooltip,
    diff_html,
    render_html,
    repetition,
    segment_flags,
    step_tooltip,
    write_trace_report,
)

ROWS = [
    {"id": "s1", "source": "<b>Tom & Jerry</b>", "reference": "トム＆ジェリー",
     "hypothesis": "<script>alert(1)</script>",
     "models": ["gemma3_270m", "smollm2_135m"], "stats": {"agreement_rate": 0.5}, "warnings": [],
     "trace": [
         {"piece": " <script>", "piece_bytes": " <script>".encode().hex(),
          "ids": {"gemma3_270m": [5], "smollm2_135m": [7, 8]},
          "logprob": {"gemma3_270m": -0.1, "smollm2_135m": -2.0}, "origin": "both",
          "top": [[" <script>", 0.6], ["\"", 0.1]],
          "union": 12},
         {"piece": "alert(1)</script>", "piece_bytes": "alert(1)</script>".encode().hex(), "ids": {"gemma3_270m": [9]},
          "logprob": {"gemma3_270m": -0.5, "smollm2_135m": None}, "origin": "lookup", "top": [], "union": 3},
         {"piece": "", "piece_bytes": "", "ids": {"gemma3_270m": [1]}, "logprob": {"gemma3_270m": -0.01},
          "origin": "gemma3_270m", "end": True}]},
    {"id": "s2", "source": "Hi", "reference": "やあ", "hypothesis": "やあ", "models": ["gemma3_270m", "smollm2_135m"],
     "trace": [{"piece": "やあ", "piece_bytes": "やあ".encode().hex(), "ids": {"gemma3_270m": [3]},
                "logprob": {"gemma3_270m": -0.2}, "origin": "target", "round": 1, "proposed": ["や"], "accepted": 0}]},
]


def step(data: bytes, origin: str, **extra) -> dict:
    """A trace step as decoding/base.py writes it (partial UTF-8 shown with backslash escapes)."""
    return {"piece": data.decode("utf-8", "backslashreplace"), "piece_bytes": data.hex(),
            "ids": {"gemma3_270m": [1], "smollm2_135m": [2]}, "logprob": {"gemma3_270m": -0.1, "smollm2_135m": -0.7},
            "origin": origin, **extra}


# " 今日" in one Gemma piece; ル (e3 83 ab) as two SmolLM2 byte pieces; "。"; the end step.
RU = "ル".encode()
UNITE_TRACE = [step(" 今日".encode(), "both", top=[[" 今日", 0.5], [" 今", 0.2]], union=9),
               step(RU[:2], "smollm2_135m", top=[["\\xe3\\x83", 0.4], ["は", 0.3]], union=11),
               step(RU[2:], "lookup", top=[["\\xab", 0.9]], union=4),
               step("。".encode(), "both", top=[["。", 0.8]], union=5),
               step(b"", "both", end=True, top=[["<end>", 0.9]], union=3)]


def charwise_step(char: str, origin: str, p: dict, top: list, fast: bool = False) -> dict:
    data = char.encode()
    return {"piece": char, "piece_bytes": data.hex(), "ids": {"gemma3_270m": [4], "smollm2_135m": []},
            "logprob": {m: -0.2 for m in p}, "origin": origin, "p": p, "score": top[0][1], "top": top,
            "argmax": {m: char for m in p}, "covers": {"gemma3_270m": 2, "smollm2_135m": 5}, "fastpath": fast}


def test_one_chip_per_character_with_a_character_split_across_steps():
    chips = character_chips(UNITE_TRACE)
    assert [c.text for c in chips] == [" ", "今", "日", "ル", "。", ""]
    assert [c.steps for c in chips] == [[0], [0], [0], [1, 2], [3], [4]]
    assert [c.kind for c in chips] == ["char"] * 5 + ["end"]
    tip = chip_tooltip(chips[3], UNITE_TRACE)
    assert tip.startswith("'ル' U+30EB · bytes e3 83 ab") and "assembled from 2 steps: 1, 2" in tip
    assert "step 1 · piece: '\\\\xe3\\\\x83' (2 bytes) · origin: smollm2_135m" in tip and "step 2 · " in tip

    page = render_html([{"id": "a", "source": "x", "reference": "今日ル。", "hypothesis": "今日ル。",
                         "method": "unite", "models": ["gemma3_270m", "smollm2_135m"], "trace": UNITE_TRACE}],
                       None, "t")
    chips_div = re.search(r"<div class=\"chips\">(.*?)</div>", page, re.S).group(1)
    assert len(re.findall(r'<span class="c[ "]', chips_div)) == 6  # one chip per character, plus the end chip
    assert "xe3" not in re.sub(r'title="[^"]*"', "", chips_div)  # no byte chips: the bytes are one character
    # one box per step: the three characters of step 0 share one, ル (steps 1+2) is one dashed box
    assert len(re.findall(r'<span class="g ', chips_div)) == 4 and chips_div.count("multi") == 1


def test_bytes_that_never_complete_a_character_are_one_chip():
    chips = character_chips([step("あ".encode(), "both"), step(RU[:2], "gemma3_270m")])
    assert [(c.text, c.kind) for c in chips] == [("あ", "char"), ("\\xe3\\x83", "incomplete")]


def test_legend_says_what_each_colour_means_for_the_method():
    rows = [{"id": "a", "source": "x", "hypothesis": "今日ル。", "method": "unite",
             "models": ["gemma3_270m", "smollm2_135m"], "trace": UNITE_TRACE}]
    legend = render_html(rows, None, "t").split("<h2>Legend</h2>")[1].split("</table>")[0]
    assert "in every model&#x27;s top-k" in legend and "first token of its spelling" in legend
    assert "proposed by smollm2_135m only" in legend and "gemma3_270m</span>" not in legend  # only origins that occur
    spec = [{"id": "a", "source": "x", "hypothesis": "やあ", "method": "speculative", "models": ["g", "d"],
             "trace": [step("や".encode(), "draft"), step("あ".encode(), "target")]}]
    legend = render_html(spec, None, "t").split("<h2>Legend</h2>")[1]
    assert "proposed by the draft model, accepted by the target" in legend and "correction" in legend
    char = [{"id": "a", "source": "x", "hypothesis": "や", "method": "charwise",
             "models": ["gemma3_270m", "smollm2_135m"],
             "trace": [charwise_step("や", "gemma3_270m", {"gemma3_270m": 0.6, "smollm2_135m": 0.3}, [["や", 0.45]])]}]
    legend = render_html(char, None, "t").split("<h2>Legend</h2>")[1].split("</table>")[0]
    assert "the most likely next character of gemma3_270m only" in legend
    # shapes are explained where they occur: charwise has no multi-character steps, no split characters
    assert "one box of several characters" not in legend and "several steps" not in legend
    unite = render_html(rows, None, "t").split("<h2>Legend</h2>")[1].split("</table>")[0]
    assert "one box of several characters" in unite and "several steps" in unite and "end of sequence; a space" in unite


def test_tooltips_show_member_probabilities_and_decision_scores():
    tip = step_tooltip(ROWS[0]["trace"][0])
    assert "smollm2_135m: p=0.135  ids [7, 8]" in tip and "gemma3_270m: p=0.905" in tip and "union size: 12" in tip
    assert "top by decision score: ▶' <script>' 0.6000 · '\"' 0.1000" in tip
    assert "proposed ['や'], accepted 0" in step_tooltip(ROWS[1]["trace"][0])
    char = charwise_step("ル", "both", {"gemma3_270m": 0.61, "smollm2_135m": 0.55},
                         [["ル", 0.58], ["ロ", 0.2], ["<end>", 0.01]], fast=True)
    tip = step_tooltip(char, 7)
    assert tip.startswith("step 7 · piece: 'ル' (3 bytes) · origin: both")
    assert "gemma3_270m: p=0.819  ids [4]  most likely 'ル'  covers 2" in tip
    assert "fused score: 0.5800  (fast path" in tip and "▶'ル' 0.5800 · 'ロ' 0.2000 · '<end>' 0.0100" in tip
    # a candidate ranked above the chosen one is visible: the marker is not on the first entry
    assert "top by decision score: 'x' 0.5000 · ▶'y' 0.4000" in step_tooltip(step(b"y", "both",
                                                                                   top=[["x", 0.5], ["y", 0.4]]))


def test_all_model_text_is_escaped():
    page = render_html(ROWS, {"bleu": 1.0, "agreement_rate": 0.5}, "run <x>")
    assert "<script>alert" not in page and "alert(1)</script>" not in page and "&lt;script&gt;alert" in page
    assert page.count("<script>") == 1  # the page's own sorting script, nothing from the data
    assert "<b>Tom" not in page and "&lt;b&gt;Tom &amp; Jerry" in page
    assert "run &lt;x&gt;" in page
    # tooltips are attribute values: quotes are escaped too
    titles = re.findall(r'title="([^"]*)"', page)
    assert any("piece: &#x27; &lt;script&gt;&#x27;" in t for t in titles) and any("&quot;" in t for t in titles)


def test_segment_line_has_sentence_scores_comet_length_ratio_and_agreement(tmp_path):
    agreed = [step("今日は".encode(), "both"), step("天気".encode(), "gemma3_270m"),
              step("が良いです。".encode(), "lookup"), step("".encode(), "both", end=True)]
    rows = [{"id": "a", "source": "x", "reference": "今日は天気がいいです。", "hypothesis": "今日は天気が良いです。",
             "models": ["gemma3_270m", "smollm2_135m"], "stats": {"agreement_rate": 0.0}, "trace": agreed},
            {"id": "b", "source": "y", "reference": "駅はどこですか", "hypothesis": "駅", "trace": []},
            {"id": "c", "source": "z", "reference": None, "hypothesis": "参照なし", "trace": []}]
    jsonl = tmp_path / "run.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    jsonl.with_suffix(".comet.jsonl").write_text('{"id": "a", "comet": 0.8123}\n{"id": "b", "comet": 0.31}\n')
    page, _ = write_trace_report(jsonl, segment=None)
    text = page.read_text(encoding="utf-8")
    scores = segment_scores([r["hypothesis"] for r in rows[:2]], [r["reference"] for r in rows[:2]])
    # the agreed share counts the green (every member proposed it) steps: 2 of 4, whatever the top-1 stat says
    assert (f"chrF {scores.chrf[0]:.1f} · BLEU {scores.bleu[0]:.1f} · COMET 0.812 · length 1.00× reference · "
            "agreed 0.50 of steps (green)") in text
    assert "top-1 agreement (every member&#x27;s most likely piece the same): 0" in text
    assert f"chrF {scores.chrf[1]:.1f} · BLEU {scores.bleu[1]:.1f} · COMET 0.310 · length 0.14× reference" in text
    # the sort data carries the same numbers
    sections = dict(re.findall(r'<section id="seg(\d)" data-order="\d" data-bleu="[^"]*" data-chrf="([^"]*)"', text))
    assert float(sections["0"]) == scores.chrf[0] and sections["2"] == ""
    assert 'id="sort"' in text and '<option value="comet">COMET</option>' in text


def test_speculative_rounds_are_shown_as_text_on_the_page():
    ru = "ルール".encode()
    trace = [  # round 1: draft proposed ル + ー (ル as two byte pieces), target accepted 2 pieces then wrote its own ー
        {**step(ru[:2], "draft"), "round": 1}, {**step(ru[2:3], "draft"), "round": 1},
        {**step("ー".encode(), "target"), "round": 1, "proposed": ["\\xe3\\x83", "\\xab", "ル"], "accepted": 2},
        # round 2: nothing accepted, the target ends
        {**step(b"", "target", end=True), "round": 2, "proposed": ["ル"], "accepted": 0}]
    from eval.trace import speculative_rounds

    rounds = speculative_rounds(trace)
    assert [(r["accepted_text"], r["rejected_text"], r["target_text"], r["accepted"], r["proposed"])
            for r in rounds] == [("ル", "ル", "ー", 2, 3), ("", "ル", "<end>", 0, 1)]
    page = render_html([{"id": "a", "source": "rule", "reference": "ルール", "hypothesis": "ルー", "trace": trace,
                         "models": ["qwen15", "qwen05"],
                         "stats": {"rounds": 2, "forward_passes": {"qwen15": 2, "qwen05": 4},
                                   "acceptance_rate": 0.5}}],
                       {"method": "speculative"}, "spec")
    assert "2 speculative rounds" in page
    assert '<span class="acc">ル</span><del>ル</del> <span class="own">ー</span></td><td class="num">2/3</td>' in page
    assert "forward passes: qwen15 2, qwen05 4 · acceptance rate: 0.5" in page and "{&quot;" not in page


def test_options_that_do_nothing_at_these_settings_are_not_shown():
    config = {"config": {"decoding": {"name": "unite", "top_k": 10, "speculate": 0, "drafter": None, "alternate": False,
                                      "draft_schedule": "constant", "draft_confidence": 0.0, "num_beams": 1,
                                      "length_penalty": 1.0, "early_stopping": True, "temperature": 0.0, "seed": 0},
                         "prompt": {}, "seed": 0}}
    page = render_html(ROWS, config, "unite")
    line = re.search(r'<div class="meta">options: (.*?)</div>', page).group(1)
    assert line.startswith("top_k=10 · speculate=0 · num_beams=1 · temperature=0.0")
    assert "drafter=" not in line and "length_penalty=" not in line and "seed=0 ·" not in line.split("(not shown")[0]
    assert "no effect at these settings: drafter, alternate, draft_schedule, draft_confidence, length_penalty" in line
    beams = {"config": {**config["config"], "decoding": {**config["config"]["decoding"], "num_beams": 4}}}
    assert "length_penalty=1.0" in render_html(ROWS, beams, "unite")


def test_diff_against_the_reference():
    assert diff_html("今朝の天気", "今日の天気") == "今<del>朝</del><ins>日</ins>の天気"
    assert diff_html("<a>", "<b>") == "&lt;<del>a</del><ins>b</ins>&gt;"


def test_flags_for_repetition_truncated_prompts_empty_output_and_the_step_limit():
    assert repetition("今日は" + "メ" * 9) == "runaway repetition: 'メ' ×9"
    assert repetition("ルカ" * 8) == "runaway repetition: 'ルカ' ×8"
    assert repetition("メ" * 7) is None and repetition("a" + " " * 12 + "b") is None
    row = {"id": "a", "source": "x", "hypothesis": "", "warnings": ["prompt truncated to the model's max_input_tokens"],
           "trace": [step(b"a", "both")] * 4}
    assert segment_flags(row, max_steps=4) == ["empty output", "prompt truncated to the model's max_input_tokens",
                                               "stopped at max_new_tokens=4"]
    assert segment_flags({**row, "hypothesis": "ok", "warnings": []}, max_steps=5) == []
    page = render_html([{**row, "hypothesis": "メ" * 12}], None, "t")
    assert "⚠ runaway repetition: &#x27;メ&#x27; ×12" in page and 'data-flagged="1"' in page


def _write_run(folder, name, method, bleu, tps, rows=ROWS, **metrics):
    jsonl = folder / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    jsonl.with_suffix(".metrics.json").write_text(json.dumps(
        {"run_name": name, "method": method, "models": ["gemma3_270m"], "dataset": "sample_en_ja", "segments": 2,
         "bleu": bleu, "chrf": 30.0, "comet": None, "tokens_per_s": tps, "agreement_rate": 0.5, **metrics}))
    return jsonl


def test_trace_command_writes_html_and_png(tmp_path):
    jsonl = _write_run(tmp_path, "unite__x__sample_en_ja", "unite", 10.0, 5.0)
    html_path, png = write_trace_report(jsonl, segment=0)
    assert html_path.read_text().count('<span class="c') >= 4 and "bleu: 10.0" in html_path.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _config(decoding: dict, seed: int = 0) -> dict:
    return {"config": {"decoding": decoding, "prompt": {"system": None}, "seed": seed}}


def test_report_has_the_options_that_distinguish_runs(tmp_path):
    _write_run(tmp_path, "greedy__m__d", "greedy", 12.5, 8.0, **_config({"name": "greedy", "max_new_tokens": 96}))
    _write_run(tmp_path, "beam__m__d", "beam", 13.0, 3.0,
               **_config({"name": "beam", "max_new_tokens": 96, "num_beams": 4, "length_penalty": 1.0}))
    _write_run(tmp_path, "unite__m__d__1", "unite", 14.0, 4.0,
               **_config({"name": "unite", "max_new_tokens": 96, "top_k": 10, "weights": None, "temperature": 0.0}))
    _write_run(tmp_path, "unite__m__d__2", "unite", 15.0, 4.0,
               **_config({"name": "unite", "max_new_tokens": 48, "top_k": 5, "weights": [1, 0], "temperature": 0.0}))
    report = Report.build(find_runs(tmp_path))
    # key options always; max_new_tokens because it differs; not temperature/length_penalty (one value each)
    assert report.option_keys == ["weights", "top_k", "num_beams", "max_new_tokens"]
    rows = {r["run_name"]: r for r in report.rows()}
    assert rows["unite__m__d__2"]["weights"] == "[1, 0]" and rows["unite__m__d__1"]["weights"] == "null"
    assert rows["greedy__m__d"]["top_k"] == "—" and rows["beam__m__d"]["num_beams"] == "4"
    md = report.to_markdown()
    assert md.splitlines()[0] == ("| run_name | method | models | weights | top_k | num_beams | max_new_tokens | "
                                  "dataset | segments | bleu | chrf | comet | tokens_per_s | forward_passes | "
                                  "acceptance_rate | agreement_rate | latin_share | non_japanese_share |")
    assert ("| unite__m__d__2 | unite | gemma3_270m | [1, 0] | 5 | — | 48 | sample_en_ja | 2 | 15.00 | 30.00 | — "
            "| 4.00 |") in md
    paths = report.write(tmp_path)
    header = next(csv.reader(paths[1].open(encoding="utf-8")))
    assert header[:7] == ["run_name", "method", "models", "weights", "top_k", "num_beams", "max_new_tokens"]


def test_options_from_overrides_when_the_run_has_no_config():
    options = RunOptions.from_metrics({"provenance": {"overrides": [
        "models=gemma3_smollm2", "decoding=unite", "decoding.top_k=5", "+decoding.weights=[1,0]", "dataset.limit=5",
        "prompt.system=訳して", "seed=3"]}})
    assert options.values == {"top_k": "5", "weights": "[1,0]", "prompt.system": "訳して", "seed": "3"}
    assert not options.complete and options.cell("num_beams") == "(default)"
    from pathlib import Path

    from eval.report import Run

    runs = [Run(Path(name), m, None, None) for name, m in (
        ("a.jsonl", {"provenance": {"overrides": ["decoding.top_k=5"]}}),
        ("b.jsonl", {"provenance": {"overrides": ["decoding.single_weight=0.3"]}}),
        ("c.jsonl", {"provenance": {"overrides": []}}))]
    assert distinguishing_options(runs) == ["top_k", "single_weight"]  # an override against a default differs


def _bootstrap_rows(hypotheses, domains=("news", "speech")):
    references = [f"今日は天気がいいので、{i}番目の駅まで歩いて行きます。" for i in range(40)]
    return [{"id": f"s{i}", "source": f"source {i}", "reference": ref, "hypothesis": hyp, "domain": domains[i % 2]}
            for i, (ref, hyp) in enumerate(zip(references, hypotheses(references)))]


def test_paired_bootstrap_markers_against_a_baseline(tmp_path):
    good = _bootstrap_rows(lambda refs: refs)
    poor = _bootstrap_rows(lambda refs: [r[:6] + "電車" for r in refs])
    _write_run(tmp_path, "greedy__poor", "greedy", 5.0, 8.0, rows=poor)
    _write_run(tmp_path, "unite__good", "unite", 90.0, 4.0, rows=good)
    _write_run(tmp_path, "beam__same", "beam", 5.0, 3.0, rows=poor)
    report = Report.build(find_runs(tmp_path), baseline="greedy__poor")
    good_boot, same_boot = report.bootstraps["unite__good"], report.bootstraps["beam__same"]
    assert good_boot.segments == 40 and good_boot.bleu_p < 0.05 and good_boot.bleu_delta > 0
    assert good_boot.marker("bleu") == "▲" and good_boot.marker("chrf") == "▲"
    assert same_boot.bleu_delta == 0 and same_boot.marker("bleu") == "" and "greedy__poor" not in report.bootstraps
    assert same_boot.bleu_p == same_boot.chrf_p == 1.0  # identical outputs: no difference to test
    md = report.to_markdown()
    assert "| 90.00 ▲ | 30.00 ▲ |" in md and "| **baseline** greedy__poor |" in md and "paired bootstrap" in md
    # a worse run gets ▼ when the good run is the baseline
    assert Report.build(find_runs(tmp_path), baseline="unite__good").bootstraps["greedy__poor"].marker("chrf") == "▼"
    rows = {r["run_name"]: r for r in report.rows()}
    assert rows["unite__good"]["bleu_p"] == good_boot.bleu_p and rows["greedy__poor"]["bleu_p"] is None
    # too few segments to resample: p-values in the CSV, no marker
    few = tmp_path / "few"
    few.mkdir()
    _write_run(few, "greedy__poor", "greedy", 5.0, 8.0, rows=poor[:10])
    _write_run(few, "unite__good", "unite", 90.0, 4.0, rows=good[:10])
    boot = Report.build(find_runs(few), baseline="greedy__poor").bootstraps["unite__good"]
    assert boot.segments == 10 and boot.bleu_p < 0.05 and boot.marker("bleu") == ""


def test_per_domain_scores(tmp_path):
    rows = _bootstrap_rows(lambda refs: [r[:10] for r in refs])
    _write_run(tmp_path, "greedy__d", "greedy", 5.0, 8.0, rows=rows)
    report = Report.build(find_runs(tmp_path))
    news = [r for r in rows if r["domain"] == "news"]
    expected = corpus_scores([r["hypothesis"] for r in news], [r["reference"] for r in news])
    assert report.domains["greedy__d"]["news"]["bleu"] == expected["bleu"]
    md = report.to_markdown()
    assert "## Per domain" in md and f"| greedy__d | {expected['bleu']:.2f} / {expected['chrf']:.2f} (20) |" in md
    paths = report.write(tmp_path)
    domains = list(csv.DictReader((tmp_path / "report_domains.csv").open(encoding="utf-8")))
    assert [d["domain"] for d in domains] == ["news", "speech"] and tmp_path / "report_domains.csv" in paths
    # rows without a domain: no per-domain section
    _write_run(tmp_path, "greedy__d", "greedy", 5.0, 8.0)
    assert "Per domain" not in Report.build(find_runs(tmp_path)).to_markdown()


def _text_boxes(figure):
    """Every text the rendered figure draws (titles, tick labels, annotations, legend, key), as extents."""
    from matplotlib.text import Text

    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in figure.findobj(Text) if t.get_visible() and t.get_text()]


def test_plot_has_short_labels_a_method_legend_chrf_beside_bleu_and_nothing_cut(tmp_path):
    long_prompt = {"system": "日本語に翻訳してください。" * 4}
    for i in range(8):  # eight runs at nearly the same point, differing by one option
        _write_run(tmp_path, f"unite__m__d__{i}", "unite", 14.0 + i * 0.01, 4.0 + i * 0.01,
                   **_config({"name": "unite", "top_k": i + 1}))
    _write_run(tmp_path, "tokenwise__a", "tokenwise", 9.0, 2.0, **_config({"name": "tokenwise", "single_weight": 0.3}))
    _write_run(tmp_path, "tokenwise__b", "tokenwise", 9.5, 2.0, **_config({"name": "tokenwise", "single_weight": 0.7}))
    _write_run(tmp_path, "greedy__long", "greedy", 5.0, 9.0,
               config={"decoding": {"name": "greedy"}, "prompt": long_prompt, "seed": 0})
    report = Report.build(find_runs(tmp_path))
    labels = dict(zip((r.name for r in report.runs), short_labels(report.runs)))
    assert labels["unite__m__d__3"] == "unite top_k=4" and labels["tokenwise__a"] == "tokenwise single_weight=0.3"
    assert labels["greedy__long"] == "greedy"  # nothing tells it apart from other greedy runs
    figure = report.figure()
    assert [ax.get_title() for ax in figure.axes] == ["BLEU", "chrF"]
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["unite", "tokenwise", "greedy"]
    key = [t.get_text() for t in figure.texts if t.get_text()[:2].strip().isdigit()]
    assert len(key) == 11 and any(line.endswith("unite top_k=8") for line in key)
    boxes = _text_boxes(figure)
    canvas = figure.bbox
    assert all(canvas.x0 <= b.x0 and b.x1 <= canvas.x1 + 0.5 and canvas.y0 <= b.y0 and b.y1 <= canvas.y1 + 0.5
               for b in boxes), "a text runs off the canvas"
    key_boxes = [t.get_window_extent(figure.canvas.get_renderer()) for t in figure.texts if t.get_text() in key]
    assert not any(a.overlaps(b) for i, a in enumerate(key_boxes) for b in key_boxes[i + 1:])
    # the saved PNG has the figure's size: what was checked is what is written
    png = report.plot(tmp_path / "report.png")
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (round(canvas.width), round(canvas.height))


def test_a_long_label_widens_the_figure_instead_of_running_off(tmp_path):
    for i, value in enumerate(["x" * 90, "y" * 90]):
        _write_run(tmp_path, f"greedy__{i}", "greedy", 5.0 + i, 9.0,
                   config={"decoding": {"name": "greedy"}, "prompt": {"system": value + " " + value}, "seed": 0})
    figure = Report.build(find_runs(tmp_path)).figure()
    canvas = figure.bbox
    assert all(b.x1 <= canvas.x1 + 0.5 and b.y0 >= canvas.y0 - 0.5 for b in _text_boxes(figure))


def test_report_collects_every_run(tmp_path):
    (tmp_path / "a").mkdir()
    _write_run(tmp_path / "a", "greedy__m__d", "greedy", 12.5, 8.0)
    _write_run(tmp_path, "unite__m__d", "unite", 14.0, 4.0)
    report = Report.build(find_runs(tmp_path))
    assert [r["method"] for r in report.rows()] == ["unite", "greedy"]  # best BLEU first
    assert "| unite__m__d | unite | gemma3_270m | sample_en_ja | 2 | 14.00 | 30.00 | — | 4.00 |" in report.to_markdown()
    md, csv_path, png = report.write(tmp_path)
    assert csv_path.read_text().splitlines()[0].startswith("run_name,method,models")
    assert png.stat().st_size > 0


def test_matplotlib_finds_a_cjk_font_installed_after_its_cache(tmp_path, monkeypatch):
    """A font list cached before the CJK font was installed (what made labels show as escapes) is refreshed."""
    if "CJK" not in subprocess.run(["fc-list"], capture_output=True, text=True).stdout:
        pytest.skip("no CJK font installed (Debian: apt-get install fonts-noto-cjk; make fonts)")
    import matplotlib
    from matplotlib import font_manager

    import eval.plots as plots

    stale = font_manager.FontManager()
    stale.ttflist = [f for f in stale.ttflist if not plots._draws_japanese(f.fname)]
    monkeypatch.setattr(font_manager, "fontManager", stale)
    monkeypatch.setattr(matplotlib, "get_cachedir", lambda: str(tmp_path))
    plots.cjk_font.cache_clear()
    try:
        font = plots.use_cjk_font()
        assert font in plots.CJK_FONTS
        assert any(tmp_path.glob("fontlist-*.json"))  # saved, so later processes find it at once
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.set_title("今日は天気がいいです")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig.savefig(tmp_path / "ja.png")
        plt.close(fig)
        assert not [w for w in caught if "missing from font" in str(w.message)]
    finally:
        plots.cjk_font.cache_clear()


def _chromium_dom(page, query=""):
    """The page's DOM after its scripts ran, as headless Chromium has it."""
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--dump-dom", page.resolve().as_uri() + query],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


needs_chromium = pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (Debian: apt-get install "
                                                               "chromium; make fonts)")


@needs_chromium
def test_trace_page_renders_and_sorts_in_headless_chromium(tmp_path):
    rows = [{"id": f"s{i}", "source": "x", "reference": "今日は天気がいいです。", "hypothesis": hyp, "method": "unite",
             "models": ["gemma3_270m", "smollm2_135m"], "trace": UNITE_TRACE}
            for i, hyp in enumerate(["今日は雨です。", "今日は天気がいいです。", "駅"])]
    jsonl = _write_run(tmp_path, "run", "unite", 10.0, 5.0, rows=rows)
    page, _ = write_trace_report(jsonl, segment=None)
    shot = screenshot(page, tmp_path / "trace.png", 1200, 1400)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000
    dom = _chromium_dom(page, "?sort=chrf&direction=desc")
    order = re.findall(r'<section id="seg(\d)"', dom)
    assert order == ["1", "0", "2"]  # exact match first, the one-character hypothesis last
    hidden = re.findall(r'<section id="seg(\d)"[^>]*hidden', _chromium_dom(page, "?below=50"))
    assert hidden == ["1"]


def _cli(module, *args, cwd):
    from conftest import ROOT

    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("fusemt: error: ")
    return line


GOOD_LINE = json.dumps(ROWS[1], ensure_ascii=False).encode() + b"\n"


@pytest.mark.parametrize("second_line, problem", [
    (b'{"id": "s3", "source": \n', ":2 is not valid JSON (Expecting value at column"),
    (b'{"id": "s3", "source": "\xff\xfe"}\n', ":2 is not UTF-8 text (byte 0xff"),
    (b'["s3", "source"]\n', ":2 holds an array, not a JSON object"),
    (b'"just a string"\n', ":2 holds a string, not a JSON object"),
    (b'{"id": "s3", "source": "x"}\n', ":2 has no 'hypothesis'"),
])
def test_trace_command_on_a_corrupt_jsonl_names_file_line_and_fix(tmp_path, second_line, problem):
    jsonl = tmp_path / "run.jsonl"
    jsonl.write_bytes(GOOD_LINE + second_line)
    line = _one_error_line(_cli("eval.trace", jsonl, cwd=tmp_path))
    assert f"{jsonl}{problem}" in line and "fix or delete that line" in line


@pytest.mark.parametrize("content, problem", [
    (b'{"run_name": "x", "bleu": 1', "is not valid JSON (Expecting ',' delimiter at line 1 column"),
    (b'[{"run_name": "x"}]', "holds an array, not a JSON object"),
    (b'{"run_name": "\xff"}', "is not UTF-8 text"),
])
def test_report_with_one_corrupt_metrics_file_names_it_and_the_fix(tmp_path, content, problem):
    _write_run(tmp_path, "greedy__m__d", "greedy", 12.5, 8.0)
    corrupt = tmp_path / "unite__m__d.metrics.json"
    corrupt.write_bytes(content)
    line = _one_error_line(_cli("eval.report", tmp_path, cwd=tmp_path))
    assert f"{corrupt} {problem}" in line and "fix or delete that file" in line


def test_report_with_a_corrupt_results_file_or_comet_file_or_unknown_baseline(tmp_path):
    jsonl = _write_run(tmp_path, "greedy__m__d", "greedy", 12.5, 8.0)
    line = _one_error_line(_cli("eval.report", tmp_path, "--baseline", "nothing", cwd=tmp_path))
    assert "--baseline nothing matches no run: give one of greedy__m__d" in line
    jsonl.with_suffix(".comet.jsonl").write_text('{"id": "s1"}\n')
    line = _one_error_line(_cli("eval.report", tmp_path, cwd=tmp_path))
    assert "greedy__m__d.comet.jsonl:1 has no 'comet'" in line
    jsonl.with_suffix(".comet.jsonl").unlink()
    jsonl.write_bytes(GOOD_LINE + b"{oops\n")
    assert f"{jsonl}:2 is not valid JSON" in _one_error_line(_cli("eval.report", tmp_path, cwd=tmp_path))


def test_trace_command_with_a_corrupt_metrics_file_beside_the_jsonl(tmp_path):
    jsonl = _write_run(tmp_path, "run", "unite", 10.0, 5.0)
    jsonl.with_suffix(".metrics.json").write_text("{")
    line = _one_error_line(_cli("eval.trace", jsonl, cwd=tmp_path))
    assert f"{jsonl.with_suffix('.metrics.json')} is not valid JSON" in line


def test_report_table_goes_to_wandb_as_a_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    _write_run(tmp_path, "greedy__m__d", "greedy", 12.5, 8.0, sweep="multirun/2025-01-01/10-00-00")
    _write_run(tmp_path, "unite__m__d", "unite", 14.0, 4.0, sweep="multirun/2025-01-01/10-00-00")
    proc = _cli("eval.report", tmp_path, "--wandb", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/media/table/report_*.table.json")
    table = json.loads(table_file.read_text(encoding="utf-8"))
    assert table["columns"][:3] == ["run_name", "method", "models"] and len(table["data"]) == 2
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/report_plot_*.png"))


def test_member_baselines_test_each_ensemble_against_its_best_single_member(tmp_path):
    good = _bootstrap_rows(lambda refs: refs)
    poor = _bootstrap_rows(lambda refs: [r[:6] + "電車" for r in refs])
    half = _bootstrap_rows(lambda refs: [r if i % 2 else r[:6] + "電車" for i, r in enumerate(refs)])
    _write_run(tmp_path, "greedy__a", "greedy", 5.0, 8.0, rows=poor, models=["a"])
    _write_run(tmp_path, "greedy__b", "greedy", 50.0, 8.0, rows=half, models=["b"])
    _write_run(tmp_path, "greedy__c", "greedy", 99.0, 8.0, rows=good, models=["c"])  # not a member: never a baseline
    _write_run(tmp_path, "beam__b", "beam", 60.0, 8.0, rows=half, models=["b"])  # beam is not the greedy baseline
    _write_run(tmp_path, "unite__a+b", "unite", 90.0, 4.0, rows=good, models=["a", "b"],
               forward_passes={"a": 400, "b": 440})
    report = Report.build(find_runs(tmp_path), member_baselines=True)
    assert {name: base.name for name, base in report.baselines.items()} == {"unite__a+b": "greedy__b"}
    rows = {r["run_name"]: r for r in report.rows()}
    assert rows["unite__a+b"]["baseline"] == "greedy__b" and rows["unite__a+b"]["bleu_delta"] > 0
    assert rows["unite__a+b"]["forward_passes"] == 21.0 and rows["greedy__a"]["baseline"] is None  # 840 / 40 segments
    assert "ensemble's best member (the member with the best BLEU" in report.to_markdown()
    # ranked elsewhere (a dev slice's compat.json): the first ranked member that ran alone is the baseline
    ranked = Report.build(find_runs(tmp_path), member_baselines=True, member_ranking=["c", "a", "b"],
                          ranking_source="dev/compat.json")
    assert {name: base.name for name, base in ranked.baselines.items()} == {"unite__a+b": "greedy__a"}
    assert "ranked best in dev/compat.json" in ranked.to_markdown()


def test_member_ranking_comes_from_a_compat_result(tmp_path):
    compat = tmp_path / "compat.json"
    compat.write_text(json.dumps({"rules": {"metric": "chrf"}, "models": [
        {"name": "a", "scores": {"bleu": 9.0, "chrf": 10.0}}, {"name": "b", "scores": {"bleu": 2.0, "chrf": 12.0}},
        {"name": "c", "scores": {"bleu": 5.0, "chrf": 10.0}}]}))
    assert read_member_ranking(compat) == ["b", "a", "c"]  # by chrF, the compat rule's metric, then BLEU
    compat.write_text(json.dumps({"models": "x"}))
    with pytest.raises(FusemtError, match="has no models with scores"):
        read_member_ranking(compat)


def test_holm_matches_the_step_down_definition():
    # Holm (1979): sorted p (0.01, 0.02, 0.03, 0.04) times (4, 3, 2, 1) = 0.04, 0.06, 0.06 (monotone), 0.06
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []
    p = [0.006, 0.029, 0.001, 0.2, 0.04]
    m = len(p)
    for i, adjusted in enumerate(holm(p)):  # the definition: max over the smaller p's of (m - rank) p, capped at 1
        ranks = sorted(range(m), key=lambda j: p[j])
        assert adjusted == pytest.approx(max(min(1, (m - r) * p[ranks[r]]) for r in range(ranks.index(i) + 1)))


def test_report_corrects_p_values_with_holm_and_says_so(tmp_path):
    good = _bootstrap_rows(lambda refs: refs)
    poor = _bootstrap_rows(lambda refs: [r[:6] + "電車" for r in refs])
    close = _bootstrap_rows(lambda refs: [r if i % 8 else r[:6] + "電車" for i, r in enumerate(refs)])
    _write_run(tmp_path, "greedy__poor", "greedy", 5.0, 8.0, rows=poor)
    _write_run(tmp_path, "unite__good", "unite", 90.0, 4.0, rows=good)
    _write_run(tmp_path, "unite__close", "unite", 20.0, 4.0, rows=close)
    report = Report.build(find_runs(tmp_path), baseline="greedy__poor")
    assert report.tests == 4
    raw = [getattr(report.bootstraps[n], f"{m}_p") for n in ("unite__good", "unite__close") for m in ("bleu", "chrf")]
    adjusted = [report.bootstraps[n].adjusted[m] for n in ("unite__good", "unite__close") for m in ("bleu", "chrf")]
    assert adjusted == pytest.approx([round(a, 4) for a in holm(raw)])
    rows = {r["run_name"]: r for r in report.rows()}
    assert rows["unite__close"]["chrf_p_adj"] == report.bootstraps["unite__close"].adjusted["chrf"]
    md = report.to_markdown()
    assert "Holm–Bonferroni-adjusted over the 4 tests" in md and "chrf_p_adj" in md.splitlines()[0]
    # a raw p under 0.05 that the correction lifts above it loses its marker
    boot = report.bootstraps["unite__close"]
    boot.chrf_p, boot.adjusted["chrf"] = 0.03, 0.09
    assert boot.marker("chrf") == ""
    plain = Report.build(find_runs(tmp_path), baseline="greedy__poor", correction="none")
    assert "no multiple-comparison correction" in plain.to_markdown() and "chrf_p_adj" not in plain.columns


def test_report_warns_when_it_mixes_datasets_or_segment_counts(tmp_path):
    _write_run(tmp_path, "greedy__a", "greedy", 5.0, 8.0)
    _write_run(tmp_path, "greedy__b", "greedy", 6.0, 8.0, rows=_bootstrap_rows(lambda refs: refs), segments=40)
    report = Report.build(find_runs(tmp_path))
    assert report.warnings == ["the runs of sample_en_ja scored different numbers of segments (2, 40): their scores "
                               "are over different segments; finish the runs or report one selection"]
    assert report.to_markdown().startswith("> warning: the runs of sample_en_ja")
    _write_run(tmp_path, "greedy__b", "greedy", 6.0, 8.0, dataset="wmt24")
    proc = _cli("eval.report", tmp_path, cwd=tmp_path)
    assert proc.returncode == 0 and "fusemt: warning: the runs are of 2 datasets (sample_en_ja, wmt24)" in proc.stderr


def test_an_ensemble_beam_search_is_tested_against_its_members_beam_search_with_as_many_beams(tmp_path):
    good = _bootstrap_rows(lambda refs: refs)
    half = _bootstrap_rows(lambda refs: [r if i % 2 else r[:6] + "電車" for i, r in enumerate(refs)])
    _write_run(tmp_path, "greedy__b", "greedy", 50.0, 8.0, rows=half, models=["b"])
    _write_run(tmp_path, "beam4__b", "beam", 55.0, 8.0, rows=half, models=["b"],
               **_config({"name": "beam", "num_beams": 4}))
    _write_run(tmp_path, "beam2__b", "beam", 58.0, 8.0, rows=half, models=["b"],
               **_config({"name": "beam", "num_beams": 2}))
    _write_run(tmp_path, "unite4__a+b", "unite", 90.0, 4.0, rows=good, models=["a", "b"],
               **_config({"name": "unite", "num_beams": 4}))
    _write_run(tmp_path, "unite1__a+b", "unite", 90.0, 4.0, rows=good, models=["a", "b"],
               **_config({"name": "unite", "num_beams": 1}))
    report = Report.build(find_runs(tmp_path), member_baselines=True)
    assert {name: base.name for name, base in report.baselines.items()} == {"unite4__a+b": "beam4__b",
                                                                           "unite1__a+b": "greedy__b"}
