"""Trace review: an HTML page per run with one chip per output character, and matplotlib bars per segment.

    python -m eval.trace results/sample/ensemble/<run_name>.jsonl [--segment 0]

writes ``<run>.trace.html`` beside the JSONL and ``<run>.seg<N>.png`` (each model's probability of
the chosen piece, per step). The page shows, per segment: source, reference, hypothesis; one chip
per character, coloured by where it came from (a legend says what each colour means for the run's
method; a character whose bytes came in several steps is one chip, its steps in the tooltip;
characters of one multi-character step touch); tooltips with each member's probability and the
candidates ranked by the score the method decided by; sentence chrF/BLEU, COMET where scored,
length ratio and agreement rate; a character diff against the reference; flags for runaway
repetition, truncated prompts and empty output; sorting and filtering by score.
"""

from __future__ import annotations

import argparse
import difflib
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from decoding.errors import FusemtError, fail
from decoding.methods import DECODERS
from decoding.vocab import utf8_char_len
from eval.jsonio import read_json_object, write_atomically
from eval.metrics import segment_scores
from eval.report import METRICS_FIX, RunOptions, read_rows, read_segment_comet

# Pastel backgrounds that keep black text readable: agreement green, lookup violet, correction red.
SHARED_COLOURS = {"both": "#b7e4c7", "all": "#b7e4c7", "lookup": "#d0bfff", "draft": "#b7e4c7", "target": "#ffc9c9",
                  "fused": "#dee2e6"}
MODEL_COLOURS = ["#a5d8ff", "#ffd8a8", "#fcc2d7", "#c3fae8", "#ffec99", "#e9fac8"]
# The green origins: every member proposed the choice (the speculative target accepted the draft's). The page's
# "agreed" share of a segment counts exactly these steps, so the figure and the green chips say the same thing.
AGREED_ORIGINS = ("both", "all", "draft")
# Options that do nothing at another option's value (the page hides them):
# (option, inert value, options it makes inert).
INERT_OPTIONS = (("num_draft_tokens", "0", ("drafter", "alternate", "draft_schedule", "draft_confidence")),
                 ("speculate", "0", ("drafter", "alternate", "draft_schedule", "draft_confidence")),  # its old name
                 ("num_beams", "1", ("length_penalty", "early_stopping")),
                 ("temperature", "0.0", ("seed", "top_p")))
# Stat names the page spells out; other stats show under their own name.
STAT_NAMES = {"agreement_rate": "top-1 agreement (every member's most likely piece the same)",
              "forward_passes": "forward passes", "cache_crops": "cache crops", "steps": "steps"}
# A unit of 1-4 characters repeated 8+ times in a row: the loops fusion falls into (メメメ…, ルカルカ…).
REPETITION = re.compile(r"(.{1,4}?)\1{7,}", re.DOTALL)
SHOWN_CONTROL = {" ": "␣", "\n": "↵", "\t": "⇥"}
TOP_SHOWN = 5
# Step fields the tooltip lays out itself; any other field is listed as it is.
STEP_FIELDS = {"piece", "piece_bytes", "ids", "logprob", "origin", "end", "top", "union", "p", "score", "argmax",
               "covers", "fastpath", "retokenized", "round", "proposed", "accepted", "stop"}


def origin_meaning(method: str, origin: str, models: list[str]) -> str:
    """What a chip colour means: the method's own description (``Decoder.origin_meaning``); a method
    this installation does not know gets the bare origin, never another method's text."""
    cls = DECODERS.get(method)
    return (cls.origin_meaning(origin, models) if cls
            else f"origin '{origin}' (method '{method}' is not registered here)")


def origin_colours(rows: list[dict]) -> dict[str, str]:
    """Fixed colours for shared origins; each model (or model combination) gets its own."""
    colours = dict(SHARED_COLOURS)
    models = list(dict.fromkeys(m for r in rows for m in r.get("models", [])))
    others = sorted({s["origin"] for r in rows for s in r.get("trace", [])} - set(colours) - set(models))
    for i, name in enumerate(models + others):
        colours.setdefault(name, MODEL_COLOURS[i % len(MODEL_COLOURS)])
    return colours


@dataclass
class CharChip:
    """One character of the output (or an end step, or bytes that never completed a character)."""

    text: str  # the character; "" for an end step; backslash escapes for incomplete bytes
    steps: list[int]  # the trace steps its bytes came from
    kind: str = "char"  # char | end | incomplete


