import json
import subprocess
import sys

import pytest
from conftest import ROOT

from decoding.errors import FusemtError
from runners.results import ResultsFile


def test_resume_after_interrupted_write(tmp_path):
    path = tmp_path / "run.jsonl"
    results = ResultsFile(path, "abc")
    results.append({"id": "1", "hypothesis": "一"})
    results.append({"id": "2", "hypothesis": "二"})
    results.close()
    with path.open("ab") as fh:  # a process killed halfway through writing line 3
        fh.write('{"id": "3", "hypo'.encode())
    resumed = ResultsFile(path, "abc")
    assert resumed.done_ids == {"1", "2"}
    resumed.append({"id": "3", "hypothesis": "三"})
    resumed.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2", "3"]  # none lost, none duplicated, no broken line


def test_resume_refuses_results_of_another_config(tmp_path):
    path = tmp_path / "run.jsonl"
    ResultsFile(path, "abc").append({"id": "1", "hypothesis": "一"})
    with pytest.raises(FusemtError, match="run_name"):
        ResultsFile(path, "other")


def test_rows_are_validated_one_line_each(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_bytes(b'{"id": "1", "hypothesis": "\xff"}\n')
    with pytest.raises(FusemtError, match=r"run.jsonl:1 is not UTF-8 text"):
        ResultsFile(path, "abc")
    path.write_text('["not", "a", "row"]\n')
    with pytest.raises(FusemtError, match=r"run.jsonl:1 holds an array, not a JSON object"):
        ResultsFile(path, "abc")


def test_file_is_created_with_its_first_result(tmp_path):
    path = tmp_path / "run.jsonl"
    results = ResultsFile(path, "abc")
    assert not path.exists()  # a run that fails before finishing anything leaves no empty file
    results.append({"id": "1", "hypothesis": "一"})
    assert path.exists()


def test_append_skips_a_segment_another_writer_finished(tmp_path):
    path = tmp_path / "run.jsonl"
    first, second = ResultsFile(path, "abc"), ResultsFile(path, "abc")
    assert first.append({"id": "1", "hypothesis": "a"})
    assert not second.append({"id": "1", "hypothesis": "b"})
    assert [json.loads(line)["hypothesis"] for line in path.read_text().splitlines()] == ["a"]
    assert second.done_ids == {"1"}


def test_claims_split_work_and_die_with_their_owner(tmp_path):
    path = tmp_path / "run.jsonl"
    ids = [str(i) for i in range(6)]
    # Another live process claims the first batch: this one must take the next segments.
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from runners.results import ResultsFile; "
              f"r = ResultsFile(__import__('pathlib').Path({str(path)!r}), 'abc'); "
              f"print(r.claim({ids!r}, 2), flush=True); "
              "time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "['0', '1']"
        mine = ResultsFile(path, "abc")
        assert mine.claim(ids, 2) == ["2", "3"]
    finally:
        other.kill()
        other.wait()
    # Its process is gone, so its claims are void: a rerun picks those segments up.
    assert ResultsFile(path, "abc").claim(ids, 10) == ["0", "1", "4", "5"]


WORKER = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from runners.results import ResultsFile
results = ResultsFile(Path({path!r}), "abc")
ids = [str(i) for i in range(40)]
while batch := results.claim(ids, 3):
    for sid in batch:
        time.sleep(0.01)  # "decoding"
        results.append({{"id": sid, "hypothesis": "", "by": {who!r}}})
results.close()
"""


def test_two_real_processes_on_one_file_write_every_segment_once(tmp_path):
    path = tmp_path / "run.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER.format(root=str(ROOT), path=str(path), who=who)])
             for who in ("a", "b")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(int(r["id"]) for r in rows) == list(range(40))  # each once
    assert {r["by"] for r in rows} == {"a", "b"}  # and the work was shared


def test_options_added_later_keep_finished_runs_named_while_at_their_default():
    """A run's fingerprint leaves out later options at their default (the behaviour from before they
    existed), so adding one does not rename every finished run; set, they name a run of their own."""
    from conftest import compose_run

    from decoding.base import fingerprint_values
    from decoding.methods.unite import UniteDecoder

    base = compose_run("models=gemma3_smollm2", "decoding=unite").fingerprint
    assert compose_run("models=gemma3_smollm2", "decoding=unite", "decoding.speculate=0",
                       "decoding.num_beams=1").fingerprint == base
    assert compose_run("models=gemma3_smollm2", "decoding=unite", "decoding.speculate=4").fingerprint != base
    assert compose_run("models=gemma3_smollm2", "decoding=unite", "decoding.num_beams=4").fingerprint != base
    values = {"top_k": 10, "speculate": 0, "num_beams": 4, "alternate": False}
    assert fingerprint_values(UniteDecoder.Config, values) == {"top_k": 10, "num_beams": 4}
