"""The fast paths of task arithmetic, TIES and DARE (their rules: :mod:`..baselines`).

In place on the engine's copy of θ₀, the fine-tuned tensors only read, chunk by chunk (:data:`.select.CHUNK`
entries) in reused buffers: a fresh tensor-sized temporary costs its page faults. TIES's trim is the exact streamed
top-k (:mod:`.select`) and, where the extension is built, the rest of TIES is one fused pass (:func:`.kernels.ties`).
Each gives its rule's result bit for bit (tests/test_select.py, tests/test_kernels.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..registry import RowBlock, Stream
from . import kernels, select
from .select import AbsDiff, Cut, Selections, part, top_k_cuts

Sign = Literal["total", "frequency"]
Convention = Literal["mergekit", "peft"]
SumConvention = Literal["forgetless", "mergekit"]


# ---------------------------------------------------------------------------------------------- task arithmetic
def add_task_vectors_(
    base: Tensor, taus: list[Tensor], weights: list[float], lambda_: float, convention: SumConvention
) -> Tensor:
    """:func:`..baselines.add_task_vectors` in place on `base`; consumes `taus`."""
    if convention == "forgetless":
        for tau, w in zip(taus, weights):
            base.add_(tau, alpha=lambda_ * w)
        return base
    mixed = taus[0] if weights[0] == 1 else taus[0].mul_(weights[0])  # × 1 is exact: skipped
    for tau, w in zip(taus[1:], weights[1:]):
        mixed.add_(tau if w == 1 else tau.mul_(w))
    return base.add_(mixed.mul_(lambda_) if lambda_ != 1 else mixed)


def task_arithmetic(
    base: Tensor, finetuned: list[Tensor], weights: list[float], lambda_: float, convention: SumConvention
) -> Tensor:
    """:func:`..baselines.task_arithmetic_rule` in place on `base`, chunk by chunk: every τₖ of a chunk formed in a
    reused buffer from θ₀ as it was; `finetuned` only read."""
    if convention != "mergekit" and len(finetuned) == 1:
        return base.lerp_(finetuned[0], lambda_ * weights[0])
    b, fts = base.contiguous().view(-1), [ft.reshape(-1) for ft in finetuned]
    scratch = [torch.empty(min(b.numel(), select.CHUNK)) for _ in fts]
    for at, stop in select.chunks(b.numel()):
        chunk = part(b, at, stop)
        taus = [
            torch.sub(part(ft, at, stop), chunk, out=part(t, 0, stop - at)) for ft, t in zip(fts, scratch)
        ]
        add_task_vectors_(chunk, taus, weights, lambda_, convention)
    return b.view(base.shape)


# ---------------------------------------------------------------------------------------------- TIES's trim
def trim_cuts(pieces: Selections, numel: int, densities: list[float]) -> list[Cut]:
    """The :class:`.select.Cut` of each model's trim, the k = ⌊density·numel⌋ largest |τ| (ties: the lower flat
    index first); ``pieces()`` yields, per piece, every model's flat |τ| — an :class:`.select.AbsDiff` of θₖ and
    θ₀ (bracketed by a histogram where the kernels run), or a tensor — and the piece's flat offset."""
    return top_k_cuts(pieces, [int(d * numel) for d in densities], numel, histogram=True)


def magnitude_trim(tau: Tensor, density: float) -> Tensor:
    """:func:`..baselines.trim` by the streamed selection (no sort), in place on `tau`."""
    a = tau.abs().reshape(-1)
    (cut,) = trim_cuts(lambda: iter([([a], 0)]), a.numel(), [density])
    return tau.mul_(cut.mask(a).view_as(tau))


def ties_prepare(params: dict, stream: Stream, shape: tuple[int, ...]) -> dict:
    """TIES on row blocks (the engine's ``tensor_prepare``): every model's trim over the whole tensor, in two
    streamed passes, each block's |θₖ − θ₀| read where it lies (:class:`.select.AbsDiff`)."""

    def pieces():
        for r in stream():
            b = r.base.reshape(-1)
            yield [AbsDiff(ft.reshape(-1), b) for ft in r.finetuned], r.offset

    return {"cuts": trim_cuts(pieces, math.prod(shape), params["density"])}


