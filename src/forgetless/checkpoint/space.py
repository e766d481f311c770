"""Free space on the output's disk, checked before long work whose output size is known; available memory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import ForgetlessError


def _existing_parent(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (an output is usually not there yet)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_free_space(path: str | os.PathLike, nbytes: int, what: str) -> None:
    """Refuse, before any work, to write ``nbytes`` of ``what`` at ``path`` when its disk has less free space:
    a full disk found after hours of computing wastes them."""
    from .writer import human_bytes

    where = _existing_parent(Path(path))
    free = shutil.disk_usage(where).free
    if nbytes > free:
        raise ForgetlessError(
            f"{what} needs {human_bytes(nbytes)} but its disk has {human_bytes(free)} free",
            file=path,
            remedy="free space on that disk, or write the output to another disk",
        )


def same_disk(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two outputs (existing or not yet) land on one file system, and so share its free space."""
    return os.stat(_existing_parent(Path(a))).st_dev == os.stat(_existing_parent(Path(b))).st_dev


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
