"""Write the fixed WMT24++ en-ja slices of the quality experiment (run once; the id files are committed).

    python scripts/make_wmt24pp_slices.py ../shared/data/wmt24_en_ja/wmt24pp_en_ja.jsonl

Segments with a good source of at most 250 characters, drawn per domain with a fixed seed: a dev
slice (prompt choice, the compatibility check) and a disjoint reported slice, each stratified over
the domains (every domain gets its quota, or all it has). Ids are interleaved across domains, so
``dataset.limit=n`` keeps a balanced prefix.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MAX_SOURCE_CHARS = 250
SEED = 2024
# Per domain: (dev, reported); the reported slice is sized so that the whole matrix of
# scripts/quality_experiment.py runs in about two hours on two CPU cores. WMT24++ en-ja has 468 short social,
# 139 literary, 44 news and 11 speech sources.
QUOTAS = {"social": (8, 8), "literary": (8, 8), "news": (6, 5), "speech": (3, 3)}
OUT = Path(__file__).resolve().parent.parent / "experiments" / "wmt24pp_en_ja"


def interleave(groups: list[list[str]]) -> list[str]:
    out, longest = [], max(map(len, groups))
    for i in range(longest):
        out += [g[i] for g in groups if i < len(g)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="wmt24pp_en_ja.jsonl (google/wmt24pp, en-ja_JP)")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(SEED)
    dev, test = [], []
    for domain, (n_dev, n_test) in QUOTAS.items():
        ids = [str(r["segment_id"]) for r in rows
               if r["domain"] == domain and not r["is_bad_source"] and len(r["source"]) <= MAX_SOURCE_CHARS]
        rng.shuffle(ids)
        dev.append(ids[:n_dev])
        test.append(ids[n_dev : n_dev + n_test])
    header = (f"# WMT24++ en-ja_JP segment ids (google/wmt24pp), sources <= {MAX_SOURCE_CHARS} chars, seed {SEED}, "
              "made by scripts/make_wmt24pp_slices.py\n")
    for name, groups, use in (("dev_ids.txt", dev, "dev slice: prompt choice and eval.compat; never reported"),
                              ("test_ids.txt", test, "reported slice: the quality experiment")):
        ids = interleave(groups)
        counts = ", ".join(f"{d} {len(g)}" for d, g in zip(QUOTAS, groups))
        (OUT / name).write_text(header + f"# {use}; {len(ids)} segments ({counts})\n" + "\n".join(ids) + "\n")
        print(f"{name}: {len(ids)} ids ({counts})")


if __name__ == "__main__":
    main()
