"""A scripted toy language model behind the real ``LoadedModel`` interface, with two tiny tokenizers.

``toy_model("sp")``: SentencePiece-like (unigram, ``▁`` for spaces, ``<0xE3>``-style byte fallback).
``toy_model("bpe")``: byte-level BPE (partial UTF-8 pieces: ``い`` is ``e3 81`` + ``84``, and a
piece ``82 e3 81`` crosses a character boundary). Both spell the alphabet ``TOY_ALPHABET`` (ASCII and kana).

The model's next-token distribution is a fixed pseudo-random function of the whole context (its
token ids), optionally overridden by scripted rules. ``forward`` reads the context back from the
KV cache it is handed (it stores token ids as its "keys"), honouring the column mask, so the
streams' caching, rollbacks and row duplication are exercised exactly as with a transformer.
The ``brute_*`` functions compute the same quantities as ``decoding.charprob`` by enumerating
every tokenization, independently of it.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from decoding.model import LoadedModel, ModelSpec
from decoding.prompt import PromptConfig
from decoding.vocab import _byte_level_decoder, utf8_pending

TOY_ALPHABET = ["a", "b", " ", "w", "x", "y", "z", "q", "あ", "い"]
# Every character the toy vocabularies can spell (byte pieces make more kana than the alphabet has).
TOY_CHARS = sorted({c for c in TOY_ALPHABET + ["\n"]} | {
    ch for x in (0x81, 0x82, 0x84) for y in (0x81, 0x82, 0x84)
    for ch in [bytes([0xE3, x, y]).decode("utf-8", errors="ignore")] if len(ch) == 1})
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

# A prompt that is just the source text (the toy tokenizers cannot spell the few-shot template).
TOY_PROMPT = PromptConfig(plain_template="{source}", examples=[], plain_stop_strings=["\n"])


def _sp_tokenizer() -> Tokenizer:
    pieces = ["a", "b", "ab", "ba", "▁", "▁a", "a▁", "w", "x", "y", "z", "q", "xy", "xz", "xq", "あ", "い", "あい",
              "aあ", "<0x0A>", "<0xE3>", "<0x81>", "<0x82>", "<0x84>"]
    vocab = [(p, 0.0) for p in SPECIALS] + [(p, -1.0 - 0.1 * i) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=SPECIALS.index("<unk>"), byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _bpe_tokenizer() -> Tokenizer:
    to_char = {b: c for c, b in _byte_level_decoder().items()}
    sym = lambda data: "".join(to_char[b] for b in data)  # noqa: E731
    alphabet = [sym(bytes([b])) for b in b"abwxyzq \n" + bytes([0xE3, 0x81, 0x82, 0x84])]
    merges = [(sym(b"a"), sym(b"b")), (sym(b" "), sym(b"a")), (sym(b"\xe3"), sym(b"\x81")),
              (sym("あ".encode()[:2]), sym(b"\x82")), (sym(b"x"), sym(b"y")), (sym(b"x"), sym(b"z")),
              (sym(b"\x82"), sym("い".encode()[:2]))]
    vocab = {t: i for i, t in enumerate(SPECIALS[:3] + alphabet + ["".join(m) for m in merges])}
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _hf_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    tok = _sp_tokenizer() if kind == "sp" else _bpe_tokenizer()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    extra = {"unk_token": "<unk>"} if kind == "sp" else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", **extra)
    fast.padding_side = "left"
    return fast


class ScriptedLM(torch.nn.Module):
    """Next-token log-probabilities as a deterministic function of the context ids.

    ``rules`` maps a full context (tuple of ids) to {id: probability}; other contexts get a
    pseudo-random softmax (seeded by the context) with the ids in ``never`` impossible. With a
    ``vocab`` (``valid_utf8``), tokens that would make the context's bytes invalid UTF-8, and the end
    token inside a character, are impossible too: then no probability mass is lost to invalid text.
    """

    def __init__(self, vocab_size: int, never: list[int], seed: int = 0, sharpness: float = 2.0):
        super().__init__()
        self.vocab_size, self.never, self.seed, self.sharpness = vocab_size, never, seed, sharpness
        self.rules: dict[tuple[int, ...], dict[int, float]] = {}
        self.vocab = None
        self.lm_head = torch.nn.Linear(1, vocab_size, bias=False)  # only its shape is used (vocab size)
        self.config = PretrainedConfig(num_hidden_layers=1)
        self.generation_config = SimpleNamespace(eos_token_id=None)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def get_output_embeddings(self):
        return self.lm_head

    def next_logprobs(self, context: tuple[int, ...]) -> torch.Tensor:
        logprobs = _next_logprobs(self.vocab_size, tuple(self.never), self.seed, self.sharpness,
                                  tuple(sorted((k, tuple(sorted(v.items()))) for k, v in self.rules.items())),
                                  tuple(context))
        if self.vocab is None:
            return logprobs
        text = self.vocab.spell(context)
        allowed = self.vocab.allowed_after([text], torch.tensor([not utf8_pending(text)]))[0]
        return torch.log_softmax(logprobs.masked_fill(~allowed, -torch.inf), dim=-1)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=False, logits_to_keep=1):
        rows, width = input_ids.shape
        if past_key_values is not None:
            ids = input_ids[:, None, :, None].double()
            ids = past_key_values.update(ids, ids, 0)[0][:, 0, :, 0].long()
        else:
            ids = input_ids
        columns = ids.shape[1]
        out = torch.zeros(rows, logits_to_keep, self.vocab_size)
        for r in range(rows):
            for k, q in enumerate(range(width - logits_to_keep, width)):
                col = columns - width + q
                context = tuple(int(ids[r, j]) for j in range(col + 1) if attention_mask[r, j])
                out[r, k] = self.next_logprobs(context)
        return SimpleNamespace(logits=out)


@lru_cache(maxsize=100_000)
def _next_logprobs(vocab_size, never, seed, sharpness, rules, context) -> torch.Tensor:
    scripted = dict(rules).get(context)
    if scripted is not None:
        probs = torch.zeros(vocab_size, dtype=torch.float64)
        for tid, p in scripted:
            probs[tid] = p
        return probs.log().float()
    generator = torch.Generator().manual_seed(zlib.crc32(repr((seed,) + context).encode()))
    logits = torch.randn(vocab_size, generator=generator, dtype=torch.float64) * sharpness
    logits[list(never)] = -torch.inf
    return torch.log_softmax(logits, dim=-1).float()


def toy_model(kind: str = "sp", seed: int = 0, name: str | None = None, sharpness: float = 2.0,
              valid_utf8: bool = False) -> LoadedModel:
    """A ``LoadedModel`` over the scripted LM with the ``sp`` or ``bpe`` toy tokenizer."""
    tokenizer = _hf_tokenizer(kind)
    never = [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS if t != "</s>" and t in tokenizer.get_vocab()]
    lm = ScriptedLM(len(tokenizer), never, seed=seed, sharpness=sharpness)
    model = LoadedModel(spec=ModelSpec(name=name or f"toy_{kind}"), tokenizer=tokenizer, model=lm)
    if valid_utf8:
        lm.vocab = model.vocab
    return model


def script(model: LoadedModel, context: list[int], pieces: dict[str, float]) -> None:
    """Make ``model``'s next-token distribution after ``context`` exactly ``pieces`` (piece -> probability)."""
    ids = {model.tokenizer.convert_tokens_to_ids(p): q for p, q in pieces.items()}
    model.model.rules[tuple(context)] = ids


