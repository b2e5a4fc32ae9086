import torch

from decoding.base import TraceStep, clip_trace, finalize_text
from decoding.vocab import ByteVocab, utf8_pending

KA = "カ".encode()  # e3 82 ab


def toy_vocab():
    # 0 end, 1 special; 2.. text: partial and whole characters, as byte-level BPE produces them
    return ByteVocab.build([None, None, b" ", b"a", KA[:2], KA[2:], KA, b"\xab a", b"\x82", KA[:1], b" \xe3"],
                           frozenset({0}))


def test_utf8_pending():
    assert utf8_pending(b"") == 0 and utf8_pending(b"a") == 0 and utf8_pending(KA) == 0
    assert utf8_pending(KA[:1]) == 2 and utf8_pending(KA[:2]) == 1
    assert utf8_pending("日本".encode()[:4]) == 2


def test_admissible_keeps_text_valid_utf8():
    vocab = toy_vocab()
    ok = vocab.admissible(torch.tensor([0, 1, 2]))
    allowed = [{i for i in range(len(vocab.token_bytes)) if ok[r, i]} for r in range(3)]
    assert allowed[0] == {2, 3, 4, 6, 9, 10}  # no token may start with a continuation byte
    assert allowed[1] == {5, 7, 8}  # exactly one continuation byte, then valid text
    assert allowed[2] == {5, 8}  # one continuation byte; b"\xab a" would leave one byte missing
    assert not ok[:, :2].any()  # special tokens add no text


def test_allowed_after_a_text_is_admissible_text_tokens_and_the_end_where_it_may_end():
    vocab = toy_vocab()
    texts = [b"a", b"a" + KA[:2], b"a"]
    ok = vocab.allowed_after(texts, torch.tensor([True, True, False]))
    allowed = [{i for i in range(len(vocab.token_bytes)) if ok[r, i]} for r in range(3)]
    assert allowed == [{0, 2, 3, 4, 6, 9, 10}, {0, 5, 7, 8}, {2, 3, 4, 6, 9, 10}]


def test_admissible_refuses_bytes_that_never_occur_in_utf8():
    # E0 80 would be overlong, F4 90 past U+10FFFF, ED A0 a surrogate, C0 and F5 start no character
    vocab = ByteVocab.build([None, b"\x80", b"\x90", b"\xa0", b"\xc0", b"\xf5", b"\xe0\x80", b"\xf4\x90", b"\xe3\x82"],
                            frozenset({0}))
    unfinished = [b"", b"\xe0", b"\xf4", b"\xed", b"\xf0"]
    ok = vocab.admissible(torch.tensor([utf8_pending(u) for u in unfinished]), unfinished)
    allowed = [{i for i in range(len(vocab.token_bytes)) if ok[r, i]} for r in range(5)]
    assert allowed == [{8}, {3}, {1}, {1, 2}, {2, 3}]


def test_segment_and_longest_prefix():
    vocab = toy_vocab()
    assert vocab.segment(KA + b" a") == [6, 2, 3]
    assert vocab.longest_prefix_token(KA[:2] + b"zz") == 4


def test_finalize_text_drops_a_cut_off_character():
    assert finalize_text(" 日本".encode() + KA[:2]) == "日本"
    assert finalize_text("日本\n".encode()) == "日本"


def test_clip_trace_cuts_at_the_stop_string():
    steps = [TraceStep(piece=p, piece_bytes=p.encode().hex(), ids={}, logprob={}, origin="m")
             for p in [" 日本", "。\nEng", "lish"]]
    kept, raw, stop = clip_trace(steps, ["\n"])
    assert stop == "\n" and raw.decode() == " 日本。"
    assert [s.piece for s in kept] == [" 日本", "。"] and kept[-1].extra["stop"] == "\n"


def test_forbidden_after_is_the_inverse_of_allowed_after_broadcast_to_every_row():
    vocab = ByteVocab.build([None, b"a", "メ".encode()[:1], "メ".encode()[1:], "メ".encode(), b"\x80"], frozenset({0}))
    for texts in ([b"x", b"y"], [b"x", "メ".encode()[:2]], [b""]):
        for may_end in ([True] * len(texts), [False] * len(texts), [True] + [False] * (len(texts) - 1)):
            ends = torch.tensor(may_end)
            forbidden = vocab.forbidden_after(texts, ends).expand(len(texts), -1)
            assert torch.equal(forbidden, ~vocab.allowed_after(texts, ends))
