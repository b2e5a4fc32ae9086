"""User-facing errors: raised for bad input, printed as one line by the CLI entry points."""

import sys
from typing import NoReturn


class FusemtError(Exception):
    """A mistake the user can fix (unknown model, missing file, bad option). Message says how."""


def fail(err: Exception | str) -> NoReturn:
    """The one way an entry point reports a user mistake: one line ``fusemt: error: <problem>: <fix>``, exit 2."""
    print(f"fusemt: error: {err}", file=sys.stderr)
    sys.exit(2)
