"""Every user mistake the CLI can meet: one line on stderr naming the problem, exit code 2, no traceback.

Each case runs the real command in a subprocess; all of them fail before any model loads.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

SAMPLE = json.dumps({"id": "a", "source": "Good night.", "reference": "おやすみなさい。"})


def write(tmp_path, name: str, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def wmt24pp_row(**fields):
    row = {"lp": "en-ja_JP", "domain": "news", "document_id": "d", "segment_id": 1, "is_bad_source": False,
           "source": "Hello.", "target": "こんにちは。", "original_target": "こんにちは。"}
    row.update(fields)
    return json.dumps({k: v for k, v in row.items() if v is not ...})


def results_with_bad_byte(tmp_path):
    """A results file (under the default run name of the command below) with a non-UTF-8 byte."""
    folder = tmp_path / "results" / "sample" / "ensemble"
    folder.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    from conftest import compose_run

    name = compose_run("dataset.limit=1").run_name
    (folder / f"{name}.jsonl").write_bytes(b'{"id": "sample-000", "hypothesis": "\xe3\x81"}\n')
    return ["dataset.limit=1"]


def metrics_folder_with_corrupt_file(tmp_path):
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "good.metrics.json").write_text(json.dumps({"run_name": "good", "method": "greedy", "models": ["m"],
                                                          "dataset": "d", "bleu": 1.0}))
    (folder / "bad.metrics.json").write_text('{"run_name": "bad", ')
    return str(folder)


FUSEMT = ["-m", "runners.translate"]
SCORE = ["-m", "runners.score"]

# (case id, entry point + arguments built from tmp_path, expected fragment of the one-line message)
CASES = [
    ("unknown-model", lambda t: FUSEMT + ["models.members=[no_such_model]"], "unknown model 'no_such_model'"),
    ("dataset-missing", lambda t: FUSEMT + ["dataset.path=/missing/data.jsonl"], "not found"),
    ("batch-size-0", lambda t: FUSEMT + ["batch_size=0"], "batch_size=0: must be at least 1"),
    ("dataset-not-utf8",
     lambda t: FUSEMT + [f"dataset.path={write(t, 'd.jsonl', SAMPLE.encode()[:-2] + bytes([0xff]) + b'}')}"],
     "is not UTF-8 text"),
    ("dataset-line-array", lambda t: FUSEMT + [f"dataset.path={write(t, 'd.jsonl', '[1, 2]')}"],
     "holds an array, not a JSON object"),
    ("dataset-line-string", lambda t: FUSEMT + [f"dataset.path={write(t, 'd.jsonl', json.dumps('text'))}"],
     "holds a string, not a JSON object"),
    ("wmt24pp-no-source", lambda t: FUSEMT + [f"dataset.path={write(t, 'd.jsonl', wmt24pp_row(source=...))}"],
     "'source' is missing"),
    ("wmt24pp-source-null", lambda t: FUSEMT + [f"dataset.path={write(t, 'd.jsonl', wmt24pp_row(source=None))}"],
     "'source' is null"),
    ("wmt24pp-source-number", lambda t: FUSEMT + [f"dataset.path={write(t, 'd.jsonl', wmt24pp_row(source=3))}"],
     "'source' is int"),
    ("duplicate-ids", lambda t: FUSEMT + [f"dataset.path={write(t, 'd.jsonl', SAMPLE + chr(10) + SAMPLE)}"],
     "segment id 'a' appears on lines 1 and 2"),
    ("limit-negative", lambda t: FUSEMT + ["dataset.limit=-1"], "dataset.limit=-1: must be a positive"),
    ("unite-top-k-0", lambda t: FUSEMT + ["models=gemma3_smollm2", "decoding=unite", "decoding.top_k=0"], "top_k"),
    ("tokenwise-top-k-0", lambda t: FUSEMT + ["models=gemma3_smollm2", "decoding=tokenwise", "decoding.top_k=0"],
     "top_k"),
    ("greedy-max-new-tokens-0", lambda t: FUSEMT + ["decoding.max_new_tokens=0"], "max_new_tokens"),
    ("unite-max-new-tokens-0", lambda t: FUSEMT + ["models=gemma3_smollm2", "decoding=unite",
                                                   "decoding.max_new_tokens=0"], "max_new_tokens"),
    ("charwise-rule", lambda t: FUSEMT + ["models=gemma3_smollm2", "decoding=charwise", "decoding.rule=median"],
     "decoding.rule=median: use one of"),
    ("repeat-limit-negative", lambda t: FUSEMT + ["models=gemma3_smollm2", "decoding=tokenwise",
                                                  "decoding.max_repeats=-1"], "decoding.max_repeats=-1"),
    ("weights-count", lambda t: FUSEMT + ["models=gemma3_smollm2", "decoding=unite", "decoding.weights=[1,2,3]"],
     "weights"),
    ("num-draft-tokens-0", lambda t: FUSEMT + ["models=gemma3_smollm2", "decoding=speculative",
                                               "decoding.num_draft_tokens=0"], "num_draft_tokens"),
    ("resume-not-utf8", lambda t: FUSEMT + results_with_bad_byte(t), "is not UTF-8 text"),
    ("misspelt-key", lambda t: FUSEMT + ["decoding.num_beemz=3"], "unknown key 'decoding.num_beemz': decoding has"),
    ("misspelt-group", lambda t: FUSEMT + ["decodin=greedy"], "unknown key 'decodin': the config has"),
    ("unknown-option", lambda t: FUSEMT + ["decoding=nonexistent"],
     "unknown option decoding=nonexistent: choose one of"),
    ("bad-type", lambda t: FUSEMT + ["decoding.max_new_tokens=lots"], "bad value for 'decoding.max_new_tokens'"),
    ("unknown-key-in-sweep", lambda t: FUSEMT + ["-m", "decoding=greedy,beam", "decoding.num_beams=2"],
     "unknown key 'decoding.num_beams'"),
    ("score-corrupt-jsonl", lambda t: SCORE + ["dataset=sample_en_ja",
                                               f"hyp_file={write(t, 'h.jsonl', '{' + chr(10))}"],
     "h.jsonl:1 is not valid JSON"),
    ("score-line-count", lambda t: SCORE + ["dataset=sample_en_ja",
                                            f"hyp_file={write(t, 'h.txt', 'header' + chr(10) * 43)}"],
     "has 43 lines but the dataset file has 42 rows"),
    ("report-corrupt-metrics", lambda t: ["-m", "eval.report", metrics_folder_with_corrupt_file(t)],
     "bad.metrics.json"),
    ("trace-corrupt-jsonl",
     lambda t: ["-m", "eval.trace", write(t, "r.jsonl", json.dumps({"id": "1", "source": "a", "hypothesis": "b"})
                                                        + chr(10) + "[1]" + chr(10))],
     "r.jsonl:2"),
]


@pytest.mark.parametrize("args, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, args, fragment):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    argv = args(tmp_path)
    if argv[:2] == FUSEMT:
        argv += [f"paths.results_dir={tmp_path}/results", f"paths.output_dir={tmp_path}/outputs", "logger=none"]
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("fusemt: error: "), proc.stderr[-2000:]
    assert fragment in lines[0]