def _whole_tensor_cuts(b: Tensor, fts: list[Tensor], densities: list[float]) -> list[Cut]:
    """Each model's trim of a whole flat tensor; the sample that brackets it drawn from θₖ and θ₀ directly."""
    n = b.numel()

    def sampler(at: Tensor) -> list[Tensor]:
        bs = b.index_select(0, at)
        return [ft.index_select(0, at).sub_(bs).abs_() for ft in fts]

    pieces = [AbsDiff(ft, b) for ft in fts]
    return top_k_cuts(
        lambda: iter([(pieces, 0)]), [int(d * n) for d in densities], n, sampler=sampler, histogram=True
    )


# ---------------------------------------------------------------------------------------------- TIES
def ties(
    base: Tensor,
    finetuned: list[Tensor],
    weights: list[float],
    densities: list[float],
    lambda_: float,
    sign: Sign,
    convention: Convention,
    block: RowBlock | None = None,
) -> Tensor:
    """:func:`..baselines.ties_rule` in place on `base`, `finetuned` only read; on a row block of a tensor
    (``block``), with the trims its pre-pass found over the whole tensor (:func:`ties_prepare`)."""
    b = base.contiguous().view(-1)  # a view of the engine's (contiguous) input: the result is written into it
    fts = [ft.reshape(-1) for ft in finetuned]
    if block is None:
        cuts, offset = _whole_tensor_cuts(b, fts, densities), 0
    else:
        cuts, offset = block.prepared["cuts"], block.offset
    return trim_and_combine(b, fts, cuts, offset, weights, lambda_, sign, convention).view(base.shape)


def trim_and_combine(
    base: Tensor,
    finetuned: list[Tensor],
    cuts: list[Cut],
    offset: int,
    weights: list[float],
    lambda_: float,
    sign: Sign,
    convention: Convention,
) -> Tensor:
    """TIES on flat tensors whose first entry has flat index `offset` in the whole tensor, into `base`: each
    τₖ = θₖ − θ₀ trimmed by its cut, then :func:`combine`, chunk by chunk. The fused kernel does the same in one
    pass where it applies: mergekit's convention, or PEFT's where it is the same (every weight 1, λ = 1)."""
    n = base.numel()
    same = convention == "mergekit" or (lambda_ == 1 and all(w == 1 for w in weights))
    if same and len(finetuned) <= kernels.MAX_MODELS and kernels.fits(base, *finetuned):
        return kernels.ties(
            base,
            finetuned,
            [c.below for c in cuts],
            [c.value for c in cuts],
            [c.split(n, offset) for c in cuts],
            weights,
            lambda_,
            sign == "frequency",
        )
    scratch = _Scratch(n, len(finetuned))
    for at, stop in select.chunks(n):
        b, tmp = part(base, at, stop), part(scratch.tmp, 0, stop - at)
        trimmed = []
        for ft, cut, t in zip(finetuned, cuts, scratch.taus):
            torch.sub(part(ft, at, stop), b, out=tmp)
            trimmed.append(cut.trim(tmp, offset + at, out=part(t, 0, stop - at)))
        combine(b, trimmed, weights, lambda_, sign, convention, scratch)
    return base


def consensus(
    base: Tensor,
    taus: list[Tensor],
    weights: list[float],
    lambda_: float,
    sign: Sign,
    convention: Convention,
    normalize: bool = True,
) -> Tensor:
    """:func:`..baselines.ties_consensus` in place on `base`, chunk by chunk; consumes `taus` (DARE-TIES)."""
    b, ts = base.contiguous().view(-1), [t.reshape(-1) for t in taus]  # views of the engine's inputs
    scratch = _Scratch(b.numel(), 0)
    for at, stop in select.chunks(b.numel()):
        chunk = [part(t, at, stop) for t in ts]
        combine(part(b, at, stop), chunk, weights, lambda_, sign, convention, scratch, normalize)
    return b.view(base.shape)


