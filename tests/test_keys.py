"""The fused step's tensor tables against dictionary walks over the tiny pair's vocabularies."""

from decoding.fusion import END
from decoding.keys import END_KEY, NO_KEY, KeyTables


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
