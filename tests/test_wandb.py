"""W&B logging: artifact names W&B accepts for every run name, the per-segment table, and a real
offline run whose transaction log holds the artifact, the summary and the table."""

import json
import re
import struct

import pytest
import sacrebleu

from eval.metrics import segment_scores
from eval.wandb_logger import ARTIFACT_NAME_MAX, LoggerConfig, RunLogger, SegmentTable, artifact_name

ENSEMBLE_RUN = "unite__gemma3_270m+smollm2_135m__sample_en_ja"
ROWS = [
    {"id": "s1", "source": "The weather is nice today.", "reference": "今日は天気が良いです。",
     "hypothesis": "今日は天気がいいです。", "n_new_tokens": 9, "time_s": 0.8, "warnings": [],
     "stats": {"agreement_rate": 0.5, "forward_passes": {"gemma3_270m": 9, "smollm2_135m": 11}}},
    {"id": "s2", "source": "Where is the station?", "reference": "駅はどこですか？", "hypothesis": "駅",
     "n_new_tokens": 2, "time_s": 0.3, "warnings": ["prompt truncated", "stopped at max_new_tokens"],
     "stats": {"agreement_rate": 1.0, "accepted": [1, 2]}},
    {"id": "s3", "source": "No reference here.", "reference": None, "hypothesis": "参照なし",
     "n_new_tokens": 4, "time_s": 0.5, "warnings": [], "stats": {}},
]


@pytest.mark.parametrize("run_name", [
    ENSEMBLE_RUN, "run=a,b c/d:e", "ユナイト__gemma", "x" * 300, "unite__a.b-c_d",
])
def test_artifact_names_are_accepted_by_wandb(run_name):
    import wandb

    name = artifact_name(run_name)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", name) and len(name) <= ARTIFACT_NAME_MAX
    wandb.Artifact(name=name, type="results")  # wandb's own check, the one that refused '+'


def test_artifact_names_stay_readable_and_distinct():
    assert artifact_name("unite__a.b-c_d") == "results-unite__a.b-c_d"  # valid names are kept as they are
    assert artifact_name(ENSEMBLE_RUN).startswith("results-unite__gemma3_270m-smollm2_135m__sample_en_ja-")
    assert artifact_name("unite__a+b__d") != artifact_name("unite__a-b__d")
    assert artifact_name("x" * 300 + "1") != artifact_name("x" * 300 + "2")


def test_segment_scores_are_sacrebleu_sentence_scores():
    hyps, refs = [r["hypothesis"] for r in ROWS[:2]], [r["reference"] for r in ROWS[:2]]
    scores = segment_scores(hyps, refs)
    for hyp, ref, bleu, chrf in zip(hyps, refs, scores.bleu, scores.chrf):
        direct = sacrebleu.sentence_bleu(hyp, [ref], tokenize="ja-mecab", use_effective_order=True).score
        assert bleu == pytest.approx(direct, abs=1e-4)
        assert chrf == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score, abs=1e-4)
    # one-character hypothesis: effective order keeps its BLEU above zero (no 4-gram to match)
    assert scores.bleu[1] > 0
    assert "tok:ja-mecab" in scores.bleu_signature and "eff:yes" in scores.bleu_signature
    assert segment_scores([], []).bleu_signature is None


def test_segment_table_has_scores_tokens_time_warnings_and_flat_stats():
    table = SegmentTable.build(ROWS, segment_comet={"s1": 0.81, "s2": 0.42})
    assert table.columns == ["id", "source", "reference", "hypothesis", "bleu", "chrf", "comet", "n_new_tokens",
                             "time_s", "warnings", "stats.accepted", "stats.agreement_rate",
                             "stats.forward_passes.gemma3_270m", "stats.forward_passes.smollm2_135m"]
    rows = [dict(zip(table.columns, cells)) for cells in table.data]
    assert all(len(cells) == len(table.columns) for cells in table.data)
    assert rows[0]["comet"] == 0.81 and rows[2]["comet"] is None
    assert rows[0]["bleu"] == segment_scores([ROWS[0]["hypothesis"]], [ROWS[0]["reference"]]).bleu[0]
    assert rows[2]["bleu"] is None and rows[2]["chrf"] is None  # no reference, no sentence score
    assert rows[1]["warnings"] == "prompt truncated; stopped at max_new_tokens"
    assert rows[0]["stats.forward_passes.smollm2_135m"] == 11 and rows[1]["stats.forward_passes.gemma3_270m"] is None
    assert rows[1]["stats.accepted"] == "[1, 2]"
    assert rows[1]["n_new_tokens"] == 2 and rows[1]["time_s"] == 0.3
    assert "comet" not in SegmentTable.build(ROWS).columns  # no COMET scores, no column
    assert set(table.signatures) == {"segment_bleu_signature", "segment_chrf_signature"}


