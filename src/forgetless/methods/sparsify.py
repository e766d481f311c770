"""Sparsified task arithmetic: Model Breadcrumbs and DELLA.

θ₀ is the base, θₖ the fine-tuned models, τₖ = θₖ − θ₀ their task vectors, wₖ their weights, λ the scale. Each task
vector is sparsified on its own — Breadcrumbs drops its largest and smallest magnitudes, DELLA drops entries at
random with keep probabilities ranked by magnitude — and then summed (task arithmetic) or combined by TIES's sign
election and disjoint mean, with :mod:`.baselines`'s steps and the engine's per-model generators. The rules come
first, on whole tensors (the reference the tests hold the registered methods to), then the registered methods.
Both follow mergekit's ``sparsify.py`` (``magnitude_outliers``, ``della_magprune``) in their counts, ranks,
probabilities and rescaling; where mergekit and the papers differ: docs/methods-notes.md, "Breadcrumbs and DELLA".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import ForgetlessError
from . import fast
from .baselines import (
    Generators,
    add_task_vectors,
    each_generator,
    l1_factors,
    l1_rescaled_,
    ties_consensus,
    times,
)
from .fast.baselines import Convention, Sign, SumConvention
from .fast.select import AbsDiff, Cut, Selections, top_k_cuts
from .registry import F, PerModel, RowBlock, Stream, Streaming, merge_method

Rescale = Literal["probability", "l1", "none"]


# ---------------------------------------------------------------------------------------------- Breadcrumbs
def kept_ranks(n: int, density: float, gamma: float, mergekit_slice: bool = False) -> tuple[int, int]:
    """The ranks [start, stop) that Breadcrumbs keeps among `n` magnitudes in ascending order: the top
    ⌊γ·n⌋ dropped, the bottom n − ⌊density·n⌋ − ⌊γ·n⌋ dropped (fewer top ones when that is negative), all
    kept at density ≥ 1 — mergekit's counts. ``mergekit_slice``: mergekit's slice ``[bottom:-top]``, empty when no
    top entry is dropped."""
    if density >= 1:
        return 0, n
    top = int(gamma * n)
    bottom = n - int(density * n) - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    if mergekit_slice and top == 0:
        return bottom, bottom
    return bottom, n - top


def outliers_mask(tau: Tensor, density: float, gamma: float, mergekit_slice: bool = False) -> Tensor:
    """Breadcrumbs' keep mask of τ (Davari & Belilovsky 2024): the entries whose |τ| ranks in
    :func:`kept_ranks` of a stable ascending sort (of equal |τ|, the lower flat index ranks lower)."""
    start, stop = kept_ranks(tau.numel(), density, gamma, mergekit_slice)
    order = tau.abs().reshape(-1).sort(stable=True).indices
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[order[start:stop]] = True
    return keep.view_as(tau)


def breadcrumbs_drop(
    tau: Tensor, density: float, gamma: float, rescale: bool = False, mergekit_slice: bool = False
) -> Tensor:
    """τ with its outliers and its smallest entries zeroed (:func:`outliers_mask`), rescaled to τ's L1 norm
    with ``rescale``; in place, and unchanged at density ≥ 1."""
    if density >= 1:
        return tau
    l1 = tau.abs().sum() if rescale else None
    kept = tau.mul_(outliers_mask(tau, density, gamma, mergekit_slice))
    return kept if l1 is None else l1_rescaled_(kept, l1)


def breadcrumbs_drops(
    taus: list[Tensor], densities: list[float], gammas: list[float], rescale: bool, mergekit_slice: bool
) -> list[Tensor]:
    """:func:`breadcrumbs_drop` of every model."""
    return [breadcrumbs_drop(t, d, g, rescale, mergekit_slice) for t, d, g in zip(taus, densities, gammas)]


def breadcrumbs_rule(
    theta0: Tensor,
    thetas: list[Tensor],
    weights: list[float],
    densities: list[float],
    gammas: list[float],
    lambda_: float = 1.0,
    rescale: bool = False,
    mergekit_slice: bool = False,
    convention: SumConvention = "forgetless",
) -> Tensor:
    """Model Breadcrumbs + task arithmetic: θ₀ + λ·Σₖ wₖ·crumbs(τₖ)."""
    taus = breadcrumbs_drops([t - theta0 for t in thetas], densities, gammas, rescale, mergekit_slice)
    return add_task_vectors(theta0, taus, weights, lambda_, convention)


def breadcrumbs_ties_rule(
    theta0: Tensor,
    thetas: list[Tensor],
    weights: list[float],
    densities: list[float],
    gammas: list[float],
    lambda_: float = 1.0,
    rescale: bool = False,
    mergekit_slice: bool = False,
    sign: Sign = "total",
    normalize: bool = True,
    convention: Convention = "mergekit",
) -> Tensor:
    """Model Breadcrumbs + TIES: the sign election and disjoint mean (or sum: ``normalize=False``) of the
    crumbs(τₖ)."""
    taus = breadcrumbs_drops([t - theta0 for t in thetas], densities, gammas, rescale, mergekit_slice)
    return ties_consensus(theta0, taus, weights, lambda_, sign, convention, normalize)


# ---------------------------------------------------------------------------------------------- DELLA
def check_della(density: float, epsilon: float) -> None:
    """mergekit's condition on a DELLA drop below density 1: every keep probability, density ± ε, in (0, 1)."""
    if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise ForgetlessError(
            f"della: density {density:g} ± epsilon {epsilon:g} leaves (0, 1)",
            remedy="choose epsilon < min(density, 1 − density) (mergekit refuses the same values)",
        )


def keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probability of every entry (Deep et al. 2024, MagPrune): pᵢ = density − ε + 2ε·(rᵢ − 1)/(n − 1),
    rᵢ ∈ 1..n the rank of |τᵢ| along dim 1 (its row; a 1-D tensor is one row), ascending, of equal |τ| the lower
    index ranking lower; a row of one entry: p = density. mergekit's ranks and float32 operations."""
    check_della(density, epsilon)
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    n = rows.shape[1]
    order = rows.abs().argsort(dim=1, stable=True)
    along = [1] * rows.dim()
    along[1] = n
    ranks = torch.arange(1, n + 1, dtype=torch.float32).view(along).expand(rows.shape)
    p = torch.empty(rows.shape).scatter_(1, order, ranks)
    del order
    if n == 1:
        return p.fill_(density).view_as(tau)
    return p.sub_(1).div_(n - 1).clamp_(0, 1).mul_(2).mul_(epsilon).add_(density - epsilon).view_as(tau)


def della_drop(
    tau: Tensor,
    density: float,
    epsilon: float,
    rescale: Rescale = "probability",
    generator: torch.Generator | None = None,
    probabilities: Tensor | None = None,
) -> Tensor:
    """τ with each entry kept with its :func:`keep_probabilities` pᵢ (Bernoulli, drawn from `generator` entry by
    entry in flat order), rescaled: "probability" ×1/pᵢ (the paper's: the expectation is τ), "l1" to τ's L1
    norm (mergekit's), "none". In place; unchanged at density ≥ 1. `probabilities`: pᵢ already found (the rows
    of a 1-D tensor's block)."""
    if density >= 1:
        return tau
    p = keep_probabilities(tau, density, epsilon) if probabilities is None else probabilities
    l1 = tau.abs().sum() if rescale == "l1" else None
    kept = tau.mul_(torch.bernoulli(p, generator=generator))
    if rescale == "probability":
        return kept.div_(p)
    return kept if l1 is None else l1_rescaled_(kept, l1)


def della_drops(
    taus: list[Tensor],
    densities: list[float],
    epsilons: list[float],
    rescale: Rescale,
    generator: Generators,
    probabilities: list[Tensor | None] | None = None,
    l1: list[Tensor | None] | None = None,
) -> list[Tensor]:
    """:func:`della_drop` of every model, each from its :func:`.baselines.each_generator`. `l1`: on a row block,
    each model's L1 factor over the whole tensor (:func:`della_prepare`), for ``rescale="l1"``."""
    gens = each_generator(generator, taus)
    ps = probabilities or [None] * len(taus)
    if l1 is None:
        return [
            della_drop(t, d, e, rescale, g, p) for t, d, e, g, p in zip(taus, densities, epsilons, gens, ps)
        ]
    drops = zip(taus, densities, epsilons, gens, ps, l1)
    return [times(della_drop(t, d, e, "none", g, p), f) for t, d, e, g, p, f in drops]