def _step_bytes(step: dict) -> bytes:
    return bytes.fromhex(step["piece_bytes"]) if "piece_bytes" in step else step["piece"].encode("utf-8")


def character_chips(trace: list[dict]) -> list[CharChip]:
    """The output's characters in order, each with the steps that produced its bytes: a kana that a
    byte-level model emitted as two pieces is one chip of two steps, a two-character piece is two
    chips of one step. Bytes that end no valid character become one ``incomplete`` chip."""
    chips: list[CharChip] = []
    pending, owners = bytearray(), []  # bytes of the character being assembled, and their steps

    def give_up_pending() -> None:
        if pending:
            chips.append(CharChip(bytes(pending).decode("utf-8", "backslashreplace"), sorted(set(owners)),
                                  "incomplete"))
            pending.clear()
            owners.clear()

    for index, step in enumerate(trace):
        if step.get("end"):
            give_up_pending()
            chips.append(CharChip("", [index], "end"))
            continue
        for byte in _step_bytes(step):
            pending.append(byte)
            owners.append(index)
            if len(pending) < utf8_char_len(pending[0]):  # 0: no character starts so: incomplete
                continue
            try:
                text = bytes(pending).decode("utf-8")
            except UnicodeDecodeError:
                give_up_pending()
                continue
            chips.append(CharChip(text, sorted(set(owners))))
            pending.clear()
            owners.clear()
    give_up_pending()
    return chips


def _probability(logprob) -> str:
    if logprob is None:
        return "—"
    p = math.exp(logprob)
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _chosen(step: dict) -> str:
    return "<end>" if step.get("end") else step["piece"]


def step_tooltip(step: dict, index: Optional[int] = None) -> str:
    """Every member's probability of the choice, the decision scores (``top``, the chosen one marked
    ▶) and the method's extras of one step."""
    data = _step_bytes(step)
    head = f"step {index} · " if index is not None else ""
    lines = [f"{head}piece: {_chosen(step)!r} ({len(data)} bytes) · origin: {step['origin']}"]
    ids = step.get("ids", {})
    for model in dict.fromkeys([*step.get("logprob", {}), *ids]):
        lines.append(f"  {model}: p={_probability(step.get('logprob', {}).get(model))}"
                     + (f"  ids {ids[model]}" if model in ids else "")
                     + (f"  most likely {step['argmax'][model]!r}" if model in step.get("argmax", {}) else "")
                     + (f"  covers {step['covers'][model]}" if model in step.get("covers", {}) else ""))
    if "score" in step:
        lines.append(f"  fused score: {step['score']:.4f}" + ("  (fast path: certain without scoring the rest)"
                                                               if step.get("fastpath") else ""))
    if step.get("top"):
        shown = step["top"][:TOP_SHOWN]
        chosen = next((i for i, (piece, _) in enumerate(shown) if piece == _chosen(step)), None)
        lines.append("  top by decision score: " + " · ".join(
            f"{'▶' if i == chosen else ''}{piece!r} {score:.4f}" for i, (piece, score) in enumerate(shown)))
    if "union" in step:
        lines.append(f"  union size: {step['union']}")
    if "proposed" in step:
        lines.append(f"  round {step['round']}: proposed {step['proposed']}, accepted {step['accepted']}")
    if step.get("retokenized"):
        lines.append(f"  re-tokenised (tokens rolled back): {step['retokenized']}")
    if step.get("stop"):
        lines.append(f"  stop string {step['stop']!r} starts after this piece")
    if step.get("end"):
        lines.append("  end of sequence")
    lines += [f"  {key}: {json.dumps(value, ensure_ascii=False)}" for key, value in step.items()
              if key not in STEP_FIELDS]
    return "\n".join(lines)


def chip_tooltip(chip: CharChip, trace: list[dict]) -> str:
    if chip.kind == "end":
        return step_tooltip(trace[chip.steps[0]], chip.steps[0])
    data = chip.text.encode("utf-8") if chip.kind == "char" else b"".join(_step_bytes(trace[i]) for i in chip.steps)
    if chip.kind == "char":
        head = f"{chip.text!r} U+{ord(chip.text):04X} · bytes {data.hex(' ')}"
    else:
        head = f"incomplete character {chip.text} (the output stopped inside it, or it is not UTF-8)"
    if len(chip.steps) > 1:
        head += f"\nassembled from {len(chip.steps)} steps: " + ", ".join(map(str, chip.steps))
    return "\n".join([head] + [step_tooltip(trace[i], i) for i in chip.steps])


