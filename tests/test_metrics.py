import json

import pytest
import sacrebleu

from decoding.errors import FusemtError
from eval.metrics import corpus_scores
from runners.data import DatasetConfig
from runners.score import score_file

HYPS = ["今日は天気がいいです。", "駅はどこにありますか？", "この本は面白い。"]
REFS = ["今日は天気が良いです。", "駅はどこですか？", "この本はとても面白いです。"]


def test_corpus_scores_match_sacrebleu_called_directly():
    scores = corpus_scores(HYPS, REFS)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="ja-mecab").score, abs=1e-4)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-4)
    assert "tok:ja-mecab" in scores["bleu_signature"] and scores["segments"] == 3
    # Without Japanese tokenisation BLEU is very different: the scorer must not fall back to 13a.
    assert scores["bleu"] != pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-2)


def _dataset(tmp_path):
    rows = [{"id": 0, "doc_id": "canary", "domain": "canary", "source": "CANARY", "reference": "CANARY"}]
    rows += [{"id": i + 1, "doc_id": "d", "domain": "news", "source": f"s{i}", "reference": r}
             for i, r in enumerate(REFS)]
    path = tmp_path / "wmt.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return DatasetConfig(name="wmt24_en_ja", path=str(path))


def test_score_file_aligns_submission_lines_by_row_canary_included(tmp_path):
    hyp = tmp_path / "system.txt"
    hyp.write_text("CANARY\n" + "\n".join(HYPS) + "\n")
    scores = score_file(_dataset(tmp_path), hyp)
    assert scores["segments"] == 3
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="ja-mecab").score, abs=1e-4)


def test_score_file_reads_results_jsonl_by_id(tmp_path):
    hyp = tmp_path / "run.jsonl"
    hyp.write_text("".join(json.dumps({"id": str(i + 1), "hypothesis": h}, ensure_ascii=False) + "\n"
                           for i, h in enumerate(HYPS)))
    assert score_file(_dataset(tmp_path), hyp)["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score,
                                                                         abs=1e-4)


def test_score_file_rejects_misaligned_files(tmp_path):
    hyp = tmp_path / "short.txt"
    hyp.write_text("only one line\n")
    with pytest.raises(FusemtError, match="one line per dataset row"):
        score_file(_dataset(tmp_path), hyp)
