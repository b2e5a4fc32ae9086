"""Speculative decoding vs target-only greedy vs Hugging Face assisted generation, in one run.

    python scripts/bench_speculative.py [--pair gemma3_selfdraft] [--segments 4] [--max-new-tokens 48]

Batch 1 (HF assisted generation takes no batches), greedy, the same prompts for all three; each
timing is the best of ``--repeats``. Reports

    speedup_vs_target = target-only HF greedy time / fusemt speculative time
    ratio_vs_hf       = HF assisted generation time / fusemt speculative time  (>= 1: not slower)
    acceptance        = accepted draft tokens / proposed draft tokens (fusemt)

and also fusemt speculative with the cross-tokenizer draft (``--cross-pair``), which HF can
only run through universal assisted generation.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_common import compose

from decoding.methods import decoder_class
from decoding.model import load_model
from decoding.prompt import render_prompt
from runners.data import DatasetConfig, load_segments


def best_of(repeats: int, fn) -> tuple[float, object]:
    result, best = fn(), float("inf")  # the first call warms up
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="gemma3_selfdraft")
    parser.add_argument("--cross-pair", default="gemma3_smollm2")
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--num-draft-tokens", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    sources = [s.source for s in load_segments(DatasetConfig(limit=args.segments))]
    common = [f"decoding.max_new_tokens={args.max_new_tokens}", "prompt.plain_stop_strings=[]"]
    print(f"torch threads={torch.get_num_threads()} device={'cuda' if torch.cuda.is_available() else 'cpu'} "
          f"segments={len(sources)} max_new_tokens={args.max_new_tokens} k={args.num_draft_tokens}")

    run = compose(f"models={args.pair}", "decoding=speculative", f"decoding.num_draft_tokens={args.num_draft_tokens}",
                  *common)
    target, draft = [load_model(spec) for spec in run.models]
    ours = decoder_class("speculative")(run.decoding, [target, draft], run.prompt)

    def hf(assistant):
        outs = []
        for src in sources:
            batch = render_prompt(target, [src], run.prompt)
            kwargs = {"assistant_model": assistant.model} if assistant else {}
            if assistant:
                target.model.generation_config.num_assistant_tokens = args.num_draft_tokens
                target.model.generation_config.num_assistant_tokens_schedule = "constant"
            out = target.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        max_new_tokens=args.max_new_tokens, do_sample=False,
                                        eos_token_id=target.end_ids, pad_token_id=target.tokenizer.pad_token_id,
                                        **kwargs)
            outs.append(out[0, batch["input_ids"].shape[1]:].tolist())
        return outs

    def fusemt(decoder):
        return lambda: [decoder.decode([src])[0] for src in sources]

    t_target, plain = best_of(args.repeats, lambda: hf(None))
    t_hf, assisted = best_of(args.repeats, lambda: hf(draft))
    t_ours, outs = best_of(args.repeats, fusemt(ours))
    ours_ids = [[s["ids"][target.name][0] for s in o.trace] for o in outs]
    acceptance = sum(o.stats["acceptance_rate"] for o in outs) / len(outs)  # mean over segments
    print(f"target-only HF greedy      {t_target:7.2f} s")
    print(f"HF assisted generation     {t_hf:7.2f} s   same tokens as target greedy: {assisted == plain}")
    print(f"fusemt speculative         {t_ours:7.2f} s   same tokens as target greedy: {ours_ids == plain}  "
          f"acceptance={acceptance:.3f} mean_accepted_length="
          f"{sum(o.stats['mean_accepted_length'] for o in outs) / len(outs):.2f}")

    cross = compose(f"models={args.cross_pair}", "decoding=speculative",
                    f"decoding.num_draft_tokens={args.num_draft_tokens}", *common)
    cross_decoder = decoder_class("speculative")(cross.decoding, [load_model(s) for s in cross.models], cross.prompt)
    t_cross, cross_outs = best_of(args.repeats, fusemt(cross_decoder))
    cross_ids = [[s["ids"][target.name][0] for s in o.trace] for o in cross_outs]
    print(f"fusemt speculative, cross-tokenizer draft ({args.cross_pair}) {t_cross:7.2f} s   same tokens: "
          f"{cross_ids == plain}  "
          f"acceptance={sum(o.stats['acceptance_rate'] for o in cross_outs) / len(cross_outs):.3f}")
    print(f"speedup_vs_target={t_target / t_ours:.3f} ratio_vs_hf={t_hf / t_ours:.3f} acceptance={acceptance:.3f}")


if __name__ == "__main__":
    main()
