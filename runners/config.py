"""Typed views of the composed Hydra config: every section is checked at start-up."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from decoding.base import TRACE_LEVELS, Decoder, fingerprint_values, typed_config
from decoding.errors import FusemtError
from decoding.methods import DECODERS, decoder_class, method_names
from decoding.model import ModelSpec, cache_root, check_local_model
from decoding.packaged import check_available
from decoding.prompt import PromptConfig, check_prompt
from decoding.sampling import SAMPLER
from eval.wandb_logger import LoggerConfig
from runners.data import DatasetConfig

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
            raise FusemtError(f"unknown model '{name}': use one of {', '.join(model_names())}, "
                              "a hub id (org/name) or a local dir")
    return typed_config(ModelSpec, values, f"model '{name}'")


# A results file's name plus its longest derived name (".<name>.jsonl.claims") fits one 255-byte component.
_LONGEST_EXTRA = len("..jsonl.owners")


def check_run_name(run_name: str) -> None:
    """``run_name`` names files inside results_dir: one plain file name, never a path out of it."""
    if run_name in ("", ".", "..") or any(c in run_name for c in "/\\\0"):
        raise FusemtError(f"run_name='{run_name}' is not a plain file name (no '/', '..' or absolute path): "
                          "results go under paths.results_dir; set that to write elsewhere")
    if len(run_name.encode()) + _LONGEST_EXTRA > 255:
        raise FusemtError(f"run_name is {len(run_name.encode())} bytes: a file name holds at most "
                          f"{255 - _LONGEST_EXTRA} with the results files' suffixes: choose a shorter run_name")


def _values(cfg: DictConfig, section: str) -> Any:
    """A config section as plain values; an interpolation that cannot be resolved (``${...}`` in a
    prompt, say) is a one-line error, not omegaconf's traceback."""
    try:
        return OmegaConf.to_container(cfg[section], resolve=True)
    except OmegaConfBaseException as err:
        first = str(err).strip().splitlines()[0]
        raise FusemtError(f"cannot resolve {section}: {first}: write a literal '${{' as '\\${{'") from None


def _one_seed(method_cls, decoding, decoding_values: dict, seed: int) -> bool:
    """The run's one ``seed`` seeds every sampler: a method's ``decoding.seed`` is set from it.

    Returns whether the run samples. Not sampling, the method's seed stays 0, its value before there
    was one seed, so that the fingerprints (and results files) of deterministic runs do not change.
    """
    if not hasattr(decoding, "seed"):
        return False
    if decoding.seed not in (0, seed):
        raise FusemtError(f"decoding.seed={decoding.seed}: the run has one seed, which seeds every sampler: "
                          f"pass seed={decoding.seed} instead")
    sampling = method_cls.samples(decoding)
    decoding.seed = decoding_values["seed"] = seed if sampling else 0
    return sampling


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
    trace: str  # what each row's trace records (decoding.base.TRACE_LEVELS): same outputs
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
    decoding_values = _values(cfg, "decoding")
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
    # Only the models that will load: one whose packages or files are missing fails now, not after the others loaded.
    for spec in models:
        if spec.chunks is not None:
            check_available(spec.chunks, spec.label, cache_root())
        check_local_model(spec)
    method_cls.check_config(decoding, len(models))
    if len(models) == 1 and method_cls.max_models != 1 and not getattr(decoding, "runs", None):  # runs: other systems
        # Allowed on purpose (a sweep's single-model baseline through the same engine), but never silent.
        log.warning("decoding=%s with one model: no ensemble, it decodes %s alone; give two or more models "
                    "(e.g. models=gemma3_smollm2) to ensemble", method, models[0].label)
    dataset = typed_config(DatasetConfig, _values(cfg, "dataset"), "dataset")
    prompt = typed_config(PromptConfig, _values(cfg, "prompt"), "prompt")
    logger = typed_config(LoggerConfig, _values(cfg, "logger"), "logger")
    batch_size = cfg.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FusemtError(f"batch_size={batch_size}: must be at least 1, a whole number")
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FusemtError(f"seed={seed}: must be a whole number")
    check_prompt(prompt)
    if not isinstance(cfg.prompt_cache, bool):
        raise FusemtError(f"prompt_cache={cfg.prompt_cache}: must be true or false")
    if cfg.trace not in TRACE_LEVELS:
        raise FusemtError(f"trace={cfg.trace}: must be one of {', '.join(TRACE_LEVELS)}")
    sampling = _one_seed(method_cls, decoding, decoding_values, seed)
    # What changes the outputs (not limit/shard/domains, batching, prompt_cache, trace, metrics or logging): it
    # names the default results file, so every swept hyperparameter gets its own file and a rerun of the
    # same config resumes; lines written under another fingerprint are refused.
    fingerprint_src = json.dumps({"models": [m.__dict__ for m in models], "method": method,
                                  "decoding": fingerprint_values(method_cls.Config, decoding_values),
                                  "prompt": _values(cfg, "prompt"), "seed": seed,
                                  "dataset": {k: getattr(dataset, k) for k in DATASET_IDENTITY},
                                  # samples drawn per segment (decoding/sampling.py), not from one stream per batch
                                  **({"sampler": SAMPLER} if sampling else {})},
                                 sort_keys=True, default=str)
    fingerprint = hashlib.sha256(fingerprint_src.encode()).hexdigest()[:12]
    model_part = "+".join(m.label for m in models) or "runs"
    run_name = str(cfg.run_name or f"{method}__{model_part}__{dataset.name}__{fingerprint[:8]}")
    check_run_name(run_name)
    return RunConfig(
        models=models, decoding_name=method, decoding=decoding, dataset=dataset, prompt=prompt, logger=logger,
        metrics=_values(cfg, "metrics"), run_name=run_name, batch_size=batch_size,
        prompt_cache=cfg.prompt_cache, trace=cfg.trace,
        seed=seed, results_dir=Path(cfg.paths.results_dir).expanduser(),
        render_input_text=bool(cfg.debug.render_input_text),
        fingerprint=fingerprint,
    )
