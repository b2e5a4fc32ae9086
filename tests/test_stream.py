"""ModelStream on tiny random HF models (seconds): the cached path equals full recompute across
rollbacks, ragged appends and sliding windows; ``sync_canonical`` keeps canonical ids and rolls
back only what changed."""

import random

import pytest
import torch
from stream_checks import canonical_violation
from tiny_models import SLIDING_WINDOW, tiny_gemma3, tiny_llama, tiny_mistral

from decoding.stream import ModelStream, common_prefix_len, sliding_window

GEMMA_TOLERANCE = 1e-3  # fp32 on CPU; the drift this guards against was up to 0.15


def random_walk(model, seed: int, steps: int = 40,
                prompt_lens=(5, 2 * SLIDING_WINDOW + 3)) -> tuple[float, ModelStream]:
    """Drive a cached and a recompute stream through the same random rollbacks and ragged appends
    (two rows). Returns the largest |difference| of their log-probabilities over the positions
    every row has just run (a row's earlier kept positions are padding), and the cached stream."""
    rng = random.Random(seed)
    vocab_size = len(model.tokenizer)
    prompts = [[rng.randrange(2, vocab_size) for _ in range(n)] for n in prompt_lens]
    cached, reference = ModelStream(model, prompts), ModelStream(model, prompts, recompute=True)
    worst = 0.0
    for step in range(steps):
        for row in range(2):
            if rng.random() < 0.4 and len(cached.generated(row)) >= 3:
                n = rng.randrange(1, 4)
                cached.rollback(row, n)
                reference.rollback(row, n)
            new = [rng.randrange(2, vocab_size) for _ in range(rng.randrange(1, 4))]
            cached.append(row, new)
            reference.append(row, new)
        keep = 3 if step % 5 == 0 else None
        fresh = [min(cached.pending(row), keep or 1) for row in range(2)]
        pair = [lp if keep else lp[:, None] for lp in (cached.logprobs(keep), reference.logprobs(keep))]
        a, b = [torch.cat([lp[row, lp.shape[1] - n:] for row, n in enumerate(fresh)]) for lp in pair]
        worst = max(worst, float((a - b).abs().max()))
    assert sum(cached.rollbacks) > 0
    return worst, cached


@pytest.mark.parametrize("make", [lambda: tiny_gemma3("sdpa"), lambda: tiny_gemma3("eager"), tiny_mistral, tiny_llama],
                         ids=["gemma3-sdpa", "gemma3-eager", "mistral", "llama"])
def test_cache_path_equals_recompute_beyond_the_sliding_window(make):
    worst, stream = random_walk(make(), seed=0)
    assert worst < 1e-5
    assert min(len(t) for t in stream.tokens) > 4 * SLIDING_WINDOW


@pytest.mark.slow
def test_gemma_cache_path_equals_recompute_beyond_512_tokens(gemma):
    """Gemma 3's 512-token sliding layers, a context past the window, rollbacks and ragged appends."""
    worst, stream = random_walk(gemma, seed=0, steps=12, prompt_lens=(500, 530))
    assert worst < GEMMA_TOLERANCE
    assert min(len(t) for t in stream.tokens) > 512 and stream.window == 512


def test_sliding_window_is_read_from_the_config():
    assert sliding_window(tiny_gemma3().model.config) == SLIDING_WINDOW
    assert sliding_window(tiny_mistral().model.config) == SLIDING_WINDOW
    assert sliding_window(tiny_llama().model.config) is None


@pytest.fixture(params=["byte_level", "byte_fallback"])
def model(request):
    return tiny_llama() if request.param == "byte_level" else tiny_gemma3()


TEXT = " 今日はメールを送ってルカ。The weather ルールを守る"


def test_sync_canonical_follows_the_text_byte_by_byte_and_rolls_back_only_the_changed_tail(model):
    stream = ModelStream(model, [[2, 3]], recompute=True)
    data, rng = TEXT.encode(), random.Random(0)
    end = 0
    while end < len(data):
        end = min(end + rng.randrange(1, 5), len(data))  # pieces end anywhere, inside characters too
        before = stream.generated(0)
        appended, dropped = stream.sync_canonical(0, data[:end])
        after = stream.generated(0)
        assert canonical_violation(stream, 0, data[:end]) is None
        common = common_prefix_len(before, after)
        assert (appended, dropped) == (after[common:], len(before) - common)
    assert stream.generated(0) == model.tokenizer.encode(TEXT, add_special_tokens=False)


