"""User-facing errors: raised for bad input, printed as one line by the CLI entry points."""


class FusemtError(Exception):
    """A mistake the user can fix (unknown model, missing file, bad option). Message says how."""
