"""One error type for everything a user can get wrong.

Every message is one line that names the file (and tensor, where there is one) and says what to do.
The CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations


class ForgetlessError(Exception):
    """A user-facing error: ``file: [tensor: ]problem; remedy``."""

    def __init__(self, problem: str, *, file: object = None, tensor: str | None = None, remedy: str | None = None):
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
