"""Full-weight baselines: WiSE-FT, task arithmetic, TIES, DARE.

θ₀ is the base, θₖ the fine-tuned models, τₖ = θₖ − θ₀ their task vectors, wₖ their weights, λ the scale. Each
rule is written first, on whole tensors, as its paper states it: the reference the tests hold the registered
methods to, bit for bit. The registered methods (below) run the same operations in place on the engine's tensors,
task arithmetic and TIES through :mod:`.fast.baselines`. ``convention``: "mergekit" follows mergekit's order of
operations, "peft" PEFT's rule (where they differ: docs/methods-notes.md, "Baselines").
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce
from typing import Literal

import torch
from torch import Tensor

from . import fast
from .fast.baselines import Convention, Sign, SumConvention
from .registry import F, PerModel, RowBlock, Stream, Streaming, merge_method

Generators = torch.Generator | list[torch.Generator] | None  # one for every model's draws, or one per model
# DARE's rescale of the survivors: True ×1/density (the paper's: the expectation is τ), "l1" to τ's L1 norm
# (mergekit's ``rescale: true``), False none
DareRescale = Literal[True, False, "l1"]
L1_EPS = 1e-7  # mergekit's: below this L1 norm (before or after the drop) the kept entries are not rescaled


# ---------------------------------------------------------------------------------------------- the rules
def wise_ft_rule(theta0: Tensor, thetas: list[Tensor], weights: list[float], lambda_: float) -> Tensor:
    """WiSE-FT (Wortsman et al. 2022): θ = (1 − λ)·θ₀ + λ·θ̄, θ̄ the weighted average of the θₖ (of one model: θ₁)."""
    theta_bar = thetas[0] if len(thetas) == 1 else weighted_average(thetas, weights)
    return theta0.lerp(theta_bar, lambda_)  # exact at both ends: λ = 0 gives θ₀, λ = 1 gives θ̄, bit for bit


def task_arithmetic_rule(
    theta0: Tensor,
    thetas: list[Tensor],
    weights: list[float],
    lambda_: float = 1.0,
    convention: SumConvention = "forgetless",
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): θ = θ₀ + λ·Σₖ wₖτₖ. One model, "forgetless": θ₀ moved toward θ₁ by
    λw₁ (``lerp``: exact at λw₁ = 0 and 1)."""
    if convention != "mergekit" and len(thetas) == 1:
        return theta0.lerp(thetas[0], lambda_ * weights[0])
    return add_task_vectors(theta0, [theta - theta0 for theta in thetas], weights, lambda_, convention)


def ties_rule(
    theta0: Tensor,
    thetas: list[Tensor],
    weights: list[float],
    densities: list[float],
    lambda_: float = 1.0,
    sign: Sign = "total",
    convention: Convention = "mergekit",
) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim each τₖ to its top-k magnitudes, elect the sign of each entry by the
    summed mass, take the disjoint mean of the entries that agree with it, scale by λ, add to θ₀."""
    taus = [trim(theta - theta0, d) for theta, d in zip(thetas, densities)]
    return ties_consensus(theta0, taus, weights, lambda_, sign, convention)


def dare_linear_rule(
    theta0: Tensor,
    thetas: list[Tensor],
    weights: list[float],
    densities: list[float],
    lambda_: float = 1.0,
    rescale: DareRescale = True,
    convention: SumConvention = "forgetless",
    generator: Generators = None,
) -> Tensor:
    """DARE + task arithmetic: θ₀ + λ·Σₖ wₖ·drop(τₖ)."""
    taus = dare_drops([theta - theta0 for theta in thetas], densities, generator, rescale)
    return add_task_vectors(theta0, taus, weights, lambda_, convention)


def dare_ties_rule(
    theta0: Tensor,
    thetas: list[Tensor],
    weights: list[float],
    densities: list[float],
    lambda_: float = 1.0,
    rescale: DareRescale = True,
    sign: Sign = "total",
    convention: Convention = "mergekit",
    generator: Generators = None,
    normalize: bool = True,
) -> Tensor:
    """DARE + TIES: TIES's sign election and disjoint mean (or sum: ``normalize=False``) of the drop(τₖ)."""
    taus = dare_drops([theta - theta0 for theta in thetas], densities, generator, rescale)
    return ties_consensus(theta0, taus, weights, lambda_, sign, convention, normalize)


