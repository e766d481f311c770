"""Full-weight baselines: linear / WiSE-FT, task arithmetic, TIES, DARE (METHODS.md, "Baselines").

Pure functions over float32 tensors; the building blocks (trim, sign election, disjoint mean, random drop) are
separate so that the later methods reuse them. Conventions follow PEFT's ``merge_utils`` where PEFT has the rule;
TIES with unequal weights follows mergekit by default (sign of the weighted sum, divide by the agreeing models'
summed weights); ``convention="peft"`` selects PEFT's rule (sign of the plain sum, divide by the count). With all
weights 1 the two are the same.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .registry import merge_method


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


def kth_largest(a: Tensor, k: int, sample: int = 1 << 16) -> Tensor:
    """The exact k-th largest value of a 1-D tensor, without sorting or selecting over all of it.

    A seeded random sample brackets the answer; one pass counts the entries above the bracket and gathers those
    inside it, and an exact selection runs on that small set. If the bracket misses (it is checked, not trusted),
    the selection runs on the whole tensor. Same result as ``a.kthvalue(n − k + 1)``, typically 20× faster.
    """
    n = a.numel()
    if n <= 4 * sample:
        return a.kthvalue(n - k + 1).values
    g = torch.Generator().manual_seed(n)
    s = a[torch.randint(n, (sample,), generator=g)]
    q = 1.0 - k / n  # the answer is the q-quantile; bracket it with ±6 standard errors of the sample quantile
    margin = 6.0 / sample**0.5
    lo = s.kthvalue(max(1, int((q - margin) * sample))).values if q - margin > 0 else a.min()
    hi = s.kthvalue(min(sample, int((q + margin) * sample) + 1)).values if q + margin < 1 else a.max()
    above = int(torch.count_nonzero(a > hi))  # count_nonzero: ~25x faster than a bool .sum()
    inside = a[(a >= lo) & (a <= hi)]
    r = k - above  # rank of the answer among `inside`, counted from the top
    if 1 <= r <= inside.numel():
        return inside.kthvalue(inside.numel() - r + 1).values
    return a.kthvalue(n - k + 1).values


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the k = ⌊density·numel⌋ entries of largest |delta| (ties: lowest flat index first), zero the rest.
    Works in place on `delta`."""
    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return delta
    if k <= 0:
        return torch.zeros_like(delta)
    a = delta.abs().reshape(-1)
    thr = kth_largest(a, k)
    keep = a >= thr
    extra = int(torch.count_nonzero(keep)) - k  # entries equal to thr beyond the k-th: drop the last ones
    if extra > 0:
        keep[(a == thr).nonzero().squeeze(1)[-extra:]] = False
    return delta.mul_(keep.view_as(delta))


def random_drop(delta: Tensor, density: float, generator: torch.Generator | None, rescale: bool = True) -> Tensor:
    """DARE: keep each entry with probability `density` (Bernoulli), rescale survivors by 1/density."""
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    out = delta * mask
    return out / density if rescale and density > 0 else out


def elect_sign(deltas: list[Tensor], weights: list[float], how: Literal["total", "frequency"] = "total") -> Tensor:
    """Per element, +1 or −1: the sign of Σₖ wₖ·Δₖ ("total") or of Σₖ sign(Δₖ) ("frequency"); 0 counts as +."""
    acc = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        acc.add_(d if how == "total" else d.sign(), alpha=w if how == "total" else 1.0)
    return acc.sign_().add_(0.5).sign_()  # −1 → −1, 0 → +1, +1 → +1, in place


def disjoint_mean(deltas: list[Tensor], weights: list[float], sign: Tensor,
                  divisor: Literal["weights", "count"]) -> Tensor:
    """Mean of wₖ·Δₖ over the models whose Δₖ agrees with the elected sign (zeros never agree), divided by the
    summed weights of those models (or their count). Consumes `deltas` (works in place)."""
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for d, w in zip(deltas, weights):
        d.mul_(sign)  # > 0 exactly where Δₖ agrees; then sign·relu(sign·Δₖ) = Δₖ there and 0 elsewhere
        den.add_(d > 0, alpha=w if divisor == "weights" else 1.0)
        num.add_(d.clamp_min_(0), alpha=w)
    return num.mul_(sign).div_(den.masked_fill_(den == 0, 1.0))  # no agreeing model: num is 0 there


