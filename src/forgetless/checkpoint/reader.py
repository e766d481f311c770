"""Lazy, one-tensor-at-a-time reading of Hugging Face model folders.

Supported: a single ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, and legacy
``pytorch_model.bin`` (single or sharded with its index), loaded with ``weights_only=True`` and ``mmap=True``.

Safetensors headers are parsed here (they are a length and a JSON object), so that every file is validated before
any work starts: a truncated file, a missing shard or an index that disagrees with its shards is reported by name.
Tensor data is read with ``os.pread`` straight into the tensor's own buffer: one copy, no mmap pages charged to the
process, and the GIL released while the kernel copies. A tensor the caller will only read can instead be mapped
from the file (:meth:`CheckpointReader.view`): no copy at all, its pages shared with the page cache while it lives.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ForgetlessError
from ..safeload import parse_json, read_json

SAFE_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFE_DTYPES.items()}

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux ≥ 5.14; Python's mmap may not name it


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # absolute byte offset of the data in `file` (safetensors); -1 for .bin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


def dtype_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def row_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of one row (dim 0) of a tensor; a scalar is one row."""
    return math.prod(shape[1:]) * dtype_size(dtype)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header. Returns (header without __metadata__, data start offset)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ForgetlessError("file not found", file=path, remedy="check the path") from None
    remedy = "the file is damaged or incomplete; download or save it again"
    if size < 8:
        raise ForgetlessError(f"not a safetensors file ({size} bytes)", file=path, remedy=remedy)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100_000_000:
            raise ForgetlessError(
                f"corrupt safetensors header (claims {n} header bytes, file has {size})",
                file=path,
                remedy=remedy,
            )
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ForgetlessError(
            f"corrupt safetensors header ({e.__class__.__name__})", file=path, remedy=remedy
        ) from None
    header = parse_json(text, file=path, remedy=remedy)
    if not isinstance(header, dict):
        raise ForgetlessError("corrupt safetensors header (not a JSON object)", file=path, remedy=remedy)
    header.pop("__metadata__", None)
    start = 8 + n
    end_max = 0
    for name, h in header.items():
        try:
            dtype = SAFE_DTYPES[h["dtype"]]
            b, e = h["data_offsets"]
            numel = math.prod(h["shape"])
        except (KeyError, TypeError, ValueError):
            raise ForgetlessError(
                f"corrupt safetensors header entry {h!r}", file=path, tensor=name, remedy=remedy
            ) from None
        if e - b != numel * dtype_size(dtype) or b < 0:
            raise ForgetlessError(
                f"data offsets {b}..{e} do not match shape {h['shape']} {h['dtype']}",
                file=path,
                tensor=name,
                remedy=remedy,
            )
        end_max = max(end_max, e)
    if start + end_max > size:
        raise ForgetlessError(
            f"file is truncated: its header needs {start + end_max} bytes, the file has {size}",
            file=path,
            remedy=remedy,
        )
    return header, start


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__")  # the header was checked by CheckpointReader first
    return meta if isinstance(meta, dict) else {}


def is_model_dir(path: Path) -> bool:
    return any((path / f).exists() for f in (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX))


