"""The test run fails on a deprecation that forgetless causes: tests/conftest.py opens :func:`deprecation_guard`
around the setup, call and teardown of every test.

Whose deprecation is it? A library names the culprit of a DeprecationWarning / FutureWarning by the frame its
``stacklevel`` points at, and that is often not the culprit: transformers' ``@deprecate_kwarg`` points one frame
above the model's ``forward``, which is torch's ``Module._call_impl`` or transformers' own output wrapper, not the
code that passed the keyword; a deprecated property warns with the default stacklevel, naming itself; and some
deprecations are log records (``logger.warning_once``), which name no caller at all. A filter on the warning's
module (``error::FutureWarning:forgetless`` in pyproject.toml) therefore catches only the warnings that happen to
name our frame.

So here, at the moment a warning is shown or a log record emitted, the live stack is walked outwards from the code
that issued it: the frames of the package that issued it (its deprecated function, its decorators and wrappers)
and call machinery (torch's ``Module.__call__``, functools, contextlib, logging, warnings) are passed over; the
first other frame is the code that made the call. When that frame, or the issuing frame itself (a deprecated C
function called from our line), is in ``src/forgetless`` or ``tests/``, the deprecation is ours: the test fails,
naming that line. PEFT's own use of transformers' deprecated ``is_gradient_checkpointing`` stops at a PEFT frame,
so it is not ours. The rule would blame us for a deprecation that a library causes itself while serving our call
(transformers calling its own deprecated API): where that happens, :data:`ALLOWED` names the message and why.

Limits: a warning is seen only if the warning filters show it (pytest's warnings plugin, on in ``make test``,
shows every DeprecationWarning; with ``-p no:warnings`` Python's defaults hide those not raised in ``__main__``,
and FutureWarning is shown once per line); ``warning_once`` log records are emitted once per process; a keyword
that PEFT passes on from our call stops at PEFT's frame.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import forgetless

OURS = (Path(forgetless.__file__).resolve().parent, Path(__file__).resolve().parent)
CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
MACHINERY = (
    "functools",
    "contextlib",
    "logging",
    "warnings",
    "torch.nn.modules.module",
    "torch.utils._contextlib",
    __name__,
)
LOGGERS = ("transformers",)  # libraries that announce deprecations as log records
ALLOWED: tuple[tuple[str, str], ...] = ()  # (message regex, why it is not ours) — none needed so far

_open: list[list[str]] = []  # the findings of the guards open, innermost last: only the innermost collects


def _module(frame: FrameType) -> str:
    return frame.f_globals.get("__name__") or ""


def _machinery(frame: FrameType) -> bool:
    name = _module(frame)
    return any(name == m or name.startswith(m + ".") for m in MACHINERY)


def _ours(frame: FrameType) -> bool:
    path = Path(frame.f_code.co_filename).resolve()
    return any(path.is_relative_to(d) for d in OURS)


def caller(frame: FrameType | None) -> tuple[FrameType | None, FrameType | None]:
    """(the frame that issued a deprecation, the frame that called into its package), walking outwards from
    ``frame`` (the innermost: inside ``warnings`` or ``logging``)."""
    while frame is not None and _machinery(frame):
        frame = frame.f_back
    issuer = frame
    package = _module(frame).split(".")[0] if frame is not None else ""
    while frame is not None and (_machinery(frame) or _module(frame).split(".")[0] == package):
        frame = frame.f_back
    return issuer, frame


def _check(found: list[str], message: str, category: str, frame: FrameType | None) -> None:
    if not _open or _open[-1] is not found or any(re.search(rx, message) for rx, _ in ALLOWED):
        return
    issuer, culprit = caller(frame)
    blamed = (
        issuer
        if issuer is not None and _ours(issuer)
        else culprit
        if culprit is not None and _ours(culprit)
        else None
    )
    if blamed is not None:
        found.append(f"{blamed.f_code.co_filename}:{blamed.f_lineno}: {category}: {message}")


class _LogGuard(logging.Handler):
    def __init__(self, found: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            _check(self.found, message, f"log record of {record.name}", sys._getframe(1))


@contextmanager
def deprecation_guard() -> Iterator[list[str]]:
    """Collect, as ``path:line: category: message``, the deprecations our code causes inside the block (module
    docstring). Warnings are passed on to whatever showed them before (pytest's recorder); of nested guards, the
    innermost collects."""
    found: list[str] = []
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, CATEGORIES):
                _check(found, str(message), category.__name__, sys._getframe(1))
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        handler = _LogGuard(found)
        loggers = [logging.getLogger(n) for n in LOGGERS]
        for lg in loggers:
            lg.addHandler(handler)
        _open.append(found)
        try:
            yield found
        finally:
            _open.pop()
            for lg in loggers:
                lg.removeHandler(handler)
