"""Time per generated character of ``charwise`` vs the members decoding alone, in one run.

    python scripts/bench_charwise.py [--pair gemma3_smollm2] [--chars 64] [--tokens 64] [--repeats 3]

For batch 1 and 8 (the first sources of the bundled sample) it times (a) each member alone with
Hugging Face ``generate`` greedy (at most ``--tokens`` new tokens) and (b) ``charwise`` over the
pair (defaults of conf/decoding/charwise.yaml, at most ``--chars`` characters). Every run stops as
in real use (END, the prompt's stop string, or the cap), and its time is divided by the characters
it generated (all rows of the batch, up to the stop; for a member, the complete characters its
tokens spell). Repetitions are interleaved (A B C A B C ...) after one warm-up round, and medians
reported:

    ratio = charwise time per character / (member A per character + member B per character)

Last line: ``charwise_ratio_bs1=<x> charwise_ratio_bs8=<y> fastpath_share=<z>`` (fast-path share:
of all charwise steps of the timed runs).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_common import compose, interleaved

from decoding.methods import decoder_class
from decoding.model import load_model
from runners.data import DatasetConfig, load_segments


def characters(output) -> int:
    data = b"".join(bytes.fromhex(step["piece_bytes"]) for step in output.trace)
    return len(data.decode("utf-8", errors="ignore"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="gemma3_smollm2")
    parser.add_argument("--chars", type=int, default=64, help="most characters per charwise run")
    parser.add_argument("--tokens", type=int, default=64, help="most tokens per member greedy run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    sources = [s.source for s in load_segments(DatasetConfig(limit=max(args.batch_sizes)))]
    print(f"torch threads={torch.get_num_threads()} device={'cuda' if torch.cuda.is_available() else 'cpu'}")

    def decoder(method: str, members: str | None, n: int):
        overrides = [f"models={args.pair}", f"decoding={method}", f"decoding.max_new_tokens={n}"]
        if members:
            overrides.append(f"models.members=[{members}]")
        run = compose(*overrides)
        return decoder_class(run.decoding_name)(run.decoding, [load_model(spec) for spec in run.models], run.prompt)

    names = [m.name for m in compose(f"models={args.pair}", "decoding=charwise").models]
    runs = {name: decoder("greedy", name, args.tokens) for name in names}
    runs["charwise"] = decoder("charwise", None, args.chars)
    ratios, fast_steps, all_steps = {}, 0, 0
    for batch in args.batch_sizes:
        batch_sources = sources[:batch]
        timed = interleaved({label: (lambda d=dec: d.decode(batch_sources)) for label, dec in runs.items()},
                            args.repeats)
        per_char = {label: [elapsed / max(sum(characters(o) for o in outputs), 1) for elapsed, outputs in rounds]
                    for label, rounds in timed.items()}
        for _, outputs in timed["charwise"]:
            fast_steps += sum(round(o.stats["fastpath_share"] * o.stats["steps"]) for o in outputs)
            all_steps += sum(o.stats["steps"] for o in outputs)
        median = {label: statistics.median(times) for label, times in per_char.items()}
        baseline = sum(median[name] for name in names)
        ratios[batch] = median["charwise"] / baseline
        print(f"bs={batch}: " + " + ".join(f"{n} {median[n] * 1e3:.1f}" for n in names)
              + f" = {baseline * 1e3:.1f} ms/char (HF greedy); charwise {median['charwise'] * 1e3:.1f} ms/char; "
              f"ratio={ratios[batch]:.3f}")
    share = fast_steps / max(all_steps, 1)
    print(" ".join(f"charwise_ratio_bs{b}={r:.3f}" for b, r in ratios.items()) + f" fastpath_share={share:.3f}")


if __name__ == "__main__":
    main()
