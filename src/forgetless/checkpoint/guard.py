"""What keeps a user's files safe from the commands that write: the output rule and the writer's lock.

:func:`check_output`: an output never replaces or deletes an input. Every command that writes calls it before
any work with every path it reads: the output may not be an input, lie inside an input folder or contain one
(symlinks resolved, hard links compared by inode), and an existing output is replaced only with ``force``.

:func:`exclusive`: one writer at a time for a folder that commands update in place (a continual state). The lock
is ``fcntl.flock`` on a file beside the folder (``.NAME.lock``, kept: removing it would let two writers lock two
different files), so the kernel releases it when its holder dies, even by ``kill -9``. The holder's PID is written
into it for the waiting writer's message.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ForgetlessError


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def overlap(out: Path, given: Path) -> str | None:
    """How `out` overlaps the input `given` ("is", "lies inside", "contains"), or None."""
    o, p = Path(out).resolve(), Path(given).resolve()
    if o == p or _same(o, p):
        return "is"
    if p in o.parents:
        return "lies inside"
    if o in p.parents:
        return "contains"
    return None


def check_output(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *, force: bool, option: str = "--out"
) -> Path:
    """Refuse, before any work, an output that is, lies inside or contains one of `inputs` (None entries are
    skipped), and an existing output without ``force``."""
    out = Path(out)
    for given in inputs:
        if given is None:
            continue
        how = overlap(out, Path(given))
        if how is not None:
            raise ForgetlessError(
                f"{option} {how} an input ({given}): writing it would replace or delete the input",
                file=out,
                remedy=f"choose {option} outside every input",
            )
    if os.path.lexists(out) and not force:
        raise ForgetlessError(
            f"{option} already exists",
            file=out,
            remedy=f"choose another {option} or pass --force (force=True in Python) to replace it",
        )
    return out


def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "?"
    except (OSError, UnicodeDecodeError):
        return "?"


@contextmanager
def exclusive(
    folder: str | os.PathLike, *, log: Callable[[str], None] | None = None, wait: bool = True
) -> Iterator[Path]:
    """Hold the lock of `folder` for the block. A held lock is waited for (``log`` says who holds it) or, without
    ``wait``, refused in one line naming the holder's PID."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            if not wait:
                raise ForgetlessError(
                    f"in use by process {pid} (lock {path})",
                    file=folder,
                    remedy="wait for it to finish, then run this command again",
                ) from None
            if log is not None:
                log(f"{folder}: waiting for process {pid}, which is writing it (lock {path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


__all__ = ["check_output", "exclusive", "lock_path", "overlap"]
