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

import torch
from bench_common import compose, interleaved

from decoding.base import decoder_class
from decoding.model import load_model
from runners.data import DatasetConfig, load_segments


def per_step(jobs: dict[str, tuple[object, list[str], int]], rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each job (decoder, sources, steps) in every interleaved round."""
    timed = interleaved({name: (lambda d=decoder, s=sources: d.decode(s)) for name, (decoder, sources, _) in jobs.items()},
                        rounds)
    return {name: [seconds / jobs[name][2] for seconds, _ in runs] for name, runs in timed.items()}


def show(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.1f} ms [{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="gemma3_smollm2")
    parser.add_argument("--steps", type=int, nargs=2, default=[32, 256], metavar=("SHORT", "LONG"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
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
        times = per_step(jobs, args.rounds)
        alone = sum(statistics.median(times[name]) for name in members)
        print(f"bs={batch} steps={short}: " + " + ".join(f"{n} {show(times[n])}" for n in members)
              + f" = {alone * 1e3:.1f} ms/step (HF generate greedy)")
        for method in methods:
            print(f"bs={batch} steps={short}: {method} {show(times[method])}  "
                  f"ratio={statistics.median(times[method]) / alone:.3f}")
        ratios[batch] = max(statistics.median(times[method]) / alone for method in methods)
    growth = 0.0
    jobs = {f"{method}@{steps}": (decoder(method, steps), sources[:1], steps) for method in methods for steps in (short, long)}
    times = per_step(jobs, args.rounds)
    for method in methods:
        t_short, t_long = statistics.median(times[f"{method}@{short}"]), statistics.median(times[f"{method}@{long}"])
        growth = max(growth, t_long / t_short)
        print(f"bs=1 {method}: {show(times[f'{method}@{short}'])}/token at {short}, "
              f"{show(times[f'{method}@{long}'])}/token at {long}, growth={t_long / t_short:.3f}")
    print(" ".join(f"ratio_bs{b}={r:.3f}" for b, r in ratios.items()) + f" growth_{long}_vs_{short}={growth:.3f}")


if __name__ == "__main__":
    main()