@dataclass
class SegmentReview:
    """What the page says about one segment besides its text."""

    bleu: Optional[float] = None
    chrf: Optional[float] = None
    comet: Optional[float] = None
    length_ratio: Optional[float] = None  # hypothesis characters / reference characters
    agreement: Optional[float] = None  # share of steps with a green (agreed) origin, for ensembles
    flags: list[str] = field(default_factory=list)

    def data_attributes(self) -> str:
        values = {"bleu": self.bleu, "chrf": self.chrf, "comet": self.comet, "ratio": self.length_ratio,
                  "agreement": self.agreement}
        cells = " ".join(f'data-{k}="{"" if v is None else v}"' for k, v in values.items())
        return f'{cells} data-flagged="{int(bool(self.flags))}"'

    def line(self) -> str:
        parts = [f"{name} {value:.{digits}f}" for name, value, digits in
                 (("chrF", self.chrf, 1), ("BLEU", self.bleu, 1), ("COMET", self.comet, 3)) if value is not None]
        if self.length_ratio is not None:
            parts.append(f"length {self.length_ratio:.2f}× reference")
        if self.agreement is not None:
            parts.append(f"agreed {self.agreement:.2f} of steps (green)")
        return " · ".join(parts)


def repetition(text: str) -> Optional[str]:
    """The longest runaway repetition in ``text`` (a 1-4 character unit 8+ times in a row), described."""
    runs = [m for m in REPETITION.finditer(text) if m.group(1).strip()]
    if not runs:
        return None
    worst = max(runs, key=lambda m: len(m.group(0)))
    return f"runaway repetition: {worst.group(1)!r} ×{len(worst.group(0)) // len(worst.group(1))}"


def segment_flags(row: dict, max_steps: Optional[int] = None) -> list[str]:
    """Problems a reviewer should see at once: runaway repetition, a truncated prompt, empty output,
    stopping at the step limit."""
    flags = []
    if not row["hypothesis"].strip():
        flags.append("empty output")
    if found := repetition(row["hypothesis"]):
        flags.append(found)
    flags += [w for w in row.get("warnings") or [] if "truncated" in w]
    trace = row.get("trace") or []
    if max_steps and len(trace) >= max_steps and not any(s.get("end") or s.get("stop") for s in trace[-1:]):
        flags.append(f"stopped at max_new_tokens={max_steps}")
    return flags


def review_segments(rows: list[dict], segment_comet: Optional[Mapping[str, float]] = None,
                    max_steps: Optional[int] = None) -> list[SegmentReview]:
    """Sentence BLEU/chrF (``eval.metrics.segment_scores``), COMET, length ratio, agreement and flags per row."""
    scored = [i for i, r in enumerate(rows) if r.get("reference") is not None]
    sentence = segment_scores([rows[i]["hypothesis"] for i in scored], [rows[i]["reference"] for i in scored])
    reviews = [SegmentReview(flags=segment_flags(row, max_steps)) for row in rows]
    for i, bleu, chrf in zip(scored, sentence.bleu, sentence.chrf):
        reviews[i].bleu, reviews[i].chrf = bleu, chrf
        reference = rows[i]["reference"]
        reviews[i].length_ratio = round(len(rows[i]["hypothesis"]) / len(reference), 3) if reference else None
    for row, review in zip(rows, reviews):
        review.comet = (segment_comet or {}).get(str(row["id"]))
        review.agreement = agreed_share(row)
    return reviews


def agreed_share(row: dict) -> Optional[float]:
    """Share of an ensemble's steps whose origin is an agreed one (the green chips); None for one model."""
    trace = row.get("trace") or []
    if len(row.get("models") or []) < 2 or not trace:
        return None
    return round(sum(step["origin"] in AGREED_ORIGINS for step in trace) / len(trace), 3)