class CheckpointReader:
    """A model folder read lazily by tensor name. Thread-safe for concurrent ``get`` calls."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            if self.path.is_file() and self.path.suffix == ".safetensors":
                # a bare safetensors file (e.g. a statistics file) is accepted as a one-file checkpoint
                self.infos = self._index_safetensors({self.path.name: self.path})
                self.format = "safetensors"
                self.config = {}
                self._bin: dict[Path, dict[str, torch.Tensor]] = {}
                self._fds: dict[Path, int] = {}
                return
            raise ForgetlessError(
                "model folder not found",
                file=self.path,
                remedy="give a Hugging Face model folder (config.json + weights)",
            )
        self.config = self._read_config()
        self._bin = {}
        self._fds = {}
        p = self.path
        if (p / SAFE_INDEX).exists():
            self.format = "safetensors"
            files = self._files_from_index(p / SAFE_INDEX)
            self.infos = self._index_safetensors(files)
            self._check_index(p / SAFE_INDEX)
        elif (p / SAFE_SINGLE).exists():
            self.format = "safetensors"
            self.infos = self._index_safetensors({SAFE_SINGLE: p / SAFE_SINGLE})
        elif (p / BIN_INDEX).exists() or (p / BIN_SINGLE).exists():
            self.format = "bin"
            files = (
                self._files_from_index(p / BIN_INDEX)
                if (p / BIN_INDEX).exists()
                else {BIN_SINGLE: p / BIN_SINGLE}
            )
            self.infos = self._index_bin(files)
        else:
            if any((p / f).exists() for f in ADAPTER_FILES):
                raise ForgetlessError(
                    "this folder is a PEFT adapter, not a model",
                    file=p,
                    remedy="name it as BASE_DIR+ADAPTER_DIR to fold it into its base model",
                )
            raise ForgetlessError(
                "no model weights found (model.safetensors, its index, or pytorch_model.bin)",
                file=p,
                remedy="give a Hugging Face model folder",
            )

    # ------------------------------------------------------------------ indexing
    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        return read_json(cfg, remedy="fix or restore config.json", expect=dict)

    def _files_from_index(self, index: Path) -> dict[str, Path]:
        remedy = "restore the index file from the original checkpoint"
        weight_map = read_json(index, remedy=remedy)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ForgetlessError(
                "invalid index (no 'weight_map' of tensor names to shard files)", file=index, remedy=remedy
            )
        self._weight_map = weight_map
        files = {}
        for shard in dict.fromkeys(weight_map.values()):
            f = self.path / shard
            if not f.exists():
                raise ForgetlessError(
                    f"missing shard {shard} listed in {index.name}",
                    file=f,
                    remedy="the download is incomplete; fetch the missing shard",
                )
            files[shard] = f
        return files

    def _check_index(self, index: Path) -> None:
        for name, shard in self._weight_map.items():
            info = self.infos.get(name)
            if info is None or info.file.name != Path(shard).name:
                raise ForgetlessError(
                    f"index lists tensor {name!r} in {shard}, which does not contain it",
                    file=index,
                    remedy="restore the index and shards from one checkpoint",
                )

    @staticmethod
    def _index_safetensors(files: dict[str, Path]) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for f in files.values():
            header, start = read_safetensors_header(f)
            for name, h in header.items():
                if name in infos:
                    raise ForgetlessError(
                        f"tensor appears in two shards ({infos[name].file.name}, {f.name})",
                        file=f,
                        tensor=name,
                        remedy="restore the shards from one checkpoint",
                    )
                infos[name] = TensorInfo(
                    name, tuple(h["shape"]), SAFE_DTYPES[h["dtype"]], f, start + h["data_offsets"][0]
                )
        return infos

    def _index_bin(self, files: dict[str, Path]) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for f in files.values():
            sd = load_bin(f)
            self._bin[f] = sd
            for name, t in sd.items():
                infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, f, -1)
        return infos

    # ------------------------------------------------------------------ access
    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A fresh tensor (never a view into the file), read straight into its own memory; ``rows``: only its rows
        ``start:stop`` along dim 0 (a contiguous byte range of the file)."""
        info = self.infos[name]
        if info.offset < 0:
            t = self._bin[info.file][name]
            return (t if rows is None else t[rows[0] : rows[1]]).clone()
        shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
        out = torch.empty(shape, dtype=info.dtype)
        if out.numel():
            self._read_into(info, memoryview(out.reshape(-1).view(torch.uint8).numpy()), rows)
        return out

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (``rows``: its rows ``start:stop``) mapped from its file rather than read: no copy, the pages
        those of the page cache, unmapped when the tensor is freed. The mapping is private and copy-on-write: the
        file never changes, and a write into the tensor copies the page it touches. For a caller that only reads
        (a method whose fine-tuned inputs are not written); a legacy .bin tensor, one whose data is not aligned
        for its dtype, or one on a file system that cannot map files, is read as :meth:`get` reads it. A file
        shortened by another process before the view, or between mapping and populating its pages, is an error
        naming it (populating reports EFAULT where a first touch would raise SIGBUS); one shortened while the
        tensor is in use still raises SIGBUS: inputs must stay as they are while they are merged."""
        info = self.infos[name]
        shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
        numel = math.prod(shape)
        at = info.offset + (0 if rows is None else rows[0] * row_bytes(info.shape, info.dtype))
        if info.offset < 0 or not numel or at % dtype_size(info.dtype):
            return self.get(name, rows)
        start = at - at % mmap.ALLOCATIONGRANULARITY
        try:
            m = mmap.mmap(
                self._fd(info.file),
                at - start + numel * dtype_size(info.dtype),
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
        except ValueError:  # Python's own size check: the file is now shorter than its header says
            raise truncated(info) from None
        except OSError:  # a file system that cannot map files
            return self.get(name, rows)
        try:  # map every page now, on this (reader) thread, in one call: faulting them in one by one where the
            m.madvise(
                MADV_POPULATE_READ
            )  # merge first touches them cost it 2-7x more (the sample's scattered reads)
        except OSError as e:
            if e.errno == errno.EFAULT:  # a page past the file's end: touching it would raise SIGBUS
                m.close()
                raise truncated(info) from None
        except ValueError:  # Linux before 5.14 (EINVAL is an OSError, passed over above)
            pass
        return torch.frombuffer(m, dtype=info.dtype, count=numel, offset=at - start).view(
            shape
        )  # keeps `m` alive

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds.setdefault(file, os.open(file, os.O_RDONLY))
        return fd

    def _read_into(self, info: TensorInfo, buf: memoryview, rows: tuple[int, int] | None = None) -> None:
        fd, off, done = self._fd(info.file), info.offset, 0
        if rows is not None:
            off += rows[0] * row_bytes(info.shape, info.dtype)
        while done < len(buf):
            k = os.preadv(fd, [buf[done:]], off + done)
            if k == 0:
                raise truncated(info)
            done += k

    def raw(self, name: str, rows: tuple[int, int] | None = None) -> bytes | bytearray:
        """The tensor's bytes as stored (``rows``: of its rows ``start:stop`` only): used to copy untouched tensors
        without decoding."""
        info = self.infos[name]
        if info.offset < 0:
            t = self._bin[info.file][name]
            t = (t if rows is None else t[rows[0] : rows[1]]).contiguous()
            return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        n = info.nbytes if rows is None else (rows[1] - rows[0]) * row_bytes(info.shape, info.dtype)
        buf = bytearray(n)
        if n:
            self._read_into(info, memoryview(buf), rows)
        return buf

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ identity
    def files(self) -> list[Path]:
        return sorted({i.file for i in self.infos.values()})

    def fingerprint(self) -> str:
        """Structure: names, shapes and dtypes. Equal for a model and its fine-tuned copy."""
        h = hashlib.sha256()
        for name in sorted(self.infos):
            i = self.infos[name]
            h.update(f"{name}|{list(i.shape)}\n".encode())
        return h.hexdigest()[:16]

    def weights_fingerprint(self, chunks: int = 256, chunk: int = 4096) -> str:
        """Content, sampled: file sizes, headers and `chunks` evenly spaced 4 KiB windows of every file."""
        h = hashlib.sha256(self.fingerprint().encode())
        for f in self.files():
            size = f.stat().st_size
            h.update(f"{f.name}:{size}\n".encode())
            with open(f, "rb") as fh:
                step = max(1, size // chunks)
                for pos in range(0, size, step):
                    h.update(os.pread(fh.fileno(), chunk, pos))
        return h.hexdigest()[:16]


def truncated(info: TensorInfo) -> ForgetlessError:
    """The error for a file found shorter than its header says while it is read (another process shortened it)."""
    return ForgetlessError(
        "file is truncated while reading (shorter than its header says: did another process change it?)",
        file=info.file,
        tensor=info.name,
        remedy="leave the inputs as they are while a command reads them; save the file again",
    )


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A legacy PyTorch checkpoint, safely (weights_only) and lazily (mmap) where the file format allows."""
    remedy = "the file is damaged or not a PyTorch state dict; download or save it again"
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # pre-1.6 (non-zip) format: no mmap
    except Exception as e:  # noqa: BLE001 — pickle errors, EOF on truncation, unsafe globals: all mean "unreadable"
        first = str(e).splitlines()[0] if str(e) else ""
        raise ForgetlessError(
            f"cannot read ({e.__class__.__name__}: {first})", file=path, remedy=remedy
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ForgetlessError("not a state dict of tensors", file=path, remedy=remedy)
    return sd
