"""Per-step cost of the token-level ensembles vs the two models decoding alone, in one run.

    python scripts/bench_ensemble.py [--pair gemma3_smollm2] [--steps 32 256] [--repeats 2]

For batch 1 and 8 it times (a) each member alone with Hugging Face ``generate`` greedy and
(b) ``unite`` and ``tokenwise`` over the pair, every run forced to exactly N new tokens
(``min_new_tokens`` = ``max_new_tokens``), and reports

    ratio   = ensemble time per step / (model A per step + model B per step)
    growth  = ensemble time per token at 256 new tokens / at 32 (flat when caches work)

Last line: ``ratio_bs1=<x> ratio_bs8=<y> growth_256_vs_32=<z>`` (worst of unite/tokenwise).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoding.base import decoder_class  # noqa: E402
from decoding.model import load_model  # noqa: E402
from runners.config import build_run_config, register_schemas  # noqa: E402
from runners.data import DatasetConfig, load_segments  # noqa: E402


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from runners.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return build_run_config(hydra_compose("translate", overrides=list(overrides)))


def timed(decoder, sources, repeats: int) -> float:
    """Best wall time of ``repeats`` full decodes (the first call also warms up)."""
    decoder.decode(sources)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        decoder.decode(sources)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="gemma3_smollm2")
    parser.add_argument("--steps", type=int, nargs=2, default=[32, 256], metavar=("SHORT", "LONG"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    register_schemas()
    torch.manual_seed(0)
    sources = [s.source for s in load_segments(DatasetConfig(limit=max(args.batch_sizes)))]
    short, long = args.steps
    print(f"torch threads={torch.get_num_threads()} device={'cuda' if torch.cuda.is_available() else 'cpu'}")

    def per_step(method: str, members: str | None, batch: int, steps: int) -> float:
        overrides = [f"models={args.pair}", f"decoding={method}", f"decoding.max_new_tokens={steps}",
                     f"decoding.min_new_tokens={steps}"]
        if members:
            overrides.append(f"models.members=[{members}]")
        run = compose(*overrides)
        models = [load_model(spec) for spec in run.models]
        decoder = decoder_class(run.decoding_name)(run.decoding, models, run.prompt)
        return timed(decoder, sources[:batch], args.repeats) / steps

    member_names = [m.name for m in compose(f"models={args.pair}", "decoding=unite").models]
    ratios: dict[int, float] = {}
    growth = 0.0
    for batch in args.batch_sizes:
        singles = [per_step("greedy", name, batch, short) for name in member_names]
        baseline = sum(singles)
        print(f"bs={batch} steps={short}: " + " + ".join(f"{n} {t * 1e3:.1f} ms" for n, t in zip(member_names, singles))
              + f" = {baseline * 1e3:.1f} ms/step (HF generate greedy)")
        worst = 0.0
        for method in ("unite", "tokenwise"):
            t = per_step(method, None, batch, short)
            worst = max(worst, t / baseline)
            print(f"bs={batch} steps={short}: {method} {t * 1e3:.1f} ms/step  ratio={t / baseline:.3f}")
        ratios[batch] = worst
    for method in ("unite", "tokenwise"):
        t_short = per_step(method, None, 1, short)
        t_long = per_step(method, None, 1, long)
        growth = max(growth, t_long / t_short)
        print(f"bs=1 {method}: {t_short * 1e3:.1f} ms/token at {short}, {t_long * 1e3:.1f} ms/token at {long}, "
              f"growth={t_long / t_short:.3f}")
    print(" ".join(f"ratio_bs{b}={r:.3f}" for b, r in ratios.items()) + f" growth_{long}_vs_{short}={growth:.3f}")


if __name__ == "__main__":
    main()
