"""COMET through unbabel-comet + the transformers-5 compatibility fixes, on a tiny local checkpoint."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from comet_fixture import build_tiny_comet
from conftest import ROOT

from eval.comet_score import comet_scores

SRC = ["The weather is nice today.", "Where is the station?"]
HYP = ["今日は天気がいいです。", "駅はどこ？"]
REF = ["今日は天気が良いです。", "駅はどこですか？"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_comet(tmp_path_factory.mktemp("comet"))


def test_comet_scores_with_a_local_checkpoint(tiny_checkpoint):
    result = comet_scores(SRC, HYP, REF, str(tiny_checkpoint), batch_size=2)
    assert result.skipped is None and len(result.segments) == 2
    assert result.system == pytest.approx(sum(result.segments) / 2, abs=1e-3)


def test_compat_fix_leaves_encoder_outputs_unchanged(tiny_checkpoint):
    from eval.comet_score import load_comet

    model = load_comet(str(tiny_checkpoint))
    batch = model.encoder.prepare_sample(["今日は天気", "hello"])
    ours = model.encoder(**batch)
    direct = model.encoder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 output_hidden_states=True)
    assert torch.equal(ours["wordemb"], direct.last_hidden_state)
    assert torch.equal(ours["sentemb"], direct.last_hidden_state[:, 0, :])
    assert all(torch.equal(a, b) for a, b in zip(ours["all_layers"], direct.hidden_states))
    tok = model.encoder.tokenizer
    assert tok.build_inputs_with_special_tokens([5, 6], [7]) == [tok.cls_token_id, 5, 6, tok.sep_token_id,
                                                                 tok.sep_token_id, 7, tok.sep_token_id]


def test_unavailable_model_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = comet_scores(SRC, HYP, REF, "Unbabel/not-a-cached-model")
    assert result.system is None and result.segments == []
    assert result.skipped.startswith("'Unbabel/not-a-cached-model' is not in the HF cache and HF_HUB_OFFLINE=1 is set")


@pytest.mark.parametrize("model, reason", [
    ("/no/such/comet/model.ckpt", "COMET model /no/such/comet/model.ckpt is neither a local checkpoint nor a hub id"),
    ("runs/a/b", "COMET model runs/a/b is neither a local checkpoint nor a hub id"),
    ("{tmp}", "holds no checkpoints/model.ckpt"),
])
def test_a_bad_local_checkpoint_is_skipped_with_the_reason(tmp_path, model, reason):
    result = comet_scores(SRC, HYP, REF, model.format(tmp=tmp_path))
    assert result.system is None and reason in result.skipped and "\n" not in result.skipped


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("offline_flag, reason", [
    (None, "is not in the HF cache and the hub (http://127.0.0.1:"),  # the hub does not answer
    ("1", "is not in the HF cache and HF_HUB_OFFLINE=1 is set"),
])
def test_unavailable_comet_is_decided_in_under_a_second(tmp_path, offline_flag, reason):
    """A fresh process with an empty HF cache: the answer comes before comet is even imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "empty-hf-home"), HF_ENDPOINT=_closed_port_url())
    if offline_flag:
        env["HF_HUB_OFFLINE"] = offline_flag
    script = ("import json, sys, time; from eval.comet_score import comet_scores; t = time.perf_counter(); "
              "r = comet_scores(['a'], ['b'], ['c'], 'Unbabel/wmt22-comet-da'); "
              "print(json.dumps({'seconds': time.perf_counter() - t, 'skipped': r.skipped, "
              "'comet_imported': 'comet' in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["seconds"] < 1.0 and not out["comet_imported"]
    assert reason in out["skipped"] and "\n" not in out["skipped"]


def test_score_entry_point_reports_comet(tiny_checkpoint, tmp_path):
    from runners.data import DatasetConfig
    from runners.score import score_file

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": i, "source": s, "reference": r}, ensure_ascii=False) + "\n"
                            for i, (s, r) in enumerate(zip(SRC, REF))))
    hyp = tmp_path / "h.txt"
    hyp.write_text("\n".join(HYP) + "\n")
    scores = score_file(DatasetConfig(path=str(data)), hyp, comet_model=str(tiny_checkpoint))
    assert isinstance(scores["comet"], float)