def stat_text(value) -> str:
    """A stat as a reader wants it: numbers rounded, per-model counts as "model n", lists compact."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {stat_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(stat_text(v) for v in value) + "]"
    return str(value)


def stats_html(stats: Mapping) -> str:
    return " · ".join(f"{html.escape(STAT_NAMES.get(k, k.replace('_', ' ')))}: {html.escape(stat_text(v))}"
                      for k, v in stats.items())


def speculative_rounds(trace: list[dict]) -> list[dict]:
    """The rounds of a speculative segment: what the draft proposed, how much the target accepted, and
    the target's own token (its correction or bonus), as text (bytes joined before decoding)."""
    rounds, current = [], []
    for step in trace:
        current.append(step)
        if "proposed" in step:
            accepted = step["accepted"]
            proposed = b"".join(_escaped_bytes(p) for p in step["proposed"])
            accepted_bytes = b"".join(_step_bytes(s) for s in current[:accepted])
            rejected = proposed[len(accepted_bytes):] if proposed.startswith(accepted_bytes) else proposed
            own = b"".join(_step_bytes(s) for s in current[accepted:])
            rounds.append({"round": step["round"], "proposed": len(step["proposed"]), "accepted": accepted,
                           "accepted_text": accepted_bytes.decode("utf-8", "replace"),
                           "rejected_text": rejected.decode("utf-8", "replace"),
                           "target_text": "<end>" if any(s.get("end") for s in current[accepted:])
                           else own.decode("utf-8", "replace")})
            current = []
    return rounds


def _escaped_bytes(text: str) -> bytes:
    """Bytes of a piece written with ``backslashreplace`` (``\\xe3`` for a byte of a partial character)."""
    parts = re.split(r"\\x([0-9a-f]{2})", text)
    return b"".join(bytes([int(part, 16)]) if i % 2 else part.encode("utf-8") for i, part in enumerate(parts))


def rounds_html(trace: list[dict]) -> str:
    rounds = speculative_rounds(trace)
    if not rounds:
        return ""
    body = "".join(
        f'<tr><td class="num">{r["round"]}</td><td><span class="acc">{html.escape(r["accepted_text"])}</span>'
        f'<del>{html.escape(r["rejected_text"])}</del> <span class="own">{html.escape(r["target_text"])}</span></td>'
        f'<td class="num">{r["accepted"]}/{r["proposed"]}</td></tr>' for r in rounds)
    return (f'<details class="rounds"><summary>{len(rounds)} speculative rounds</summary><table><thead><tr><th>round'
            '</th><th><span class="acc">accepted draft</span> <del>rejected draft</del> '
            '<span class="own">target\'s own '
            f'token</span></th><th>accepted</th></tr></thead><tbody>{body}</tbody></table></details>')


def diff_html(hypothesis: str, other: str) -> str:
    """A character diff: text only in the hypothesis struck out red, text only in ``other`` green."""
    parts = []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(None, hypothesis, other, autojunk=False).get_opcodes():
        if op == "equal":
            parts.append(html.escape(hypothesis[a0:a1]))
            continue
        if a1 > a0:
            parts.append(f"<del>{html.escape(hypothesis[a0:a1])}</del>")
        if b1 > b0:
            parts.append(f"<ins>{html.escape(other[b0:b1])}</ins>")
    return "".join(parts)


def flag_badges(flags: list[str]) -> str:
    return "".join(f'<span class="flag">⚠ {html.escape(f)}</span>' for f in flags)


def _shown(chip: CharChip) -> str:
    if chip.kind == "end":
        return "⏎"
    if chip.kind == "incomplete":
        return chip.text
    return SHOWN_CONTROL.get(chip.text, chip.text if chip.text.isprintable() else ascii(chip.text)[1:-1])


def chips_html(trace: list[dict], colour_class: Mapping[str, str], colours: Mapping[str, str]) -> str:
    """One chip per character, each with its own tooltip; the characters of one step (or the one
    character several steps made) sit in one box coloured by the step's origin (a gradient when
    its steps differ), outlined dashed when the character was assembled from several steps."""
    groups: list[list[CharChip]] = []
    for chip in character_chips(trace):
        if groups and chip.kind == "char" and groups[-1][-1].kind == "char" and groups[-1][-1].steps == chip.steps:
            groups[-1].append(chip)
        else:
            groups.append([chip])
    out = []
    for group in groups:
        steps = group[0].steps
        origins = list(dict.fromkeys(trace[i]["origin"] for i in steps))
        classes = " ".join(c for c in ("g", colour_class.get(origins[0], ""), "multi" if len(steps) > 1 else "") if c)
        style = (f' style="background: linear-gradient(90deg, {", ".join(colours.get(o, "#eee") for o in origins)})"'
                 if len(origins) > 1 else "")
        inner = "".join(f'<span class="c{_chip_class(chip)}" '
                        f'title="{html.escape(chip_tooltip(chip, trace), quote=True)}">'
                        f"{html.escape(_shown(chip))}</span>" for chip in group)
        out.append(f'<span class="{classes}"{style}>{inner}</span>')
    return "".join(out)


