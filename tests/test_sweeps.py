"""Sweeps and scale-out with real processes on the embedded Gemma (short outputs): run identity,
failing jobs, shards, concurrent runs, launchers, Ctrl-C, provenance."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

FOUR = [{"id": f"s{i}", "source": src, "reference": ref} for i, (src, ref) in enumerate([
    ("Good night.", "おやすみなさい。"), ("Thank you.", "ありがとう。"), ("See you tomorrow.", "また明日。"),
    ("It is cold today.", "今日は寒いです。")])]


def command(tmp_path, *overrides):
    flags = [o for o in overrides if o.startswith("-")]  # Hydra flags (e.g. -m) go before the overrides
    return [sys.executable, "-m", "runners.translate", *flags, f"paths.results_dir={tmp_path}/results",
            f"paths.output_dir={tmp_path}/outputs", "logger=none", "metrics.comet=false",
            *(o for o in overrides if o not in flags)]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def fusemt(tmp_path, *overrides, expect=0):
    proc = subprocess.run(command(tmp_path, *overrides), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def _sigint_as_in_a_terminal() -> None:
    # A shell's background job (`make test &`) ignores SIGINT and its children inherit that, so the
    # Ctrl-C test's signal would be lost and the run would finish (exit 0): give the child the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(tmp_path, *overrides):
    return subprocess.Popen(command(tmp_path, *overrides), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_in_a_terminal)


def results_dir(tmp_path, group="sample"):
    return tmp_path / "results" / group / "ensemble"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def only(paths) -> Path:
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


@pytest.fixture
def four(tmp_path):
    path = tmp_path / "four.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FOUR))
    return [f"dataset.path={path}", "dataset.name=four"]


def test_hyperparameter_sweep_then_rerun_resumes_and_shows_prompts(tmp_path):
    fusemt(tmp_path, "-m", "decoding.max_new_tokens=3,4", "dataset.limit=1")
    files = sorted(results_dir(tmp_path).glob("*.jsonl"))
    assert len(files) == 2 and all(f.name.startswith("greedy__gemma3_270m__sample_en_ja__") for f in files)
    metrics = json.loads(only(results_dir(tmp_path).glob(f"{files[0].stem}.metrics.json")).read_text())
    provenance = metrics["provenance"]
    assert set(provenance) >= {"git_commit", "git_dirty", "fusemt_version", "versions", "seed", "overrides",
                               "hydra_run_dir", "results_path", "config_hash", "dataset_selection"}
    assert set(provenance["versions"]) == {"torch", "transformers", "sacrebleu"}
    assert provenance["dataset_selection"]["limit"] == 1 and any("max_new_tokens" in o for o in provenance["overrides"])
    # The same config again: nothing to decode, the prompts are still shown on request.
    proc = fusemt(tmp_path, "decoding.max_new_tokens=3", "dataset.limit=1", "debug.render_input_text=true")
    assert "1 already done" in proc.stderr + proc.stdout
    assert "----- prompt for gemma3_270m, segment sample-000 -----" in proc.stdout
    # More segments, then fewer: the metrics always describe every segment in the file.
    fusemt(tmp_path, "decoding.max_new_tokens=3", "dataset.limit=2")
    fusemt(tmp_path, "decoding.max_new_tokens=3", "dataset.limit=1")
    by_size = {len(rows_of(f)): f for f in results_dir(tmp_path).glob("*.jsonl")}
    metrics = json.loads(by_size[2].with_suffix(".metrics.json").read_text())
    assert metrics["segments"] == 2 and metrics["complete"]


def test_a_failing_job_does_not_end_the_sweep(tmp_path, four):
    proc = fusemt(tmp_path, "-m", f"{four[0]},{tmp_path}/missing.jsonl", four[1],
                  "decoding.max_new_tokens=3", "dataset.limit=1", expect=1)
    assert "1 job(s) of the sweep failed" in proc.stderr and "missing.jsonl not found" in proc.stderr
    failures = only((tmp_path / "outputs" / "multiruns").glob("*/*/failures.jsonl"))
    assert [f["job"] for f in rows_of(failures)] == [1]
    assert len(rows_of(only(results_dir(tmp_path).glob("*.jsonl")))) == 1  # job 0 ran


def test_shards_one_after_another_complete_the_run(tmp_path, four):
    fusemt(tmp_path, *four, "decoding.max_new_tokens=3", "dataset.shard=0/2")
    path = only(results_dir(tmp_path).glob("*.jsonl"))
    metrics = json.loads(path.with_suffix(".metrics.json").read_text())
    assert (metrics["segments"], metrics["complete"], metrics["missing_segments"]) == (2, False, 2)
    fusemt(tmp_path, *four, "decoding.max_new_tokens=3", "dataset.shard=1/2")
    assert sorted(r["id"] for r in rows_of(path)) == ["s0", "s1", "s2", "s3"]
    metrics = json.loads(path.with_suffix(".metrics.json").read_text())
    assert (metrics["segments"], metrics["complete"], metrics["selected_segments"]) == (4, True, 4)


@pytest.mark.parametrize("jobs", [["dataset.shard=0/2", "dataset.shard=1/2"], [[], []]],
                         ids=["two-shards-at-once", "same-run-twice-at-once"])
def test_processes_at_once_write_every_segment_once(tmp_path, four, jobs):
    procs = [start(tmp_path, *four, "decoding.max_new_tokens=3", "batch_size=1", *([j] if isinstance(j, str) else j))
             for j in jobs]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    path = only(results_dir(tmp_path).glob("*.jsonl"))
    assert sorted(r["id"] for r in rows_of(path)) == ["s0", "s1", "s2", "s3"]
    metrics = json.loads(path.with_suffix(".metrics.json").read_text())
    assert (metrics["segments"], metrics["complete"]) == (4, True)
    assert len(list((tmp_path / "outputs" / "runs").glob("*/*"))) == 2  # each run its own folder


@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20"]],
                         ids=["joblib", "submitit-local"])
def test_two_job_sweep_through_a_launcher(tmp_path, launcher):
    fusemt(tmp_path, "-m", *launcher, "decoding.max_new_tokens=3,4", "dataset.limit=1")
    metrics = [json.loads(p.read_text()) for p in results_dir(tmp_path).glob("*.metrics.json")]
    assert len(metrics) == 2 and all(m["complete"] and m["segments"] == 1 for m in metrics)
    assert len({m["sweep"] for m in metrics}) == 1


def test_ctrl_c_keeps_finished_segments_and_says_so_in_one_line(tmp_path, four):
    # every segment forced to 48 tokens: the run cannot finish between the first row and the signal
    run = [*four, "decoding.max_new_tokens=48", "decoding.min_new_tokens=48", "batch_size=1"]
    proc = start(tmp_path, *run)
    deadline = time.time() + 600
    while not list(results_dir(tmp_path).glob("*.jsonl")) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("fusemt:")] == [
        next(line for line in err.splitlines() if line.startswith("fusemt: interrupted:"))]
    path = only(results_dir(tmp_path).glob("*.jsonl"))
    kept = rows_of(path)
    assert 1 <= len(kept) < 4
    fusemt(tmp_path, *run)
    assert [r["id"] for r in rows_of(path)][: len(kept)] == [r["id"] for r in kept]
    assert sorted(r["id"] for r in rows_of(path)) == ["s0", "s1", "s2", "s3"]