Convention = Literal["mergekit", "peft"]


def _ties_combine(base: Tensor, deltas: list[Tensor], weights: list[float], lambda_: float,
                  sign: Literal["total", "frequency"], convention: Convention) -> Tensor:
    """Sign election and disjoint mean. The two published conventions differ only when weights are not all 1:
    "mergekit" elects the sign of Σ wₖΔₖ and divides by the agreeing models' summed weights; "peft" elects the
    sign of Σ Δₖ and divides by their count."""
    if convention == "mergekit":
        elected, divisor = elect_sign(deltas, weights, sign), "weights"
    else:
        elected, divisor = elect_sign(deltas, [1.0] * len(deltas), sign), "count"
    return base.add_(disjoint_mean(deltas, weights, elected, divisor), alpha=lambda_)


# ---------------------------------------------------------------------------------------------- methods
@merge_method("linear", aliases=("wise_ft",), per_model=("weight",))
def linear(base: Tensor, finetuned: list[Tensor], *, weight: list[float] = 1.0, lambda_: float = 0.5) -> Tensor:
    """WiSE-FT: θ = (1−λ)·θ₀ + λ·θ̄, θ̄ the weight-normalised average of the fine-tuned models."""
    if len(finetuned) == 1:
        return interpolate(base, finetuned[0], lambda_)
    return interpolate(base, weighted_average(finetuned, weight), lambda_)


@merge_method("task_arithmetic", per_model=("weight",))
def task_arithmetic(base: Tensor, finetuned: list[Tensor], *, weight: list[float] = 1.0,
                    lambda_: float = 1.0) -> Tensor:
    """Task arithmetic: θ = θ₀ + λ·Σₖ wₖ·(θₖ − θ₀)."""
    if len(finetuned) == 1:
        return interpolate(base, finetuned[0], lambda_ * weight[0])
    return add_deltas(base, [ft.sub_(base) for ft in finetuned], [lambda_ * w for w in weight])


@merge_method("ties", per_model=("weight", "density"), ranges={"density": "(0, 1]"})
def ties(base: Tensor, finetuned: list[Tensor], *, weight: list[float] = 1.0, density: list[float] = 0.5,
         lambda_: float = 1.0, sign: Literal["total", "frequency"] = "total",
         convention: Convention = "mergekit") -> Tensor:
    """TIES: trim each Δₖ to its top-`density` magnitudes, elect a sign per entry, average the agreeing entries."""
    deltas = [magnitude_trim(ft.sub_(base), d) for ft, d in zip(finetuned, density)]
    return _ties_combine(base, deltas, weight, lambda_, sign, convention)


@merge_method("dare_linear", per_model=("weight", "density"), ranges={"density": "(0, 1]"})
def dare_linear(base: Tensor, finetuned: list[Tensor], *, weight: list[float] = 1.0, density: list[float] = 0.5,
                lambda_: float = 1.0, rescale: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """DARE + task arithmetic: drop each Δₖ entry with probability 1−density, rescale, add λ·Σ wₖ·Δₖ."""
    deltas = [random_drop(ft.sub_(base), d, generator, rescale) for ft, d in zip(finetuned, density)]
    return add_deltas(base, deltas, [lambda_ * w for w in weight])


@merge_method("dare_ties", per_model=("weight", "density"), ranges={"density": "(0, 1]"})
def dare_ties(base: Tensor, finetuned: list[Tensor], *, weight: list[float] = 1.0, density: list[float] = 0.5,
              lambda_: float = 1.0, rescale: bool = True, sign: Literal["total", "frequency"] = "total",
              convention: Convention = "mergekit",
              generator: torch.Generator | None = None) -> Tensor:
    """DARE + TIES consensus: random drop and rescale each Δₖ, then sign election and disjoint mean."""
    deltas = [random_drop(ft.sub_(base), d, generator, rescale) for ft, d in zip(finetuned, density)]
    return _ties_combine(base, deltas, weight, lambda_, sign, convention)
