"""Fused kernels for TIES and the exact top-k selection (``_kernels.c``, built at install).

Each does in one pass over memory what the torch code beside it does in several torch operations, with the same
float32 operations in the same order, so the result is the same bit for bit (tests/test_kernels.py). What they save:
BENCHMARKS.md, "Merge engine (foundation)".

Optional: where the extension was not built (no C compiler at install) or ``FORGETLESS_KERNELS=0`` is set,
:data:`ENABLED` is False and the callers run torch. Callers pass flat, contiguous float32 CPU tensors (:func:`fits`);
the kernels release the GIL, so merges on several threads overlap.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    from . import _kernels
except ImportError:  # not built: the torch rule runs
    _kernels = None

MAX_MODELS = 64  # the TIES kernel's limit (_kernels.c); more models run the torch rule
ENABLED = _kernels is not None and os.environ.get("FORGETLESS_KERNELS", "1") != "0"


def fits(*tensors: Tensor) -> bool:
    """Whether the kernels can take these tensors: enabled, and each contiguous float32 on the CPU."""
    return ENABLED and all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors
    )


def count_gather(
    a: Tensor, b: Tensor | None, lo: float, hi: float, largest: bool, values: Tensor, index: Tensor
) -> tuple[int, int]:
    """One pass over x = `a`, or x = |`a` − `b`| (flat, of one length): how many entries lie beyond the bracket
    [`lo`, `hi`] (above `hi` for the largest, below `lo` for the smallest; NaN never), and how many inside it —
    those written, in order, to `values` and their positions to `index` (int32), both at least as long as `a`."""
    n = a.numel()
    assert (b is None or b.numel() == n) and values.numel() >= n and index.numel() >= n and n < 2**31
    assert index.dtype == torch.int32 and values.dtype == torch.float32
    return _kernels.count_gather(
        a.data_ptr(),
        0 if b is None else b.data_ptr(),
        n,
        lo,
        hi,
        largest,
        values.data_ptr(),
        index.data_ptr(),
    )


def histogram(a: Tensor, b: Tensor, hist: Tensor) -> Tensor:
    """Adds to `hist` (int64, :data:`.select.BINS` bins) the count of the entries x = |`a` − `b`| (flat, of one
    length) in each bin of the top 16 bits of x's float32 bits (``x.view(int32) >> 16``); NaN left out."""
    assert (
        a.numel() == b.numel()
        and hist.dtype == torch.int64
        and hist.numel() == 1 << 15
        and hist.is_contiguous()
    )
    _kernels.histogram(a.data_ptr(), b.data_ptr(), a.numel(), hist.data_ptr())
    return hist


def ties(
    base: Tensor,
    finetuned: list[Tensor],
    below: list[float],
    value: list[float],
    split: list[int],
    weights: list[float],
    lambda_: float,
    frequency: bool,
) -> Tensor:
    """TIES on flat tensors in mergekit's convention, in place on `base`: each Δₖ = θₖ − θ₀ kept where
    |Δₖ| > ``below[k]`` in its first ``split[k]`` entries and > ``value[k]`` after (the cut's ``hardshrink``);
    ×wₖ when any weight is not 1; the sign of Σ Δₖ (of Σ sign Δₖ with `frequency`) elected, 0 and NaN as +; the
    agreeing entries' sum divided by their models' summed weights (max(den, 1) when every weight is ≥ 1, else
    den + (den == 0)), ×λ when λ ≠ 1, added to θ₀ — :func:`.baselines.combine`'s operations in its order."""
    n = base.numel()
    assert all(f.numel() == n for f in finetuned)
    _kernels.ties(
        base.data_ptr(),
        tuple(f.data_ptr() for f in finetuned),
        n,
        tuple(map(float, below)),
        tuple(map(float, value)),
        tuple(split),
        tuple(map(float, weights)),
        float(lambda_),
        frequency,
    )
    return base