# --- brute force: every tokenization, straight from the definitions ----------------------------------

def _token_bytes(model: LoadedModel) -> list[bytes]:
    return [b or b"" for b in model.vocab.token_bytes]


def _probs(model: LoadedModel, context: tuple[int, ...]) -> list[float]:
    """The next-token probabilities exactly as ``LoadedModel.forward`` returns them (fp32 log-softmax)."""
    return torch.log_softmax(model.model.next_logprobs(context).float(), dim=-1).double().exp().tolist()


def brute_prefix_prob(model: LoadedModel, context: tuple[int, ...], data: bytes) -> float:
    """P(the output after ``context`` starts with ``data``), summed over every covering tokenization."""
    if not data:
        return 1.0
    probs = _probs(model, context)
    total = 0.0
    for tid, piece in enumerate(_token_bytes(model)):
        if not piece or probs[tid] == 0.0:
            continue
        if piece.startswith(data):
            total += probs[tid]
        elif data.startswith(piece):
            total += probs[tid] * brute_prefix_prob(model, context + (tid,), data[len(piece):])
    return total


def brute_end_prob(model: LoadedModel, context: tuple[int, ...], data: bytes) -> float:
    """P(the output after ``context`` is exactly ``data`` and then ends)."""
    probs = _probs(model, context)
    total = sum(probs[t] for t in model.vocab.end_ids) if not data else 0.0
    for tid, piece in enumerate(_token_bytes(model)):
        if piece and probs[tid] > 0.0 and data.startswith(piece):
            total += probs[tid] * brute_end_prob(model, context + (tid,), data[len(piece):])
    return total


def brute_char_greedy(model: LoadedModel, context: tuple[int, ...], max_chars: int, prefix: bytes = b"",
                      stop: str = "\n") -> str:
    """Character-level greedy decoding by brute force over ``TOY_CHARS`` + END (ties: END last, then
    the smaller character), after the forced bytes ``prefix``; stops before ``stop``."""
    text = b""
    for _ in range(max_chars):
        scores = {c: brute_prefix_prob(model, context, prefix + text + c.encode()) for c in TOY_CHARS}
        best = max(sorted(scores), key=lambda c: scores[c])
        if brute_end_prob(model, context, prefix + text) > scores[best] or best == stop:
            break
        text += best.encode()
    return text.decode()
