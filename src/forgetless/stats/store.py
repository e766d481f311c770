"""Statistics files: safetensors keyed by the weights' own tensor names, with metadata.

Metadata (all strings, as safetensors requires):
  ``kind``                    "fisher" | "gram" (or another statistic's name)
  ``num_samples``             N
  ``model_fingerprint``       ``CheckpointReader(model_dir).fingerprint()``: names and shapes (what the engine checks)
  ``model_weights_fingerprint`` optional, ``CheckpointReader.weights_fingerprint()``: file sizes and sampled bytes
  ``data_fingerprint``        given by the caller (the calibration data)
  ``forgetless_version``
  ``token_counts``            Gram files: JSON {tensor name: rows summed}
  ``shared``                  Gram files: JSON {module: the module whose stored Gram it reads} for Linears that
                              read the same input (q/k/v, gate/up); their Gram is stored once
  ``extra``                   JSON of anything else the caller passes (variant, seed, skipped samples, …)

A Fisher file holds F = sums / N (the mean); a Gram file holds Σ x xᵀ (the sum) and the token counts.
:class:`Statistics` reads one statistic by module name, from one file or from several that complete each other
(runs of the same model and data over disjoint ``--scope``).
Files appear whole or not at all (:func:`forgetless.checkpoint.writer.atomic_write`). A tensor
with a NaN or Inf is refused, naming the tensor. Stored in float32 (default) or bfloat16; never float16, whose
range the tiny squared gradients fall out of.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._version import __version__
from ..checkpoint.reader import CheckpointReader, read_safetensors_metadata
from ..checkpoint.writer import atomic_write
from ..errors import ForgetlessError
from ..safeload import parse_json

STORE_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def model_fingerprints(model_dir: str | os.PathLike) -> dict[str, str]:
    """The fingerprints to store for a model folder: structure (checked by the engine) and sampled content."""
    with CheckpointReader(model_dir) as r:
        return {"model_fingerprint": r.fingerprint(), "model_weights_fingerprint": r.weights_fingerprint()}


def save_statistics(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    kind: str,
    num_samples: int,
    model_fingerprint: str,
    data_fingerprint: str,
    dtype: torch.dtype | str = torch.float32,
    token_counts: Mapping[str, int] | None = None,
    model_weights_fingerprint: str | None = None,
    extra: Mapping[str, Any] | None = None,
    replace: bool = True,
    shared: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (already final: the mean for a Fisher, the sum for a Gram) atomically to ``path``.
    ``replace=False``: a file that appeared at ``path`` meanwhile (another writer) is never replaced."""
    path = Path(path)
    if isinstance(dtype, str):
        if dtype not in STORE_DTYPES:
            raise ForgetlessError(
                f"statistics cannot be stored as {dtype!r}",
                file=path,
                remedy="use float32 (default) or bfloat16",
            )
        dtype = STORE_DTYPES[dtype]
    if dtype == torch.float16:
        raise ForgetlessError(
            "statistics are never stored in float16: squared gradients fall below its range",
            file=path,
            remedy="use float32 (default) or bfloat16",
        )
    if dtype not in (torch.float32, torch.bfloat16):
        raise ForgetlessError(
            f"statistics cannot be stored as {dtype}", file=path, remedy="use float32 (default) or bfloat16"
        )
    if not tensors:
        raise ForgetlessError("no statistics to write", file=path, remedy="check the scope")
    if num_samples <= 0:
        raise ForgetlessError(
            f"statistics over {num_samples} samples",
            file=path,
            remedy="give calibration data with at least one usable sample",
        )
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ForgetlessError(f"statistics must be floating point, got {t.dtype}", file=path, tensor=name)
        bad = ~torch.isfinite(t)
        if bad.any():
            raise ForgetlessError(
                f"{int(bad.sum())} of {t.numel()} values are NaN or Inf; not written",
                file=path,
                tensor=name,
                remedy="find the samples that produce them (on_bad='skip' counts and skips them)",
            )
        c = t.detach().to("cpu", dtype).contiguous()
        if dtype == torch.bfloat16 and not torch.isfinite(c).all():
            raise ForgetlessError(
                "values overflow bfloat16", file=path, tensor=name, remedy="store in float32"
            )
        out[name] = c
    meta = {
        "format": "pt",
        "kind": str(kind),
        "num_samples": str(int(num_samples)),
        "model_fingerprint": str(model_fingerprint),
        "data_fingerprint": str(data_fingerprint),
        "forgetless_version": __version__,
    }
    if model_weights_fingerprint is not None:
        meta["model_weights_fingerprint"] = str(model_weights_fingerprint)
    if shared:
        bad = next((m for m, r in shared.items() if r not in out or m in out), None)
        if bad is not None:
            raise ForgetlessError("a shared Gram must name a stored one", file=path, tensor=bad)
        meta["shared"] = json.dumps(dict(shared), sort_keys=True)
    if token_counts is not None:
        missing = (set(out) | set(shared or {})) - set(token_counts)
        if missing:
            raise ForgetlessError("no token count", file=path, tensor=min(missing))
        meta["token_counts"] = json.dumps(
            {k: int(token_counts[k]) for k in [*out, *(shared or {})]}, sort_keys=True
        )
    if extra:
        meta["extra"] = json.dumps(dict(extra), sort_keys=True, default=str)
    try:
        atomic_write(path, lambda tmp: save_file(out, tmp, metadata=meta), replace=replace)
    except FileExistsError:
        raise ForgetlessError(
            "output file appeared while the statistics were computed (another process wrote "
            "it); it was left as it is",
            file=path,
            remedy="choose another --out, or pass --force to replace it",
        ) from None
    return path