def _chip_class(chip: CharChip) -> str:
    if chip.kind != "char":
        return f" {chip.kind}"
    return " ws" if chip.text in SHOWN_CONTROL else ""


# Sorting and filtering of segment blocks (and their rows in the index) by the data-* scores they carry;
# without JavaScript (some viewers) the page simply stays in file order.
SORT_SCRIPT = """
function fusemtValue(el, key) {
  const v = el.dataset[key];
  return v === undefined || v === "" ? null : Number(v);
}
function fusemtReorder(container, key, descending, keep) {
  const items = Array.from(container.children);
  items.sort((a, b) => {
    const x = fusemtValue(a, key), y = fusemtValue(b, key);
    if (x === null || y === null) return (x === null) - (y === null) || a.dataset.order - b.dataset.order;
    return (descending ? y - x : x - y) || a.dataset.order - b.dataset.order;
  });
  for (const el of items) { el.hidden = !keep(el); container.appendChild(el); }
}
"""

TRACE_SCRIPT = SORT_SCRIPT + """
function applyView() {
  const key = document.getElementById("sort").value;
  const descending = document.getElementById("direction").value === "desc";
  const flaggedOnly = document.getElementById("flagged").checked;
  const below = document.getElementById("below").value;
  const keep = el => (!flaggedOnly || el.dataset.flagged === "1") &&
      (below === "" || (el.dataset.chrf !== "" && Number(el.dataset.chrf) < Number(below)));
  for (const container of document.querySelectorAll("[data-segments]"))
    fusemtReorder(container, key, key !== "order" && descending, keep);
}
// the view can also be set from the address: <run>.trace.html?sort=chrf&direction=asc&flagged=1&below=30
const params = new URLSearchParams(location.search);
for (const id of ["sort", "direction", "below"]) if (params.has(id)) document.getElementById(id).value = params.get(id);
document.getElementById("flagged").checked = params.get("flagged") === "1";
for (const id of ["sort", "direction", "flagged", "below"])
  document.getElementById(id).addEventListener("input", applyView);
applyView();
"""

PAGE_STYLE = """
body { font-family: "Noto Sans CJK JP", "Noto Sans JP", "IPAexGothic", sans-serif; margin: 1.2em; max-width: 80em; }
.g { display: inline-block; margin: 0.1em 0 0.1em 0.2em; border-radius: 0.3em; border: 1px solid transparent; }
.g.multi { border: 1px dashed #333; }
.c { display: inline-block; min-width: 0.6em; text-align: center; padding: 0.05em 0.12em; white-space: pre; \
cursor: help; }
.g .c + .c { border-left: 1px dotted rgba(0, 0, 0, 0.18); }
.c.ws, .c.end { color: #666; } .c.incomplete { font-family: monospace; font-size: 0.8em; color: #900; }
.chips { margin: 0.4em 0; line-height: 2.0; font-size: 1.15em; }
.field { margin: 0.15em 0; } .field b { display: inline-block; min-width: 6.5em; color: #444; }
.scores { color: #333; font-size: 0.9em; margin: 0.2em 0; } .stats { color: #666; font-size: 0.8em; }
.flag { display: inline-block; background: #fff3bf; color: #7a4a00; border: 1px solid #f0c36d; border-radius: 0.3em;
        padding: 0 0.35em; margin: 0 0.3em 0 0; font-size: 0.85em; }
.warn { color: #b00; font-size: 0.9em; }
del { background: #ffe3e3; color: #a00; } ins { background: #d3f9d8; color: #064; text-decoration: none; }
section { border-top: 1px solid #ddd; padding: 0.4em 0; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ddd; padding: 0.15em 0.4em; }
th { background: #f1f3f5; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.acc { background: #b7e4c7; } .own { background: #ffc9c9; } details.rounds table { font-size: 0.9em; }
.legend td { vertical-align: top; } .controls { margin: 0.6em 0; padding: 0.3em; background: #f8f9fa; }
.meta { color: #444; font-size: 0.9em; }
"""


def _metric_line(metrics: dict) -> str:
    keys = ["segments", "bleu", "chrf", "comet", "tokens_per_s", "agreement_rate", "acceptance_rate",
            "mean_accepted_length", "fastpath_share"]
    return " · ".join(f"{k}: {html.escape(str(metrics[k]))}" for k in keys if metrics.get(k) is not None)