def della_linear_rule(
    theta0: Tensor,
    thetas: list[Tensor],
    weights: list[float],
    densities: list[float],
    epsilons: list[float],
    lambda_: float = 1.0,
    rescale: Rescale = "probability",
    convention: SumConvention = "forgetless",
    generator: Generators = None,
) -> Tensor:
    """DELLA + task arithmetic: θ₀ + λ·Σₖ wₖ·drop(τₖ)."""
    taus = della_drops([t - theta0 for t in thetas], densities, epsilons, rescale, generator)
    return add_task_vectors(theta0, taus, weights, lambda_, convention)


def della_rule(
    theta0: Tensor,
    thetas: list[Tensor],
    weights: list[float],
    densities: list[float],
    epsilons: list[float],
    lambda_: float = 1.0,
    rescale: Rescale = "probability",
    sign: Sign = "total",
    normalize: bool = True,
    convention: Convention = "mergekit",
    generator: Generators = None,
) -> Tensor:
    """DELLA (drop, elect, fuse): TIES's sign election and disjoint mean (or sum: ``normalize=False``) of the
    drop(τₖ)."""
    taus = della_drops([t - theta0 for t in thetas], densities, epsilons, rescale, generator)
    return ties_consensus(theta0, taus, weights, lambda_, sign, convention, normalize)


# ---------------------------------------------------------------------------------------------- streaming
@dataclass(frozen=True)
class Crumbs:
    """One model's Breadcrumbs selection over a whole tensor: the entries among the ``stop`` smallest |τ| and not
    among the ``start`` smallest (two :class:`.fast.select.Cut`, ties to the lower flat index), and the L1
    rescale factor (None: none)."""

    start: Cut
    stop: Cut
    scale: Tensor | None = None

    def keep(self, magnitude: Tensor, offset: int) -> Tensor:
        """The keep mask of a flat piece of |τ| whose first entry has flat index `offset`."""
        return self.stop.mask(magnitude, offset) & ~self.start.mask(magnitude, offset)


def _crumbs(pieces: Selections, n: int, params: dict) -> list[Crumbs]:
    """Every model's :class:`Crumbs` without the scale: both cuts of every model in the same streamed passes
    (``pieces()`` yields every model's |τ| once per piece: each is the piece of two selections)."""
    spans = [
        kept_ranks(n, d, g, params["mergekit_slice"]) for d, g in zip(params["density"], params["gamma"])
    ]

    def twice():
        for ps, offset in pieces():
            yield [p for p in ps for _ in range(2)], offset

    cuts = top_k_cuts(twice, [k for span in spans for k in span], n, largest=False)
    return [Crumbs(cuts[2 * k], cuts[2 * k + 1]) for k in range(len(spans))]


def _abs_pieces(stream: Stream) -> Selections:
    def pieces():
        for r in stream():
            b = r.base.reshape(-1)
            yield [AbsDiff(ft.reshape(-1), b) for ft in r.finetuned], r.offset

    return pieces


def breadcrumbs_prepare(params: dict, stream: Stream, shape: tuple[int, ...]) -> dict:
    """Breadcrumbs on row blocks (the engine's ``tensor_prepare``): every model's selection over the whole tensor
    in two streamed passes, and with ``rescale`` a third for the L1 norms (summed block by block in float64, so
    the factor may differ from the whole tensor's float32 sums in its last bit)."""
    crumbs = _crumbs(_abs_pieces(stream), math.prod(shape), params)
    if not params["rescale"]:
        return {"crumbs": crumbs}

    def masks(taus: list[Tensor], offset: int) -> list[Tensor | None]:
        return [
            c.keep(t.abs().reshape(-1), offset).view_as(t) if d < 1 else None
            for t, c, d in zip(taus, crumbs, params["density"])
        ]

    factors = l1_factors(stream, masks)
    return {"crumbs": [Crumbs(c.start, c.stop, f) for c, f in zip(crumbs, factors)]}


