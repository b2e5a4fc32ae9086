"""Trace review: an HTML page of colour chips per run, and matplotlib bars per segment.

    python -m eval.trace results/sample/ensemble/unite__gemma3_270m+smollm2_135m__sample_en_ja.jsonl [--segment 0]

writes ``<run>.trace.html`` beside the JSONL (one chip per decoding step, coloured by where the
piece came from, with a tooltip of ids, probabilities and top candidates) and
``<run>.seg<N>.png`` (each model's probability of the chosen piece, per step).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path

from decoding.errors import FusemtError
from eval.jsonio import read_json_object, read_jsonl_objects

ORIGIN_COLOURS = {"both": "#b7e4c7", "all": "#b7e4c7", "lookup": "#d0bfff", "draft": "#b7e4c7", "target": "#ffc9c9"}
MODEL_COLOURS = ["#a5d8ff", "#ffd8a8", "#fcc2d7", "#c3fae8", "#ffec99"]
ROW_KEYS = ("id", "source", "hypothesis")  # what every results line has and the page shows


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FusemtError(f"results file {path} not found: pass a results/.../<run_name>.jsonl")
    fix = "pass a fusemt results JSONL, or fix or delete that line (rerunning the config rewrites a deleted segment)"
    rows = read_jsonl_objects(path, fix, required=ROW_KEYS)
    if not rows:
        raise FusemtError(f"{path} holds no segments yet")
    return rows


def origin_colours(rows: list[dict]) -> dict[str, str]:
    """Fixed colours for shared origins; each model (or model combination) gets its own."""
    colours = dict(ORIGIN_COLOURS)
    models = list(dict.fromkeys(m for r in rows for m in r.get("models", [])))
    others = sorted({s["origin"] for r in rows for s in r.get("trace", [])} - set(colours) - set(models))
    for i, name in enumerate(models + others):
        colours.setdefault(name, MODEL_COLOURS[i % len(MODEL_COLOURS)])
    return colours


def _probability(logprob) -> str:
    return "—" if logprob is None else f"{math.exp(logprob):.3f}"


def step_tooltip(step: dict) -> str:
    lines = [f"piece: {step['piece']!r}", f"origin: {step['origin']}"]
    for model, ids in step.get("ids", {}).items():
        lines.append(f"{model}: ids {ids}  p={_probability(step.get('logprob', {}).get(model))}")
    if step.get("top"):
        lines.append("top: " + ", ".join(f"{piece!r} {score:.3f}" for piece, score in step["top"]))
    if "union" in step:
        lines.append(f"union size: {step['union']}")
    if "proposed" in step:
        lines.append(f"round {step['round']}: proposed {step['proposed']}, accepted {step['accepted']}")
    if step.get("retokenized"):
        lines.append(f"re-tokenised (tokens rolled back): {step['retokenized']}")
    if step.get("end"):
        lines.append("end of sequence")
    return "\n".join(lines)


def _chip(step: dict, colours: dict[str, str]) -> str:
    shown = "⏎" if step.get("end") else step["piece"].replace("\n", "↵") or "∅"
    colour = colours.get(step["origin"], "#eeeeee")
    return (f'<span class="chip" style="background:{colour}" title="{html.escape(step_tooltip(step), quote=True)}">'
            f"{html.escape(shown)}</span>")


def _metric_line(metrics: dict) -> str:
    keys = ["segments", "bleu", "chrf", "comet", "tokens_per_s", "agreement_rate", "acceptance_rate", "mean_accepted_length"]
    return " · ".join(f"{k}: {html.escape(str(metrics[k]))}" for k in keys if metrics.get(k) is not None)


def render_html(rows: list[dict], metrics: dict | None, title: str) -> str:
    """The whole page; every piece of model or data text is HTML-escaped."""
    colours = origin_colours(rows)
    legend = "".join(f'<span class="chip" style="background:{c}">{html.escape(name)}</span>'
                     for name, c in colours.items() if any(s["origin"] == name for r in rows for s in r.get("trace", [])))
    nav = "".join(f'<a href="#seg{i}">{html.escape(str(r["id"]))}</a> ' for i, r in enumerate(rows))
    sections = []
    for i, row in enumerate(rows):
        chips = "".join(_chip(step, colours) for step in row.get("trace", []))
        stats = row.get("stats") or {}
        stat_line = " · ".join(f"{k}: {html.escape(json.dumps(v, ensure_ascii=False))}" for k, v in stats.items())
        warnings = "".join(f'<div class="warn">{html.escape(w)}</div>' for w in row.get("warnings", []))
        prev_link = f'<a href="#seg{i - 1}">← prev</a>' if i > 0 else ""
        next_link = f'<a href="#seg{i + 1}">next →</a>' if i + 1 < len(rows) else ""
        sections.append(f"""<section id="seg{i}">
