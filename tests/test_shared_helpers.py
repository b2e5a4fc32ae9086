"""The small shared pieces, one definition each: UTF-8 character length, common prefix, the one-line
error exit, prompt rows, stop strings."""

import subprocess
import sys
from pathlib import Path

import pytest

from decoding.prompt import ensemble_stop_strings, find_stop, prompt_rows, render_prompt
from decoding.stream import common_prefix_len
from decoding.vocab import utf8_char_len
from eval.trace import character_chips

ROOT = Path(__file__).resolve().parent.parent


def codec_char_len(lead: int) -> int:
    """The length of a character Python's UTF-8 codec accepts starting with ``lead``; 0 if none does."""
    for n in range(1, 5):
        for second in range(0x80, 0xC0):
            data = bytes([lead]) + (bytes([second]) + b"\x80" * (n - 2) if n > 1 else b"")
            try:
                if len(data.decode("utf-8")) == 1:
                    return n
            except UnicodeDecodeError:
                pass
    return 0


def test_utf8_char_len_agrees_with_the_codec_on_every_byte():
    # Invalid leads (continuation bytes, overlong C0/C1, F5..FF) start no character: 0, not 1 or 2.
    assert [utf8_char_len(b) for b in range(256)] == [codec_char_len(b) for b in range(256)]


def test_trace_chips_give_up_an_invalid_lead_byte_without_swallowing_the_next_character():
    # C0 can never start a character: it is one incomplete chip at once, and あ (e3 81 82) stays whole.
    step = {"piece": "", "piece_bytes": (b"\xc0" + "あ".encode()).hex(), "origin": "x"}
    chips = character_chips([step])
    assert [(c.text, c.kind) for c in chips] == [("\\xc0", "incomplete"), ("あ", "char")]
    f5 = {"piece": "", "piece_bytes": (b"\xf5" + b"ab").hex(), "origin": "x"}
    assert [(c.text, c.kind) for c in character_chips([f5])] == [("\\xf5", "incomplete"), ("a", "char"), ("b", "char")]


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert (common_prefix_len((1, 2), (1, 2, 3)) == 2 and common_prefix_len([], [1]) == 0
            and common_prefix_len([7], [8]) == 0)


def test_fail_prints_one_line_and_exits_2():
    code = "from decoding.errors import FusemtError, fail; fail(FusemtError('bad thing: do this'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and proc.stderr == "fusemt: error: bad thing: do this\n" and proc.stdout == ""


def test_no_module_prints_its_own_error_line():
    """Every entry point reports user mistakes through decoding.errors.fail (one place)."""
    copies = [str(p.relative_to(ROOT)) for folder in ("decoding", "eval", "runners", "scripts")
              for p in (ROOT / folder).rglob("*.py") if 'f"fusemt: error:' in p.read_text(encoding="utf-8")]
    assert copies == ["decoding/errors.py"]


def test_prompt_rows_and_stop_strings():
    from toy_lm import TOY_PROMPT, toy_model

    sp, bpe = toy_model("sp"), toy_model("bpe")
    batch = render_prompt(sp, ["ab", "a b あ"], TOY_PROMPT)
    rows = prompt_rows(batch)
    assert [len(r) for r in rows] == batch["attention_mask"].sum(-1).tolist()
    assert rows[1] == batch["input_ids"][1].tolist()[-len(rows[1]):]  # left padding dropped
    assert ensemble_stop_strings([sp, bpe], TOY_PROMPT) == ["\n"]  # each stop string once
    assert find_stop(b"ab\ncd\n", ["\n"]) == 2 and find_stop(b"ab\ncd\n", ["\n"], start=4) == 5
    assert find_stop(b"abc", ["\n", ""]) is None


@pytest.mark.parametrize("lead,length", [(0x41, 1), (0xC3, 2), (0xE3, 3), (0xF0, 4), (0x80, 0), (0xC1, 0), (0xF8, 0)])
def test_utf8_char_len_examples(lead, length):
    assert utf8_char_len(lead) == length