# ---------------------------------------------------------------------------------------------- their steps
def weighted_average(thetas: list[Tensor], weights: list[float]) -> Tensor:
    """θ̄ = Σₖ wₖθₖ / Σₖ wₖ."""
    total = float(sum(weights))
    out = torch.zeros_like(thetas[0])
    for theta, w in zip(thetas, weights):
        out.add_(theta, alpha=w / total)
    return out


def add_task_vectors(
    theta0: Tensor,
    taus: list[Tensor],
    weights: list[float],
    lambda_: float,
    convention: SumConvention = "forgetless",
) -> Tensor:
    """θ₀ + λ·Σₖ wₖτₖ: each λwₖ·τₖ added to θ₀ in turn ("forgetless"), or in mergekit's order — the wₖτₖ summed
    model after model, ×λ, + θ₀ ("mergekit": mergekit's result bit for bit)."""
    if convention == "mergekit":
        return theta0 + lambda_ * reduce(torch.add, [w * tau for w, tau in zip(weights, taus)])
    out = theta0.clone()
    for tau, w in zip(taus, weights):
        out.add_(tau, alpha=lambda_ * w)
    return out


def trim(tau: Tensor, density: float) -> Tensor:
    """τ with its k = ⌊density·n⌋ entries of largest magnitude kept (ties: the lower flat index first; NaN is never
    large) and the rest zeroed."""
    magnitude = tau.abs().reshape(-1)
    ranked = torch.where(magnitude.isnan(), -1.0, magnitude).sort(descending=True, stable=True).indices
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[ranked[: int(density * tau.numel())]] = True
    return tau * keep.view_as(tau)


def elect_sign(taus: list[Tensor], how: Sign = "total") -> Tensor:
    """γ = sgn Σₖ τₖ (the summed mass: "total") or sgn Σₖ sgn τₖ ("frequency"), entry by entry; 0 counts as +."""
    mass = reduce(torch.add, taus if how == "total" else [tau.sign() for tau in taus])
    return torch.ones_like(mass).masked_fill_(mass < 0, -1.0)


def disjoint_mean(taus: list[Tensor], gamma: Tensor, weights: list[float], shares: list[float]) -> Tensor:
    """Σₖ wₖτₖ / Σₖ sₖ over the models whose τₖ agrees with γ (a zero never does), entry by entry; 0 where none
    does."""
    num, den = torch.zeros_like(gamma), torch.zeros_like(gamma)
    for tau, w, s in zip(taus, weights, shares):
        agreeing = (tau * gamma).clamp_min(0)  # |τₖ| where its sign is γ, 0 elsewhere
        num.add_(agreeing, alpha=w)
        den.add_(agreeing > 0, alpha=s)
    return num * gamma / den.masked_fill(den == 0, 1.0)


def ties_consensus(
    theta0: Tensor,
    taus: list[Tensor],
    weights: list[float],
    lambda_: float = 1.0,
    sign: Sign = "total",
    convention: Convention = "mergekit",
    normalize: bool = True,
) -> Tensor:
    """θ₀ + λ·τₘ, τₘ the disjoint mean of the τₖ that agree with the elected sign. "mergekit" weighs first (γ of
    Σ wₖτₖ; the agreeing wₖτₖ over their Σ wₖ); "peft" elects on Σ τₖ and divides Σ wₖτₖ by the agreeing count.
    ``normalize=False``: the agreeing terms summed, not divided (mergekit's ``normalize: false``)."""
    ones = [1.0] * len(taus)
    if convention == "peft":
        shares = ones if normalize else [0.0] * len(taus)
        return theta0.add(disjoint_mean(taus, elect_sign(taus, sign), weights, shares), alpha=lambda_)
    weighted = [w * tau for w, tau in zip(weights, taus)]
    shares = weights if normalize else [0.0] * len(taus)  # no agreeing share: the denominator is 1
    return theta0 + lambda_ * disjoint_mean(weighted, elect_sign(weighted, sign), ones, shares)


def dare_drop(
    tau: Tensor, density: float, generator: torch.Generator | None = None, rescale: DareRescale = True
) -> Tensor:
    """DARE (Yu et al. 2024): each entry kept with probability p = density (Bernoulli), the survivors ×1/p — or
    rescaled to τ's L1 norm (``rescale="l1"``: mergekit's), or left as they are (False). Drawn from `generator`
    entry by entry in flat order, so row blocks dropped in turn drop what the whole tensor would."""
    kept = tau * torch.bernoulli(torch.full_like(tau, density), generator=generator)
    if rescale == "l1":
        return l1_rescaled_(kept, tau.abs().sum())
    return kept / density if rescale and density > 0 else kept


