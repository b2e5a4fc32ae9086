"""Score any hypothesis file against a dataset.

    fusemt-score dataset=wmt24_en_ja dataset.path=../shared/data/wmt24_en_ja/wmt24_en_ja.jsonl \
        hyp_file=../shared/data/wmt24_en_ja/systems/GPT-4.txt

``hyp_file`` is either plain text with one line per dataset *row* (WMT submissions: canary line
included), aligned before rows are filtered, or a fusemt results JSONL (matched by segment id).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from decoding.base import typed_config
from decoding.errors import FusemtError, fail
from eval.comet_score import comet_scores
from eval.jsonio import read_jsonl_objects
from eval.metrics import corpus_scores
from runners.cli import run_cli
from runners.config import CONF_DIR
from runners.data import DatasetConfig, load_records, load_segments


def read_results_rows(path: Path) -> dict[str, dict]:
    """A results JSONL's rows by segment id, each row checked (id, a text hypothesis)."""
    rows = read_jsonl_objects(path, "pass a fusemt results JSONL or a plain text file with one hypothesis per line",
                              required=("id", "hypothesis"), segment=True)
    by_id: dict[str, dict] = {}
    for row in rows:
        if row["id"] in by_id:  # which of the two was meant cannot be told: refuse rather than pick one
            raise FusemtError(f"{path} has segment id '{row['id']}' twice: keep one line per segment")
        by_id[row["id"]] = row
    return by_id


def read_hypotheses(hyp_file: Path) -> tuple[dict[int, str] | None, dict[str, str] | None]:
    """(by row, by id): plain text gives rows, a results JSONL gives ids."""
    if not hyp_file.exists():
        raise FusemtError(f"hypothesis file {hyp_file} not found: check hyp_file=")
    if hyp_file.suffix == ".jsonl":
        return None, {sid: row["hypothesis"] for sid, row in read_results_rows(hyp_file).items()}
    try:
        lines = hyp_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise FusemtError(f"{hyp_file} is not UTF-8 text (byte {err.start}): re-encode it as UTF-8") from None
    return dict(enumerate(lines)), None


def score_file(dataset: DatasetConfig, hyp_file: Path, bleu: bool = True, chrf: bool = True,
               comet_model: str | None = None, comet_batch_size: int = 16) -> dict:
    from dataclasses import replace

    # Alignment is by row of the whole file: select segments without limit first, then apply it.
    records = load_records(dataset)
    segments = load_segments(replace(dataset, limit=None), records)
    by_row, by_id = read_hypotheses(hyp_file)
    if by_row is not None:
        if len(by_row) != len(records):
            raise FusemtError(f"{hyp_file} has {len(by_row)} lines but the dataset file has {len(records)} rows: "
                              "expected exactly one line per dataset row (canary included, no header)")
        pairs = [(by_row[s.row], s.reference, s.source) for s in segments]
    else:
        missing = [s.id for s in segments if s.id not in by_id]
        segments = [s for s in segments if s.id in by_id]
        if not segments:
            raise FusemtError(f"{hyp_file} has no segment id of dataset '{dataset.name}'")
        pairs = [(by_id[s.id], s.reference, s.source) for s in segments]
        if missing:
            print(f"note: {len(missing)} dataset segments have no hypothesis in {hyp_file} and are not scored",
                  file=sys.stderr)
    if dataset.limit is not None:
        pairs = pairs[: dataset.limit]
    hyps, refs, sources = (list(column) for column in zip(*pairs))
    scores = {"hyp_file": str(hyp_file), **corpus_scores(hyps, refs, bleu=bleu, chrf=chrf)}
    if comet_model:
        result = comet_scores(sources, hyps, refs, comet_model, comet_batch_size)
        scores["comet"] = result.system
        if result.skipped:
            scores["comet_skipped"] = result.skipped
    return scores


def _typed_dataset(cfg: DictConfig) -> DatasetConfig:
    return typed_config(DatasetConfig, OmegaConf.to_container(cfg.dataset, resolve=True), "dataset")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="score")
def _main(cfg: DictConfig) -> None:
    try:
        if not cfg.hyp_file:
            raise FusemtError("hyp_file is required: fusemt-score dataset=... hyp_file=<file>")
        scores = score_file(_typed_dataset(cfg), Path(cfg.hyp_file).expanduser(), bleu=cfg.metrics.bleu,
                            chrf=cfg.metrics.chrf, comet_model=cfg.metrics.comet_model if cfg.metrics.comet else None,
                            comet_batch_size=cfg.metrics.comet_batch_size)
    except FusemtError as err:
        fail(err)
    print(json.dumps(scores, ensure_ascii=False, indent=2))


def main() -> None:
    run_cli(_main, config_name="score", build=_typed_dataset)


if __name__ == "__main__":
    main()
