"""Per-step cost of the token-level ensembles vs the two models decoding alone, and of the
speculative ensemble vs the plain ensemble, in one run.

    python scripts/bench_ensemble.py [--pair gemma3_smollm2] [--batch-sizes 1 8 32] [--rounds 5]
                                     [--speculate 4] [--se-batch-sizes 1 8] [--alternate] [--drafter I]
                                     [--draft-schedule heuristic] [--draft-confidence C]
                                     [--parts ratio growth se]

For each batch size it times (a) each member alone with Hugging Face ``generate`` greedy and
(b) ``unite`` and ``tokenwise`` over the pair, every run forced to exactly N new tokens
(``min_new_tokens`` = ``max_new_tokens``). After one warm-up call each, the configurations are
timed in ``--rounds`` interleaved rounds (A B C D, A B C D, ...), so that a slow spell of the
machine hits all of them alike; each figure is the median over the rounds, with the spread
(min-max). Reports

    ratio   = median ensemble time per step / (median model A per step + median model B per step)
    growth  = median ensemble time per token at LONG new tokens / at SHORT (flat when caches work)

Speculative ensemble (``decoding.speculate=K``, the cheapest member drafting, or ``--drafter I``;
``--alternate``: the members take turns; ``--draft-schedule``/``--draft-confidence``: shorter drafts where
they are likely wasted): ``unite``, ``tokenwise`` and ``charwise`` with and without speculation on the
same sources, each ending naturally (at most SHORT steps), timed the same interleaved way:

    se_speedup = median plain time / median speculative time (the same steps: outputs are compared)

Last line: ``ratio_bs1=<x> ratio_bs8=<y> ... growth_<LONG>_vs_<SHORT>=<z>`` (medians; the worse of
unite/tokenwise) ``se_speedup_bs1=<x> se_speedup_bs8=<y>`` (the worst of the three methods)
``se_identical=<0|1>`` (1 when every speculative output equals the plain ensemble's, in every round).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_common import compose, interleaved

from decoding.methods import decoder_class
from decoding.model import load_model
from decoding.speculate import DRAFT_SCHEDULES
from runners.data import DatasetConfig, load_segments

PARTS = ("ratio", "growth", "se")


def per_step(jobs: dict[str, tuple[object, list[str], int]], rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each job (decoder, sources, steps) in every interleaved round."""
    timed = interleaved({name: (lambda d=decoder, s=sources: d.decode(s))
                         for name, (decoder, sources, _) in jobs.items()},
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
    parser.add_argument("--speculate", type=int, default=4, help="drafted tokens per round of the speculative ensemble")
    parser.add_argument("--se-batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--alternate", action="store_true", help="members take turns drafting")
    parser.add_argument("--drafter", type=int, default=None,
                        help="index of the drafting member (default: the cheapest)")
    parser.add_argument("--draft-schedule", default="constant", choices=DRAFT_SCHEDULES,
                        help="heuristic: HF's adaptive draft length")
    parser.add_argument("--draft-confidence", type=float, default=0.0,
                        help="a draft stops before a token the drafter gives less probability")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args()
    torch.manual_seed(0)
    sources = [s.source for s in load_segments(DatasetConfig(limit=max(args.batch_sizes + args.se_batch_sizes)))]
    short, long = args.steps
    print(f"torch threads={torch.get_num_threads()} device={'cuda' if torch.cuda.is_available() else 'cpu'} "
          f"pair={args.pair} rounds={args.rounds} (median [min-max] per step)")

    def decoder(method: str, steps: int, *extra: str, forced: bool = True):
        overrides = [f"models={args.pair}", f"decoding={method}", f"decoding.max_new_tokens={steps}", *extra]
        run = compose(*overrides, *([f"decoding.min_new_tokens={steps}"] if forced else []))
        return decoder_class(run.decoding_name)(run.decoding, [load_model(s) for s in run.models], run.prompt)

    members = [m.name for m in compose(f"models={args.pair}", "decoding=unite").models]
    methods = ("unite", "tokenwise")
    summary = []
    if "ratio" in args.parts:
        ratios: dict[int, float] = {}
        for batch in args.batch_sizes:
            rows = sources[:batch]
            jobs = {name: (decoder("greedy", short, f"models.members=[{name}]"), rows, short) for name in members}
            jobs.update({method: (decoder(method, short), rows, short) for method in methods})
            times = per_step(jobs, args.rounds)
            alone = sum(statistics.median(times[name]) for name in members)
            print(f"bs={batch} steps={short}: " + " + ".join(f"{n} {show(times[n])}" for n in members)
                  + f" = {alone * 1e3:.1f} ms/step (HF generate greedy)")
            for method in methods:
                print(f"bs={batch} steps={short}: {method} {show(times[method])}  "
                      f"ratio={statistics.median(times[method]) / alone:.3f}")
            ratios[batch] = max(statistics.median(times[method]) / alone for method in methods)
        summary += [f"ratio_bs{b}={r:.3f}" for b, r in ratios.items()]
    if "growth" in args.parts:
        growth = 0.0
        jobs = {f"{method}@{steps}": (decoder(method, steps), sources[:1], steps)
                for method in methods for steps in (short, long)}
        times = per_step(jobs, args.rounds)
        for method in methods:
            t_short, t_long = (statistics.median(times[f"{method}@{short}"]),
                               statistics.median(times[f"{method}@{long}"]))
            growth = max(growth, t_long / t_short)
            print(f"bs=1 {method}: {show(times[f'{method}@{short}'])}/token at {short}, "
                  f"{show(times[f'{method}@{long}'])}/token at {long}, growth={t_long / t_short:.3f}")
        summary.append(f"growth_{long}_vs_{short}={growth:.3f}")
    if "se" in args.parts:
        spec = [f"decoding.num_draft_tokens={args.speculate}"] \
            + (["decoding.alternate=true"] if args.alternate else []) \
            + ([f"decoding.drafter={args.drafter}"] if args.drafter is not None else []) \
            + [f"decoding.draft_schedule={args.draft_schedule}", f"decoding.draft_confidence={args.draft_confidence}"]
        identical = True
        for batch in args.se_batch_sizes:
            rows = sources[:batch]
            jobs = {}
            for method in (*methods, "charwise"):
                jobs[method] = (lambda d=decoder(method, short, forced=False): d.decode(rows))
                jobs[f"{method}+se"] = (lambda d=decoder(method, short, *spec, forced=False): d.decode(rows))
            timed = interleaved(jobs, args.rounds)
            speedups = []
            for method in (*methods, "charwise"):
                plain, fast = timed[method], timed[f"{method}+se"]
                same = all([o.text for o in out] == [o.text for o in plain[0][1]] for _, out in plain + fast)
                identical = identical and same
                steps = max(o.stats["steps"] for o in plain[0][1])  # the batch takes as many steps as its longest row
                drafted = [o.stats["speculation"] for o in fast[0][1]]
                acceptance = sum(d["drafted_steps"] for d in drafted) / max(
                    sum(d["drafted_steps"] + d["corrected_steps"] for d in drafted), 1)
                t_plain, t_fast = [t / steps for t, _ in plain], [t / steps for t, _ in fast]
                speedups.append(statistics.median(t_plain) / statistics.median(t_fast))
                print(f"bs={batch} {method}: plain {show(t_plain)}/step, speculative {show(t_fast)}/step "
                      f"({steps} steps, draft acceptance {acceptance:.3f}, identical={int(same)}) "
                      f"se_speedup={speedups[-1]:.3f}")
            summary.append(f"se_speedup_bs{batch}={min(speedups):.3f}")
        summary.append(f"se_identical={int(identical)}")
    print(" ".join(summary))


if __name__ == "__main__":
    main()
