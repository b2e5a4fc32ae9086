"""``fusemt-compat``: UniTE's determine-then-ensemble check over a list of models on a dev slice.

    fusemt-compat models=gemma3_qwen05                      # one pair
    fusemt-compat models=pair 'models.members=[gemma3_270m,qwen25_coder_05b,qwen25_coder_15b]'   # every pair

Each model translates the dev slice greedily (its results are kept in compat.out_dir, so a rerun
reuses them); the rules and measures are in ``eval/compat.py``. Writes compat.json and compat.md,
prints the verdicts, logs them to W&B. Exit code 0 whatever the verdicts (they are findings).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from decoding.base import typed_config
from decoding.errors import FusemtError, fail
from decoding.methods import decoder_class
from decoding.model import load_model
from decoding.prompt import PromptConfig
from eval.compat import (
    CompatRules,
    ModelProfile,
    agreement_rate,
    fertility,
    judge,
    length_ratio,
    verdict_table,
    verdict_text,
    write_report,
)
from eval.jsonio import read_jsonl_objects
from eval.metrics import corpus_scores, script_shares
from eval.wandb_logger import LoggerConfig, RunLogger
from runners.cli import run_cli
from runners.config import CONF_DIR, resolve_member
from runners.data import DatasetConfig, load_segments

log = logging.getLogger("fusemt")


@dataclass
class CompatConfig:
    rules: CompatRules = field(default_factory=CompatRules)
    agreement_segments: int = 10  # reference prefixes scored for next-character agreement (the first n segments)
    max_new_tokens: int = 96
    batch_size: int = 8
    out_dir: str = "results/compat"


def _typed(cfg: DictConfig):
    members = [resolve_member(m) for m in cfg.models.members]
    if len(members) < 2:
        raise FusemtError("fusemt-compat compares models: give two or more, e.g. models=gemma3_qwen05")
    compat = typed_config(CompatConfig, OmegaConf.to_container(cfg.compat, resolve=True), "compat")
    if compat.rules.metric not in ("chrf", "bleu"):
        raise FusemtError(f"compat.rules.metric={compat.rules.metric}: use chrf or bleu")
    if compat.agreement_segments < 0 or compat.batch_size < 1 or compat.max_new_tokens < 1:
        raise FusemtError("compat.agreement_segments >= 0, compat.batch_size >= 1 and compat.max_new_tokens >= 1 "
                          "are needed")
    dataset = typed_config(DatasetConfig, OmegaConf.to_container(cfg.dataset, resolve=True), "dataset")
    prompt = typed_config(PromptConfig, OmegaConf.to_container(cfg.prompt, resolve=True), "prompt")
    logger = typed_config(LoggerConfig, OmegaConf.to_container(cfg.logger, resolve=True), "logger")
    return members, compat, dataset, prompt, logger


def _translations(model, segments, prompt, compat: CompatConfig, path: Path) -> list[str]:
    """The model's greedy outputs, reused from ``path`` when it holds every segment of this slice."""
    if path.exists():
        done = {r["id"]: r["hypothesis"]
                for r in read_jsonl_objects(path, "delete it to decode again", ("id", "hypothesis"))}
        if all(s.id in done for s in segments):
            return [done[s.id] for s in segments]
    greedy = decoder_class("greedy")
    decoder = greedy(typed_config(greedy.Config, {"name": "greedy", "max_new_tokens": compat.max_new_tokens}, "greedy"),
                     [model], prompt)
    hyps = []
    for i in range(0, len(segments), compat.batch_size):
        hyps += [out.text for out in decoder.decode([s.source for s in segments[i : i + compat.batch_size]])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": s.id, "hypothesis": h}, ensure_ascii=False) + "\n"
                            for s, h in zip(segments, hyps)), encoding="utf-8")
    return hyps