def wandb_records(run_file):
    """The protobuf records of an offline run's ``run-<id>.wandb`` (LevelDB log format: 32 KiB
    blocks of chunks with a 7-byte header crc32/length/type, after a 7-byte file header).
    wandb 0.31 ships no Python reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_offline_run_of_a_two_model_config_logs_its_artifact(tmp_path):
    jsonl = tmp_path / f"{ENSEMBLE_RUN}.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    metrics = {"run_name": ENSEMBLE_RUN, "segments": 3, "bleu": 20.5, "bleu_signature": "nrefs:1|tok:ja-mecab",
               "chrf": 30.1, "chrf_signature": "nrefs:1|nc:6", "comet": None,
               "comet_skipped": "'Unbabel/wmt22-comet-da' is not in the HF cache and HF_HUB_OFFLINE=1 is set"}
    metrics_path = jsonl.with_suffix(".metrics.json")
    metrics_path.write_text(json.dumps(metrics))
    trace = jsonl.with_suffix(".trace.html")
    trace.write_text("<html><body>trace</body></html>")
    logger = RunLogger(LoggerConfig(mode="offline"), ENSEMBLE_RUN, config={"method": "unite"}, out_dir=tmp_path)
    assert logger.run is not None
    logger.log_results(metrics, ROWS, [jsonl, metrics_path, trace, jsonl.with_suffix(".comet.jsonl")])
    logger.finish()

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    artifacts = {r.artifact.name: r.artifact for r in records if r.WhichOneof("record_type") == "artifact"}
    assert artifact_name(ENSEMBLE_RUN) in artifacts
    logged = artifacts[artifact_name(ENSEMBLE_RUN)]
    assert {entry.path for entry in logged.manifest.contents} == {jsonl.name, metrics_path.name, trace.name}
    assert json.loads(logged.metadata)["run_name"] == ENSEMBLE_RUN

    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update({u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in record.summary.update})
    assert summary["comet"] is None and summary["comet_skipped"] == metrics["comet_skipped"]
    assert summary["bleu_signature"] == metrics["bleu_signature"] and "eff:yes" in summary["segment_bleu_signature"]

    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/media/table/segments_*.table.json")
    table = json.loads(table_file.read_text(encoding="utf-8"))
    assert {"bleu", "chrf", "n_new_tokens", "time_s", "warnings", "stats.agreement_rate"} <= set(table["columns"])
    assert len(table["data"]) == 3


def _history(run_file) -> list[dict]:
    return [{item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]


def _run_record(run_file):
    return next(r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run")


def test_interrupted_and_resumed_run_is_one_wandb_run_with_history_from_both_parts(tmp_path, monkeypatch):
    """A real offline W&B run through ``translate`` (tiny model): the run is started before decoding,
    logs a history point per batch, is interrupted after its first two batches and resumed; both
    invocations write the same run id, the second continuing the steps; a third invocation, which
    decodes nothing new, starts no W&B run."""
    from conftest import compose_run
    from tiny_models import tiny_gemma3

    import runners.translate as translate_module
    from eval.wandb_logger import run_id

    run = compose_run("dataset.limit=5", "batch_size=2", "decoding.max_new_tokens=3", "metrics.comet=false",
                      "logger=wandb", f"paths.results_dir={tmp_path}")
    monkeypatch.setattr(translate_module, "load_model", lambda spec: tiny_gemma3())
    real_class, calls = translate_module.decoder_class, []

    def interrupting_class(name):
        class Interrupting(real_class(name)):
            def decode(self, sources, segments=None):
                calls.append(len(sources))
                if len(calls) == 3 and interrupt:
                    raise KeyboardInterrupt
                return super().decode(sources, segments)
        return Interrupting

    monkeypatch.setattr(translate_module, "decoder_class", interrupting_class)
    interrupt = True
    with pytest.raises(SystemExit) as stopped:
        translate_module.translate(run)
    assert stopped.value.code == 130
    interrupt = False
    translate_module.translate(run)
    # each invocation's first batch is one segment, then batch_size; the interrupted batch's segments again
    assert calls == [1, 2, 2, 1, 1]
    translate_module.translate(run)  # nothing new: no third W&B run

    run_files = sorted(run.results_path.parent.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    records = [_run_record(f) for f in run_files]
    assert {r.run_id for r in records} == {run_id(run.run_name, run.fingerprint)}
    assert records[0].job_type == "greedy" and {"greedy", "gemma3_270m"} <= set(records[0].tags)
    first, second = ([h for h in _history(f) if "segments_done" in h] for f in run_files)
    assert [h["segments_done"] for h in first] == [1, 3]  # the interrupted part: two batches
    assert [h["segments_done"] for h in second] == [4, 5] and [h["_step"] for h in second] == [4, 5]
    assert all("tokens_per_s" in h and "bleu" in h and "chrf" in h for h in first + second)
    summary = {}
    for record in wandb_records(run_files[1]):
        if record.WhichOneof("record_type") == "summary":
            summary.update({u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in record.summary.update})
    assert summary["segments"] == 5 and "config" not in summary and "provenance" not in summary


def test_unreachable_wandb_server_with_a_key_logs_offline_within_seconds(tmp_path, monkeypatch):
    """An API key but no server: the run decides at once (not wandb's 90 s init timeout) and logs offline."""
    import time

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.invalid")  # RFC 2606: never resolves
    start = time.perf_counter()
    logger = RunLogger(LoggerConfig(), ENSEMBLE_RUN, config={}, out_dir=tmp_path)
    assert time.perf_counter() - start < 30
    assert logger.run is not None and logger.run.settings.mode == "offline"
    logger.finish()
    assert list(tmp_path.glob("wandb/offline-run-*"))


def test_shards_and_selections_of_one_run_share_its_wandb_id_other_configs_do_not():
    from conftest import compose_run

    from eval.wandb_logger import run_id

    def identity(*overrides):
        run = compose_run(*overrides)
        return run_id(run.run_name, run.fingerprint)

    base = identity()
    assert identity("dataset.shard=0/2") == identity("dataset.shard=1/2") == identity("dataset.limit=3") == base
    assert identity("batch_size=2") == base  # batching does not change what is decoded
    assert identity("decoding=beam") != base and identity("run_name=mine") != base
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]{8}", base)  # W&B ids: no / \\ # ? % :
