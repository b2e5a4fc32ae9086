"""`make gpu-check` on the CPU (``--device cpu --small``): every check of scripts/gpu_check.py runs on
shrunk random models of the members' architectures. Fast: the bundle is built here from the tiny
tokenizers of the two families (tests/tiny_models.py) and the architectures' default configs; the
slow test exports the real bundle (configs and tokenizers from the local GGUFs) and checks it."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import byte_fallback_tokenizer, byte_level_tokenizer
from transformers import Gemma3TextConfig, LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def make_check(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}", f"GPU_BUNDLE={bundle}",
                           f"GPU_CHECK_ARGS={' '.join(args)}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def tiny_bundle(path: Path) -> Path:
    configs = {"gemma3": Gemma3TextConfig().to_dict(), "qwen25_15b": dict(gpu_check.QWEN25_15B),
               "smollm2": LlamaConfig().to_dict()}
    tokenizers = {"gemma3": byte_fallback_tokenizer(), "qwen25_15b": byte_level_tokenizer(),
                  "smollm2": byte_level_tokenizer()}
    for key, config in configs.items():
        tokenizer = tokenizers[key]
        config.update(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, bos_token_id=None)
        gpu_check._save_member(path / "members" / key, tokenizer, config)
    return path


def test_gpu_check_small_on_cpu(tmp_path):
    run = make_check(tiny_bundle(tmp_path / "bundle"), "--device", "cpu", "--small")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = run.stdout.strip().splitlines()[-1]
    assert summary.startswith("gpu_check: pass=7/7 device=cpu dtype=float32 small=1"), summary
    figures = dict(kv.split("=") for kv in summary.split()[1:])
    assert float(figures["ensemble_over_members_bs8"]) > 0 and float(figures["host_ms_bs8_unite"]) > 0
    detail = json.loads(run.stdout.split("PASS cached_vs_recompute: ")[1].splitlines()[0])
    assert detail["length"] > detail["window"] == gpu_check.SMALL_WINDOW  # ran past Gemma 3's sliding window
    assert detail["steps"] > 10


def test_gpu_check_says_what_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.load_member(tmp_path, "gemma3", True, "cpu", None)
    assert (exc.value.code == 2
            and "has no tokenizer: build the bundle with `make gpu-bundle`" in capsys.readouterr().err)


def test_gpu_check_refuses_old_transformers(monkeypatch, capsys):
    monkeypatch.setattr("transformers.__version__", "5.17.0")
    with pytest.raises(SystemExit) as exc:
        gpu_check.check_transformers()
    assert exc.value.code == 2
    assert "transformers 5.17.0 is installed, fusemt needs >= 5.23.0" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_real_bundle_on_cpu(tmp_path):
    """The real export: members' configs and tokenizers from the local GGUFs (Qwen2.5's from the first
    part of the Qwen2.5-Coder-0.5B GGUF, downloaded by `make gpu-bundle`; skipped where absent)."""
    part = next(iter(sorted((ROOT / "gpu_bundle").glob("members/qwen25_15b/tokenizer.json.gz"))), None)
    if part is None:
        pytest.skip("no gpu_bundle/ here: `make gpu-bundle` builds it")
    run = make_check(ROOT / "gpu_bundle", "--device", "cpu", "--small", "--no-timing")
    assert run.returncode == 0, run.stdout + run.stderr
    with gzip.open(ROOT / "gpu_bundle" / "members" / "gemma3" / "tokenizer.json.gz") as fh:
        assert len(json.load(fh)["model"]["vocab"]) == 262144