def l1_rescaled_(kept: Tensor, l1: Tensor) -> Tensor:
    """`kept` × ‖τ‖₁ / ‖kept‖₁ in place, ‖τ‖₁ = `l1` the task vector's L1 norm before the drop (mergekit's
    ``rescale``: the sums of the whole tensor in float32); unchanged when either norm is below 1e-7."""
    after = kept.abs().sum()
    if l1 < L1_EPS or after < L1_EPS:
        return kept
    return kept.mul_(l1 / after)


def dare_drops(
    taus: list[Tensor],
    densities: list[float],
    generator: Generators,
    rescale: DareRescale = True,
    l1: list[Tensor | None] | None = None,
) -> list[Tensor]:
    """drop(τₖ) of every model (:func:`dare_drop`), model after model, each from its :func:`each_generator`.
    `l1`: on a row block, each model's L1 factor over the whole tensor (:func:`dare_prepare`), for ``rescale="l1"``."""
    gens = each_generator(generator, taus)
    if l1 is None:
        return [dare_drop(t, d, g, rescale) for t, d, g in zip(taus, densities, gens)]
    return [times(dare_drop(t, d, g, False), f) for t, d, g, f in zip(taus, densities, gens, l1)]


def times(kept: Tensor, factor: Tensor | None) -> Tensor:
    """`kept` × `factor` in place (None: unchanged)."""
    return kept if factor is None else kept.mul_(factor)


def l1_factor(before: float, after: float) -> Tensor | None:
    """‖τ‖₁/‖kept‖₁ from sums taken block by block (in float64), divided as float32 tensors as mergekit divides its
    float32 sums (so it may differ from the whole tensor's factor in its last bit); None below 1e-7 (no rescale)."""
    one = torch.tensor(before, dtype=torch.float32), torch.tensor(after, dtype=torch.float32)
    return None if min(one) < L1_EPS else one[0] / one[1]


def l1_factors(
    stream: Stream, masks: Callable[[list[Tensor], int], list[Tensor | None]]
) -> list[Tensor | None]:
    """Every model's :func:`l1_factor` over a tensor streamed in row blocks: on each block, τₖ = θₖ − θ₀ and the
    keep mask `masks(taus, offset)` draws for it (None: nothing dropped, no factor), drawn block after block as the
    method draws them."""
    sums: list[list[float] | None] = []
    for r in stream():
        taus = [ft.sub(r.base) for ft in r.finetuned]
        sums = sums or [None] * len(taus)
        for k, (tau, mask) in enumerate(zip(taus, masks(taus, r.offset))):
            if mask is not None:
                before = float(tau.abs().sum(dtype=torch.float64))
                after = float(tau.mul_(mask).abs_().sum(dtype=torch.float64))
                sums[k] = [before, after] if sums[k] is None else [sums[k][0] + before, sums[k][1] + after]
    return [None if s is None else l1_factor(*s) for s in sums]


def each_generator(generator: Generators, models: list[Tensor]) -> list[torch.Generator | None]:
    """The generator of each model's draws: a list gives each model its own stream (the engine's: a model's mask
    then depends neither on the others nor on the row blocks); one generator is drawn from model after model."""
    return list(generator) if isinstance(generator, list) else [generator] * len(models)


# ---------------------------------------------------------------------------------------------- methods
def _dare_method(name: str) -> Callable[[F], F]:
    """DARE's registration: a density per model, the drops drawn row block after row block."""
    return merge_method(
        name,
        per_model=("weight", "density"),
        ranges={"density": "(0, 1]"},
        streaming=Streaming(rows="blocks", tensor_prepare=dare_prepare),
    )


def dare_prepare(params: dict, stream: Stream, shape: tuple[int, ...]) -> dict:
    """DARE on row blocks (the engine's ``tensor_prepare``): nothing to find, but with ``rescale="l1"`` each model's
    L1 factor over the whole tensor, its masks drawn here from generators in the state the blocks' own start from
    (``params["generator"]``), so the blocks keep the entries whose norms were summed."""
    if params["rescale"] != "l1":
        return {}
    densities = params["density"]
    gens = each_generator(params["generator"], densities)

    def masks(taus: list[Tensor], offset: int) -> list[Tensor]:
        return [torch.bernoulli(torch.full_like(t, d), generator=g) for t, d, g in zip(taus, densities, gens)]

    return {"l1": l1_factors(stream, masks)}


