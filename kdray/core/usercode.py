"""Exceptions raised by a user's own code (a ``model.import`` network, a factory), told as one paragraph.

A user's model that does not fit its data (a ``Linear`` sized for other images, say) raises a plain
``RuntimeError`` deep inside the training loop, inspect or a teacher cache. That is bad input, not a
kdray bug: the user should read which stage, which file and line, which input shape and what the
message was, in one paragraph with exit code 2, and find the full traceback in a file (or behind
``--debug``). ``from_user_code`` makes that ``UserCodeError`` out of an exception whose traceback runs
through a file that is neither kdray's, nor an installed package's, nor the standard library's; the
traceback travels with it (``details``: a plain string, so it survives pickling out of a Ray worker).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import traceback
from types import TracebackType
from typing import Any

from kdray.core.errors import KdrayError

_KDRAY = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _library_roots() -> tuple[str, ...]:
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {p for p in sys.path if p.rstrip(os.sep).endswith(("site-packages", "dist-packages"))}
    return tuple(os.path.abspath(r) + os.sep for r in roots if r)


def is_user_file(filename: str) -> bool:
    """Whether a traceback's file is the user's: not kdray's, not an installed package's, not Python's."""
    if not filename or filename.startswith("<") or not filename.endswith(".py"):
        return False  # a user's network is Python source; a compiled library's frame (pyarrow's .pxi) is not
    path = os.path.abspath(filename)
    if not os.path.isfile(path):
        return False
    return not path.startswith(_KDRAY) and not path.startswith(_library_roots())


class UserCodeError(KdrayError):
    """An exception raised in the user's own code; ``details`` holds its full traceback as text."""


def _innermost_user_frame(tb: TracebackType | None) -> tuple[Any, int] | None:
    found = None
    while tb is not None:
        if is_user_file(tb.tb_frame.f_code.co_filename):
            found = (tb.tb_frame, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _input_shape(frame: Any) -> str | None:
    """The shape of the first tensor argument of the user's function (its input), if any."""
    code = frame.f_code
    names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    for name in names:
        value = frame.f_locals.get(name)
        shape = getattr(value, "shape", None)
        if shape is not None and name != "self":
            return "(" + ", ".join(str(int(d)) for d in shape) + ")"
    return None


def from_user_code(exc: BaseException, *, stage: str | None = None, field: str | None = None) -> UserCodeError | None:
    """The one-paragraph ``UserCodeError`` for ``exc`` if it was raised in user code, else None.

    ``field`` names the spec field whose code it is (``stages.teacher.model.import``)."""
    if isinstance(exc, KdrayError) or not isinstance(exc, Exception):
        return None
    hit = _innermost_user_frame(exc.__traceback__)
    if hit is None:
        return None
    frame, line = hit
    where = f"{os.path.relpath(frame.f_code.co_filename)}:{line} (in {frame.f_code.co_name})"
    shape = _input_shape(frame)
    first = (str(exc).strip().splitlines() or [""])[0].strip().rstrip(".")
    subject = f"stage {stage!r}: " if stage else ""
    code = f"the code of {field}" if field else "your code"
    message = (
        f"{subject}{code} raised {type(exc).__name__} at {where}"
        + (f" on an input of shape {shape}" if shape else "")
        + (f": {first}." if first else ".")
    )
    err = UserCodeError(
        message,
        hint="Fix the model so that it takes the data's inputs (`kdray inspect SPEC --stage NAME` shows the "
        "shapes each layer sees).",
    )
    err.details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return err
