import json
import shutil
import subprocess

import pytest

from eval.report import collect, to_markdown, write_report
from eval.trace import render_html, step_tooltip, write_trace_report

ROWS = [
    {"id": "s1", "source": "<b>Tom & Jerry</b>", "reference": "トム＆ジェリー", "hypothesis": "<script>alert(1)</script>",
     "models": ["gemma3_270m", "smollm2_135m"], "stats": {"agreement_rate": 0.5}, "warnings": [],
     "trace": [
         {"piece": " <script>", "piece_bytes": " <script>".encode().hex(), "ids": {"gemma3_270m": [5], "smollm2_135m": [7, 8]},
          "logprob": {"gemma3_270m": -0.1, "smollm2_135m": -2.0}, "origin": "both", "top": [[" <script>", 0.6], ["\"", 0.1]],
          "union": 12},
         {"piece": "alert(1)</script>", "piece_bytes": "alert(1)</script>".encode().hex(), "ids": {"gemma3_270m": [9]},
          "logprob": {"gemma3_270m": -0.5, "smollm2_135m": None}, "origin": "lookup", "top": [], "union": 3},
         {"piece": "", "piece_bytes": "", "ids": {"gemma3_270m": [1]}, "logprob": {"gemma3_270m": -0.01},
          "origin": "gemma3_270m", "end": True}]},
    {"id": "s2", "source": "Hi", "reference": "やあ", "hypothesis": "やあ", "models": ["gemma3_270m", "smollm2_135m"],
     "trace": [{"piece": "やあ", "piece_bytes": "やあ".encode().hex(), "ids": {"gemma3_270m": [3]},
                "logprob": {"gemma3_270m": -0.2}, "origin": "target", "round": 1, "proposed": ["や"], "accepted": 0}]},
]


def test_all_model_text_is_escaped():
    page = render_html(ROWS, {"bleu": 1.0, "agreement_rate": 0.5}, "run <x>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<b>Tom" not in page and "&lt;b&gt;Tom &amp; Jerry" in page
    assert "run &lt;x&gt;" in page
    # tooltips are attribute values: quotes are escaped too
    assert 'title="piece: &#x27; &lt;script&gt;&#x27;' in page and "&quot;" in page


def test_tooltip_has_ids_probabilities_and_candidates():
    tip = step_tooltip(ROWS[0]["trace"][0])
    assert "smollm2_135m: ids [7, 8]" in tip and "p=0.905" in tip and "union size: 12" in tip
    assert "proposed ['や'], accepted 0" in step_tooltip(ROWS[1]["trace"][0])


def _write_run(folder, name, method, bleu, tps, rows=ROWS):
    jsonl = folder / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    jsonl.with_suffix(".metrics.json").write_text(json.dumps(
        {"run_name": name, "method": method, "models": ["gemma3_270m"], "dataset": "sample_en_ja", "segments": 2,
         "bleu": bleu, "chrf": 30.0, "comet": None, "tokens_per_s": tps, "agreement_rate": 0.5}))
    return jsonl


def test_trace_command_writes_html_and_png(tmp_path):
    jsonl = _write_run(tmp_path, "unite__x__sample_en_ja", "unite", 10.0, 5.0)
    html_path, png = write_trace_report(jsonl, segment=0)
    assert html_path.read_text().count('class="chip"') >= 4 and "bleu: 10.0" in html_path.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_collects_every_run(tmp_path):
    (tmp_path / "a").mkdir()
    _write_run(tmp_path / "a", "greedy__m__d", "greedy", 12.5, 8.0)
    _write_run(tmp_path, "unite__m__d", "unite", 14.0, 4.0)
    rows = collect(tmp_path)
    assert [r["method"] for r in rows] == ["unite", "greedy"]  # best BLEU first
    assert "| unite | gemma3_270m | sample_en_ja | 2 | 14.00 | 30.00 | — | 4.00 |" in to_markdown(rows)
    md, csv_path, png = write_report(tmp_path)
    assert csv_path.read_text().splitlines()[0].startswith("run_name,method,models")
    assert png.stat().st_size > 0


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="Chromium is not installed (Debian package 'chromium')")
def test_trace_page_renders_in_headless_chromium(tmp_path):
    jsonl = _write_run(tmp_path, "run", "unite", 10.0, 5.0)
    html_path, _ = write_trace_report(jsonl, segment=None)
    shot = tmp_path / "shot.png"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1000,800", html_path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000


def _cli(module, *args, cwd):
    import os
    import sys

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


def test_trace_command_with_a_corrupt_metrics_file_beside_the_jsonl(tmp_path):
    jsonl = _write_run(tmp_path, "run", "unite", 10.0, 5.0)
    jsonl.with_suffix(".metrics.json").write_text("{")
    line = _one_error_line(_cli("eval.trace", jsonl, cwd=tmp_path))
    assert f"{jsonl.with_suffix('.metrics.json')} is not valid JSON" in line