def save_fisher(
    path: str | os.PathLike, sums: Mapping[str, torch.Tensor], num_samples: int, **kw: Any
) -> Path:
    """Store F = sums / N."""
    if num_samples <= 0:
        raise ForgetlessError(
            "no usable sample: the Fisher is undefined",
            file=path,
            remedy="check the calibration data (answers present, no NaN)",
        )
    return save_statistics(
        path,
        {k: v.float() / num_samples for k, v in sums.items()},
        kind="fisher",
        num_samples=num_samples,
        **kw,
    )


def save_gram(
    path: str | os.PathLike,
    grams: Mapping[str, torch.Tensor],
    token_counts: Mapping[str, int],
    num_samples: int,
    **kw: Any,
) -> Path:
    """Store Σ x xᵀ (the sum, cast to the storage dtype) and the token counts."""
    return save_statistics(path, grams, kind="gram", num_samples=num_samples, token_counts=token_counts, **kw)


def load_statistics(path: str | os.PathLike, strict: bool = True) -> tuple[CheckpointReader, dict[str, Any]]:
    """(a lazy reader of the stored tensors by name, metadata). Metadata: strings, except ``num_samples`` (int)
    and ``token_counts`` / ``extra`` / ``shared`` (decoded JSON). ``strict=False`` also takes a plain safetensors
    file of statistics without forgetless's metadata (the merge engine does)."""
    path = Path(path)
    if not path.is_file():
        raise ForgetlessError(
            "statistics file not found", file=path, remedy="compute it with `forgetless stats`"
        )
    reader = CheckpointReader(path)
    meta: dict[str, Any] = dict(read_safetensors_metadata(path))
    if strict and ("kind" not in meta or "num_samples" not in meta):
        reader.close()
        raise ForgetlessError(
            "not a forgetless statistics file (no kind / num_samples metadata)",
            file=path,
            remedy="compute it with `forgetless stats`",
        )
    if "num_samples" in meta:
        meta["num_samples"] = int(meta["num_samples"])
    for key in ("token_counts", "extra", "shared"):
        if key in meta:
            meta[key] = parse_json(meta[key], file=path, remedy="recompute it with `forgetless stats`")
    return reader, meta


AGREE = ("kind", "model_fingerprint", "model_weights_fingerprint", "data_fingerprint", "num_samples")


class Statistics:
    """One statistic by module name, read from one file or from several that complete each other.

    Several files must agree on the kind, model, weights, data and sample count, and cover disjoint modules
    (refused otherwise, naming the module and both files); ``strict=False`` takes files without forgetless's
    metadata too (see :func:`load_statistics`). A module whose Gram is shared (``shared`` metadata)
    reads the stored tensor of the module it shares with. Readers take ``infos``, ``get`` and ``in`` as on a
    :class:`CheckpointReader`.
    """

    def __init__(self, paths: str | os.PathLike | list[str | os.PathLike], strict: bool = True):
        self.paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
        self.strict = strict
        if not self.paths:
            raise ForgetlessError("no statistics file given", remedy="name at least one file")
        self.readers: list[CheckpointReader] = []
        self.metas: list[dict[str, Any]] = []
        self._where: dict[str, tuple[CheckpointReader, str]] = {}  # module → (its file's reader, stored key)
        try:
            for p in self.paths:
                self._add(p)
        except BaseException:
            self.close()
            raise
        self.path = self.paths[0]
        self.meta = self._combined_meta()
        self.infos = {n: r.info(k) for n, (r, k) in self._where.items()}

    def _add(self, path: Path) -> None:
        reader, meta = load_statistics(path, self.strict)
        self.readers.append(reader)
        self.metas.append(meta)
        first = self.metas[0]
        for key in AGREE:
            if meta.get(key) != first.get(key):
                raise ForgetlessError(
                    f"{key} {meta.get(key)!r} differs from {self.paths[0]}'s {first.get(key)!r}; "
                    "files that complete each other come from one model, data and sample count",
                    file=path,
                    remedy="compute every part with the same model, --data, -n, --seed",
                )
        stored = {n: (reader, n) for n in reader.names()}
        shared = {m: (reader, r) for m, r in (meta.get("shared") or {}).items()}
        for name, where in {**stored, **shared}.items():
            if name in self._where:
                other = self.paths[self.readers.index(self._where[name][0])]
                raise ForgetlessError(
                    f"statistics for this module are also in {other}; the files overlap",
                    file=path,
                    tensor=name,
                    remedy="give files over disjoint --scope",
                )
            if where[1] not in reader:
                raise ForgetlessError(
                    f"shares the Gram of {where[1]}, which the file does not hold",
                    file=path,
                    tensor=name,
                    remedy="recompute it with `forgetless stats gram`",
                )
            self._where[name] = where

    def _combined_meta(self) -> dict[str, Any]:
        meta = dict(self.metas[0])
        for key in ("token_counts", "shared"):
            merged = {k: v for m in self.metas for k, v in (m.get(key) or {}).items()}
            if merged or key in meta:
                meta[key] = merged
        return meta

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str):
        return self.infos[name]

    def key(self, name: str) -> tuple[Path, str]:
        """Where the module's tensor is stored: (file, tensor name). Modules with the same key share it."""
        reader, key = self._where[name]
        return reader.path, key

    def file_of(self, name: str) -> Path:
        return self._where[name][0].path

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        reader, key = self._where[name]
        return reader.get(key, rows)

    def weights_fingerprint(self) -> str:
        """The files' sampled-content fingerprint (one file: that file's own)."""
        fps = [r.weights_fingerprint() for r in self.readers]
        if len(fps) == 1:
            return fps[0]
        return hashlib.sha256("\n".join(fps).encode()).hexdigest()[:16]

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