@pytest.mark.parametrize("rule", ["tail", "whole"])
def test_rows_synced_together_equal_rows_synced_one_by_one(model, rule):
    texts = [TEXT, "ルールを守る", " The weather 今日", "メ"]
    together, alone = (ModelStream(model, [[2, 3]] * len(texts), recompute=True) for _ in range(2))
    if rule == "whole":  # a tokenizer without a tail rule: whole texts, one batch call
        together.tail_rule = alone.tail_rule = None
    data, ends, rng = [t.encode() for t in texts], [0] * len(texts), random.Random(1)
    while rows := [r for r in range(len(texts)) if ends[r] < len(data[r])]:
        for r in rows:  # pieces end anywhere, inside characters too
            ends[r] = min(ends[r] + rng.randrange(1, 5), len(data[r]))
        synced = together.sync_canonical_rows(rows[::-1], [data[r][:ends[r]] for r in rows[::-1]])
        assert synced == [alone.sync_canonical(r, data[r][:ends[r]]) for r in rows[::-1]]
        assert together.tokens == alone.tokens and together.cut == alone.cut
    assert [together.generated(r) for r in range(len(texts))] == \
           [model.tokenizer.encode(t, add_special_tokens=False) for t in texts]


def test_own_piece_is_kept_over_an_unfinished_character_then_replaced():
    model = tiny_llama()
    vocab = model.vocab
    stream = ModelStream(model, [[2]], recompute=True)
    stream.sync_canonical(0, "今日は".encode())
    partial = "メ".encode()[:2]
    (own,) = vocab.bytes_to_ids[partial]  # a byte-level piece that ends inside メ
    stream.append(0, [own])
    assert stream.sync_canonical(0, "今日は".encode() + partial) == ([], 0)
    assert stream.generated(0)[-1] == own
    stream.sync_canonical(0, "今日はメール".encode())
    assert stream.generated(0) == model.tokenizer.encode("今日はメール", add_special_tokens=False)


def test_byte_fallback_pieces_become_the_characters_token_once_it_completes():
    model = tiny_gemma3()
    vocab, tokenizer = model.vocab, model.tokenizer
    stream = ModelStream(model, [[2]], recompute=True)
    ru = "ル".encode()
    stream.sync_canonical(0, ru[:1])
    assert stream.generated(0) == vocab.bytes_to_ids[ru[:1]]  # <0xE3>
    appended, dropped = stream.sync_canonical(0, ru + "ール".encode())
    assert stream.generated(0) == tokenizer.encode("ルール", add_special_tokens=False)
    assert dropped == 1 and len(stream.generated(0)) < len("ルール".encode())


def test_select_rows_copies_a_row_listed_twice_and_the_copies_diverge():
    model = tiny_gemma3()
    cached, reference = (ModelStream(model, [[5, 6, 7], [8, 9]], recompute=flag) for flag in (False, True))
    for stream in (cached, reference):
        stream.logprobs()
        stream.select_rows([1, 1, 0])
        stream.append(0, [10, 11])
        stream.append(1, [12])
        stream.append(2, [13] * 20)  # past the 8-token window
    assert cached.tokens[0] == [8, 9, 10, 11] and cached.tokens[1] == [8, 9, 12]
    assert (cached.logprobs() - reference.logprobs()).abs().max() < 1e-5


@pytest.mark.parametrize("make", [lambda: tiny_gemma3("sdpa"), tiny_llama], ids=["gemma3", "llama"])
def test_ragged_rows_and_retaken_rollbacks_equal_recompute(make):
    """Six rows, most appending one token a step and one at a time appending many (run ahead in a
    call of its own), and rolled-back tokens appended again (their KV taken back from the shadow):
    the cached path still equals full recompute."""
    model = make()
    rng = random.Random(1)
    vocab_size = len(model.tokenizer)
    prompts = [[rng.randrange(2, vocab_size) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    cached, reference = ModelStream(model, prompts), ModelStream(model, prompts, recompute=True)
    calls, forward = [0], model.forward

    def counting(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    model.forward = counting
    worst, retaken = 0.0, 0
    for step in range(24):
        wide = rng.randrange(6)
        for row in range(6):
            if step % 4 == 3 and len(cached.generated(row)) >= 3:  # roll back, then append the same ids again
                again = cached.generated(row)[-2:]
                for stream in (cached, reference):
                    stream.rollback(row, 2)
                    stream.append(row, again)
                retaken += cached.pending(row) == 0
                continue
            new = [rng.randrange(2, vocab_size) for _ in range(rng.randrange(6, 10) if row == wide else 1)]
            cached.append(row, new)
            reference.append(row, new)
        a, b = cached.logprobs(), reference.logprobs()
        worst = max(worst, float((a - b).abs().max()))
    model.forward = forward
    assert worst < 1e-5
    # each stream calls the model once a step; the cached one more often: some steps ran a wide row ahead
    assert calls[0] > 2 * 24 and retaken > 0  # and some rows took their KV back
