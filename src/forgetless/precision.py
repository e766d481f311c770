"""TF32 for float32 matrix products on CUDA: one switch, held for the span of a command, then put back.

On Ampere and later GPUs, TF32 tensor cores multiply float32 matrices with 10-bit mantissas and float32
accumulation, several times faster than IEEE float32; PyTorch leaves cuBLAS on IEEE by default and recommends TF32
where that precision is enough. The commands that multiply large float32 matrices (statistics, the CGM chain,
fine-tuning, evaluation) turn it on by default; ``--no-tf32`` keeps IEEE float32. bfloat16 and float16 products, and
everything on the CPU, are not affected.

The flags are set through ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``: in the
installed torch they set the legacy switches and the per-backend ``fp32_precision`` settings together, whereas
setting ``fp32_precision`` alone leaves the legacy switches disagreeing, and torch then refuses to read them
(``torch.get_float32_matmul_precision()`` raises).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _leaves() -> tuple:
    """The per-backend settings the switches below write (restored as they were, ``"none"`` included)."""
    return (
        torch.backends.cuda.matmul,
        torch.backends.mkldnn.matmul,
        torch.backends.cudnn.conv,
        torch.backends.cudnn.rnn,
    )


def tf32_state() -> tuple:
    """Everything :func:`tf32` changes: the legacy switches and the per-backend settings."""
    return (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        *(leaf.fp32_precision for leaf in _leaves()),
    )


def _restore(state: tuple) -> None:
    matmul, cudnn, *leaves = state
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn
    for leaf, value in zip(_leaves(), leaves):
        leaf.fp32_precision = value


@contextmanager
def tf32(enabled: bool = True) -> Iterator[None]:
    """Within the block, float32 matmuls (cuBLAS) and cuDNN convolutions on CUDA use TF32 (``enabled``) or IEEE
    float32; on exit every setting is as it was before."""
    before = tf32_state()
    mode = "tf32" if enabled else "ieee"
    try:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
        for leaf in (torch.backends.cudnn.conv, torch.backends.cudnn.rnn):
            leaf.fp32_precision = mode  # off, allow_tf32 leaves them "none": inherited, maybe TF32 from above
        yield
    finally:
        _restore(before)
