"""The one base class of every error a user can fix.

Each subclass lives with the stage that raises it (ConfigError in config.py, DataError in
data.py, ...) and keeps a built-in second base (ValueError, RuntimeError, ...) so that code
catching those still works. The command line catches `EnsembleKDError` and prints its
message as one line, `error: ...`, with exit code 2; anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations


class EnsembleKDError(Exception):
    """A problem the user can fix; the message names what is wrong and what to do."""


class MissingExtraError(EnsembleKDError, ImportError):
    """An optional extra (onnx, dask) is needed but not installed; the message names the pip command."""
