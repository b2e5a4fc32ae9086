"""``fusemt``: translate a dataset with one decoding method, write traced JSONL, score, log.

    fusemt                                   # embedded default: Gemma 3 270M few-shot greedy
    fusemt models=gemma3_smollm2 decoding=unite dataset.limit=10
    fusemt -m decoding=greedy,beam           # Hydra multirun
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from decoding.base import decoder_class
from decoding.errors import FusemtError
from decoding.model import load_model
from eval.comet_score import comet_scores
from eval.metrics import corpus_scores
from eval.trace import render_html
from eval.wandb_logger import RunLogger
from runners.config import CONF_DIR, RunConfig, build_run_config, register_schemas
from runners.data import Segment, load_segments
from runners.results import ResultsFile

log = logging.getLogger("fusemt")


def summarize_stats(rows: list[dict]) -> dict:
    """Per-segment method stats over the run: numbers averaged, per-model counts summed."""
    means: dict[str, list[float]] = {}
    sums: dict[str, dict[str, float]] = {}
    for row in rows:
        for key, value in (row.get("stats") or {}).items():
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, (int, float)):
                means.setdefault(key, []).append(float(value))
            elif isinstance(value, dict):
                bucket = sums.setdefault(key, {})
                for sub, v in value.items():
                    bucket[sub] = bucket.get(sub, 0) + v
    out: dict = {k: round(sum(v) / len(v), 4) for k, v in means.items()}
    out.update(sums)
    return out


def run_metrics(run: RunConfig, rows: list[dict]) -> dict:
    scored = [r for r in rows if r.get("reference") is not None]
    metrics: dict = {"run_name": run.run_name, "method": run.decoding_name, "models": [m.label for m in run.models],
                     "dataset": run.dataset.name}
    if scored:
        metrics.update(corpus_scores([r["hypothesis"] for r in scored], [r["reference"] for r in scored],
                                     bleu=run.metrics.get("bleu", True), chrf=run.metrics.get("chrf", True)))
    else:
        metrics["segments"] = 0
    metrics["comet"] = None
    if scored and run.metrics.get("comet"):
        result = comet_scores([r["source"] for r in scored], [r["hypothesis"] for r in scored],
                              [r["reference"] for r in scored], run.metrics["comet_model"], run.metrics["comet_batch_size"])
        if result is not None:
            metrics["comet"], metrics["comet_model"] = result.system, result.model
            comet_path = run.results_path.with_suffix(".comet.jsonl")
            comet_path.write_text("".join(json.dumps({"id": r["id"], "comet": score}) + "\n"
                                          for r, score in zip(scored, result.segments)))
    total_time = sum(r["time_s"] for r in rows)
    metrics["n_new_tokens"] = sum(r["n_new_tokens"] for r in rows)
    metrics["tokens_per_s"] = round(metrics["n_new_tokens"] / total_time, 3) if total_time > 0 else None
    metrics.update(summarize_stats(rows))
    return metrics


def segment_row(run: RunConfig, seg: Segment, hypothesis: str, n_new_tokens: int, time_s: float, trace: list,
                stats: dict, warnings: list[str]) -> dict:
    return {"id": seg.id, "source": seg.source, "reference": seg.reference, "hypothesis": hypothesis,
            "method": run.decoding_name, "models": [m.label for m in run.models], "n_new_tokens": n_new_tokens,
            "time_s": round(time_s, 4), "warnings": warnings, "stats": stats, "trace": trace}


def translate(run: RunConfig, sweep_group: str | None = None) -> dict:
    """Run one configuration end to end; returns the metrics written next to the JSONL."""
    random.seed(run.seed)
    torch.manual_seed(run.seed)
    segments = load_segments(run.dataset)
    results = ResultsFile(run.results_path, run.fingerprint)
    todo = [s for s in segments if s.id not in results.done_ids]
    log.info("%s: %d segments, %d already done, writing %s", run.run_name, len(segments), len(segments) - len(todo),
             run.results_path)
    logger_cfg = replace(run.logger, group=run.logger.group or sweep_group)
    logger = RunLogger(logger_cfg, run.run_name, config=_loggable(run), out_dir=run.results_path.parent)
    try:
        if todo:
            models = [load_model(spec) for spec in run.models]
            decoder = decoder_class(run.decoding_name)(run.decoding, models, run.prompt, run.render_input_text)
            _decode_all(run, decoder, todo, results)
    finally:
        results.close()
    wanted = {s.id for s in segments}
    rows = [r for r in results.rows if r["id"] in wanted]
    metrics = run_metrics(run, rows)
    metrics["sweep"] = logger_cfg.group  # the W&B group: one per multirun sweep unless logger.group is set
    metrics_path = run.results_path.with_suffix(".metrics.json")
    metrics_path.write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    trace_path = run.results_path.with_suffix(".trace.html")
    trace_path.write_text(render_html(rows, metrics, run.run_name), encoding="utf-8")
    log.info("metrics: %s", {k: metrics[k] for k in ("segments", "bleu", "chrf", "comet", "tokens_per_s") if k in metrics})
    log.info("traces: %s", trace_path)
    logger.log_results(metrics, rows, [run.results_path, metrics_path, trace_path,
                                       run.results_path.with_suffix(".comet.jsonl")])
    logger.finish()
    return metrics


def _decode_all(run: RunConfig, decoder, todo: list[Segment], results: ResultsFile) -> None:
    bar = tqdm(total=len(todo), desc=run.decoding_name, unit="seg", dynamic_ncols=True)
    n_tokens, elapsed = 0, 0.0
    for start in range(0, len(todo), run.batch_size):
        batch = todo[start : start + run.batch_size]
        # An empty source has nothing to translate: record it with a warning instead of decoding.
        for seg in (s for s in batch if not s.source.strip()):
            results.append(segment_row(run, seg, "", 0, 0.0, [], {}, ["empty source: nothing to translate"]))
        live = [s for s in batch if s.source.strip()]
        if not live:
            bar.update(len(batch))
            continue
        t0 = time.perf_counter()
        outputs = decoder.decode([s.source for s in live])
        dt = time.perf_counter() - t0
        for seg, out in zip(live, outputs):
            results.append(segment_row(run, seg, out.text, out.n_new_tokens, dt / len(live), out.trace, out.stats,
                                       out.warnings))
            n_tokens += out.n_new_tokens
        elapsed += dt
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{n_tokens / elapsed:.1f}")
    bar.close()


def _loggable(run: RunConfig) -> dict:
    return json.loads(json.dumps({"method": run.decoding_name, "decoding": run.decoding.__dict__,
                                  "models": [m.__dict__ for m in run.models], "dataset": run.dataset.__dict__,
                                  "prompt": run.prompt.__dict__, "batch_size": run.batch_size, "seed": run.seed},
                                 default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o)))


def _sweep_group() -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir).as_posix().replace("/", "_").strip("_")
    return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="translate")
def _main(cfg: DictConfig) -> None:
    try:
        translate(build_run_config(cfg), sweep_group=_sweep_group())
    except FusemtError as err:
        print(f"fusemt: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_schemas()
    _main()


if __name__ == "__main__":
    main()
