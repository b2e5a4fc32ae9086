"""Tail-only canonical re-encoding (decoding/canonical.py): encoding a growing text from the last safe
cut equals encoding it whole, for both tokenizer families, on random and real texts."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from decoding.canonical import MergePairRule, PreTokenRule, TailRule
from decoding.vocab import ByteVocab

CORPUS = ["東京都は日本の首都です。", "今日はいい天気ですね、散歩に行きましょう。",
          "The weather's nice today, isn't it?",
          "I'll translate the following text into Japanese: 「こんにちは」 3 times!",
          "  spaced   out\ttext\n\nnew lines"]
ALPHABET = list("ab cde,.'!?\n\t  ") + list("東京都はのをにがです。、「」ー１２3") + ["é", "😀", "<", "|", "'s", " the"]


def gemma_like():
    """A SentencePiece-style BPE built here (spaces become ▁ before BPE, byte fallback), as Gemma's."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"] + bytes_,
                                                               show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def byte_level():
    """A byte-level BPE with the GPT-2 pre-tokenizer built here, as SmolLM2's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=500, special_tokens=["<|im_end|>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                               show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def grow_and_compare(tokenizer, texts: list[str], seed: int = 0) -> list[int]:
    """Grows all texts together a few characters at a time, encoding each from its cut as ModelStream
    does (one ``encode_from`` call per round for all of them), and asserts equality with encoding each
    whole text alone (None where it does not spell the text, as ``ModelStream.encode``). Returns the
    tail lengths encoded."""
    rule = TailRule.of(tokenizer)
    vocab = ByteVocab.from_tokenizer(tokenizer, len(tokenizer))
    rnd, tails = random.Random(seed), []

    def spelled(ids, data):
        return ids if vocab.spell(ids) == data else None

    data = [text.encode() for text in texts]
    cuts, ids, ends = [None] * len(texts), [[] for _ in texts], [0] * len(texts)
    while growing := [i for i in range(len(texts)) if ends[i] < len(data[i])]:
        for i in growing:
            ends[i] += rnd.randint(1, 6)
            while ends[i] < len(data[i]) and data[i][ends[i]] & 0xC0 == 0x80:
                ends[i] += 1
        heads = [data[i][:ends[i]] for i in growing]
        encoded = rule.encode_from(heads, [cuts[i] for i in growing], [ids[i] for i in growing], vocab.token_bytes)
        for i, head, tail in zip(growing, heads, encoded):
            whole = spelled(tokenizer.encode(head.decode(), add_special_tokens=False), head)
            assert tail == whole, (head, cuts[i])
            tails.append(len(head) - (cuts[i].offset if cuts[i] else 0))
            if tail is not None:
                ids[i], cuts[i] = tail, rule.advance(head, cuts[i], tail, vocab.token_bytes)
    return tails


def random_texts(n: int, seed: int = 1) -> list[str]:
    rnd = random.Random(seed)
    return ["".join(rnd.choice(ALPHABET) for _ in range(rnd.randint(5, 150))) for _ in range(n)]


@pytest.mark.parametrize("make, family", [(gemma_like, MergePairRule), (byte_level, PreTokenRule)])
def test_tail_encoding_equals_whole_encoding_on_random_texts(make, family):
    tokenizer = make()
    assert isinstance(TailRule.of(tokenizer), family)
    grow_and_compare(tokenizer, CORPUS + random_texts(150))


@pytest.mark.parametrize("make", [gemma_like, byte_level])
def test_tail_stays_short_as_the_text_grows(make):
    paragraph = " ".join(CORPUS) * 12  # ~1,800 bytes
    tails = grow_and_compare(make(), [paragraph])
    assert max(tails) < 120 and sum(tails) / len(tails) < 40


def test_tokenizers_outside_the_tested_families_have_no_rule():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert TailRule.of(PreTrainedTokenizerFast(tokenizer_object=tok)) is None


@pytest.mark.slow
def test_tail_encoding_equals_whole_encoding_for_the_embedded_tokenizers(gemma, smollm):
    from runners.data import DatasetConfig, load_segments

    segments = load_segments(DatasetConfig(limit=60))
    texts = [s.source for s in segments] + [s.reference for s in segments if s.reference] + random_texts(300, seed=2)
    texts += ["東京<eos>都は", "a<|im_end|>b", "<start_of_turn>user\nこんにちは<end_of_turn>"]
    for model, family in ((gemma, MergePairRule), (smollm, PreTokenRule)):
        assert isinstance(TailRule.of(model.tokenizer), family)
        tails = grow_and_compare(model.tokenizer, texts)
        assert sorted(tails)[len(tails) // 2] < 40  # the median tail is a few characters, not the text
