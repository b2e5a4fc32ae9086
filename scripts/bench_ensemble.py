"""Per-step cost of the token-level ensembles vs the two models decoding alone, in one run.

    python scripts/bench_ensemble.py [--pair gemma3_smollm2] [--batch-sizes 1 8 32] [--rounds 5]

For each batch size it times (a) each member alone with Hugging Face ``generate`` greedy and
(b) ``unite`` and ``tokenwise`` over the pair, every run forced to exactly N new tokens
(``min_new_tokens`` = ``max_new_tokens``). After one warm-up call each, the configurations are
timed in ``--rounds`` interleaved rounds (A B C D, A B C D, ...), so that a slow spell of the
machine hits all of them alike; each figure is the median over the rounds, with the spread
(min-max). Reports

    ratio   = median ensemble time per step / (median model A per step + median model B per step)
    growth  = median ensemble time per token at LONG new tokens / at SHORT (flat when caches work)

Last line: ``ratio_bs1=<x> ratio_bs8=<y> ... growth_<LONG>_vs_<SHORT>=<z>`` (medians; the worse of
unite/tokenwise).
"""

from __future__ import annotations

import argparse
import statistics
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


def interleaved(jobs: dict[str, tuple[object, list[str], int]], rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each job (decoder, sources, steps) in every round, after one warm-up each."""
    for decoder, sources, _ in jobs.values():
        decoder.decode(sources)
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, (decoder, sources, steps) in jobs.items():
            t0 = time.perf_counter()
            decoder.decode(sources)
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def show(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.1f} ms [{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="gemma3_smollm2")
    parser.add_argument("--steps", type=int, nargs=2, default=[32, 256], metavar=("SHORT", "LONG"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    register_schemas()
    torch.manual_seed(0)
    sources = [s.source for s in load_segments(DatasetConfig(limit=max(args.batch_sizes)))]
    short, long = args.steps
    print(f"torch threads={torch.get_num_threads()} device={'cuda' if torch.cuda.is_available() else 'cpu'} "
          f"pair={args.pair} rounds={args.rounds} (median [min-max] per step)")

    def decoder(method: str, steps: int, member: str | None = None):
        overrides = [f"models={args.pair}", f"decoding={method}", f"decoding.max_new_tokens={steps}",
                     f"decoding.min_new_tokens={steps}"] + ([f"models.members=[{member}]"] if member else [])
        run = compose(*overrides)
        return decoder_class(run.decoding_name)(run.decoding, [load_model(s) for s in run.models], run.prompt)

    members = [m.name for m in compose(f"models={args.pair}", "decoding=unite").models]
    methods = ("unite", "tokenwise")
    ratios: dict[int, float] = {}
    for batch in args.batch_sizes:
        rows = sources[:batch]
        jobs = {name: (decoder("greedy", short, name), rows, short) for name in members}
        jobs.update({method: (decoder(method, short), rows, short) for method in methods})
        times = interleaved(jobs, args.rounds)
        alone = sum(statistics.median(times[name]) for name in members)
        print(f"bs={batch} steps={short}: " + " + ".join(f"{n} {show(times[n])}" for n in members)
              + f" = {alone * 1e3:.1f} ms/step (HF generate greedy)")
        for method in methods:
            print(f"bs={batch} steps={short}: {method} {show(times[method])}  "
                  f"ratio={statistics.median(times[method]) / alone:.3f}")
        ratios[batch] = max(statistics.median(times[method]) / alone for method in methods)
    growth = 0.0
    jobs = {f"{method}@{steps}": (decoder(method, steps), sources[:1], steps) for method in methods for steps in (short, long)}
    times = interleaved(jobs, args.rounds)
    for method in methods:
        t_short, t_long = statistics.median(times[f"{method}@{short}"]), statistics.median(times[f"{method}@{long}"])
        growth = max(growth, t_long / t_short)
        print(f"bs=1 {method}: {show(times[f'{method}@{short}'])}/token at {short}, "
              f"{show(times[f'{method}@{long}'])}/token at {long}, growth={t_long / t_short:.3f}")
    print(" ".join(f"ratio_bs{b}={r:.3f}" for b, r in ratios.items()) + f" growth_{long}_vs_{short}={growth:.3f}")


if __name__ == "__main__":
    main()
