"""``fusemt-models``: the resolved model specs behind names in ``models.members``.

    fusemt-models                               # every catalog entry
    fusemt-models gemma3_270m Qwen/Qwen3-1.7B   # names, hub ids or local dirs, as models.members takes them
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from omegaconf import OmegaConf

from decoding.errors import FusemtError
from runners.config import model_names, resolve_member


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fusemt-models", description="Show the resolved spec of each model.")
    parser.add_argument("members", nargs="*", help="catalog names, hub ids or local dirs (default: the whole catalog)")
    args = parser.parse_args(argv)
    try:
        specs = [resolve_member(name) for name in args.members or model_names()]
    except FusemtError as err:
        print(f"fusemt: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(OmegaConf.to_yaml({spec.label: dataclasses.asdict(spec) for spec in specs}), end="")


if __name__ == "__main__":
    main()
