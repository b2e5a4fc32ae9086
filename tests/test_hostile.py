"""A careless or unlucky user (issue 22): the file system, hand-edited or foreign files, odd values,
what was decoded, signals. Every case is one line ``fusemt: error: ...`` and exit code 2 with no
traceback, or a run that goes on and is right.

Entry points run in this process (as from the command line: ``sys.argv``, ``main()``), so that the
table stays fast; no case here loads a model except the SIGTERM test (a tiny local model in a real
process) and the sampling tests (the tiny random pair).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, build_decoder, compose_run

FOUR = [{"id": f"s{i}", "source": src, "reference": ref} for i, (src, ref) in enumerate([
    ("Good night.", "おやすみなさい。"), ("Thank you.", "ありがとう。"), ("See you tomorrow.", "また明日。"),
    ("It is cold today.", "今日は寒いです。")])]


# --- running an entry point ----------------------------------------------------------------------
def base(tmp: Path) -> list[str]:
    return [f"paths.results_dir={tmp}/results", f"paths.output_dir={tmp}/outputs", "logger=none", "metrics.comet=false"]


def run_entry(module: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """(exit code, stderr) of ``python -m <module> <argv>``, run in this process."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    capsys.readouterr()
    code = 0
    try:
        importlib.import_module(module).main()
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err


def one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert len([line for line in lines if line.startswith("fusemt:")]) == 1, err[-2000:]
    return next(line for line in lines if line.startswith("fusemt: error: "))


@pytest.fixture
def no_model_loads(monkeypatch):
    """Cases that must fail (or finish) before a model loads: loading one fails the test."""
    import runners.translate

    def refuse(spec):
        raise AssertionError(f"model {spec.label} loaded")

    monkeypatch.setattr(runners.translate, "load_model", refuse)


# --- files the cases use -------------------------------------------------------------------------
def dataset(tmp: Path, rows=FOUR) -> list[str]:
    path = tmp / "four.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return [f"dataset.path={path}", "dataset.name=four"]


def results_row(segment: dict, **changes) -> dict:
    row = {**segment, "hypothesis": "訳", "method": "greedy", "n_new_tokens": 2, "time_s": 0.1, "warnings": [],
           "stats": {}, "trace": []}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not ...}


def write_results(tmp: Path, overrides: list[str], rows: list[dict]) -> Path:
    """A results file, under the run name and fingerprint the command ``overrides`` has."""
    run = compose_run(*overrides)
    run.results_path.parent.mkdir(parents=True, exist_ok=True)
    run.results_path.write_text("".join(json.dumps({**r, "config_hash": run.fingerprint}, ensure_ascii=False) + "\n"
                                        for r in rows), encoding="utf-8")
    return run.results_path


def hand_edited(tmp: Path, rows, dataset_rows=FOUR, limit=4) -> list[str]:
    over = [*base(tmp), *dataset(tmp), f"dataset.limit={limit}"]
    write_results(tmp, over, rows)
    if dataset_rows is not FOUR:
        dataset(tmp, dataset_rows)
    return over


def write_json(tmp: Path, name: str, content) -> str:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return str(path)


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


EDITED = [{**FOUR[0], "source": "Good evening."}, *FOUR[1:]]
PAIR = ["models=gemma3_smollm2", "decoding=unite"]
TRANSLATE, SCORE, REPORT, COMPARE = "runners.translate", "runners.score", "eval.report", "eval.compare"

