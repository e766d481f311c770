"""Fisher merging (Matena & Raffel 2022): per entry, θ = Σₖ λₖFₖθₖ / Σₖ λₖFₖ, the minimiser of
Σₖ λₖ Σ Fₖ(θ − θₖ)², each model's squared distance weighted by its diagonal Fisher Fₖ and its weight λₖ.

Two registrations, because a statistic is either required or not used: ``fisher`` over the fine-tuned models, and
``fisher_with_base`` with θ₀ as one more term (statistic ``fisher_base``, weight ``base_weight``). The relative floor
ε·F̄ on each Fisher and ``normalize``: docs/methods-notes.md, "Fisher merging".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor

from .baselines import weighted_average
from .registry import PerModel, RowBlock, Stream, Streaming, merge_method

Normalize = Literal["none", "mean", "max"]


def _check_weights(weights: list[float]) -> None:
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"Fisher merging needs weights >= 0 with a positive sum, got {weights}")


def fisher_combine(
    params: list[Tensor],
    fishers: list[Tensor],
    weights: list[float],
    epsilon: float = 1e-8,
    normalize: Normalize = "none",
    scales: tuple[list[float], float] | None = None,
) -> Tensor:
    """The rule: θ = Σₖ λₖF̃ₖθₖ / Σₖ λₖF̃ₖ with F̃ₖ = max(Fₖ/cₖ, ε·F̄), cₖ the scale ``normalize`` divides by and
    F̄ the mean of the scaled Fishers (:func:`fisher_scales`); where every λₖF̃ₖ is 0, the λ-weighted average.
    Negative Fisher entries count as 0. Consumes `fishers` (works in place). ``scales``: those of the whole
    tensor when `params` are a block of its rows."""
    if len(params) != len(fishers) or len(params) != len(weights):
        raise ValueError(f"{len(params)} tensors, {len(fishers)} Fishers, {len(weights)} weights")
    _check_weights(weights)
    if normalize not in ("none", "mean", "max"):
        raise ValueError(f"normalize must be none | mean | max, got {normalize!r}")
    if scales is None:
        scales = fisher_scales([fishers], params[0].numel(), normalize)
    factors, level = scales
    floor = epsilon * level
    num = torch.zeros_like(params[0])
    den = torch.zeros_like(params[0])
    for p, f, w, sc in zip(params, fishers, weights, factors):
        f.clamp_(min=0)
        if sc != 1.0:
            f.div_(sc)
        f.clamp_(min=floor).mul_(w)
        den.add_(f)
        num.addcmul_(f, p)
    seen = den > 0
    if bool(seen.all()):
        return num.div_(den)
    return torch.where(seen, num / torch.where(seen, den, 1.0), weighted_average(params, weights))


def fisher_scales(
    pieces: Iterable[list[Tensor]], numel: int, normalize: Normalize = "none"
) -> tuple[list[float], float]:
    """Per Fisher, the scale it is divided by (``normalize``: its mean or max over the whole tensor; else 1), and
    the level F̄ (the mean of the scaled Fishers) — from the whole tensor, or from its row blocks one after the
    other (`pieces` yields, per block, every Fisher's rows). Negative entries count as zero (clamped in place).

    Exact whatever the blocks: each row is summed in float64 and the row sums are added with ``math.fsum``
    (exactly rounded, so independent of their grouping)."""
    sums: list[list[float]] | None = None
    peaks: list[float] = []
    for fishers in pieces:
        if sums is None:
            sums, peaks = [[] for _ in fishers], [0.0] * len(fishers)
        for k, f in enumerate(fishers):
            f.clamp_(min=0)
            rows = f.reshape(f.shape[0], -1) if f.dim() >= 2 else f.reshape(-1, 1)
            sums[k] += rows.sum(dim=1, dtype=torch.float64).tolist()
            if f.numel():
                peaks[k] = max(peaks[k], float(f.max()))
    means = [math.fsum(s) / numel if numel else 0.0 for s in sums or []]
    if normalize == "none":
        scales = [1.0] * len(means)
    else:
        scales = [v if v > 0 else 1.0 for v in (means if normalize == "mean" else peaks)]
    return scales, sum(m / sc for m, sc in zip(means, scales)) / max(1, len(means))


def _fisher_prepare(which: Callable[[dict], list[Tensor]]) -> Callable[[dict, Stream, tuple[int, ...]], dict]:
    """The row blocks' pre-pass: :func:`fisher_scales` over the whole tensor, from the Fishers `which` picks."""

    def prepare(params: dict, stream: Stream, shape: tuple[int, ...]) -> dict:
        return {
            "scales": fisher_scales((which(r.stats) for r in stream()), math.prod(shape), params["normalize"])
        }

    return prepare


@merge_method(
    "fisher",
    per_model_needs=("fisher",),
    per_model=("weight",),
    ranges={"weight": "[0, inf)", "epsilon": "[0, inf)"},
    divides_by_weights=True,
    streaming=Streaming(rows="blocks", tensor_prepare=_fisher_prepare(lambda st: st["fisher"])),
)
def fisher(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    fisher: list[Tensor],
    weight: PerModel[float] = 1.0,
    epsilon: float = 1e-8,
    normalize: Normalize = "none",
    block: RowBlock | None = None,
) -> Tensor:
    """Fisher merging: θ = Σₖ λₖFₖθₖ / Σₖ λₖFₖ over the fine-tuned models (diagonal Fisher per model)."""
    return fisher_combine(
        finetuned, fisher, weight, epsilon, normalize, block.prepared["scales"] if block else None
    )


@merge_method(
    "fisher_with_base",
    needs=("fisher_base",),
    per_model_needs=("fisher",),
    per_model=("weight",),
    ranges={"weight": "[0, inf)", "epsilon": "[0, inf)", "base_weight": "[0, inf)"},
    streaming=Streaming(
        rows="blocks", tensor_prepare=_fisher_prepare(lambda st: [st["fisher_base"], *st["fisher"]])
    ),
)
def fisher_with_base(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    fisher: list[Tensor],
    fisher_base: Tensor,
    weight: PerModel[float] = 1.0,
    base_weight: float = 1.0,
    epsilon: float = 1e-8,
    normalize: Normalize = "none",
    block: RowBlock | None = None,
) -> Tensor:
    """Fisher merging with θ₀ as one more term: θ = (λ₀F₀θ₀ + Σₖ λₖFₖθₖ) / (λ₀F₀ + Σₖ λₖFₖ)."""
    return fisher_combine(
        [base, *finetuned],
        [fisher_base, *fisher],
        [base_weight, *weight],
        epsilon,
        normalize,
        block.prepared["scales"] if block else None,
    )