def _pool_line(metrics: dict) -> str:
    """A pool run's origin shares and oracle; the oracle rule itself is marked as an upper bound."""
    if "pool_choice_share" not in metrics:
        return ""
    shares = ", ".join(f"{html.escape(o)} {v:.0%}" for o, v in metrics["pool_choice_share"].items())
    oracle = (f' · pool oracle (upper bound): BLEU {metrics["pool_oracle_bleu"]}, chrF {metrics["pool_oracle_chrf"]}'
              if "pool_oracle_chrf" in metrics else "")
    bound = ('<div class="warn">select=oracle: chosen with the reference: an UPPER BOUND, not a translation method'
             '</div>'
             if (metrics.get("config") or {}).get("decoding", {}).get("select") == "oracle" else "")
    return f'{bound}<div class="meta">choices by origin: {shares}{oracle}</div>'


def _legend(rows: list[dict], method: str, colours: dict[str, str], colour_class: dict[str, str]) -> str:
    """Each colour that occurs, with what it means for this method, and each chip shape that occurs."""
    models = list(dict.fromkeys(m for r in rows for m in r.get("models", [])))
    seen = {s["origin"] for r in rows for s in r.get("trace", [])}
    # shared first, then models
    entries = [(f'<span class="g {colour_class[o]}"><span class="c">{html.escape(o)}</span></span>',
                html.escape(origin_meaning(method, o, models))) for o in colours if o in seen]
    chips = [chip for r in rows for chip in character_chips(r.get("trace") or [])]
    if any(len(chip.steps) > 1 for chip in chips):
        entries.append(('<span class="g multi"><span class="c">ル</span></span>', "one character whose bytes came in "
                        "several steps (a byte-level piece ends inside it); its steps are listed in its tooltip"))
    if any(a.kind == b.kind == "char" and a.steps == b.steps for a, b in zip(chips, chips[1:])):
        entries.append(('<span class="g"><span class="c">今</span><span class="c">日</span></span>',
                        "one box of several "
                        "characters: one step added them (a multi-character token); each character has its own chip"))
    shown = [(kind, mark, text) for kind, mark, text in (("end", "⏎", "end of sequence"), ("ws", "␣", "a space"),
                                                         ("incomplete", "\\xe3", "bytes of an unfinished character"))
             if any(_chip_class(chip).strip() == kind for chip in chips)]
    if shown:
        entries.append((" ".join(f'<span class="g"><span class="c {kind}">{mark}</span></span>'
                                 for kind, mark, _ in shown),
                        "; ".join(text for _, _, text in shown)))
    entries.append(("tooltip", "hover a chip: each member's probability of the choice, the candidates ranked by the "
                    "score the method decided by (▶ the chosen one), and the method's step details"))
    return "<table class=\"legend\">" + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in entries) + "</table>"


def _cell(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _index(rows: list[dict], reviews: list[SegmentReview]) -> str:
    body = "".join(
        f'<tr data-order="{i}" {rev.data_attributes()}><td class="num">{i}</td>'
        f'<td><a href="#seg{i}">{html.escape(str(row["id"]))}</a></td><td class="num">{_cell(rev.chrf, 1)}</td>'
        f'<td class="num">{_cell(rev.bleu, 1)}</td><td class="num">{_cell(rev.comet, 3)}</td>'
        f'<td class="num">{_cell(rev.length_ratio, 2)}</td><td class="num">{_cell(rev.agreement, 2)}</td>'
        f'<td>{flag_badges(rev.flags)}</td></tr>' for i, (row, rev) in enumerate(zip(rows, reviews)))
    return (f'<details {"open" if len(rows) <= 40 else ""}><summary>segments ({len(rows)})</summary>'
            '<table><thead><tr><th>#</th><th>id</th><th>chrF</th><th>BLEU</th><th>COMET</th><th>length ratio</th>'
            f'<th>agreed</th><th>flags</th></tr></thead><tbody data-segments>{body}</tbody></table></details>')


CONTROLS = """<div class="controls">sort by <select id="sort"><option value="order">file order</option>
<option value="chrf">sentence chrF</option><option value="bleu">sentence BLEU</option>\
<option value="comet">COMET</option>
<option value="ratio">length ratio</option><option value="agreement">agreed share</option></select>
<select id="direction"><option value="asc">lowest first</option><option value="desc">highest first</option></select>
· <label><input type="checkbox" id="flagged"> flagged only</label>
· <label>chrF below <input type="number" id="below" min="0" max="100" step="5" style="width: 4em"></label></div>"""


def _options_line(metrics: dict) -> str:
    """The run's method options on one line; prompt options (long texts) folded away."""
    options = RunOptions.from_metrics(metrics)
    if not options.values:
        return ""
    source = "options" if options.complete else "overrides (other options at their defaults)"
    method = {k: v for k, v in options.values.items() if not k.startswith("prompt.")}
    inert = list(dict.fromkeys(k for key, value, keys in INERT_OPTIONS if method.get(key, value) == value
                               for k in keys if k in method))
    method = {k: v for k, v in method.items() if k not in inert}
    prompt = {k: v for k, v in options.values.items() if k.startswith("prompt.")}
    line = " · ".join(f"{html.escape(k)}={html.escape(v)}" for k, v in method.items())
    folded = ("<details><summary>prompt</summary><table>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td><pre>{html.escape(v)}</pre></td></tr>" for k, v in prompt.items())
        + "</table></details>") if prompt else ""
    hidden = f" (not shown, no effect at these settings: {html.escape(', '.join(inert))})" if inert else ""
    return f'<div class="meta">{source}: {line}{hidden}</div>{folded}'