def _breadcrumbs_drops(
    base: Tensor, finetuned: list[Tensor], params: dict, block: RowBlock | None
) -> list[Tensor]:
    """Every τₖ = θₖ − θ₀ in the engine's copy of θₖ, its crumbs kept and (``rescale``) rescaled: on the whole
    tensor, mergekit's L1 sums; on a block, its pre-pass's selection and factors."""
    b, fts = base.reshape(-1), [ft.reshape(-1) for ft in finetuned]
    if block is None:
        crumbs, offset = _crumbs(lambda: iter([([AbsDiff(f, b) for f in fts], 0)]), b.numel(), params), 0
    else:
        crumbs, offset = block.prepared["crumbs"], block.offset
    taus = []
    for ft, c, d in zip(fts, crumbs, params["density"]):
        tau = ft.sub_(b)
        if d < 1:
            l1 = tau.abs().sum() if params["rescale"] and block is None else None
            kept = tau.mul_(c.keep(tau.abs(), offset))
            kept = (
                l1_rescaled_(kept, l1)
                if l1 is not None
                else kept.mul_(c.scale)
                if c.scale is not None
                else kept
            )
        taus.append(tau.view(base.shape))
    return taus


def della_prepare(params: dict, stream: Stream, shape: tuple[int, ...]) -> dict:
    """DELLA on row blocks (the engine's ``tensor_prepare``): the rows of a tensor of two or more dimensions are
    its blocks' own, so nothing to rank; a 1-D tensor is one row, ranked here whole. With ``rescale="l1"``, each
    model's L1 factor over the whole tensor, its masks drawn here as the blocks will draw them (from generators in
    the state theirs start from, ``params["generator"]``)."""
    prepared = {} if len(shape) >= 2 else {"probabilities": _whole_probabilities(params, stream)}
    if params["rescale"] != "l1":
        return prepared
    densities, epsilons = params["density"], params["epsilon"]
    gens = each_generator(params["generator"], densities)

    def masks(taus: list[Tensor], offset: int) -> list[Tensor | None]:
        ps = _block_probabilities(RowBlock(offset, shape, prepared), taus[0].numel()) or [None] * len(taus)
        return [
            None if d >= 1 else torch.bernoulli(keep_probabilities(t, d, e) if p is None else p, generator=g)
            for t, d, e, g, p in zip(taus, densities, epsilons, gens, ps)
        ]

    return {**prepared, "l1": l1_factors(stream, masks)}


def _whole_probabilities(params: dict, stream: Stream) -> list[Tensor | None]:
    """A 1-D tensor's keep probabilities of every model, ranked over the whole tensor (None: nothing dropped)."""
    parts = list(stream())
    b = torch.cat([r.base.reshape(-1) for r in parts])
    fts = zip(*[r.finetuned for r in parts])
    return [
        None if d >= 1 else keep_probabilities(torch.cat(ft).sub_(b), d, e)
        for ft, d, e in zip(fts, params["density"], params["epsilon"])
    ]


def _block_probabilities(block: RowBlock | None, n: int) -> list[Tensor | None] | None:
    """A 1-D tensor's block: its entries' keep probabilities, found over the whole tensor by :func:`della_prepare`."""
    if block is None or "probabilities" not in block.prepared:
        return None
    return [
        None if p is None else p[block.offset : block.offset + n] for p in block.prepared["probabilities"]
    ]


# ---------------------------------------------------------------------------------------------- methods
def _sparsify_method(name: str, extra: str, prepare: Callable) -> Callable[[F], F]:
    """A sparsified task arithmetic's registration: weight, density and `extra` per model, row blocks with a
    pre-pass."""
    return merge_method(
        name,
        per_model=("weight", "density", extra),
        ranges={"density": "(0, 1]", extra: "[0, 1]" if extra == "gamma" else "[0, 0.5)"},
        streaming=Streaming(rows="blocks", tensor_prepare=prepare),
    )