# (case, (entry point, arguments) built from tmp_path, a fragment of the one line)
CASES = [
    # values that must fail at start-up, before any model loads
    ("batch-size-fraction", lambda t: (TRANSLATE, [*base(t), "batch_size=1.5"]), "batch_size=1.5: must be at least 1"),
    ("interpolation-in-prompt", lambda t: (TRANSLATE, [*base(t), "prompt.system=${nope}"]), "cannot resolve prompt"),
    ("plain-template-unknown-key",
     lambda t: (TRANSLATE, [*base(t), "prompt.plain_template='{src_lang}: {source} {oops}'"]),
     "prompt.plain_template uses {oops}"),
    ("plain-template-without-source", lambda t: (TRANSLATE, [*base(t), "prompt.plain_template='{src_lang}:'"]),
     "prompt.plain_template has no {source}"),
    ("instruction-without-source", lambda t: (TRANSLATE, [*base(t), "prompt.instruction=Translate."]),
     "prompt.instruction has no {source}"),
    ("member-folder-without-model", lambda t: (TRANSLATE, [*base(t), f"models.members=[{t}]"]), "holds no model"),
    ("weights-nan", lambda t: (TRANSLATE, [*base(t), *PAIR, "decoding.weights=[nan,1]"]),
     "finite non-negative weights"),
    ("weights-inf", lambda t: (TRANSLATE, [*base(t), *PAIR, "decoding.weights=[inf,1]"]),
     "finite non-negative weights"),
    ("second-seed", lambda t: (TRANSLATE, [*base(t), *PAIR, "decoding.seed=5"]), "pass seed=5 instead"),
    ("run-name-with-slash", lambda t: (TRANSLATE, [*base(t), "run_name=sub/run"]), "is not a plain file name"),
    ("run-name-dotdot", lambda t: (TRANSLATE, [*base(t), "run_name=.."]), "is not a plain file name"),
    ("run-name-absolute", lambda t: (TRANSLATE, [*base(t), f"run_name={t}/elsewhere"]), "is not a plain file name"),
    ("run-name-300-chars", lambda t: (TRANSLATE, [*base(t), "run_name=" + "r" * 300]), "run_name is 300 bytes"),
    ("hydra-output-folder-unwritable",
     lambda t: (TRANSLATE, [f"paths.output_dir={write_json(t, 'f', '')}/x", "logger=none"]),
     "Not a directory"),
    # hand-edited or foreign results files
    ("row-without-hypothesis", lambda t: (TRANSLATE, hand_edited(t, [results_row(FOUR[0], hypothesis=...)])),
     ".jsonl:1: 'hypothesis' is missing, not text"),
    ("row-hypothesis-null",
     lambda t: (TRANSLATE, hand_edited(t, [results_row(FOUR[0]), results_row(FOUR[1], hypothesis=None)])),
     ".jsonl:2: 'hypothesis' is null, not text"),
    ("row-id-not-in-dataset", lambda t: (TRANSLATE, hand_edited(t, [results_row({**FOUR[0], "id": "s9"})])),
     "holds segment 's9', which dataset 'four'"),
    ("dataset-edited-in-place", lambda t: (TRANSLATE, hand_edited(t, [results_row(FOUR[0])], dataset_rows=EDITED)),
     "segment 's0' has another source in dataset 'four'"),
    ("score-duplicate-ids",
     lambda t: (SCORE, ["dataset=sample_en_ja", "metrics.comet=false",
                        f"hyp_file={write_json(t, 'h.jsonl', jsonl([{'id': 'sample-000', 'hypothesis': 'a'}, {'id': 'sample-000', 'hypothesis': 'b'}]))}"]),  # noqa: E501
     "has segment id 'sample-000' twice"),
    ("score-null-hypothesis",
     lambda t: (SCORE, ["dataset=sample_en_ja", "metrics.comet=false",
                        f"hyp_file={write_json(t, 'h.jsonl', jsonl([{'id': 'sample-000', 'hypothesis': None}]))}"]),
     "h.jsonl:1: 'hypothesis' is null"),
    ("score-numeric-hypothesis",
     lambda t: (SCORE, ["dataset=sample_en_ja", "metrics.comet=false",
                        f"hyp_file={write_json(t, 'h.jsonl', jsonl([{'id': 'sample-000', 'hypothesis': 3}]))}"]),
     "h.jsonl:1: 'hypothesis' is a number"),
    ("compare-different-files-one-name", lambda t: (COMPARE, [
        write_json(t, "a/run.jsonl", jsonl([{**FOUR[0], "hypothesis": "x"}])),
        write_json(t, "b/run.jsonl", jsonl([{**EDITED[0], "hypothesis": "x"}]))]),
     "segment 's0' has another source in"),
    ("report-bleu-text",
     lambda t: (REPORT, [str(Path(write_json(t, "rep/a.metrics.json", {"run_name": "a", "bleu": "high"})).parent)]),
     "'bleu' is \"high\", not a number or null"),
    ("report-empty-metrics", lambda t: (REPORT, [str(Path(write_json(t, "rep/a.metrics.json", {})).parent)]),
     "a.metrics.json has no 'run_name'"),
]