def pool_html(pool: Optional[list[dict]]) -> str:
    """A pool's candidates ranked by the score the rule chose by (▶ the chosen one); ties keep pool order."""
    if not pool:
        return ""
    ranked = sorted(pool, key=lambda c: -c["score"])
    members = list(dict.fromkeys(m for c in pool for m in c.get("logprob") or {}))
    head = "".join(f"<th>log p {html.escape(m)}</th>" for m in members)
    body = "".join(
        f'<tr><td>{"▶" if c["chosen"] else ""}</td><td class="num">{c["score"]:.3f}</td>'
        f'<td>{html.escape(c["text"])}</td>'
        f'<td>{html.escape(", ".join(f"{o}×{n}" for o, n in c["origins"].items()))}</td>'
        f'<td class="num">{c["count"]}</td>'
        f'<td class="num">{_cell(c.get("utility"), 2)}</td>'
        + "".join(f'<td class="num">{_cell((c.get("logprob") or {}).get(m), 2)}</td>' for m in members)
        + f'<td class="num">{_cell(c.get("joint"), 4)}</td><td class="num">{_cell(c.get("ref_chrf"), 1)}</td></tr>'
        for c in ranked)
    return (f'<details><summary>pool: {len(pool)} candidates, ranked by the rule\'s score (▶ chosen)</summary><table>'
            '<tr><th></th><th>score</th><th>candidate</th><th>origins</th><th>count</th>'
            f'<th>expected utility</th>{head}'
            '<th>joint (per char)</th><th>chrF vs reference (oracle only)</th></tr>'
            f'{body}</table></details>')


def step_limit(options: RunOptions) -> Optional[int]:
    """The run's ``max_new_tokens`` (steps: tokens, or characters for charwise), when its config is known."""
    value = options.values.get("max_new_tokens")
    return int(value) if value and value.isdigit() else None


