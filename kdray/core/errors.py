"""User-facing errors.

A ``KdrayError`` is bad input or a bad environment that the user can fix: the CLI prints its
message as one paragraph and exits with code 2, without a traceback. Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class KdrayError(Exception):
    """A problem the user can fix. The message names the field or path and how to fix it."""

    exit_code = 2
    details = ""  # a traceback behind the message (user code, a Ray worker): logged to a file, shown with --debug

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.where = where
        self.hint = hint
        parts = [f"{where}: {message}" if where else message]
        if hint:
            parts.append(hint)
        super().__init__(" ".join(sentence(p) for p in parts if p.strip()))


def sentence(text: str) -> str:
    """``text`` ending as a sentence does: a period added unless it ends with one (or ``?``, ``!``)."""
    text = text.rstrip()
    return text if text.endswith((".", "?", "!")) else text + "."


class SpecError(KdrayError):
    """A pipeline spec that does not validate."""


class DataError(KdrayError):
    """Missing or malformed data files."""


class StorageError(KdrayError):
    """Unreachable storage, a missing bucket, a missing or corrupt artifact.

    ``transient`` marks an I/O failure that may pass (a network error, a server restarting): the
    CLI still reports it with exit code 2, but an orchestrator may retry it.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None, transient: bool = False):
        super().__init__(message, where=where, hint=hint)
        self.transient = transient


class CheckpointMismatch(KdrayError):
    """Weights that do not fit the model they are loaded into."""