@merge_method(
    "linear",
    aliases=("wise_ft",),
    per_model=("weight",),
    divides_by_weights=True,
    streaming=Streaming(rows="blocks", reads_finetuned=True),
)
def linear(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    lambda_: float = 0.5,
    block: RowBlock | None = None,
) -> Tensor:
    """WiSE-FT: θ = (1−λ)·θ₀ + λ·θ̄, θ̄ the weight-normalised average of the fine-tuned models."""
    theta_bar = finetuned[0] if len(finetuned) == 1 else weighted_average(finetuned, weight)
    return base.lerp_(theta_bar, lambda_)  # wise_ft_rule in place on the engine's copy of θ₀


@merge_method(
    "task_arithmetic", per_model=("weight",), streaming=Streaming(rows="blocks", reads_finetuned=True)
)
def task_arithmetic(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    lambda_: float = 1.0,
    convention: SumConvention = "forgetless",
    block: RowBlock | None = None,
) -> Tensor:
    """Task arithmetic: θ = θ₀ + λ·Σₖ wₖ·(θₖ − θ₀).

    :func:`task_arithmetic_rule`, in place and in chunks. ``convention="mergekit"``: summed in mergekit's order,
    mergekit's result bit for bit; the default adds each term to θ₀ in turn, exact at λ·w = 0 and 1 for one
    model."""
    return fast.baselines.task_arithmetic(base, finetuned, weight, lambda_, convention)


@merge_method(
    "ties",
    per_model=("weight", "density"),
    ranges={"density": "(0, 1]"},
    streaming=Streaming(rows="blocks", tensor_prepare=fast.baselines.ties_prepare, reads_finetuned=True),
)
def ties(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[float] = 0.5,
    lambda_: float = 1.0,
    sign: Sign = "total",
    convention: Convention = "mergekit",
    block: RowBlock | None = None,
) -> Tensor:
    """TIES: trim each Δₖ to its top-`density` magnitudes, elect a sign per entry, average the agreeing entries.

    :func:`ties_rule`, in place, by the streamed exact top-k and the fused kernel where built."""
    return fast.baselines.ties(base, finetuned, weight, density, lambda_, sign, convention, block)


@_dare_method("dare_linear")
def dare_linear(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[float] = 0.5,
    lambda_: float = 1.0,
    rescale: DareRescale = True,
    convention: SumConvention = "forgetless",
    generator: Generators = None,
    block: RowBlock | None = None,
) -> Tensor:
    """DARE + task arithmetic: drop each Δₖ entry with probability 1−density, rescale (×1/density; ``l1``: to
    Δₖ's L1 norm, mergekit's), add λ·Σ wₖ·Δₖ (in mergekit's order of operations with ``convention="mergekit"``).

    :func:`dare_linear_rule`, in place: each τₖ in the engine's copy of θₖ, the sum in θ₀'s."""
    l1 = block.prepared.get("l1") if block is not None else None
    taus = dare_drops([ft.sub_(base) for ft in finetuned], density, generator, rescale, l1)
    return fast.baselines.add_task_vectors_(base, taus, weight, lambda_, convention)


@_dare_method("dare_ties")
def dare_ties(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[float] = 0.5,
    lambda_: float = 1.0,
    rescale: DareRescale = True,
    sign: Sign = "total",
    normalize: bool = True,
    convention: Convention = "mergekit",
    generator: Generators = None,
    block: RowBlock | None = None,
) -> Tensor:
    """DARE + TIES consensus: random drop and rescale each Δₖ, then sign election and disjoint mean
    (``normalize``; else the agreeing entries added).

    :func:`dare_ties_rule`, in place: each τₖ in the engine's copy of θₖ, the consensus in chunks into θ₀."""
    l1 = block.prepared.get("l1") if block is not None else None
    taus = dare_drops([ft.sub_(base) for ft in finetuned], density, generator, rescale, l1)
    return fast.baselines.consensus(base, taus, weight, lambda_, sign, convention, normalize)
