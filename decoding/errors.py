"""User-facing errors: raised for bad input, printed as one line by the CLI entry points."""

import errno
import sys
from typing import NoReturn


class FusemtError(Exception):
    """A mistake the user can fix (unknown model, missing file, bad option). Message says how."""


# What to do about an OS error, by errno: the user's side of a failed read or write.
_OS_FIXES = {
    errno.ENOSPC: "free disk space and rerun (finished segments are kept)",
    errno.EDQUOT: "free disk space and rerun (finished segments are kept)",
    errno.EROFS: "write elsewhere (fusemt: paths.results_dir= / paths.output_dir=)",
    errno.EACCES: "make it writable or write elsewhere (fusemt: paths.results_dir= / paths.output_dir=)",
    errno.EPERM: "make it writable or write elsewhere (fusemt: paths.results_dir= / paths.output_dir=)",
    errno.ENAMETOOLONG: "a file name is too long: choose a shorter run_name (or file name)",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
}


def os_error(err: OSError, path=None) -> FusemtError:
    """An OS error (read-only folder, full disk, name too long, ...) as one line naming the path and
    the cause; ``path`` names the file when the error itself does not (a failed write says none)."""
    where = err.filename if err.filename is not None else path
    cause = err.strerror or str(err) or type(err).__name__
    fix = _OS_FIXES.get(err.errno, "check the path and the file system")
    return FusemtError(f"{where or 'a file'}: {cause}: {fix}")


def fail(err: Exception | str) -> NoReturn:
    """The one way an entry point reports a user mistake: one line ``fusemt: error: <problem>: <fix>``, exit 2.
    An OS error (read-only folder, full disk, ...) is one too: its line names the path and the cause."""
    print(f"fusemt: error: {os_error(err) if isinstance(err, OSError) else err}", file=sys.stderr)
    sys.exit(2)
