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

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from decoding.base import current_options
from decoding.errors import FusemtError, fail, os_error
from decoding.methods import decoder_class
from decoding.model import load_model
from decoding.prefix import PromptCache
from decoding.prompt import prompt_text
from eval.comet_score import comet_scores
from eval.jsonio import write_atomically
from eval.metrics import RunningScores, corpus_scores, pool_metrics, script_shares
from eval.trace import render_html
from eval.wandb_logger import RunLogger, run_id
from runners.candidates import load_run_candidates
from runners.cli import run_cli, sigterm_as_interrupt, stop_exit_code, stop_reason
from runners.config import CONF_DIR, RunConfig, build_run_config
from runners.data import Segment, dataset_location, dataset_segments, load_records, load_segments
from runners.provenance import provenance
from runners.results import ResultsFile, check_rows_match
from runners.sweep import job_context, record_failure, record_job

log = logging.getLogger("fusemt")


def summarize_stats(method: str, rows: list[dict]) -> dict:
    """The method's per-segment stats over the run, each field combined as its record declares
    (``decoding/stats.py``: mean, sum, constant, per-model sum)."""
    return decoder_class(method).Stats.summarize([row["stats"] for row in rows if row.get("stats")])


def run_metrics(run: RunConfig, rows: list[dict], selected_ids: list[str]) -> tuple[dict, dict[str, float] | None]:
    """Metrics over exactly ``rows`` (every finished segment of the results file), with how complete
    they are against the selection; and the segment COMET scores by id when COMET ran."""
    scored = [r for r in rows if r.get("reference") is not None]
    done = {r["id"] for r in rows}
    missing = [i for i in selected_ids if i not in done]
    metrics: dict = {"run_name": run.run_name, "method": run.decoding_name, "models": [m.label for m in run.models],
                     "dataset": run.dataset.name, "segments": len(scored), "selected_segments": len(selected_ids),
                     "missing_segments": len(missing), "complete": not missing}
    if scored:
        metrics.update(corpus_scores([r["hypothesis"] for r in scored], [r["reference"] for r in scored],
                                     bleu=run.metrics.get("bleu", True), chrf=run.metrics.get("chrf", True)))
    metrics.update(script_shares([r["hypothesis"] for r in rows]))
    metrics["comet"], comet_segments = None, None
    if not run.metrics.get("comet"):
        metrics["comet_skipped"] = "metrics.comet=false"
    elif scored:
        result = comet_scores([r["source"] for r in scored], [r["hypothesis"] for r in scored],
                              [r["reference"] for r in scored], run.metrics["comet_model"],
                              run.metrics["comet_batch_size"])
        metrics["comet_model"] = result.model
        if result.skipped:
            metrics["comet_skipped"] = result.skipped
        else:
            metrics["comet"] = result.system
            comet_segments = {r["id"]: score for r, score in zip(scored, result.segments)}
    total_time = sum(r.get("time_s") or 0 for r in rows)  # a hand-written row may lack the timings
    metrics["n_new_tokens"] = sum(r.get("n_new_tokens") or 0 for r in rows)
    metrics["tokens_per_s"] = round(metrics["n_new_tokens"] / total_time, 3) if total_time > 0 else None
    metrics.update(summarize_stats(run.decoding_name, rows))
    metrics.update(pool_metrics(rows))
    return metrics, comet_segments


def segment_row(run: RunConfig, seg: Segment, hypothesis: str, n_new_tokens: int, time_s: float, trace: list,
                stats: dict, warnings: list[str], pool: list[dict] | None = None) -> dict:
    row = {"id": seg.id, "source": seg.source, "reference": seg.reference, "domain": seg.domain,
           "hypothesis": hypothesis, "method": run.decoding_name, "models": [m.label for m in run.models],
           "n_new_tokens": n_new_tokens,
           "time_s": round(time_s, 4), "warnings": warnings, "stats": stats, "trace": trace}
    if pool is not None:
        row["pool"] = pool
    return row