@pytest.mark.parametrize("case, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_gives_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, no_model_loads, case, fragment):
    monkeypatch.chdir(tmp_path)
    module, argv = case(tmp_path)
    line = one_error_line(*run_entry(module, argv, capsys, monkeypatch))
    assert fragment in line, line


def test_an_id_edited_to_a_number_is_still_that_segment(tmp_path, monkeypatch, capsys, no_model_loads):
    """"1" -> 1 by hand: the segment is done, not decoded again and stored twice."""
    monkeypatch.chdir(tmp_path)
    numbered = [{**seg, "id": str(n + 1)} for n, seg in enumerate(FOUR[:2])]
    over = [*base(tmp_path), *dataset(tmp_path, numbered)]
    path = write_results(tmp_path, over, [results_row({**numbered[0], "id": 1}), results_row(numbered[1])])
    code, err = run_entry(TRANSLATE, over, capsys, monkeypatch)
    assert code in (0, None), err[-2000:]
    assert len(path.read_text().splitlines()) == 2
    metrics = json.loads(path.with_suffix(".metrics.json").read_text())
    assert (metrics["segments"], metrics["selected_segments"], metrics["complete"]) == (2, 2, True)


def test_report_table_keeps_its_shape_with_a_pipe_or_newline_in_an_option(tmp_path):
    from eval.report import Report, find_runs

    for name, system in (("a", "Be | terse"), ("b", "Line one\nline two")):
        write_json(tmp_path, f"{name}.metrics.json",
                   {"run_name": name, "method": "greedy", "models": ["m"], "bleu": 1.0,
                    "config": {"decoding": {"name": "greedy"}, "prompt": {"system": system}}})
    table = [line for line in Report.build(find_runs(tmp_path)).to_markdown().splitlines() if line.startswith("|")]
    assert len(table) == 4 and len({line.replace("\\|", "").count("|") for line in table}) == 1, table
    assert any("Be \\| terse" in line for line in table) and any("Line one line two" in line for line in table)


# --- the file system -----------------------------------------------------------------------------
@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` read-only, also for root (for whom permission bits do not stop writes): a read-only
    bind mount when running as root, else the permission bits; skipped only when neither works."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only folder as root here: {mounted.stderr.decode().strip()}")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_read_only_results_folder(tmp_path, monkeypatch, capsys, no_model_loads):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    over = [*base(tmp_path), *dataset(tmp_path)]
    with read_only(tmp_path / "results"):
        line = one_error_line(*run_entry(TRANSLATE, over, capsys, monkeypatch))
    assert f"{tmp_path}/results" in line and ("Read-only file system" in line or "Permission denied" in line), line


def test_read_only_existing_results_file_lock_sidecar(tmp_path, monkeypatch, capsys, no_model_loads):
    monkeypatch.chdir(tmp_path)
    over = hand_edited(tmp_path, [results_row(FOUR[0])])
    path = compose_run(*over).results_path
    before = path.read_bytes()
    with read_only(path.parent):
        line = one_error_line(*run_entry(TRANSLATE, over, capsys, monkeypatch))
    assert f".{path.name}.lock" in line and ("Read-only file system" in line or "Permission denied" in line), line
    assert path.read_bytes() == before


def _full_disk_for(monkeypatch, suffix: str):
    """Writes of files whose name ends in ``suffix`` fail as on a full disk, after writing half."""
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name.endswith(suffix):
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("target", [".metrics.json", ".trace.html"])
def test_full_disk_writing_metrics_or_trace_page(tmp_path, monkeypatch, capsys, no_model_loads, target):
    """One line naming the file, no temporary file left, nothing finished lost, the old page kept."""
    monkeypatch.chdir(tmp_path)
    over = hand_edited(tmp_path, [results_row(seg) for seg in FOUR])
    path = compose_run(*over).results_path
    before = path.read_bytes()
    old_page = path.with_suffix(target)
    old_page.write_text("the page of the last run")
    _full_disk_for(monkeypatch, f"{target}.{os.getpid()}.tmp")  # metrics first: for the page, they go through
    line = one_error_line(*run_entry(TRANSLATE, over, capsys, monkeypatch))
    assert str(old_page) in line and "No space left on device" in line, line
    assert path.read_bytes() == before and old_page.read_text() == "the page of the last run"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_full_disk_writing_the_report(tmp_path, monkeypatch, capsys):
    write_json(tmp_path, "a.metrics.json", {"run_name": "a", "method": "greedy", "models": ["m"], "bleu": 1.0})
    _full_disk_for(monkeypatch, ".tmp")
    line = one_error_line(*run_entry(REPORT, [str(tmp_path)], capsys, monkeypatch))
    assert "report.md" in line and "No space left on device" in line, line
    assert not list(tmp_path.glob(".*.tmp"))


def test_full_disk_appending_a_row_keeps_every_finished_row(tmp_path, monkeypatch):
    from decoding.errors import FusemtError
    from runners.results import ResultsFile

    results = ResultsFile(tmp_path / "r.jsonl", "abc")
    results.append(results_row(FOUR[0]))
    before = results.path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(FusemtError, match=f"{results.path}: No space left on device: free disk space"):
        results.append(results_row(FOUR[1]))
    monkeypatch.setattr(os, "write", real_write)
    assert results.path.read_bytes() == before  # the partial line is cut off
    assert ResultsFile(results.path, "abc").done_ids == {"s0"}
    results.append(results_row(FOUR[1]))
    assert ResultsFile(results.path, "abc").done_ids == {"s0", "s1"}
    results.close()


def test_full_disk_on_a_real_tiny_file_system(tmp_path):
    """The same on a 64 KiB tmpfs filled up (root only; skipped where it cannot be mounted)."""
    from decoding.errors import FusemtError
    from runners.results import ResultsFile

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        results = ResultsFile(disk / "r.jsonl", "abc")
        results.append(results_row(FOUR[0]))
        before = results.path.read_bytes()
        with contextlib.suppress(OSError):
            (disk / "filler").write_bytes(b"x" * 128 * 1024)
        with pytest.raises(FusemtError, match="No space left on device"):
            results.append(results_row(FOUR[1], hypothesis="訳" * 20000))
        assert results.path.read_bytes() == before
        results.close()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --- identity of what was decoded ----------------------------------------------------------------
# Fingerprints computed before the one-seed change: committed runs of deterministic configs resume
# into the same files.
DETERMINISTIC_FINGERPRINTS = {(): "7d6898dfaea7", ("decoding=beam",): "0b765b96139b",
                              ("models=pair", "decoding=unite"): "b7c48cae5aa3",
                              ("models=pair", "decoding=tokenwise"): "1f8f66a9b8b4",
                              ("models=pair", "decoding=charwise"): "09d60ff85c5e",
                              ("models=pair", "decoding=speculative"): "9603cf867214", ("seed=7",): "1db1ac9ad656",
                              ("models=pair", "decoding=unite", "seed=7"): "8b4d668c9fb9"}


@pytest.mark.parametrize("overrides", list(DETERMINISTIC_FINGERPRINTS), ids=" ".join)
def test_deterministic_runs_keep_their_fingerprints(overrides):
    assert compose_run(*overrides).fingerprint == DETERMINISTIC_FINGERPRINTS[overrides]


def test_committed_runs_resume_into_their_own_files():
    """Every committed run on the bundled sample, rebuilt from the overrides it recorded, gets its run
    name back (whose last part is its fingerprint); runs whose models are not installed here are left
    out (and runs on other data: their dataset path depends on where the checkout lives)."""
    from decoding.errors import FusemtError

    checked = 0
    for path in sorted((ROOT / "experiments").glob("*/runs/sample/*.metrics.json")):
        metrics = json.loads(path.read_text())
        try:
            run = compose_run(*metrics["provenance"]["overrides"])
        except FusemtError:  # a model package not installed (make models)
            continue
        assert run.run_name == metrics["run_name"], path
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("method", ["unite", "charwise", "speculative"])
def test_one_seed_seeds_the_sampler_and_names_the_run(method):
    sampling = ["models=pair", f"decoding={method}", "decoding.temperature=0.7"]
    seed0, seed7 = compose_run(*sampling), compose_run(*sampling, "seed=7")
    assert (seed0.decoding.seed, seed7.decoding.seed) == (0, 7)
    assert seed0.fingerprint != seed7.fingerprint and seed0.run_name != seed7.run_name
    assert compose_run(*sampling, "batch_size=1").fingerprint == seed0.fingerprint  # batching changes no sample


SOURCES = ["The weather is nice today.", "Good morning.", "今日は天気がいいです。", "ルールを守る",
           "東京に新しいオフィス", "メールを送ってください。", "コーヒーを一杯お願いします。", "English: Japanese:"]


@pytest.mark.parametrize("method", ["unite", "tokenwise", "charwise", "speculative"])
def test_samples_depend_on_the_seed_not_on_batching(tiny_pair, method):
    options = {"temperature": 1.5, "max_new_tokens": 6}

    def sample(seed: int, batch_size: int) -> list[str]:
        decoder = build_decoder(method, tiny_pair, seed=seed, **options)
        return [out.text for i in range(0, len(SOURCES), batch_size)
                for out in decoder.decode(SOURCES[i:i + batch_size])]

    batched = sample(3, 8)
    assert sample(3, 1) == batched
    assert sample(3, 8) == batched
    assert sample(4, 8) != batched


# --- slow failures -------------------------------------------------------------------------------
def test_offline_hub_dataset_fails_within_seconds(monkeypatch):
    import datasets  # noqa: F401 - imported before the clock starts: the decision is timed, not the import

    from decoding import hub
    from decoding.errors import FusemtError
    from runners.data import DatasetConfig, load_segments

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "unavailable_reason",
                        lambda: "the hub (https://huggingface.co) did not answer within 0.8 s")
    start = time.perf_counter()
    with pytest.raises(FusemtError, match="did not answer.*dataset.path="):
        load_segments(DatasetConfig(name="x", hub_id="google/wmt24pp-not-cached-here", hub_config="en-ja_JP"))
    assert time.perf_counter() - start < 5


# --- signals -------------------------------------------------------------------------------------
def _default_signals() -> None:
    # A shell's background job ignores SIGINT, and its children inherit that: give the child defaults.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_sigterm_keeps_finished_segments_releases_claims_and_exits_143(tmp_path):
    """What a scheduler sends at a time limit: one line, finished segments kept, the claims of the
    stopped run released (a requeued run starts on them at once), exit code 143."""
    from tiny_models import tiny_llama

    model = tiny_llama()
    model.model.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    many = [{"id": f"s{i}", "source": f"Good morning {i}.", "reference": "おはよう。"} for i in range(200)]
    over = [*base(tmp_path), *dataset(tmp_path, many), f"models.members=[{tmp_path / 'tiny'}]", "batch_size=1",
            "decoding.max_new_tokens=40", "decoding.min_new_tokens=40", "prompt.examples=[]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", TRANSLATE, *over], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    folder = tmp_path / "results" / "sample" / "ensemble"
    deadline = time.time() + 300
    while not any(p.suffix == ".jsonl" and p.stat().st_size for p in folder.glob("*.jsonl")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fusemt:")]
    assert len(lines) == 1 and lines[0].startswith("fusemt: terminated (SIGTERM): "), err[-2000:]
    path = next(folder.glob("*.jsonl"))
    kept = path.read_text().splitlines()
    assert 1 <= len(kept) < len(many) and f"{len(kept)} finished segments are kept in {path}" in lines[0]
    assert not list((folder / f".{path.name}.owners").iterdir())  # no live claim left behind
