"""The end of a sweep: a table of its jobs and the commands that review exactly its runs (fast: the
jobs' records are written as a sweep's jobs write them, the report command is run as printed)."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

from decoding.errors import FusemtError
from runners.sweep import JobInfo, SweepReport, record_failure, record_job, sweep_summary

ROWS = [{"id": f"s{i}", "source": f"source {i}", "reference": "今日は天気がいいです。", "hypothesis": hyp}
        for i, hyp in enumerate(["今日は天気がいいです。", "今日は天気"])]


def _run(folder, name, bleu, dataset="sample_en_ja"):
    results = folder / f"{name}.jsonl"
    results.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    metrics = {"run_name": name, "method": name.split("__")[0], "models": ["gemma3_270m"], "dataset": dataset,
               "segments": 2, "selected_segments": 2, "missing_segments": 0, "complete": True, "bleu": bleu,
               "chrf": 40.0, "comet": None, "tokens_per_s": 5.5}
    results.with_suffix(".metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return results, metrics


def test_sweep_ends_with_a_table_of_its_jobs_and_commands_for_exactly_its_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs, sweep = tmp_path / "results", tmp_path / "outputs" / "multiruns" / "x"
    runs.mkdir()
    _run(runs, "greedy__other", 1.0)  # an earlier run in the same folder: not part of this sweep
    common = ["dataset.limit=2"]
    for num, (top_k, bleu) in enumerate([("3", 30.0), ("5", 35.5)]):
        results, metrics = _run(runs, f"unite__k{top_k}", bleu)
        record_job(JobInfo(True, num, sweep, ["decoding=unite", f"decoding.top_k={top_k}", *common]), results, metrics)
    record_failure(JobInfo(True, 2, sweep, ["decoding=unite", "decoding.top_k=0", *common]),
                   FusemtError("decoding.top_k=0: must be at least 1"))
    capsys.readouterr()

    summary = sweep_summary(sweep)
    lines = summary.splitlines()
    assert lines[0] == "| job | run_name | decoding.top_k | segments | bleu | chrf | comet | tokens_per_s | status |"
    assert lines[2] == "| 0 | unite__k3 | 3 | 2 | 30.00 | 40.00 | — | 5.50 | complete |"
    assert lines[4] == "| 2 | — | 0 | — | — | — | — | — | failed: decoding.top_k=0: must be at least 1 |"
    report_cmd = next(line.strip() for line in lines if "eval.report" in line)
    assert "greedy__other" not in summary and "unite__k3.jsonl" in report_cmd and "unite__k5.jsonl" in report_cmd
    assert any("eval.compare" in line for line in lines)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *shlex.split(report_cmd)[1:]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (sweep / "report.md").read_text(encoding="utf-8")
    assert "unite__k3" in report and "unite__k5" in report and "greedy__other" not in report

    class Config:  # what Hydra hands the callback
        class hydra:
            class sweep:
                dir = str(sweep)

    with pytest.raises(SystemExit) as end:
        SweepReport().on_multirun_end(Config)
    assert end.value.code == 1  # a job failed
    out = capsys.readouterr()
    assert "fusemt: sweep summary" in out.out and "| 1 | unite__k5 | 5 |" in out.out
    assert (sweep / "summary.md").read_text(encoding="utf-8") == summary and "job 2 [" in out.err


def test_report_of_results_files_needs_an_output_folder(tmp_path):
    results, _ = _run(tmp_path, "greedy__a", 1.0)
    proc = subprocess.run([sys.executable, "-m", "eval.report", str(results)], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 2 and "say where the report goes with -o <folder>" in proc.stderr
