"""Host cost of a fused step: the time a decoding step spends outside the members' forward calls.

    python scripts/bench_overhead.py [--pair gemma3_smollm2] [--batch-sizes 1 8 32] [--steps 32]
                                     [--rounds 3] [--methods unite tokenwise charwise] [--variants]
                                     [--growth 512] [--trace full off] [--quick]

For each batch size it runs each member alone under Hugging Face ``generate`` greedy and each fused
method over the pair, every run forced to exactly ``--steps`` new tokens (characters for
``charwise``), in ``--rounds`` interleaved rounds after one warm-up round (A B C, A B C, ...: a slow
spell of the machine hits all of them alike). For every run it measures

    wall     the decoding time (``prepare`` excluded) per step
    forward  the time inside the members' forward calls (hooks on each member's HF module) per step
    host     wall - forward: what a GPU does not make faster
    vocab    the part of host spent in vocabulary-sized tensor operations (any torch operation outside a
             forward call with a tensor whose last dimension is at least the smallest member's
             vocabulary: log-softmax, masks, top-k, lookups, copies; timed by a TorchFunctionMode)
    py       host - vocab: Python and small-tensor work, the part a GPU cannot absorb
    kv       the part of py spent in operations outside a forward call that take a 4-D tensor as a
             positional argument: KV-cache rows copied, reordered or extended ([rows, heads, columns,
             dim]) and the steps of mask building that work on [rows, 1, queries, columns] masks; copies
             a GPU runs on the device, shown apart so that ``py - kv`` is the Python and small-tensor
             work proper (on CUDA every timed operation synchronises, which adds to the host time)

and prints the medians over the rounds with their spread [min-max]. ``hf`` figures are the members'
HF ``generate`` host times summed (as the fused step runs both members). ``--variants`` also times the
speculative (``decoding.speculate=4``) and beam (``decoding.num_beams=4``) variants of unite and
tokenwise at batch 8 (host per generated token). ``--growth N``: one run of each method at batch 1
forced to N steps; host per step over its last 32 steps / over steps 17..48 (``host_growth_N_vs_32``).
``--trace``: the run's trace levels (decoding.base.TRACE_LEVELS); the first is the one every job and
the last line use, each further one adds the fused methods at that level (``unite@off``) to the same
interleaved rounds.

``--quick`` (a few minutes on 2 busy cores): 16 steps, 2 rounds, growth over 512 steps for unite only.
On a CUDA device the hooks synchronise, so the split is exact there too.

Last line: ``host_ms_bs8_unite= host_ms_bs8_tokenwise= host_ms_bs8_charwise= host_ms_bs32_unite= ...
hf_host_ms_bs8= hf_host_ms_bs32= py_ms_bs8_<method>= py_ms_bs32_<method>= kv_ms_bs8_<method>= kv_ms_bs32_<method>=
host_growth_512_vs_32=``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_common import compose, interleaved
from torch.overrides import TorchFunctionMode

from decoding.base import TRACE_LEVELS
from decoding.methods import decoder_class
from decoding.model import load_model
from runners.data import DatasetConfig, load_segments

METHODS = ("unite", "tokenwise", "charwise")


class Meter(TorchFunctionMode):
    """Seconds inside the members' forward calls, and outside them in vocabulary-sized tensor operations
    and in KV-cache-shaped ones (4-D)."""

    def __init__(self, models, min_vocab: int):
        super().__init__()
        self.min_vocab = min_vocab
        self.forward_s = self.vocab_s = self.kv_s = 0.0
        self.depth, self.started = 0, 0.0
        self.cuda = any(m.device.type == "cuda" for m in models)
        for m in models:
            m.model.register_forward_pre_hook(self._enter)
            m.model.register_forward_hook(self._leave)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _enter(self, *_) -> None:
        if self.depth == 0:
            self._sync()
            self.started = time.perf_counter()
        self.depth += 1

    def _leave(self, *_) -> None:
        self.depth -= 1
        if self.depth == 0:
            self._sync()
            self.forward_s += time.perf_counter() - self.started

    @classmethod
    def _any_tensor(cls, value, test) -> bool:
        """Whether ``value`` is, or (in lists and tuples) holds, a tensor that passes ``test``."""
        if isinstance(value, torch.Tensor):
            return test(value)
        if isinstance(value, (list, tuple)):
            return any(cls._any_tensor(v, test) for v in value)
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:
            return func(*args, **kwargs)
        vocab = self._any_tensor(args, lambda t: t.dim() > 0 and t.shape[-1] >= self.min_vocab)
        if not vocab and not self._any_tensor(args, lambda t: t.dim() == 4):
            return func(*args, **kwargs)
        self._sync()
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        self._sync()
        if vocab:
            self.vocab_s += time.perf_counter() - t0
        else:
            self.kv_s += time.perf_counter() - t0
        return out

    def totals(self) -> tuple[float, float, float]:
        return self.forward_s, self.vocab_s, self.kv_s


def measured_run(decoder, sources: list[str], meter: Meter, per_step: bool = False) -> dict:
    """Decode ``sources`` step by step: wall, forward and vocab seconds in total (and per step)."""
    state = decoder.prepare(sources)
    steps, wall = [], 0.0
    with meter:
        going = True
        while going:
            f0, v0, k0 = meter.totals()
            t0 = time.perf_counter()
            going = decoder.step(state)
            elapsed = time.perf_counter() - t0
            f1, v1, k1 = meter.totals()
            wall += elapsed
            steps.append((elapsed, f1 - f0, v1 - v0, k1 - k0))
    decoder.finish(state)
    # every row is forced to exactly max_new_tokens steps (min_new_tokens = max_new_tokens); an output's
    # n_new_tokens would undercount them, being cut at its first stop string
    n = decoder.cfg.max_new_tokens
    total = [sum(s[i] for s in steps) for i in range(4)]
    run = {"steps": n, "wall": total[0] / n, "forward": total[1] / n, "vocab": total[2] / n, "kv": total[3] / n}
    run["host"] = run["wall"] - run["forward"]
    run["py"] = run["host"] - run["vocab"]
    if per_step:
        run["per_step"] = [w - f for w, f, _, _ in steps]
    return run


def show(runs: list[dict], key: str) -> str:
    values = [r[key] * 1e3 for r in runs]
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def median_ms(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="gemma3_smollm2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--variants", action="store_true", help="also the speculative and beam variants (batch 8)")
    parser.add_argument("--growth", type=int, default=512, help="steps of the growth run (0: skip)")
    parser.add_argument("--trace", nargs="+", choices=TRACE_LEVELS, default=["full"],
                        help="trace levels: the first for every job, the others add the fused methods at that level")
    parser.add_argument("--quick", action="store_true", help="16 steps, 2 rounds, growth for unite only")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 16, 2
    torch.manual_seed(0)
    sources = [s.source for s in load_segments(DatasetConfig(limit=max(args.batch_sizes)))]
    sources = (sources * max(args.batch_sizes))[: max(args.batch_sizes)]
    cache = {}

    def model(spec):
        if spec.name not in cache:
            cache[spec.name] = load_model(spec)
        return cache[spec.name]

    def decoder(method: str, steps: int, *extra: str, trace: str = args.trace[0]):
        run = compose(f"models={args.pair}", f"decoding={method}", f"decoding.max_new_tokens={steps}",
                      f"decoding.min_new_tokens={steps}", *extra)
        built = decoder_class(run.decoding_name)(run.decoding, [model(s) for s in run.models], run.prompt)
        built.trace = trace
        return built

    members = [m.name for m in compose(f"models={args.pair}", "decoding=unite").models]
    models = [model(s) for s in compose(f"models={args.pair}", "decoding=unite").models]
    meter = Meter(models, min(m.vocab_size for m in models))
    print(f"torch threads={torch.get_num_threads()} device={models[0].device} pair={args.pair} steps={args.steps} "
          f"rounds={args.rounds} trace={args.trace[0]} (ms per step: median [min-max] over rounds)")

    summary: dict[str, float] = {}
    for batch in args.batch_sizes:
        rows = sources[:batch]
        jobs = {name: decoder("greedy", args.steps, f"models.members=[{name}]") for name in members}
        jobs.update({method: decoder(method, args.steps) for method in args.methods})
        jobs.update({f"{method}@{level}": decoder(method, args.steps, trace=level)
                     for level in args.trace[1:] for method in args.methods})
        timed = interleaved({name: (lambda d=d: measured_run(d, rows, meter)) for name, d in jobs.items()}, args.rounds)
        runs = {name: [r for _, r in results] for name, results in timed.items()}
        for name in jobs:
            r = runs[name]
            print(f"bs={batch} {name:>14}: wall {show(r, 'wall')}  forward {show(r, 'forward')}  host {show(r, 'host')}"
                  f"  vocab {show(r, 'vocab')}  py {show(r, 'py')}  kv {show(r, 'kv')}")
        hf = sum(median_ms(runs[name], "host") for name in members)
        print(f"bs={batch} hf host (members summed) {hf:.2f} ms/step")
        if batch in (8, 32):
            summary[f"hf_host_ms_bs{batch}"] = hf
            for method in args.methods:
                summary[f"host_ms_bs{batch}_{method}"] = median_ms(runs[method], "host")
                summary[f"py_ms_bs{batch}_{method}"] = median_ms(runs[method], "py")
                summary[f"kv_ms_bs{batch}_{method}"] = median_ms(runs[method], "kv")
    if args.variants:
        rows = sources[:8]
        jobs = {}
        for method in ("unite", "tokenwise"):
            jobs[method] = decoder(method, args.steps)
            jobs[f"{method}+speculate4"] = decoder(method, args.steps, "decoding.speculate=4")
            jobs[f"{method}+beam4"] = decoder(method, args.steps, "decoding.num_beams=4")
        timed = interleaved({name: (lambda d=d: measured_run(d, rows, meter)) for name, d in jobs.items()}, args.rounds)
        for name, results in timed.items():
            r = [x for _, x in results]
            print(f"bs=8 {name:>20}: per token: wall {show(r, 'wall')}  forward {show(r, 'forward')}  "
                  f"host {show(r, 'host')}  vocab {show(r, 'vocab')}  py {show(r, 'py')}  kv {show(r, 'kv')}")
    if args.growth:
        growth = 0.0
        for method in (["unite"] if args.quick else args.methods):
            run = measured_run(decoder(method, args.growth), sources[:1], meter, per_step=True)
            host = run["per_step"]
            early, late = statistics.median(host[16:48]), statistics.median(host[-32:])
            growth = max(growth, late / early)
            print(f"bs=1 {method}: host {early * 1e3:.2f} ms/step at steps 17-48, {late * 1e3:.2f} at the last 32 "
                  f"of {args.growth}: growth {late / early:.3f}")
        summary[f"host_growth_{args.growth}_vs_32"] = growth
    order = [f"host_ms_bs{b}_{m}" for b in (8, 32) for m in args.methods] + [f"hf_host_ms_bs{b}" for b in (8, 32)] \
        + [f"py_ms_bs{b}_{m}" for b in (8, 32) for m in args.methods] \
        + [f"kv_ms_bs{b}_{m}" for b in (8, 32) for m in args.methods] + [f"host_growth_{args.growth}_vs_32"]
    print(" ".join(f"{key}={summary[key]:.3f}" if "growth" in key else f"{key}={summary[key]:.2f}"
                   for key in order if key in summary))


if __name__ == "__main__":
    main()
