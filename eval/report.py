"""Collect every ``*.metrics.json`` under a folder into one comparison table and plot.

    python -m eval.report results/

writes ``report.md``, ``report.csv`` and ``report.png`` (quality vs speed) into that folder.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from decoding.errors import FusemtError
from eval.jsonio import read_json_object

COLUMNS = ["run_name", "method", "models", "dataset", "segments", "bleu", "chrf", "comet", "tokens_per_s",
           "acceptance_rate", "agreement_rate"]


def collect(folder: Path) -> list[dict]:
    if not folder.is_dir():
        raise FusemtError(f"{folder} is not a folder: pass the results folder, e.g. results/")
    rows = []
    for path in sorted(folder.rglob("*.metrics.json")):
        metrics = read_json_object(path, "fix or delete that file (rerunning its config rewrites it), "
                                         "then rerun the report")
        row = {k: metrics.get(k) for k in COLUMNS}
        row["models"] = "+".join(metrics.get("models", []))
        rows.append(row)
    if not rows:
        raise FusemtError(f"no *.metrics.json under {folder}: run fusemt first")
    return sorted(rows, key=lambda r: (r["dataset"] or "", -(r["bleu"] or 0)))


def _cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = "comet" if all(r["comet"] is not None for r in rows) else "bleu"
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        if r["tokens_per_s"] is None or r[quality] is None:
            continue
        ax.scatter(r["tokens_per_s"], r[quality], s=40)
        ax.annotate(f"{r['method']}\n{r['models']}", (r["tokens_per_s"], r[quality]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("tokens / s")
    ax.set_ylabel(quality.upper() if quality == "bleu" else "COMET")
    ax.set_title("quality vs speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(folder: Path) -> list[Path]:
    rows = collect(folder)
    md, csv_path = folder / "report.md", folder / "report.csv"
    md.write_text(to_markdown(rows), encoding="utf-8")
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return [md, csv_path, plot(rows, folder / "report.png")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One comparison table (markdown + CSV) and a quality-vs-speed plot.")
    parser.add_argument("folder", type=Path, nargs="?", default=Path("results"))
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.folder)
    except FusemtError as err:
        print(f"fusemt: error: {err}", file=sys.stderr)
        sys.exit(2)
    print((args.folder / "report.md").read_text(), end="")
    print("\n".join(f"wrote {p}" for p in paths))


if __name__ == "__main__":
    main()