def translate(run: RunConfig, sweep_group: str | None = None) -> dict:
    """Run one configuration end to end; returns the metrics written next to the JSONL."""
    random.seed(run.seed)
    torch.manual_seed(run.seed)
    records = load_records(run.dataset)
    segments = load_segments(run.dataset, records)
    # Completeness is judged against the whole selection: every shard of a run shares one results file.
    selected = segments if not run.dataset.shard else load_segments(replace(run.dataset, shard=None), records)
    results = ResultsFile(run.results_path, run.fingerprint)
    check_rows_match(results.rows, dataset_segments(run.dataset, records), run.results_path,
                     f"dataset '{run.dataset.name}' ({dataset_location(run.dataset)})")
    todo = [s for s in segments if s.id not in results.done_ids]
    log.info("%s: %d segments, %d already done, writing %s", run.run_name, len(segments), len(segments) - len(todo),
             run.results_path)
    runs = getattr(run.decoding, "runs", None)  # finished outputs a method chooses among: checked before models load
    method_inputs = {"external": load_run_candidates(runs, run.dataset, todo, run.results_dir)} if runs and todo else {}
    sweep = run.logger.group or sweep_group  # the W&B group: one per multirun sweep unless logger.group is set
    # An invocation that decodes nothing new (a finished run rerun) adds nothing to its W&B run.
    logger = open_run_logger(run, sweep) if todo and run.logger.name != "none" else None
    try:
        if todo or run.render_input_text:
            models = [load_model(spec) for spec in run.models]
            for model in models:
                model.prompt_cache = PromptCache(model) if run.prompt_cache else None
        if run.render_input_text:
            _print_prompts(models, segments, run)
        if todo:
            decoder = decoder_class(run.decoding_name)(run.decoding, models, run.prompt, **method_inputs)
            decoder.trace = run.trace
            _decode_all(run, decoder, todo, results, logger)
        results.close()
        # Inside the try: a failure or a signal while scoring and writing still closes the W&B run.
        return write_run_files(run, results, [s.id for s in selected], sweep, logger)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (a scheduler's time limit or pre-emption)
        results.close()  # releases this run's claims: a requeued job resumes them at once
        if logger:
            logger.finish(exit_code=stop_exit_code(stop))
        # Counted in the file: the signal may have come between writing a row and noting it.
        print(f"fusemt: {stop_reason(stop)}: {len(results.snapshot())} finished segments are kept in "
              f"{run.results_path}; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(stop_exit_code(stop)) from None
    except BaseException:
        if logger:
            logger.finish(exit_code=1)
        raise


def open_run_logger(run: RunConfig, sweep: str | None) -> RunLogger:
    """The run's W&B run, started before the models load: its id comes from the run's identity, so
    a resumed or sharded run continues it; method and models are its job type and tags."""
    return RunLogger(replace(run.logger, group=sweep), run.run_name,
                     config={**_config_of(run), "provenance": provenance(run)}, out_dir=run.results_path.parent,
                     run_id=run_id(run.run_name, run.fingerprint), job_type=run.decoding_name,
                     tags=(run.decoding_name, *(m.label for m in run.models)))


def write_run_files(run: RunConfig, results: ResultsFile, selected_ids: list[str], sweep: str | None,
                    logger: RunLogger | None = None) -> dict:
    """Metrics, segment COMET and trace page over every finished segment of the results file.

    Shards and concurrent runs share the file: each computes from a snapshot and writes only if
    nothing was appended meanwhile, so the last writer's files describe the union.
    """
    rows = results.snapshot()
    metrics, comet_segments = run_metrics(run, rows, selected_ids)
    metrics["sweep"] = sweep
    metrics["config"] = _config_of(run)
    metrics["provenance"] = provenance(run)
    metrics_path = run.results_path.with_suffix(".metrics.json")
    trace_path = run.results_path.with_suffix(".trace.html")
    comet_path = run.results_path.with_suffix(".comet.jsonl")
    with results.exclusive() as now:
        if len(now) == len(rows):
            write_atomically(metrics_path, json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
            write_atomically(trace_path, render_html(rows, metrics, run.run_name, segment_comet=comet_segments))
            if comet_segments is not None:
                write_atomically(comet_path, "".join(json.dumps({"id": sid, "comet": score}) + "\n"
                                                      for sid, score in comet_segments.items()))
            else:  # scores of an earlier state of the file would describe other segments
                comet_path.unlink(missing_ok=True)
        else:
            log.info("another process added segments meanwhile: it writes the run's metrics")
    done = ("complete" if metrics["complete"]
            else f"{metrics['missing_segments']} of {metrics['selected_segments']} missing")
    log.info("metrics (%s): %s", done, {k: metrics[k] for k in ("segments", "bleu", "chrf", "comet", "tokens_per_s")
                                       if k in metrics})
    if metrics.get("comet_skipped") and run.metrics.get("comet"):
        log.warning("COMET skipped: %s", metrics["comet_skipped"])
    log.info("traces: %s", trace_path)
    if logger:
        logger.log_results(metrics, rows, [run.results_path, metrics_path, trace_path, comet_path],
                           segment_comet=comet_segments)
        logger.finish()
    return metrics


def _print_prompts(models, segments: list[Segment], run: RunConfig) -> None:
    for model in models:
        for seg in segments:
            print(f"----- prompt for {model.name}, segment {seg.id} -----\n"
                  f"{prompt_text(model.tokenizer, seg.source, run.prompt)}\n-----", flush=True)


def _decode_all(run: RunConfig, decoder, todo: list[Segment], results: ResultsFile, logger: RunLogger | None) -> None:
    """Decode batch by batch; each batch is claimed first, so concurrent runs never decode a segment twice.
    After each batch, W&B history gets segments done, tokens/s and the running corpus BLEU/chrF."""
    by_id = {s.id: s for s in todo}
    n_tokens, elapsed = 0, 0.0
    running = RunningScores()
    if logger:
        scored = [r for r in results.rows if r.get("reference") is not None]
        running.add([r["hypothesis"] for r in scored], [r["reference"] for r in scored])
    # The first batch is one segment: the bar's first rate and ETA come after one segment, not a whole batch.
    batch_size = 1
    with tqdm(total=len(todo), desc=run.decoding_name, unit="seg", dynamic_ncols=True) as bar:  # closed on Ctrl-C too
        while batch_ids := results.claim(list(by_id), batch_size):
            batch_size = run.batch_size
            batch = [by_id.pop(i) for i in batch_ids]
            # An empty source has nothing to translate: record it with a warning instead of decoding.
            for seg in (s for s in batch if not s.source.strip()):
                results.append(segment_row(run, seg, "", 0, 0.0, [], {}, ["empty source: nothing to translate"]))
            live = [s for s in batch if s.source.strip()]
            if live:
                t0 = time.perf_counter()
                outputs = decoder.decode([s.source for s in live], segments=live)
                dt = time.perf_counter() - t0
                for seg, out in zip(live, outputs):
                    results.append(segment_row(run, seg, out.text, out.n_new_tokens, dt / len(live), out.trace,
                                               out.stats, out.warnings, out.pool))
                    n_tokens += out.n_new_tokens
                elapsed += dt
                bar.set_postfix(tok_s=f"{n_tokens / elapsed:.1f}")
                if logger:
                    scored = [(out.text, seg.reference) for seg, out in zip(live, outputs) if seg.reference is not None]
                    running.add([h for h, _ in scored], [r for _, r in scored])
            bar.update(len(batch))
            if logger:
                logger.log_progress(len(results.done_ids), {"segments_done": len(results.done_ids),
                                                            "tokens_per_s": n_tokens / elapsed if elapsed else 0.0,
                                                            **running.scores()})
    if by_id:
        log.info("%d segments are being decoded by another process: it will write them", len(by_id))


def _config_of(run: RunConfig) -> dict:
    """The run's resolved config, JSON-safe: what the report and W&B compare runs by."""
    return json.loads(json.dumps({"method": run.decoding_name, "decoding": current_options(run.decoding),
                                  "models": [m.__dict__ for m in run.models], "dataset": run.dataset.__dict__,
                                  "prompt": run.prompt.__dict__, "batch_size": run.batch_size, "seed": run.seed},
                                 default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o)))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="translate")
def _main(cfg: DictConfig) -> None:
    with job_context() as job:
        try:
            run = build_run_config(cfg)
            with sigterm_as_interrupt():
                metrics = translate(job.place_on_devices(run), sweep_group=job.sweep_group)
            if job.multirun:
                record_job(job, run.results_path, metrics)
        except (FusemtError, OSError) as err:
            err = os_error(err) if isinstance(err, OSError) else err
            if not job.multirun:
                fail(err)
            record_failure(job, err)
        except Exception as err:  # noqa: BLE001 - in a sweep, one broken job must not end the others
            if not job.multirun:
                raise
            log.exception("job %s failed", job.num)
            record_failure(job, err)


def main() -> None:
    run_cli(_main, config_name="translate")


if __name__ == "__main__":
    main()
