import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_run(*overrides: str):
    """The typed RunConfig for ``fusemt <overrides>``, composed exactly as the CLI does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runners.config import CONF_DIR, build_run_config, register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("translate", overrides=list(overrides))
    return build_run_config(cfg)


def build_decoder(method: str, models, prompt=None, **options):
    """Method ``method``'s decoder over loaded models, its typed Config built from ``options``."""
    from decoding.methods import decoder_class
    from decoding.prompt import PromptConfig

    cls = decoder_class(method)
    return cls(cls.Config(name=method, **options), models, prompt or PromptConfig())


def trace_pieces(outs) -> list[list[tuple[str, bool]]]:
    """Each output's trace as (piece bytes, end) pairs: what two decodings must share to be the same."""
    return [[(s["piece_bytes"], s.get("end", False)) for s in out.trace] for out in outs]


@pytest.fixture(scope="module")
def tiny_pair():
    """The tiny random pair: Gemma 3 (sliding window, byte fallback) and Llama (byte-level BPE)."""
    from tiny_models import tiny_gemma3, tiny_llama

    return [tiny_gemma3(), tiny_llama()]


@pytest.fixture(scope="session")
def prompt_cfg():
    return compose_run().prompt


@pytest.fixture(scope="session")
def gemma():
    from decoding.model import load_model

    return load_model(compose_run("models=gemma3_270m").models[0])


@pytest.fixture(scope="session")
def smollm():
    from decoding.model import load_model

    return load_model(compose_run("models=smollm2_135m").models[0])


def tiny_tokenizer(chat_template: str | None = None):
    """A small word-level tokenizer built here: a stand-in for hub tokenizers in fast tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + sorted(set(
        "English Japanese : good morning the weather is nice today hello world translate following text into "
        "reply with translation only . user assistant system you are a translator".split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = chat_template
    fast.padding_side = "left"
    return fast


def stand_in_model(tokenizer, max_input_tokens: int = 2048, name: str = "tiny"):
    from decoding.model import ModelSpec

    return SimpleNamespace(tokenizer=tokenizer, name=name, spec=ModelSpec(name=name, max_input_tokens=max_input_tokens))
