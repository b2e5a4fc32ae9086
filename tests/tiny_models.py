"""Tiny randomly initialised HF models with toy tokenizers built here, so that exact stream and
fusion checks run in seconds without GGUF models.

Two tokenizers of the two families the project fuses: byte-level BPE (SmolLM2, Qwen: pieces end
inside characters, some span the end of one character and the start of the next) and
SentencePiece-style BPE with byte fallback (Gemma: ``▁`` for spaces, ``<0xE3>`` pieces for
characters outside the vocabulary). The Gemma 3 model has 8-token sliding-window layers, so
contexts of a few dozen tokens exercise the window.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from decoding.model import LoadedModel, ModelSpec

CORPUS = ["今日は天気がいいです。", "コーヒーを一杯お願いします。", "メールを送ってください。",
          "The weather is nice today.", "ルールを守る", "東京に新しいオフィス", "English: Japanese:",
          "Good morning."] * 3
PAD, EOS = "<pad>", "<eos>"  # ids 0 and 1 in both tokenizers
SLIDING_WINDOW = 8


@lru_cache(maxsize=None)
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=[PAD, EOS], show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


@lru_cache(maxsize=None)
def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=[PAD, EOS], show_progress=False))
    # The trainer knows nothing of byte fallback: add the 256 <0xXX> pieces and the matching decoder.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token=PAD, eos_token=EOS)


def _sizes(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=None)


def tiny_gemma3(attn_implementation: str = "sdpa", seed: int = 0) -> LoadedModel:
    """Gemma 3 with three 8-token sliding-window layers and one full layer, byte-fallback tokenizer."""
    tokenizer = byte_fallback_tokenizer()
    torch.manual_seed(seed)
    config = Gemma3TextConfig(num_hidden_layers=4, sliding_window=SLIDING_WINDOW, max_position_embeddings=512,
                              layer_types=["sliding_attention"] * 3 + ["full_attention"], **_sizes(tokenizer))
    config._attn_implementation = attn_implementation
    return LoadedModel(spec=ModelSpec(name="tiny_gemma3"), tokenizer=tokenizer, model=Gemma3ForCausalLM(config).eval())


def tiny_llama(seed: int = 1) -> LoadedModel:
    """Llama (full attention only), byte-level BPE tokenizer."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, max_position_embeddings=512, **_sizes(tokenizer))
    return LoadedModel(spec=ModelSpec(name="tiny_llama"), tokenizer=tokenizer, model=LlamaForCausalLM(config).eval())


def tiny_mistral(seed: int = 2) -> LoadedModel:
    """Mistral: every layer slides (no ``layer_types``; the model takes one mask), byte-level BPE tokenizer."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    config = MistralConfig(num_hidden_layers=2, sliding_window=SLIDING_WINDOW, max_position_embeddings=512,
                           **_sizes(tokenizer))
    return LoadedModel(spec=ModelSpec(name="tiny_mistral"), tokenizer=tokenizer,
                       model=MistralForCausalLM(config).eval())
