import json

import pytest

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
