"""Typed views of the composed Hydra config: every section is checked at start-up."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from decoding.base import Decoder, fingerprint_values, typed_config
from decoding.errors import FusemtError
from decoding.methods import DECODERS, decoder_class, method_names
from decoding.model import ModelSpec, cache_root
from decoding.packaged import check_available
from eval.wandb_logger import LoggerConfig
from runners.data import DatasetConfig
from decoding.prompt import PromptConfig

log = logging.getLogger("fusemt")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# One file per model, read by resolve_member; kept outside conf/ so that Hydra does not offer it as a group.
MODEL_CATALOG = CONF_DIR.parent / "catalog"
# Dataset fields that say which text is translated (the selection — limit/shard/domains — does not).
DATASET_IDENTITY = ("name", "path", "hub_id", "hub_config", "split", "reference_field")


@dataclass
class ModelsConfig:
    members: list[Any] = field(default_factory=list)


@dataclass
class MetricsConfig:
    bleu: bool = True
    chrf: bool = True
    comet: bool = True
    comet_model: str = "Unbabel/wmt22-comet-da"  # hub id, or a local .../checkpoints/model.ckpt
    comet_batch_size: int = 16


@dataclass
class DebugConfig:
    render_input_text: bool = False


def register_schemas() -> None:
    """Structured-config schemas for every group: a bad override fails when Hydra composes.

    They are stored at the root as ``schema_<group>[_<method>]`` and pulled into each group option
    with ``/schema_...@_here_``, so they never show up as options of a group (``--help``, tab
    completion, error lists) and cannot be selected by mistake.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, node in (("dataset", DatasetConfig), ("prompt", PromptConfig), ("logger", LoggerConfig),
                        ("metrics", MetricsConfig), ("models", ModelsConfig), ("debug", DebugConfig)):
        store.store(name=f"schema_{group}", node=node)
    for name, cls in DECODERS.items():
        store.store(name=f"schema_decoding_{name}", node=cls.Config)


def model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CATALOG.glob("*.yaml"))


def resolve_member(member) -> ModelSpec:
    """A models.members entry: a catalog name (catalog/<name>.yaml), a hub id, a local dir, or a dict.

    A dict with ``name`` of a catalog entry overrides that entry's fields, e.g.
    ``{name: gemma3_270m, dtype: bf16}``.
    """
    if isinstance(member, (DictConfig, dict)):
        values = OmegaConf.to_container(member) if isinstance(member, DictConfig) else dict(member)
    else:
        values = {"name": str(member)}
    name = values.get("name", "")
    catalog = MODEL_CATALOG / f"{name}.yaml"
    if catalog.exists():
        values = {**OmegaConf.to_container(OmegaConf.load(catalog)), **values}
    elif not {"path", "package", "chunks"} & values.keys():
        if "/" in name or Path(name).expanduser().exists():  # hub id or local directory
            values = {"name": name.rstrip("/").rsplit("/", 1)[-1], "path": name}
        else:
            raise FusemtError(f"unknown model '{name}': use one of {', '.join(model_names())}, a hub id (org/name) or a local dir")
    return typed_config(ModelSpec, values, f"model '{name}'")


@dataclass
class RunConfig:
    """Everything a run needs, typed."""

    models: list[ModelSpec]
    decoding_name: str
    decoding: Decoder.Config  # the method's own Config subclass
    dataset: DatasetConfig
    prompt: PromptConfig
    logger: LoggerConfig
    metrics: dict[str, Any]  # MetricsConfig's fields
    run_name: str
    batch_size: int
    prompt_cache: bool  # reuse the shared prompt prefix's KV cache (decoding.prefix): same outputs, faster
    seed: int
    results_dir: Path
    render_input_text: bool
    fingerprint: str

    @property
    def results_path(self) -> Path:
        return self.results_dir / self.dataset.results_group / "ensemble" / f"{self.run_name}.jsonl"


def build_run_config(cfg: DictConfig) -> RunConfig:
    members = cfg.models.members
    if not isinstance(members, ListConfig) or len(members) == 0:
        raise FusemtError("models.members must be a non-empty list, e.g. models.members=[gemma3_270m,smollm2_135m]")
    models = [resolve_member(m) for m in members]
    for spec in models:  # a model whose packages are missing fails now, not after the others loaded
        if spec.chunks is not None:
            check_available(spec.chunks, spec.label, cache_root())
    decoding_values = OmegaConf.to_container(cfg.decoding, resolve=True)
    method = decoding_values.get("name")
    if not method:
        raise FusemtError(f"decoding.name is missing: choose decoding={'|'.join(method_names())}")
    method_cls = decoder_class(method)
    decoding = typed_config(method_cls.Config, decoding_values, f"decoding={method}")
    if method_cls.max_models is not None and len(models) > method_cls.max_models:
        # Lets one sweep run single-model baselines on a pair config: they decode with the first member(s).
        log.warning("decoding=%s uses %d model(s): running it on %s", method, method_cls.max_models,
                    ", ".join(m.label for m in models[: method_cls.max_models]))
        models = models[: method_cls.max_models]
    if not method_cls.uses_models(decoding):  # e.g. a combination of finished runs: no model is loaded
        models = []
    method_cls.check_config(decoding, len(models))
    if len(models) == 1 and method_cls.max_models != 1 and not getattr(decoding, "runs", None):  # runs: other systems
        # Allowed on purpose (a sweep's single-model baseline through the same engine), but never silent.
        log.warning("decoding=%s with one model: no ensemble, it decodes %s alone; give two or more models "
                    "(e.g. models=gemma3_smollm2) to ensemble", method, models[0].label)
    dataset = typed_config(DatasetConfig, OmegaConf.to_container(cfg.dataset, resolve=True), "dataset")
    prompt = typed_config(PromptConfig, OmegaConf.to_container(cfg.prompt, resolve=True), "prompt")
    logger = typed_config(LoggerConfig, OmegaConf.to_container(cfg.logger, resolve=True), "logger")
    if cfg.batch_size < 1:
        raise FusemtError(f"batch_size={cfg.batch_size}: must be at least 1")
    if not isinstance(cfg.prompt_cache, bool):
        raise FusemtError(f"prompt_cache={cfg.prompt_cache}: must be true or false")
    # What changes the outputs (not limit/shard/domains, batching, prompt_cache, metrics or logging): it names the
    # default results file, so every swept hyperparameter gets its own file and a rerun of the same
    # config resumes; lines written under another fingerprint are refused.
    fingerprint_src = json.dumps({"models": [m.__dict__ for m in models], "method": method,
                                  "decoding": fingerprint_values(method_cls.Config, decoding_values),
                                  "prompt": OmegaConf.to_container(cfg.prompt, resolve=True), "seed": cfg.seed,
                                  "dataset": {k: getattr(dataset, k) for k in DATASET_IDENTITY}},
                                 sort_keys=True, default=str)
    fingerprint = hashlib.sha256(fingerprint_src.encode()).hexdigest()[:12]
    model_part = "+".join(m.label for m in models) or "runs"
    run_name = cfg.run_name or f"{method}__{model_part}__{dataset.name}__{fingerprint[:8]}"
    return RunConfig(
        models=models, decoding_name=method, decoding=decoding, dataset=dataset, prompt=prompt, logger=logger,
        metrics=OmegaConf.to_container(cfg.metrics, resolve=True), run_name=run_name, batch_size=cfg.batch_size,
        prompt_cache=cfg.prompt_cache,
        seed=cfg.seed, results_dir=Path(cfg.paths.results_dir).expanduser(),
        render_input_text=bool(cfg.debug.render_input_text),
        fingerprint=fingerprint,
    )