def render_html(rows: list[dict], metrics: dict | None, title: str,
                segment_comet: Optional[Mapping[str, float]] = None) -> str:
    """The whole page; every piece of model or data text is HTML-escaped. ``segment_comet`` maps
    segment id to its COMET score (the run's ``<run>.comet.jsonl``)."""
    metrics = metrics or {}
    method = metrics.get("method") or (rows[0].get("method") if rows else "") or ""
    models = list(dict.fromkeys(m for r in rows for m in r.get("models", [])))
    colours = origin_colours(rows)
    colour_class = {name: f"o{i}" for i, name in enumerate(colours)}
    colour_css = "".join(f".{colour_class[name]} {{ background: {c}; }}\n" for name, c in colours.items())
    reviews = review_segments(rows, segment_comet, step_limit(RunOptions.from_metrics(metrics)))
    sections = []
    for i, (row, review) in enumerate(zip(rows, reviews)):
        trace = row.get("trace") or []
        stats = row.get("stats") or {}
        stat_line = stats_html(stats)
        other_warnings = "".join(f'<div class="warn">{html.escape(w)}</div>'
                                 for w in row.get("warnings") or [] if w not in review.flags)
        reference = row.get("reference")
        diff = (f'<div class="field"><b>diff</b> {diff_html(row["hypothesis"], reference)}</div>'
                if reference is not None else "")
        sections.append(f"""<section id="seg{i}" data-order="{i}" {review.data_attributes()}>
<h3>{i}: {html.escape(str(row['id']))} {flag_badges(review.flags)}</h3>
<div class="scores">{review.line()}{f" · {len(trace)} steps" if trace else ""}</div>
<div class="field"><b>source</b> {html.escape(row['source'])}</div>
<div class="field"><b>reference</b> {html.escape(str(reference or ''))}</div>
<div class="field"><b>hypothesis</b> {html.escape(row['hypothesis'])}</div>{diff}
<div class="chips">{chips_html(trace, colour_class, colours) if trace else "<i>no trace</i>"}</div>
{rounds_html(trace)}<div class="stats">{stat_line}</div>{other_warnings}{pool_html(row.get("pool"))}
</section>""")
    return f"""<!DOCTYPE html>
<html lang="ja"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{PAGE_STYLE}{colour_css}</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="meta">{html.escape(method)} · {html.escape(" + ".join(metrics.get("models") or models))}</div>
<div class="meta">{_metric_line(metrics)}</div>
{_pool_line(metrics)}{_options_line(metrics)}
<h2>Legend</h2>
{_legend(rows, method, colours, colour_class)}
<p class="meta">Scores per segment: sentence chrF and BLEU (sacrebleu, ja-mecab, effective order), COMET where scored,
length in characters against the reference, for ensembles the share of steps whose choice every member
proposed (the green chips). diff: <del>only in the
hypothesis</del> <ins>only in the reference</ins>.</p>
{CONTROLS}
{_index(rows, reviews)}
<div data-segments>
{''.join(sections)}
</div>
<script>{TRACE_SCRIPT}</script>
</body></html>
"""


def plot_segment(row: dict, path: Path) -> Path:
    """Horizontal bars: each model's probability of the chosen piece, one group per step."""
    from eval.plots import label_text, use_cjk_font

    use_cjk_font()
    import matplotlib.pyplot as plt

    steps = row.get("trace", [])
    models = list(dict.fromkeys(m for s in steps for m in s.get("logprob", {})))
    height = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.32 * len(steps) + 1)))
    for j, model in enumerate(models):
        probs = [math.exp(s["logprob"][model]) if s.get("logprob", {}).get(model) is not None else 0.0 for s in steps]
        ax.barh([i + j * height for i in range(len(steps))], probs, height=height, label=model,
                color=MODEL_COLOURS[j % len(MODEL_COLOURS)], edgecolor="#555")
    labels = [f"{i}: {'<end>' if s.get('end') else label_text(repr(s['piece']))} [{s['origin']}]"
              for i, s in enumerate(steps)]
    ax.set_yticks([i + height * (len(models) - 1) / 2 for i in range(len(steps))], labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of the chosen piece")
    ax.set_title(label_text(f"segment {row['id']}"), fontsize=9, loc="left")
    if models:  # above the bars, where it hides none of them
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(models), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_trace_report(results: Path, segment: int | None = 0) -> tuple[Path, Path | None]:
    rows = read_rows(results)
    metrics_path = results.with_suffix(".metrics.json")
    metrics = read_json_object(metrics_path, METRICS_FIX) if metrics_path.exists() else None
    if segment is not None and not 0 <= segment < len(rows):  # checked before anything is written
        raise FusemtError(f"--segment {segment} is out of range: {results} has {len(rows)} segments "
                          f"(0..{len(rows) - 1})")
    html_path = results.with_suffix(".trace.html")
    write_atomically(html_path, render_html(rows, metrics, results.stem, read_segment_comet(results)))
    png = None
    if segment is not None:
        png = plot_segment(rows[segment], results.with_name(f"{results.stem}.seg{segment}.png"))
    return html_path, png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render a results JSONL's traces as an HTML page and matplotlib bars.")
    parser.add_argument("results", type=Path)
    parser.add_argument("--segment", type=int, default=0, help="segment (0-based line) to plot")
    args = parser.parse_args(argv)
    try:
        html_path, png = write_trace_report(args.results, args.segment)
    except (FusemtError, OSError) as err:  # an OS error: a read-only folder, a full disk, ...
        fail(err)
    print(f"wrote {html_path}\nwrote {png}")


if __name__ == "__main__":
    main()