class _Scratch:
    """Reused buffers of up to :data:`.select.CHUNK` entries: one trimmed τ per model, and four temporaries."""

    def __init__(self, n: int, models: int):
        size = min(n, select.CHUNK)
        self.taus = [torch.empty(size) for _ in range(models)]
        self.acc, self.num, self.den, self.tmp = (torch.empty(size) for _ in range(4))

    def cut(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return part(self.acc, 0, k), part(self.num, 0, k), part(self.den, 0, k), part(self.tmp, 0, k)


def combine(
    base: Tensor,
    taus: list[Tensor],
    weights: list[float],
    lambda_: float,
    sign: Sign,
    convention: Convention,
    scratch: _Scratch,
    normalize: bool = True,
) -> Tensor:
    """:func:`..baselines.ties_consensus` on one chunk, into `base`, its temporaries in `scratch`; consumes `taus`."""
    acc, num, den, tmp = scratch.cut(base.numel())
    ones = [1.0] * len(taus)
    if convention == "peft":
        gamma = _elect_sign(taus, sign, acc, tmp)
        shares = ones if normalize else [0.0] * len(taus)
        return base.add_(_disjoint_mean(taus, gamma, weights, shares, (num, den, tmp)), alpha=lambda_)
    if any(w != 1 for w in weights):  # mergekit weighs before electing, each wₖτₖ rounded
        taus = [t.mul_(w) for t, w in zip(taus, weights)]
    gamma = _elect_sign(taus, sign, acc, tmp)
    shares = weights if normalize else [0.0] * len(taus)  # no agreeing share: the denominator is 1
    mixed = _disjoint_mean(taus, gamma, ones, shares, (num, den, tmp))
    return base.add_(mixed.mul_(lambda_) if lambda_ != 1 else mixed)


def _elect_sign(taus: list[Tensor], how: Sign, acc: Tensor, tmp: Tensor) -> Tensor:
    """:func:`..baselines.elect_sign` into `acc` (`tmp`: a buffer for the signs)."""
    rest = taus
    if (
        how == "total" and len(taus) > 1
    ):  # Δ₀ + Δ₁ and 0 + Δ₀ + Δ₁ differ only in the sign of a zero: + either way
        torch.add(taus[0], taus[1], out=acc)
        rest = taus[2:]
    else:
        acc.zero_()
    for t in rest:
        acc.add_(t if how == "total" else torch.sign(t, out=tmp))
    return acc.sign_().add_(0.5).sign_()  # −1 → −1, 0 → +1, +1 → +1 (NaN: sign 0, so +1), in place


def _disjoint_mean(
    taus: list[Tensor],
    gamma: Tensor,
    weights: list[float],
    shares: list[float],
    out: tuple[Tensor, Tensor, Tensor],
) -> Tensor:
    """:func:`..baselines.disjoint_mean` into the buffers `out` (numerator, denominator, a mask); consumes `taus`.
    Masks are float (a compare into a float buffer is several times faster than into a bool one), and a zero
    denominator becomes 1 as max(den, 1) when no share is below 1, else as den + (den == 0): both equal to
    ``masked_fill`` for every den the sums can give."""
    num, den, mask = out[0].zero_(), out[1].zero_(), out[2]
    for t, w, s in zip(taus, weights, shares):
        t.mul_(gamma)  # > 0 exactly where τₖ agrees; then γ·relu(γ·τₖ) = τₖ there and 0 elsewhere
        den.add_(torch.gt(t, 0, out=mask), alpha=s)
        num.add_(t.clamp_min_(0), alpha=w)
    nonzero = den.clamp_min_(1) if all(s >= 1 for s in shares) else den.add_(torch.eq(den, 0, out=mask))
    return num.mul_(gamma).div_(nonzero)
