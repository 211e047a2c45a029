"""Errors a user can fix: their one base class, EnsembleKDError, and `plural` for their wording.

Each subclass lives with the stage that raises it (ConfigError in config.py, DataError in
data.py, ...) and keeps a built-in second base (ValueError, RuntimeError, ...) so that code
catching those still works. The command line catches `EnsembleKDError` and prints its
message as one line, `error: ...`, with exit code 2; anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import errno

# what writing into a read-only, foreign or full folder raises (OSError.errno): the command line says so in one
# line (`cannot write PATH: REASON`), and no stage turns it into an error of its own
WRITE_ERRNOS = frozenset(getattr(errno, name) for name in ("EROFS", "EACCES", "EPERM", "ENOSPC", "EDQUOT")
                         if hasattr(errno, name))


class EnsembleKDError(Exception):
    """A problem the user can fix; the message names what is wrong and what to do."""


class MissingExtraError(EnsembleKDError, ImportError):
    """An optional extra (onnx, dask) is needed but not installed; the message names the pip command."""


class DataError(EnsembleKDError, ValueError):
    """Bad or missing data the user can fix; the message names the file, class or count and the fix.

    Raised by data.py and imagefolder.py, so it lives here rather than with either."""


def plural(count: int, noun: str) -> str:
    """"1 class", "2 classes", "1 thread", "0 specialists": a count with its noun (regular English plurals)."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}{'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else 's'}"
