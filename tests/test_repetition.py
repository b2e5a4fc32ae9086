"""The repetition guard judges characters of the text, however the candidate pieces split them."""

import pytest

from decoding.errors import FusemtError
from decoding.repetition import RepetitionGuard

ME = "メ".encode()  # b"\xe3\x83\xa1"


def test_a_run_is_stopped_at_the_limit_whatever_the_pieces():
    guard = RepetitionGuard(max_repeats=3)
    assert not guard.blocks("今メメ".encode(), ME)
    assert guard.blocks("今メメメ".encode(), ME)
    # alternating partial pieces, as a byte-level BPE model spells メ: judged when メ completes
    text = "今メメメ".encode()
    assert not guard.blocks(text, ME[:2])
    assert guard.blocks(text + ME[:2], ME[2:])
    assert not guard.blocks(text + ME[:2], "ア".encode()[2:])  # the same lead bytes completing another character
    # a piece that completes the fourth メ and goes on is blocked too
    assert guard.blocks(text, ME + "です".encode())


def test_units_of_several_characters():
    guard = RepetitionGuard(max_repeats=2, repeat_unit=2)
    assert not guard.blocks("ゼルゼル".encode(), "ゼ".encode())
    assert guard.blocks("ゼルゼルゼ".encode(), "ル".encode())
    assert guard.blocks("ゼルゼルゼ".encode() + "ル".encode()[:2], "ル".encode()[2:])
    assert not RepetitionGuard(max_repeats=2, repeat_unit=1).blocks("ゼルゼルゼ".encode(), "ル".encode())
    assert not guard.blocks("ゼルゼルゼ".encode(), "ロ".encode())


def test_ngrams_are_compared_as_characters():
    guard = RepetitionGuard(no_repeat_ngram_size=2)
    assert guard.blocks("ルカル".encode(), "カ".encode())
    assert guard.blocks("ルカル".encode() + "カ".encode()[:1], "カ".encode()[1:])
    assert not guard.blocks("ルカル".encode(), "ル".encode())
    assert not guard.blocks("ルカ".encode(), "ル".encode())
    assert guard.blocks(b"abc ", b"abc")  # "ab" again, completed inside one piece


def test_off_by_default():
    guard = RepetitionGuard()
    assert not guard.active and not guard.blocks(ME * 20, ME)


@pytest.mark.parametrize("options", [dict(max_repeats=-1), dict(repeat_unit=0), dict(no_repeat_ngram_size=-2)])
def test_bad_options_name_the_option(options):
    (name, value), = options.items()
    with pytest.raises(FusemtError, match=f"decoding.{name}={value}"):
        RepetitionGuard(**options)
