"""Streaming, atomic writing of a Hugging Face model folder.

The plan of every output tensor (name, shape, dtype) is known before the first tensor is computed, so each shard's
safetensors header is written up front and every tensor is written at its final offset with ``os.pwrite`` the
moment it is ready, in any order, from any thread. Nothing is buffered beyond the tensor being written, so memory
does not grow with the shard size.

Everything goes to a temporary folder beside the output, renamed into place by :meth:`StreamingWriter.commit`
once every file in it and the folder itself are on disk (``fsync``); :meth:`abort` removes it. An existing output
is replaced only when asked (``force``). The disk writes overlap the merge: a shard is synced on a background thread
after every :data:`SYNC_EVERY` bytes written to it and when its last tensor is written, so that the sync at commit
finds little left to write.

Concurrency and crashes (:func:`temp_folder`, :func:`commit_folder`): every temporary folder has a unique name
that carries its process id (``.OUT.forgetless-tmp-PID-XXXX``), so two writers — processes or threads — never
share one; a writer removes the temporary folders of the same output left by processes that no longer run (a
``kill -9``); and the final rename never replaces an output another writer committed meanwhile unless asked
(``renameat2(RENAME_NOREPLACE)`` on Linux, else a rename that fails on a non-empty folder). Replacing swaps the
two folders in one step (``RENAME_EXCHANGE``), so a ``kill -9`` at any instant leaves the old output or the new
one at the path; where the file system cannot swap, :func:`recover` puts back an output that a crash left moved
aside, before any cleanup.

A single file (a JSON record, a statistics file, a plot) is written the same way by :func:`atomic_write`: a
temporary file of a unique name beside it, renamed over it.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import math
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch

from ..errors import ForgetlessError, naming
from .reader import DTYPE_NAMES, SAFE_INDEX, SAFE_SINGLE, dtype_size
from .space import check_free_space

SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


SYNC_EVERY = 64 * 2**20  # bytes written to a shard between two background syncs of it
WRITE_PIECE = 4 * 2**20  # bytes per write call (BENCHMARKS.md, issue 18)

_LEFTOVER = re.compile(r"\.forgetless-(?:tmp|old)-(\d+)-[^/]*$")
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # renameat2's flags (Linux)
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary (and moved-aside) folders of `out` whose process no longer runs; returns them."""
    out = Path(out)
    gone = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.forgetless-*-*"):
        m = _LEFTOVER.search(p.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def temp_folder(out: Path) -> Path:
    """A new temporary folder beside `out`, unique to this call, named with this process's id; the leftovers of
    dead processes writing the same `out` are removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)  # before the cleanup, which would delete what a crashed replace moved aside
    remove_stale(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.forgetless-tmp-{os.getpid()}-", dir=out.parent))


def _renameat2(src: Path, dst: Path, flags: int) -> int:
    """``renameat2(src, dst, flags)``: 0, or the errno (ENOSYS where the C library lacks it)."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return errno.ENOSYS
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return 0
    return ctypes.get_errno()


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, raising FileExistsError when `dst` exists — atomically where the kernel can
    (``renameat2`` with ``RENAME_NOREPLACE``), else by a rename that cannot replace a non-empty folder."""
    e = _renameat2(src, dst, RENAME_NOREPLACE)
    if e == 0:
        return
    if e == errno.EEXIST:
        raise FileExistsError(e, os.strerror(e), str(dst))
    if e not in _UNSUPPORTED:
        raise OSError(e, os.strerror(e), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (``RENAME_EXCHANGE``); False where the kernel or the file system
    cannot, and FileNotFoundError when `b` is gone."""
    e = _renameat2(a, b, RENAME_EXCHANGE)
    if e == 0:
        return True
    if e in _UNSUPPORTED:
        return False
    raise (FileNotFoundError if e == errno.ENOENT else OSError)(e, os.strerror(e), str(b))


def commit_folder(tmp: Path, out: Path, *, replace: bool) -> Path:
    """Rename the finished `tmp` to `out`. ``replace``: an existing `out` is swapped with `tmp` in one step, so
    that `out` holds the old folder or the new one at every instant, then the old one is removed (where the file
    system cannot swap, the old `out` is moved aside first and :func:`recover` restores it after a crash between
    the two renames). Without ``replace``, an `out` that exists — another writer committed it while this one
    worked — is never touched (one line names it) and `tmp` is removed."""
    tmp, out = Path(tmp), Path(out)
    os.chmod(tmp, 0o755)
    if not replace:
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ForgetlessError(
                "output folder appeared while this run was writing it (another process or "
                "thread wrote the same output); it was left as it is",
                file=out,
                remedy="choose another --out, or pass --force to replace it",
            ) from None
        return out
    for _ in range(3):  # another writer may commit or remove `out` between our steps: look again
        try:
            _rename_noreplace(tmp, out)
            return out
        except FileExistsError:
            pass
        try:
            swapped = _rename_exchange(tmp, out)
        except FileNotFoundError:
            continue
        if swapped:
            shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now at tmp's name
            return out
        if _replace_moving_aside(tmp, out):
            return out
    raise ForgetlessError(
        "output folder is being replaced by other writers at the same time",
        file=out,
        remedy="run one writer per output folder",
    )


def _replace_moving_aside(tmp: Path, out: Path) -> bool:
    """Replace `out` by `tmp` in two renames (for file systems that cannot swap): the old `out` goes to a
    ``.OUT.forgetless-old-PID-…/old`` folder first, which :func:`recover` moves back after a crash in between."""
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.forgetless-old-{os.getpid()}-", dir=out.parent))
    try:
        try:
            os.replace(out, trash / "old")
        except FileNotFoundError:
            return False
        try:
            _rename_noreplace(tmp, out)
        except BaseException:
            _rename_noreplace(trash / "old", out)  # put the old one back where it was
            raise
        return True
    except FileExistsError:
        return False
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def recover(out: Path) -> Path | None:
    """Put back the folder a crashed replace moved aside (:func:`_replace_moving_aside`), when `out` is absent and
    that writer no longer runs; returns the restored path. Run before any cleanup of leftovers."""
    out = Path(out)
    if os.path.lexists(out):
        return None
    for p in moved_aside(out):
        try:
            _rename_noreplace(p / "old", out)
        except FileExistsError:
            return None
        return out
    return None


def moved_aside(out: Path) -> list[Path]:
    """The folders holding a copy of `out` that a crashed replace moved aside (their writer no longer runs)."""
    found = []
    for p in sorted(Path(out).parent.glob(f".{glob.escape(Path(out).name)}.forgetless-old-*-*")):
        m = _LEFTOVER.search(p.name)
        if m and not _alive(int(m.group(1))) and os.path.lexists(p / "old"):
            found.append(p)
    return found


@contextmanager
def atomic_folder(out: Path, *, replace: bool = True) -> Iterator[Path]:
    """A temporary folder beside `out` to write into (:func:`temp_folder`); on success its files and itself are
    synced to disk and it is renamed to `out` (:func:`commit_folder`: an existing `out` is replaced only with
    ``replace``), on error it is removed. Readers never see a half-written `out`."""
    out = Path(out)
    tmp = temp_folder(out)
    try:
        yield tmp
        sync_folder(tmp)
        commit_folder(tmp, out, replace=replace)
        fsync_path(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _temp_file(path: Path) -> tuple[int, Path]:
    """A new file beside `path` named with this process's id (as :func:`temp_folder`'s), created with the
    permissions the umask gives an ordinary file (mkstemp's are the owner's alone)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.forgetless-tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def atomic_write(
    path: str | os.PathLike, data: bytes | str | Callable[[Path], object], *, replace: bool = True
) -> Path:
    """Write `data` to the file `path`, whole or not at all: bytes, text (UTF-8), or a function that writes the
    path it is given. It goes to a temporary file beside `path`, unique to this call (concurrent writers never
    share one), renamed over `path`; on any failure the temporary file is removed and an error of the operating
    system names `path` (a full disk says which file). ``replace=False``: an existing `path` is kept and
    FileExistsError raised (the file system's no-replace rename of a file: a hard link)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    try:
        with naming(path):
            if callable(data):
                os.close(fd)
                data(tmp)
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(data.encode("utf-8") if isinstance(data, str) else data)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # FileExistsError on an existing path
            os.unlink(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def parse_size(size: str | int) -> int:
    """'5GB', '500MiB', '2e9' or an int → bytes."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper().replace(" ", "")
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "B": 1,
    }
    for u, mult in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * mult)
    return int(float(s))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


@dataclass
class _Shard:
    file: str
    entries: list[Entry]
    header_len: int = 0
    offsets: dict[str, int] | None = None  # absolute offset of each tensor's data


def plan_shards(entries: list[Entry], shard_size: int) -> list[list[Entry]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow the current one."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


class StreamingWriter:
    def __init__(
        self,
        out: Path,
        entries: list[Entry],
        *,
        shard_size: int,
        force: bool = False,
        metadata: dict[str, str] | None = None,
        single_name: str = SAFE_SINGLE,
    ):
        """``single_name``: the file name when everything fits one shard (a PEFT adapter is one
        ``adapter_model.safetensors``: give it a shard size above its total)."""
        self.out = Path(out)
        if self.out.exists() and not force:
            raise ForgetlessError(
                "output folder already exists",
                file=self.out,
                remedy="choose another --out or pass --force to replace it",
            )
        self.force = force
        groups = plan_shards(entries, shard_size)
        n = len(groups)
        names = [single_name] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = [_Shard(f, g) for f, g in zip(names, groups)]
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (fd, offset, nbytes)
        self._fds: list[int] = []
        self._left: dict[int, int] = {}  # fd -> bytes of its shard not written yet
        self._unsynced: dict[int, int] = {}  # fd -> bytes written since its last background sync
        self._syncer: ThreadPoolExecutor | None = None
        self._syncs: list[Future] = []
        self._pending = {e.name for e in entries}
        self._partial: dict[str, int] = {}  # name -> bytes written so far, for tensors written in pieces
        self._lock = threading.Lock()
        self.total_size = sum(e.nbytes for e in entries)
        check_free_space(self.out, self.total_size, "the output")
        meta = {"format": "pt", **(metadata or {})}
        self._paths: dict[int, Path] = {}  # fd -> its file, for the messages of OS errors that lack it
        self.tmp = temp_folder(self.out)
        try:
            for shard in self.shards:
                self._open_shard(shard, meta)
        except BaseException:  # a full disk at the headers: nothing of this writer is left behind
            self.abort()
            raise

    def _open_shard(self, shard: _Shard, meta: dict[str, str]) -> None:
        header: dict[str, object] = {"__metadata__": meta}
        pos = 0
        for e in shard.entries:
            header[e.name] = {
                "dtype": DTYPE_NAMES[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [pos, pos + e.nbytes],
            }
            pos += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = self.tmp / shard.file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds.append(fd)
        self._paths[fd] = self.out / shard.file  # the file the user asked for, on the same disk as `path`
        start = 8 + len(raw)
        with naming(self._paths[fd]):
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, start + pos)
        for e in shard.entries:
            off = start + header[e.name]["data_offsets"][0]
            self._where[e.name] = (fd, off, e.nbytes)
        self._left[fd], self._unsynced[fd] = pos, 0

    def write(self, name: str, data: torch.Tensor | bytes, at: int = 0) -> None:
        """Write one tensor (already in its planned dtype and shape) or its raw bytes; or, with ``at``, a piece of
        it (a block of rows) whose first byte is byte `at` of the tensor. The tensor is done when every one of its
        bytes has been written once. Thread-safe."""
        fd, off, nbytes = self._where[name]
        if isinstance(data, torch.Tensor):
            buf = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy()) if data.numel() else b""
        else:
            buf = memoryview(data)
        size = len(buf)
        if (at, size) == (0, nbytes):
            done = nbytes
        else:
            with self._lock:
                done = self._partial.get(name, 0) + size
                self._partial[name] = done
            if at < 0 or at + size > nbytes or done > nbytes:
                raise AssertionError(
                    f"{name}: bytes {at}..{at + size} written ({done} in all), {nbytes} planned"
                )
        off += at
        with naming(self._paths[fd]):
            while len(buf):  # in pieces: a write holds the file's lock, and other threads' writes wait for it
                k = os.pwrite(fd, buf[:WRITE_PIECE], off)
                buf, off = buf[k:], off + k
        with self._lock:
            if done == nbytes:
                self._pending.discard(name)
            self._left[fd] -= size
            self._unsynced[fd] += size
            if self._unsynced[fd] >= SYNC_EVERY or (self._left[fd] == 0 and self._unsynced[fd]):
                self._unsynced[fd] = 0
                if self._syncer is None:
                    self._syncer = ThreadPoolExecutor(1, thread_name_prefix="forgetless-sync")
                self._syncs.append(self._syncer.submit(self._datasync, fd))

    def _datasync(self, fd: int) -> None:
        with naming(self._paths[fd]):
            os.fdatasync(fd)

    def _stop_syncing(self) -> None:
        """Wait for the background syncs; raise the first one's error (a full disk, an I/O error)."""
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        syncs, self._syncs = self._syncs, []
        for f in syncs:
            f.result()

    def commit(
        self,
        *,
        side_files_from: Path | None = None,
        config_updates: dict | None = None,
        extra_files: dict[str, str] | None = None,
    ) -> Path:
        """Finish: check every tensor was written, write the index and side files, rename into place."""
        if self._pending:
            raise AssertionError(
                f"{len(self._pending)} planned tensors never written, e.g. {sorted(self._pending)[:3]}"
            )
        self._stop_syncing()
        for fd in self._fds:
            with naming(self._paths[fd]):
                os.fsync(fd)  # what the background syncs left, and the file's size and metadata
            os.close(fd)
        self._fds.clear()
        written = []
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {e.name: s.file for s in self.shards for e in s.entries},
            }
            (self.tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            written.append(SAFE_INDEX)
        if side_files_from is not None:
            written += copy_side_files(side_files_from, self.tmp, config_updates or {})
        for fname, text in (extra_files or {}).items():
            (self.tmp / fname).write_text(text)
            written.append(fname)
        for fname in written:
            fsync_path(self.tmp / fname)
        fsync_path(self.tmp)  # the folder's entries
        out = commit_folder(self.tmp, self.out, replace=self.force)
        fsync_path(out.parent)  # the rename
        return out

    def abort(self) -> None:
        try:
            self._stop_syncing()
        except OSError:
            pass  # the failure being handled is the one to report
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with naming(path):
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """Flush every file in `folder` (not its subfolders), then the folder's entries."""
    for f in folder.iterdir():
        if f.is_file():
            fsync_path(f)
    fsync_path(folder)


def copy_side_files(src: Path, dst: Path, config_updates: dict) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()) if src.is_dir() else []:
        if not f.is_file() or not any(fnmatch(f.name, pat) for pat in SIDE_FILES):
            continue
        if f.name == "config.json" and config_updates:
            cfg = json.loads(f.read_text())
            cfg.update(config_updates)
            (dst / f.name).write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied
