"""The fused step's tensor tables and per-batch ranking against dictionary walks over the tiny pair's
vocabularies: keys, lookups, candidates (order, probabilities, flags) and the choices made from them."""

import math

import pytest
import torch
from conftest import build_decoder

from decoding.fusion import END, Candidate
from decoding.keys import END_KEY, NO_KEY, RECENT_SETS, KeyTables


def spellings(vocab) -> dict[bytes, list[int]]:
    """Each byte string the vocabulary spells as one token -> those tokens, in id order."""
    out: dict[bytes, list[int]] = {}
    for tid, data in enumerate(vocab.token_bytes):
        if data:
            out.setdefault(data, []).append(tid)
    return out


def first_token(vocab, data: bytes):
    """The longest token that is a prefix of ``data`` (the lowest id among equal bytes), or None."""
    fits = [(len(b), -tid) for tid, b in enumerate(vocab.token_bytes) if b and data.startswith(b)]
    return -max(fits)[1] if fits else None


def test_tables_equal_a_dictionary_walk_over_every_member(tiny_pair):
    vocabs = [model.vocab for model in tiny_pair]
    tables = KeyTables.build(vocabs)
    assert tables.key_bytes[END_KEY] is END and len(set(tables.key_bytes[1:])) == len(tables.key_bytes) - 1
    assert set(tables.key_bytes[1:]) == {b for vocab in vocabs for b in spellings(vocab)}
    for m, vocab in enumerate(vocabs):
        for tid, data in enumerate(vocab.token_bytes):
            key = int(tables.key_of[m][tid])
            if tid in vocab.end_ids:
                assert key == END_KEY
            elif data:
                assert tables.key_bytes[key] == data
            else:
                assert key == NO_KEY
    looked_up = 0
    for n, vocab in enumerate(vocabs):
        own = spellings(vocab)
        assert set(tables.lookup[n][END_KEY].tolist()) == set(vocab.end_ids) and bool(tables.exact[n][END_KEY])
        for key, data in enumerate(tables.key_bytes[1:], start=1):
            ids = set(tables.lookup[n][key].tolist())
            if data in own:
                assert ids == set(own[data]) and bool(tables.exact[n][key])
            else:
                first = first_token(vocab, data)
                assert ids == {NO_KEY if first is None else first} and not bool(tables.exact[n][key])
                looked_up += first is not None
    assert looked_up > 10  # each tokenizer has pieces the other spells only as several tokens


def test_tables_are_built_once_per_set_of_vocabularies(tiny_pair):
    """Decoders over the same members share one build; another set, or one pushed out of the few kept
    (``RECENT_SETS``), gets its own."""
    a, b = [model.vocab for model in tiny_pair]
    first = build_decoder("unite", tiny_pair).key_tables
    assert build_decoder("tokenwise", tiny_pair).key_tables is first
    assert KeyTables.of([b, a]) is not first and KeyTables.of([a, b]) is first
    for n in range(RECENT_SETS):
        KeyTables.of([a] * (n + 1))
    assert KeyTables.of([a, b]) is not first


def reference_candidates(decoder, logprobs, rows, texts, may_end, top_k):
    """The dictionary walk the fused step did per row: union by bytes in proposal order, then lookups."""
    models, n = decoder.models, len(decoder.models)
    tops = []
    for lp, model in zip(logprobs, models):
        masked = lp[rows].masked_fill(model.vocab.forbidden_after(texts, may_end), -math.inf)
        values, ids = masked.topk(min(top_k, masked.shape[1]), dim=-1)
        tops.append((values.tolist(), ids.tolist()))
    out, agree = [], []
    for i, row in enumerate(rows):
        by_key = {}
        for m, (values, ids) in enumerate(tops):
            vocab = models[m].vocab
            for lp, tid in zip(values[i], ids[i]):
                if lp == -math.inf:
                    continue
                key = END if tid in vocab.end_ids else vocab.token_bytes[tid]
                cand = by_key.setdefault(key, Candidate(key, [0.0] * n, [False] * n, [False] * n, [None] * n))
                if not cand.proposed[m] or math.exp(lp) > cand.probs[m]:
                    cand.probs[m], cand.exact[m], cand.proposed[m], cand.ids[m] = math.exp(lp), True, True, tid
        for m, model in enumerate(models):
            own = spellings(model.vocab)
            for cand in by_key.values():
                if cand.proposed[m]:
                    continue
                if cand.key is END:
                    options, cand.exact[m] = sorted(model.vocab.end_ids), True
                else:
                    options = own.get(cand.key, [])
                    cand.exact[m] = bool(options)
                    if not options:
                        first = first_token(model.vocab, cand.key)
                        options = [] if first is None else [first]
                for tid in options:
                    cand.probs[m] = max(cand.probs[m], float(logprobs[m][row, tid].exp()))
        out.append(list(by_key.values()))
        top1 = {c.key for c in out[-1] if any(c.proposed[m] and c.ids[m] == tops[m][1][i][0] for m in range(n))}
        agree.append(len(top1) == 1)
    return out, agree


@pytest.mark.parametrize("method", ["unite", "tokenwise"])
@pytest.mark.parametrize("top_k", [1, 4, 40])
def test_batched_candidates_equal_the_dictionary_walk(tiny_pair, method, top_k):
    decoder = build_decoder(method, tiny_pair)
    ka = "カ".encode()
    texts = [b"", b"a", ka[:1], b"x" + ka[:2], "日".encode(), b" the"]
    generator = torch.Generator().manual_seed(top_k)
    compared = 0
    for trial in range(6):
        # coarse values: many ties, so the order of equal candidates is checked too
        logprobs = [(torch.randn(len(texts), model.vocab_size, generator=generator) * 3).round().log_softmax(-1)
                    for model in tiny_pair]
        rows = list(range(len(texts))) if trial % 2 == 0 else [4, 1, 2]
        may_end = torch.tensor([(trial + r) % 3 != 0 for r in rows])
        row_texts = [texts[r] for r in rows]
        got = decoder._candidates(logprobs, rows, row_texts, may_end, top_k)
        expected = reference_candidates(decoder, logprobs, rows, row_texts, may_end, top_k)
        assert got == expected
        assert [decoder._choose(cands, text, None) for cands, text in zip(got[0], row_texts)] == \
               [decoder._choose(cands, text, None) for cands, text in zip(expected[0], row_texts)]
        compared += sum(len(cands) for cands in got[0])
    assert compared > 20


def test_ranking_stays_on_the_log_probabilities_device(tiny_pair, monkeypatch):
    """On the meta device any mask, index or table left on the CPU raises (as it would on a GPU): everything
    up to the one transfer to the host runs where the log-probabilities are."""
    decoder = build_decoder("unite", tiny_pair)
    meta = torch.device("meta")
    packed = []
    monkeypatch.setattr(decoder, "_unpack", packed.append)
    for texts in ([b"a", b" the"], [b"a", "カ".encode()[:1]]):  # a mask shared by the rows; one built per row
        logprobs = [torch.zeros(3, model.vocab_size, device=meta) for model in tiny_pair]
        decoder._candidates(logprobs, [2, 0], texts, torch.tensor([True, False]), 4)
    assert [p.device for p in packed] == [meta, meta] and packed[0].shape[0] == 2
