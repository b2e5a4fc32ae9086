"""COMET through unbabel-comet + the transformers-5 compatibility fixes, on a tiny local checkpoint."""

import json

import pytest
import torch
from comet_fixture import build_tiny_comet

from eval.comet_score import comet_scores

SRC = ["The weather is nice today.", "Where is the station?"]
HYP = ["今日は天気がいいです。", "駅はどこ？"]
REF = ["今日は天気が良いです。", "駅はどこですか？"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_comet(tmp_path_factory.mktemp("comet"))


def test_comet_scores_with_a_local_checkpoint(tiny_checkpoint):
    result = comet_scores(SRC, HYP, REF, str(tiny_checkpoint), batch_size=2)
    assert result is not None and len(result.segments) == 2
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


def test_unavailable_model_is_skipped_with_a_message(caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert comet_scores(SRC, HYP, REF, "Unbabel/not-a-cached-model") is None
    assert "COMET skipped" in caplog.text


def test_score_entry_point_reports_comet(tiny_checkpoint, tmp_path):
    from runners.score import score_file
    from runners.data import DatasetConfig

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": i, "source": s, "reference": r}, ensure_ascii=False) + "\n"
                            for i, (s, r) in enumerate(zip(SRC, REF))))
    hyp = tmp_path / "h.txt"
    hyp.write_text("\n".join(HYP) + "\n")
    scores = score_file(DatasetConfig(path=str(data)), hyp, comet_model=str(tiny_checkpoint))
    assert isinstance(scores["comet"], float)