def _profile(model, segments, hyps: list[str]) -> ModelProfile:
    from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

    mecab = TokenizerJaMecab()
    refs = [s.reference for s in segments]

    def tokenize(text: str) -> list[int]:
        return model.tokenizer.encode(text, add_special_tokens=False)

    en = fertility(tokenize, [s.source for s in segments], str.split)
    ja = fertility(tokenize, refs, lambda t: mecab(t).split())
    scores = corpus_scores(hyps, refs)
    return ModelProfile(name=model.name, scores={"bleu": scores["bleu"], "chrf": scores["chrf"]},
                        length_ratio=length_ratio(hyps, refs),
                        fertility={**{f"en_{k}": v for k, v in en.items()}, **{f"ja_{k}": v for k, v in ja.items()}},
                        **script_shares(hyps))


def _next_char_tops(models, segments, prompt, compat: CompatConfig) -> list[list[list]]:
    """Per model: its argmax next character at each reference position (teacher-forced; charwise's
    character probabilities with its default cover beam)."""
    charwise = decoder_class("charwise")
    cfg = typed_config(charwise.Config, {"name": "charwise", "fast_path": False, "max_new_tokens": 10_000}, "charwise")
    chosen = segments[: compat.agreement_segments]
    per_seq: list[list[list]] = []
    for i in range(0, len(chosen), compat.batch_size):
        batch = chosen[i : i + compat.batch_size]
        per_seq += charwise(cfg, models, prompt).reference_argmax([s.source for s in batch],
                                                                  [s.reference for s in batch])
    # per_seq[seq][pos][member] -> per member: [seq][pos]
    return [[[tops[m] for tops in seq] for seq in per_seq] for m in range(len(models))]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="compat")
def _main(cfg: DictConfig) -> None:
    try:
        specs, compat, dataset, prompt, logger_cfg = _typed(cfg)
        segments = [s for s in load_segments(dataset) if s.reference]
        if not segments:
            raise FusemtError(f"dataset '{dataset.name}' has no references: the check needs a slice with references")
        out_dir = Path(compat.out_dir).expanduser() / dataset.name
        models = [load_model(spec) for spec in specs]
        profiles = []
        for model in models:
            # The file name holds what the outputs depend on, so a changed prompt or spec decodes again.
            key = hashlib.sha256(json.dumps([model.spec.__dict__, prompt.__dict__, compat.max_new_tokens],
                                            sort_keys=True, default=str).encode()).hexdigest()[:8]
            hyps = _translations(model, segments, prompt, compat, out_dir / "greedy" / f"{model.name}__{key}.jsonl")
            profiles.append(_profile(model, segments, hyps))
            log.info("%s: %s", model.name, profiles[-1].scores)
        tops = _next_char_tops(models, segments, prompt, compat) if compat.agreement_segments else None
        verdicts = [judge(profiles[i], profiles[j], agreement_rate(tops[i], tops[j]) if tops else None, compat.rules,
                          len(segments)) for i, j in itertools.combinations(range(len(models)), 2)]
    except FusemtError as err:
        fail(err)
    selection = Path(dataset.ids_file).name if dataset.ids_file else (dataset.path or dataset.hub_id or "bundled")
    about = (f"{len(segments)} segments of {dataset.name} ({selection}); "
             f"greedy, prompt={HydraConfig.get().runtime.choices.get('prompt')}; next-character agreement "
             f"on the references of the first {min(compat.agreement_segments, len(segments))} segments.")
    json_path, md_path = write_report(out_dir, profiles, verdicts, compat.rules, about)
    for v in verdicts:
        print(f"{' + '.join(v.models)}: {verdict_text(v)} (on {len(segments)} segments) — {'; '.join(v.reasons)}")
    print(f"written: {md_path}, {json_path}")
    run_logger = RunLogger(logger_cfg, f"compat__{'+'.join(p.name for p in profiles)}__{dataset.name}",
                           {"models": [p.name for p in profiles], "rules": compat.rules.__dict__,
                            "dataset": dataset.name},
                           out_dir)
    run_logger.log_review(tables={"compat": verdict_table(verdicts)}, pages={})
    run_logger.finish()


def main() -> None:
    run_cli(_main, config_name="compat", build=_typed)


if __name__ == "__main__":
    main()