@_sparsify_method("breadcrumbs", "gamma", breadcrumbs_prepare)
def breadcrumbs(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[float] = 0.9,
    gamma: PerModel[float] = 0.01,
    lambda_: float = 1.0,
    rescale: bool = False,
    mergekit_slice: bool = False,
    convention: SumConvention = "forgetless",
    block: RowBlock | None = None,
) -> Tensor:
    """Model Breadcrumbs: drop each Δₖ's top `gamma` and bottom magnitudes, keeping `density` of it, then add
    λ·Σ wₖ·Δₖ.

    :func:`breadcrumbs_rule`, in place: the selection by the streamed exact top-k, each τₖ in the engine's copy of
    θₖ. ``rescale``: the kept entries scaled to Δₖ's L1 norm (mergekit's); ``mergekit_slice``: a tensor too small
    for one top entry (⌊γ·n⌋ = 0) loses every entry, as mergekit's slice does."""
    params = {"density": density, "gamma": gamma, "rescale": rescale, "mergekit_slice": mergekit_slice}
    taus = _breadcrumbs_drops(base, finetuned, params, block)
    return fast.baselines.add_task_vectors_(base, taus, weight, lambda_, convention)


@_sparsify_method("breadcrumbs_ties", "gamma", breadcrumbs_prepare)
def breadcrumbs_ties(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[float] = 0.9,
    gamma: PerModel[float] = 0.01,
    lambda_: float = 1.0,
    rescale: bool = False,
    mergekit_slice: bool = False,
    sign: Sign = "total",
    normalize: bool = True,
    convention: Convention = "mergekit",
    block: RowBlock | None = None,
) -> Tensor:
    """Model Breadcrumbs + TIES: drop each Δₖ's top `gamma` and bottom magnitudes, then elect a sign per entry and
    average (``normalize``; else add) the agreeing entries.

    :func:`breadcrumbs_ties_rule`, in place, as :func:`breadcrumbs`, the consensus in chunks into θ₀."""
    params = {"density": density, "gamma": gamma, "rescale": rescale, "mergekit_slice": mergekit_slice}
    taus = _breadcrumbs_drops(base, finetuned, params, block)
    return fast.baselines.consensus(base, taus, weight, lambda_, sign, convention, normalize)


@_sparsify_method("della_linear", "epsilon", della_prepare)
def della_linear(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[float] = 0.5,
    epsilon: PerModel[float] = 0.15,
    lambda_: float = 1.0,
    rescale: Rescale = "probability",
    convention: SumConvention = "forgetless",
    generator: Generators = None,
    block: RowBlock | None = None,
) -> Tensor:
    """DELLA + task arithmetic: keep each Δₖ entry with a probability density ± epsilon ranked by its magnitude in
    its row, rescale, add λ·Σ wₖ·Δₖ.

    :func:`della_linear_rule`, in place: each τₖ in the engine's copy of θₖ, the sum in θ₀'s."""
    taus = [ft.sub_(base) for ft in finetuned]
    l1 = block.prepared.get("l1") if block is not None else None
    ps = _block_probabilities(block, base.numel())
    taus = della_drops(taus, density, epsilon, rescale, generator, ps, l1)
    return fast.baselines.add_task_vectors_(base, taus, weight, lambda_, convention)


@_sparsify_method("della", "epsilon", della_prepare)
def della(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[float] = 0.5,
    epsilon: PerModel[float] = 0.15,
    lambda_: float = 1.0,
    rescale: Rescale = "probability",
    sign: Sign = "total",
    normalize: bool = True,
    convention: Convention = "mergekit",
    generator: Generators = None,
    block: RowBlock | None = None,
) -> Tensor:
    """DELLA: keep each Δₖ entry with a probability density ± epsilon ranked by its magnitude in its row, rescale,
    then elect a sign per entry and average (``normalize``; else add) the agreeing entries.

    :func:`della_rule`, in place: each τₖ in the engine's copy of θₖ, the consensus in chunks into θ₀."""
    taus = [ft.sub_(base) for ft in finetuned]
    l1 = block.prepared.get("l1") if block is not None else None
    ps = _block_probabilities(block, base.numel())
    taus = della_drops(taus, density, epsilon, rescale, generator, ps, l1)
    return fast.baselines.consensus(base, taus, weight, lambda_, sign, convention, normalize)
