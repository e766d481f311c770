"""One error type for everything a user can get wrong.

Every message is one line that names the file (and tensor, where there is one) and says what to do.
The CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager


class ForgetlessError(Exception):
    """A user-facing error: ``file: [tensor: ]problem; remedy``."""

    def __init__(
        self, problem: str, *, file: object = None, tensor: str | None = None, remedy: str | None = None
    ):
        self.problem = problem
        self.file = None if file is None else str(file)
        self.tensor = tensor
        self.remedy = remedy
        parts = []
        if self.file:
            parts.append(self.file)
        if tensor:
            parts.append(f"tensor {tensor!r}")
        head = ": ".join(parts)
        msg = f"{head}: {problem}" if head else problem
        if remedy:
            msg += f" — {remedy}"
        super().__init__(msg)


def require_all(names: list[str], have: object, what: str, of: str, *, file: object, remedy: str) -> None:
    """Refuse, naming the first, the `names` that `have` (anything with ``in``) lacks: "no {what} for N {of}"."""
    missing = [n for n in names if n not in have]
    if missing:
        problem = f"no {what} for {len(missing)} {of}, e.g. {missing[0]}"
        raise ForgetlessError(problem, file=file, remedy=remedy)


@contextmanager
def naming(path: object) -> Iterator[None]:
    """Operating-system errors raised inside carry `path` (a full disk met by ``write`` or by safetensors' own
    writer names no file), so that the command's one line names it."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))  # safetensors: "I/O error: … (os error 28) at path …"
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


@contextmanager
def loading(what: str, path: object, remedy: str) -> Iterator[None]:
    """Whatever a library raises while loading ``what`` from ``path`` (transformers raises many types) becomes one
    line naming the file; our own errors pass as they are."""
    try:
        yield
    except ForgetlessError:
        raise
    except Exception as e:
        raise ForgetlessError(
            f"cannot load {what} ({type(e).__name__}: {e})", file=path, remedy=remedy
        ) from e
