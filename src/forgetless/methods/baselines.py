"""Full-weight baselines: linear / WiSE-FT, task arithmetic, TIES, DARE (METHODS.md, "Baselines").

Pure functions over float32 tensors; the building blocks (trim, sign election, disjoint mean, random drop) are
separate so that the later methods reuse them. Conventions follow PEFT's ``merge_utils`` where PEFT has the rule;
TIES with unequal weights follows mergekit by default (sign of the weighted sum, divide by the agreeing models'
summed weights); ``convention="peft"`` selects PEFT's rule (sign of the plain sum, divide by the count). With all
weights 1 the two are the same. The "mergekit" convention (TIES, DARE-TIES; task arithmetic and DARE-linear on
request) also follows mergekit's order of operations — each wₖ·Δₖ rounded, summed model after model, divided, then
×λ, then added to θ₀ — so the result is mergekit's bit for bit (up to four models: torch sums five or more stacked
tensors in another order; TIES: up to which of equal |Δ| at the top-k boundary are kept).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from . import kernels
from .registry import PerModel, RowBlock, Streaming, merge_method
from .select import CHUNK, AbsDiff, Cut, part, top_k_cuts


# ---------------------------------------------------------------------------------------------- building blocks
def interpolate(base: Tensor, target: Tensor, t: float) -> Tensor:
    """base + t·(target − base), exact at both ends: t=0 gives base, t=1 gives target, bit for bit. In place on
    `base` (methods own their inputs; a fresh result would cost a new allocation's page faults per tensor)."""
    return base.lerp_(target, t)


def weighted_average(params: list[Tensor], weights: list[float]) -> Tensor:
    """Σₖ wₖθₖ / Σₖ wₖ."""
    total = float(sum(weights))
    out = torch.zeros_like(params[0])
    for p, w in zip(params, weights):
        out.add_(p, alpha=w / total)
    return out


def add_deltas(base: Tensor, deltas: list[Tensor], coeffs: list[float]) -> Tensor:
    """base + Σ cₖ·dₖ, in place on `base`."""
    for d, c in zip(deltas, coeffs):
        base.add_(d, alpha=c)
    return base


def trim_cuts(pieces, numel: int, densities: list[float]) -> list[Cut]:
    """The :class:`.select.Cut` of TIES's trim of each model: the k = ⌊density·numel⌋ largest |Δ| (ties: lowest
    flat index first); ``pieces()`` yields, per piece, every model's flat |Δ| — an :class:`.select.AbsDiff` of
    θₖ and θ₀ (bracketed by a histogram where the kernels run), or a tensor — and the piece's flat offset."""
    return top_k_cuts(pieces, [int(d * numel) for d in densities], numel, histogram=True)


def magnitude_trim(delta: Tensor, density: float, cut: Cut | None = None, offset: int = 0) -> Tensor:
    """Keep the k = ⌊density·numel⌋ entries of largest |delta| (ties: lowest flat index first), zero the rest.
    Works in place on `delta`. ``cut``/``offset``: `delta` is a block of a larger tensor whose trim was found over
    the whole of it (:func:`trim_cuts`), and its first entry has flat index `offset` there."""
    a = delta.abs().reshape(-1)
    if cut is None:
        (cut,) = trim_cuts(lambda: iter([([a], 0)]), a.numel(), [density])
    return delta.mul_(cut.mask(a, offset).view_as(delta))


def random_drop(delta: Tensor, density: float, generator: torch.Generator | None, rescale: bool = True) -> Tensor:
    """DARE: keep each entry with probability `density` (Bernoulli), rescale survivors by 1/density. The draws come
    from `generator` entry by entry in flat order, so a tensor's row blocks dropped one after the other with one
    generator drop the same entries as the whole tensor."""
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    out = delta * mask
    return out / density if rescale and density > 0 else out


def elect_sign(deltas: list[Tensor], weights: list[float], how: Literal["total", "frequency"] = "total",
               out: Tensor | None = None, tmp: Tensor | None = None) -> Tensor:
    """Per element, +1 or −1: the sign of Σₖ wₖ·Δₖ ("total") or of Σₖ sign(Δₖ) ("frequency"); 0 counts as +.
    ``out``/``tmp``: buffers shaped like a delta to work in (else fresh ones)."""
    acc = torch.zeros_like(deltas[0]) if out is None else out
    rest = zip(deltas, weights)
    if how == "total" and len(deltas) > 1 and weights[0] == weights[1] == 1:
        # 0 + Δ₀ + Δ₁ and Δ₀ + Δ₁ differ only in the sign of a zero, which elects + either way
        torch.add(deltas[0], deltas[1], out=acc)
        rest = zip(deltas[2:], weights[2:])
    elif out is not None:
        acc.zero_()
    for d, w in rest:
        if how == "total":
            acc.add_(d, alpha=w)
        else:
            acc.add_(d.sign() if tmp is None else torch.sign(d, out=tmp), alpha=1.0)
    return acc.sign_().add_(0.5).sign_()  # −1 → −1, 0 → +1, +1 → +1, in place


def disjoint_mean(deltas: list[Tensor], weights: list[float], sign: Tensor,
                  divisor: Literal["weights", "count"], weighted: bool = False,
                  out: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Mean of wₖ·Δₖ over the models whose Δₖ agrees with the elected sign (zeros never agree), divided by the
    summed weights of those models (or their count). ``weighted``: `deltas` are wₖ·Δₖ already (agreement is then
    the sign of wₖ·Δₖ, as in mergekit). Consumes `deltas` (works in place). ``out``: three buffers shaped like
    `sign` to work in (numerator, denominator, a mask); else fresh ones. Masks are float (a compare into a float
    buffer is several times faster than into a bool one; adding 1.0 or True is the same), and a zero denominator
    becomes 1 as den + (den == 0) — equal to ``masked_fill`` for every den — or, when no weight is below 1, as
    max(den, 1)."""
    num, den, mask = (torch.zeros_like(sign), torch.zeros_like(sign), torch.empty_like(sign)) if out is None else (
        out[0].zero_(), out[1].zero_(), out[2])
    den_w = weights if divisor == "weights" else [1.0] * len(deltas)
    for d, w, wd in zip(deltas, weights, den_w):
        d.mul_(sign)  # > 0 exactly where Δₖ agrees; then sign·relu(sign·Δₖ) = Δₖ there and 0 elsewhere
        den.add_(torch.gt(d, 0, out=mask), alpha=wd)
        num.add_(d.clamp_min_(0), alpha=1.0 if weighted else w)
    # no agreeing model: num is 0 there; with every weight ≥ 1 the denominator is 0 or ≥ 1, and max(den, 1) is it
    nonzero = den.clamp_min_(1) if all(w >= 1 for w in den_w) else den.add_(torch.eq(den, 0, out=mask))
    return num.mul_(sign).div_(nonzero)


def mergekit_sum(base: Tensor, deltas: list[Tensor], weights: list[float], lambda_: float) -> Tensor:
    """θ₀ + λ·Σₖ wₖ·Δₖ in mergekit's order of operations (each wₖ·Δₖ rounded, summed model after model, ×λ when
    λ ≠ 1, then added to θ₀): mergekit's task arithmetic bit for bit. Consumes `deltas`; in place on `base`."""
    mixed = deltas[0] if weights[0] == 1 else deltas[0].mul_(weights[0])  # × 1 is exact: skipped
    for d, w in zip(deltas[1:], weights[1:]):
        mixed.add_(d if w == 1 else d.mul_(w))
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return base.add_(mixed)


Convention = Literal["mergekit", "peft"]
SumConvention = Literal["forgetless", "mergekit"]  # task arithmetic's sum: fused (exact at the ends), or mergekit's
Generators = torch.Generator | list[torch.Generator] | None  # one for every model's draws, or one per model


def _each(generator: Generators, models: list[Tensor]) -> list[torch.Generator | None]:
    """The generator of each model's draws: a list gives each model its own stream (the engine's choice: a
    model's mask then does not depend on the others, nor on how the tensor is split in row blocks); a single
    generator is drawn from model after model."""
    return list(generator) if isinstance(generator, list) else [generator] * len(models)


class _Scratch:
    """Reused buffers of up to :data:`.select.CHUNK` entries for the chunked TIES rule."""

    def __init__(self, n: int, models: int):
        size = min(n, CHUNK)
        self.deltas = [torch.empty(size) for _ in range(models)]
        self.acc, self.num, self.den, self.tmp = (torch.empty(size) for _ in range(4))

    def cut(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return part(self.acc, 0, k), part(self.num, 0, k), part(self.den, 0, k), part(self.tmp, 0, k)


def _combine(base: Tensor, deltas: list[Tensor], weights: list[float], lambda_: float,
             sign: Literal["total", "frequency"], convention: Convention, scratch: _Scratch) -> Tensor:
    """:func:`_ties_combine` on one chunk, its temporaries in `scratch`."""
    acc, num, den, tmp = scratch.cut(base.numel())
    ones = [1.0] * len(deltas)
    if convention == "peft":
        elected = elect_sign(deltas, ones, sign, acc, tmp)
        return base.add_(disjoint_mean(deltas, weights, elected, "count", out=(num, den, tmp)), alpha=lambda_)
    if any(w != 1 for w in weights):  # mergekit weighs before electing, each wₖ·Δₖ rounded
        deltas = [d.mul_(w) for d, w in zip(deltas, weights)]
    elected = elect_sign(deltas, ones, sign, acc, tmp)
    mixed = disjoint_mean(deltas, weights, elected, "weights", weighted=True, out=(num, den, tmp))
    return base.add_(mixed.mul_(lambda_) if lambda_ != 1 else mixed)


def _ties_combine(base: Tensor, deltas: list[Tensor], weights: list[float], lambda_: float,
                  sign: Literal["total", "frequency"], convention: Convention) -> Tensor:
    """Sign election and disjoint mean, into `base`. The two published conventions differ only when weights are
    not all 1: "mergekit" elects the sign of Σ wₖΔₖ and divides by the agreeing models' summed weights, in
    mergekit's order of operations (each wₖΔₖ rounded first, ×λ after the division); "peft" elects the sign of
    Σ Δₖ and divides by their count. Elementwise, so computed chunk by chunk (:data:`.select.CHUNK` entries): the
    temporaries are reused buffers of a chunk's size, not fresh tensors of the tensor's size.
    Consumes `deltas`."""
    b, ds = base.contiguous().view(-1), [d.reshape(-1) for d in deltas]  # views of the engine's inputs
    scratch = _Scratch(b.numel(), 0)
    for at in range(0, b.numel(), CHUNK):
        stop = min(b.numel(), at + CHUNK)
        _combine(part(b, at, stop), [part(d, at, stop) for d in ds], weights, lambda_, sign, convention, scratch)
    return b.view(base.shape)


# ---------------------------------------------------------------------------------------------- methods
@merge_method("linear", aliases=("wise_ft",), per_model=("weight",), divides_by_weights=True,
              streaming=Streaming(rows="blocks", reads_finetuned=True))
def linear(base: Tensor, finetuned: list[Tensor], *, weight: PerModel[float] = 1.0, lambda_: float = 0.5,
           block: RowBlock | None = None) -> Tensor:
    """WiSE-FT: θ = (1−λ)·θ₀ + λ·θ̄, θ̄ the weight-normalised average of the fine-tuned models."""
    if len(finetuned) == 1:
        return interpolate(base, finetuned[0], lambda_)
    return interpolate(base, weighted_average(finetuned, weight), lambda_)


@merge_method("task_arithmetic", per_model=("weight",), streaming=Streaming(rows="blocks", reads_finetuned=True))
def task_arithmetic(base: Tensor, finetuned: list[Tensor], *, weight: PerModel[float] = 1.0,
                    lambda_: float = 1.0, convention: SumConvention = "forgetless",
                    block: RowBlock | None = None) -> Tensor:
    """Task arithmetic: θ = θ₀ + λ·Σₖ wₖ·(θₖ − θ₀).

    ``convention="mergekit"``: summed in mergekit's order (:func:`mergekit_sum`), mergekit's result bit for bit;
    the default fuses each term into θ₀ and is exact at λ·w = 0 and 1 for one model. The deltas are formed chunk
    by chunk in reused buffers (every Δₖ of a chunk from θ₀ as it was), the fine-tuned tensors only read."""
    if convention != "mergekit" and len(finetuned) == 1:
        return interpolate(base, finetuned[0], lambda_ * weight[0])
    b, fts = base.contiguous().view(-1), [ft.reshape(-1) for ft in finetuned]
    scratch = [torch.empty(min(b.numel(), CHUNK)) for _ in fts]
    for at in range(0, b.numel(), CHUNK):
        stop = min(b.numel(), at + CHUNK)
        chunk = part(b, at, stop)
        deltas = [torch.sub(part(ft, at, stop), chunk, out=part(d, 0, stop - at)) for ft, d in zip(fts, scratch)]
        if convention == "mergekit":
            mergekit_sum(chunk, deltas, weight, lambda_)
        else:
            add_deltas(chunk, deltas, [lambda_ * w for w in weight])
    return b.view(base.shape)


def ties_prepare(params: dict, stream, shape: tuple[int, ...]) -> dict:
    """TIES on row blocks: every model's trim (:func:`trim_cuts`) over the whole tensor, in two streamed passes
    (each block's |θₖ − θ₀| read where it lies, :class:`.select.AbsDiff`)."""
    def pieces():
        for r in stream():
            b = r.base.reshape(-1)
            yield [AbsDiff(ft.reshape(-1), b) for ft in r.finetuned], r.offset
    return {"cuts": trim_cuts(pieces, math.prod(shape), params["density"])}


def _trim_and_combine(base: Tensor, finetuned: list[Tensor], cuts: list[Cut], offset: int, weights: list[float],
                      lambda_: float, sign: Literal["total", "frequency"], convention: Convention) -> Tensor:
    """TIES on flat tensors, into `base`, chunk by chunk (:data:`.select.CHUNK` entries, every temporary a reused
    buffer): each Δₖ = θₖ − θ₀ trimmed by its cut (the tensor's entries from flat index `offset` on, as
    :func:`magnitude_trim`), then :func:`_ties_combine`. `finetuned` is read, not changed. The fused kernel
    (:func:`.kernels.ties`) runs the same operations in one pass where it applies: mergekit's convention, or
    PEFT's when its result is the same (every weight 1, λ = 1)."""
    n = base.numel()
    same = convention == "mergekit" or (lambda_ == 1 and all(w == 1 for w in weights))  # where PEFT's rule is mergekit's
    if same and len(finetuned) <= kernels.MAX_MODELS and kernels.fits(base, *finetuned):
        return kernels.ties(base, finetuned, [c.below for c in cuts], [c.value for c in cuts],
                            [c.split(n, offset) for c in cuts], weights, lambda_, sign == "frequency")
    scratch = _Scratch(n, len(finetuned))
    for at in range(0, n, CHUNK):
        stop = min(n, at + CHUNK)
        b, tmp = part(base, at, stop), part(scratch.tmp, 0, stop - at)
        trimmed = []
        for ft, cut, d in zip(finetuned, cuts, scratch.deltas):
            torch.sub(part(ft, at, stop), b, out=tmp)
            trimmed.append(cut.trim(tmp, offset + at, out=part(d, 0, stop - at)))
        _combine(b, trimmed, weights, lambda_, sign, convention, scratch)
    return base


@merge_method("ties", per_model=("weight", "density"), ranges={"density": "(0, 1]"},
              streaming=Streaming(rows="blocks", tensor_prepare=ties_prepare, reads_finetuned=True))
def ties(base: Tensor, finetuned: list[Tensor], *, weight: PerModel[float] = 1.0, density: PerModel[float] = 0.5,
         lambda_: float = 1.0, sign: Literal["total", "frequency"] = "total",
         convention: Convention = "mergekit", block: RowBlock | None = None) -> Tensor:
    """TIES: trim each Δₖ to its top-`density` magnitudes, elect a sign per entry, average the agreeing entries."""
    b = base.contiguous().view(-1)  # a view of the engine's (contiguous) input: the result is written into it
    fts = [ft.reshape(-1) for ft in finetuned]
    if block is not None:
        cuts, offset = block.prepared["cuts"], block.offset
    else:
        n, offset = b.numel(), 0

        def sampler(at: Tensor) -> list[Tensor]:
            bs = b.index_select(0, at)
            return [ft.index_select(0, at).sub_(bs).abs_() for ft in fts]
        pieces = [AbsDiff(ft, b) for ft in fts]
        cuts = top_k_cuts(lambda: iter([(pieces, 0)]), [int(d * n) for d in density], n, sampler=sampler,
                          histogram=True)
    return _trim_and_combine(b, fts, cuts, offset, weight, lambda_, sign, convention).view(base.shape)


@merge_method("dare_linear", per_model=("weight", "density"), ranges={"density": "(0, 1]"},
              streaming=Streaming(rows="blocks"))
def dare_linear(base: Tensor, finetuned: list[Tensor], *, weight: PerModel[float] = 1.0, density: PerModel[float] = 0.5,
                lambda_: float = 1.0, rescale: bool = True, convention: SumConvention = "forgetless",
                generator: Generators = None, block: RowBlock | None = None) -> Tensor:
    """DARE + task arithmetic: drop each Δₖ entry with probability 1−density, rescale, add λ·Σ wₖ·Δₖ (in
    mergekit's order of operations with ``convention="mergekit"``)."""
    deltas = [random_drop(ft.sub_(base), d, g, rescale) for ft, d, g in zip(finetuned, density, _each(generator, finetuned))]
    if convention == "mergekit":
        return mergekit_sum(base, deltas, weight, lambda_)
    return add_deltas(base, deltas, [lambda_ * w for w in weight])


@merge_method("dare_ties", per_model=("weight", "density"), ranges={"density": "(0, 1]"},
              streaming=Streaming(rows="blocks"))
def dare_ties(base: Tensor, finetuned: list[Tensor], *, weight: PerModel[float] = 1.0, density: PerModel[float] = 0.5,
              lambda_: float = 1.0, rescale: bool = True, sign: Literal["total", "frequency"] = "total",
              convention: Convention = "mergekit", generator: Generators = None,
              block: RowBlock | None = None) -> Tensor:
    """DARE + TIES consensus: random drop and rescale each Δₖ, then sign election and disjoint mean."""
    deltas = [random_drop(ft.sub_(base), d, g, rescale) for ft, d, g in zip(finetuned, density, _each(generator, finetuned))]
    return _ties_combine(base, deltas, weight, lambda_, sign, convention)
