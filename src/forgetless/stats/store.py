"""Statistics files: safetensors keyed by the weights' own tensor names, with metadata.

Metadata (all strings, as safetensors requires):
  ``kind``                    "fisher" | "gram" (or another statistic's name)
  ``num_samples``             N
  ``model_fingerprint``       ``CheckpointReader(model_dir).fingerprint()``: names and shapes (what the engine checks)
  ``model_weights_fingerprint`` optional, ``CheckpointReader.weights_fingerprint()``: file sizes and sampled bytes
  ``data_fingerprint``        given by the caller (the calibration data)
  ``forgetless_version``
  ``token_counts``            Gram files: JSON {tensor name: rows summed}
  ``extra``                   JSON of anything else the caller passes (variant, seed, skipped samples, …)

A Fisher file holds F = sums / N (the mean); a Gram file holds Σ x xᵀ (the sum) and the token counts.
Files appear whole or not at all (written to a temporary file in the same folder, then ``os.replace``). A tensor
with a NaN or Inf is refused, naming the tensor. Stored in float32 (default) or bfloat16; never float16, whose
range the tiny squared gradients fall out of.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint.reader import CheckpointReader, read_safetensors_metadata
from ..errors import ForgetlessError
from ..safeload import parse_json

STORE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _version() -> str:
    try:
        from .. import __version__  # lazily: the package __init__ imports the engine, which may import us
    except ImportError:  # pragma: no cover
        return "unknown"
    return __version__


def model_fingerprints(model_dir: str | os.PathLike) -> dict[str, str]:
    """The fingerprints to store for a model folder: structure (checked by the engine) and sampled content."""
    with CheckpointReader(model_dir) as r:
        return {"model_fingerprint": r.fingerprint(), "model_weights_fingerprint": r.weights_fingerprint()}


def save_statistics(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, kind: str, num_samples: int,
                    model_fingerprint: str, data_fingerprint: str, dtype: torch.dtype | str = torch.float32,
                    token_counts: Mapping[str, int] | None = None, model_weights_fingerprint: str | None = None,
                    extra: Mapping[str, Any] | None = None, replace: bool = True) -> Path:
    """Write ``tensors`` (already final: the mean for a Fisher, the sum for a Gram) atomically to ``path``.
    ``replace=False``: a file that appeared at ``path`` meanwhile (another writer) is never replaced."""
    path = Path(path)
    if isinstance(dtype, str):
        if dtype not in STORE_DTYPES:
            raise ForgetlessError(f"statistics cannot be stored as {dtype!r}", file=path,
                                  remedy="use float32 (default) or bfloat16")
        dtype = STORE_DTYPES[dtype]
    if dtype == torch.float16:
        raise ForgetlessError("statistics are never stored in float16: squared gradients fall below its range",
                              file=path, remedy="use float32 (default) or bfloat16")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ForgetlessError(f"statistics cannot be stored as {dtype}", file=path,
                              remedy="use float32 (default) or bfloat16")
    if not tensors:
        raise ForgetlessError("no statistics to write", file=path, remedy="check the scope")
    if num_samples <= 0:
        raise ForgetlessError(f"statistics over {num_samples} samples", file=path,
                              remedy="give calibration data with at least one usable sample")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ForgetlessError(f"statistics must be floating point, got {t.dtype}", file=path, tensor=name)
        bad = ~torch.isfinite(t)
        if bad.any():
            raise ForgetlessError(f"{int(bad.sum())} of {t.numel()} values are NaN or Inf; not written", file=path,
                                  tensor=name, remedy="find the samples that produce them (on_bad='skip' counts "
                                  "and skips them)")
        c = t.detach().to("cpu", dtype).contiguous()
        if dtype == torch.bfloat16 and not torch.isfinite(c).all():
            raise ForgetlessError("values overflow bfloat16", file=path, tensor=name, remedy="store in float32")
        out[name] = c
    meta = {"format": "pt", "kind": str(kind), "num_samples": str(int(num_samples)),
            "model_fingerprint": str(model_fingerprint), "data_fingerprint": str(data_fingerprint),
            "forgetless_version": _version()}
    if model_weights_fingerprint is not None:
        meta["model_weights_fingerprint"] = str(model_weights_fingerprint)
    if token_counts is not None:
        missing = set(out) - set(token_counts)
        if missing:
            raise ForgetlessError("no token count", file=path, tensor=min(missing))
        meta["token_counts"] = json.dumps({k: int(token_counts[k]) for k in out}, sort_keys=True)
    if extra:
        meta["extra"] = json.dumps(dict(extra), sort_keys=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(out, tmp, metadata=meta)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails on an existing path: the no-replace rename of a file
            except FileExistsError:
                raise ForgetlessError("output file appeared while the statistics were computed (another "
                                      "process wrote it); it was left as it is", file=path,
                                      remedy="choose another --out, or pass --force to replace it") from None
            finally:
                Path(tmp).unlink(missing_ok=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_fisher(path: str | os.PathLike, sums: Mapping[str, torch.Tensor], num_samples: int, **kw: Any) -> Path:
    """Store F = sums / N."""
    if num_samples <= 0:
        raise ForgetlessError("no usable sample: the Fisher is undefined", file=path,
                              remedy="check the calibration data (answers present, no NaN)")
    return save_statistics(path, {k: v.float() / num_samples for k, v in sums.items()}, kind="fisher",
                           num_samples=num_samples, **kw)


def save_gram(path: str | os.PathLike, grams: Mapping[str, torch.Tensor], token_counts: Mapping[str, int],
              num_samples: int, **kw: Any) -> Path:
    """Store Σ x xᵀ (the sum, cast to the storage dtype) and the token counts."""
    return save_statistics(path, grams, kind="gram", num_samples=num_samples, token_counts=token_counts, **kw)


def load_statistics(path: str | os.PathLike) -> tuple[CheckpointReader, dict[str, Any]]:
    """(a lazy reader of the tensors by name, metadata). Metadata: strings, except ``num_samples`` (int) and
    ``token_counts`` / ``extra`` (decoded JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ForgetlessError("statistics file not found", file=path, remedy="compute it with `forgetless stats`")
    reader = CheckpointReader(path)
    meta: dict[str, Any] = dict(read_safetensors_metadata(path))
    if "kind" not in meta or "num_samples" not in meta:
        reader.close()
        raise ForgetlessError("not a forgetless statistics file (no kind / num_samples metadata)", file=path,
                              remedy="compute it with `forgetless stats`")
    meta["num_samples"] = int(meta["num_samples"])
    for key in ("token_counts", "extra"):
        if key in meta:
            meta[key] = parse_json(meta[key], file=path, remedy="recompute it with `forgetless stats`")
    return reader, meta