<h2>{html.escape(str(row['id']))} <small>{prev_link} {next_link}</small></h2>
<div class="field"><b>source</b> {html.escape(row['source'])}</div>
<div class="field"><b>reference</b> {html.escape(str(row.get('reference') or ''))}</div>
<div class="field"><b>hypothesis</b> {html.escape(row['hypothesis'])}</div>
<div class="chips">{chips}</div>
<div class="stats">{stat_line}</div>{warnings}
</section>""")
    header = _metric_line(metrics or {})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 70em; }}
.chip {{ display: inline-block; padding: 0.1em 0.25em; margin: 0.08em; border-radius: 0.3em; white-space: pre;
         font-family: monospace; cursor: help; }}
.chips {{ margin: 0.5em 0; line-height: 1.9; }}
.field {{ margin: 0.2em 0; }} .stats {{ color: #555; font-size: 0.85em; }} .warn {{ color: #b00; }}
nav {{ margin: 0.5em 0 1em; font-size: 0.9em; }} section {{ border-top: 1px solid #ddd; padding-top: 0.5em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="metrics">{header}</div>
<div class="legend">{legend}</div>
<nav>{nav}</nav>
{''.join(sections)}
</body></html>
"""


CJK_FONTS = ["Noto Sans CJK JP", "Noto Sans JP", "IPAexGothic", "IPAGothic", "TakaoGothic", "VL Gothic",
             "Droid Sans Fallback", "WenQuanYi Zen Hei"]


def _cjk_font() -> str | None:
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def plot_segment(row: dict, path: Path) -> Path:
    """Horizontal bars: each model's probability of the chosen piece, one group per step.

    Japanese labels need a CJK font (e.g. Debian's fonts-noto-cjk); without one, pieces are
    shown with escapes rather than as empty boxes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = _cjk_font()
    show = (lambda piece: repr(piece)) if font else ascii
    steps = row.get("trace", [])
    models = list(dict.fromkeys(m for s in steps for m in s.get("logprob", {})))
    height = 0.8 / max(len(models), 1)
    if font:
        plt.rcParams["font.family"] = ["DejaVu Sans", font]
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.32 * len(steps) + 1)))
    for j, model in enumerate(models):
        probs = [math.exp(s["logprob"][model]) if s.get("logprob", {}).get(model) is not None else 0.0 for s in steps]
        ax.barh([i + j * height for i in range(len(steps))], probs, height=height, label=model,
                color=MODEL_COLOURS[j % len(MODEL_COLOURS)], edgecolor="#555")
    labels = [f"{i}: {'<end>' if s.get('end') else show(s['piece'])} [{s['origin']}]" for i, s in enumerate(steps)]
    ax.set_yticks([i + height * (len(models) - 1) / 2 for i in range(len(steps))], labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of the chosen piece")
    ax.set_title(f"segment {row['id']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_trace_report(results: Path, segment: int | None = 0) -> tuple[Path, Path | None]:
    rows = read_rows(results)
    metrics_path = results.with_suffix(".metrics.json")
    metrics = (read_json_object(metrics_path, "delete it (the page is drawn without metrics) or rerun the config")
               if metrics_path.exists() else None)
    html_path = results.with_suffix(".trace.html")
    html_path.write_text(render_html(rows, metrics, results.stem), encoding="utf-8")
    png = None
    if segment is not None:
        if not 0 <= segment < len(rows):
            raise FusemtError(f"--segment {segment} is out of range: {results} has {len(rows)} segments (0..{len(rows) - 1})")
        png = plot_segment(rows[segment], results.with_name(f"{results.stem}.seg{segment}.png"))
    return html_path, png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render a results JSONL's traces as HTML chips and matplotlib bars.")
    parser.add_argument("results", type=Path)
    parser.add_argument("--segment", type=int, default=0, help="segment (0-based line) to plot")
    args = parser.parse_args(argv)
    try:
        html_path, png = write_trace_report(args.results, args.segment)
    except FusemtError as err:
        print(f"fusemt: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {html_path}\nwrote {png}")


if __name__ == "__main__":
    main()
