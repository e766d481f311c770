"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For a Linear weight W [out, in] (y = x Wᵀ) and each model's input Gram Gₖ = XₖᵀXₖ [in, in] (statistic ``gram``),
the merged weight minimises Σₖ λₖ‖XₖWᵀ − XₖWₖᵀ‖²: W* = (Σₖ λₖWₖG̃ₖ)(Σₖ λₖG̃ₖ)⁻¹, G̃ₖ = diag(Gₖ) + α·offdiag(Gₖ),
with a small ridge toward the plain average. Tensors without a Gram get the λ-weighted average; θ₀ is not used.
α's default, the ridge and how the solve runs: docs/methods-notes.md, "RegMean".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .baselines import weighted_average
from .linalg import Cholesky, Precision
from .registry import PerModel, RowBlock, Stream, Streaming, merge_method


def gram_shape(weight_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The shape of the ``gram`` statistic of a weight of this shape: [in, in] for a Linear weight [out, in]; None
    when the tensor cannot have one (not 2-D). For the engine's statistics shape check."""
    return (weight_shape[1], weight_shape[1]) if len(weight_shape) == 2 else None


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """diag(G) + α·offdiag(G), in place."""
    d = gram.diagonal().clone()
    gram.mul_(alpha).diagonal().copy_(d)
    return gram


def regmean_rule(
    params: list[Tensor], grams: list[Tensor], weights: list[float], alpha: float = 0.9, ridge: float = 1e-6
) -> Tensor:
    """The rule, in float64: W* = (Σₖ λₖWₖG̃ₖ + ρW̄)(Σₖ λₖG̃ₖ + ρI)⁻¹ with G̃ₖ = diag(Gₖ) + α·offdiag(Gₖ), W̄ the
    λ-weighted average and ρ = ridge·mean(diag Σₖ λₖG̃ₖ): the least-squares merge plus ρ‖W − W̄‖² (W̄ where
    every Gram is 0). The result in the dtype of params."""
    g = [
        lam * reduce_off_diagonal(gram.to(torch.float64, copy=True), alpha)
        for gram, lam in zip(grams, weights)
    ]
    lhs, w_bar = sum(g), weighted_average(params, weights).double()
    rho = ridge * float(lhs.diagonal().mean())
    if not float(lhs.diagonal().mean()) > 0:
        return w_bar.to(params[0].dtype)
    rhs = sum(w.double() @ gk for w, gk in zip(params, g)) + rho * w_bar
    lhs = lhs + rho * torch.eye(lhs.shape[0], dtype=torch.float64)
    return torch.linalg.solve(lhs, rhs.T).T.to(params[0].dtype)  # W*·lhs = rhs, lhs symmetric


def regmean_combine(
    params: list[Tensor],
    grams: list[Tensor],
    weights: list[float],
    alpha: float = 0.9,
    ridge: float = 1e-6,
    **solve: Any,
) -> Tensor:
    """:func:`regmean_rule`, checked, solved by a Cholesky factorisation (never an inverse) on ``device``, in the
    precision :mod:`.linalg` picks there (``solve``: :func:`regmean_system`'s ``device`` and ``precision``); the
    system is shared by every output row."""
    _check(params, grams, weights, alpha, ridge)
    system = regmean_system(grams, weights, alpha, ridge, **solve)
    return regmean_solve(params, grams, weights, alpha, system)


@dataclass(frozen=True)
class RegmeanSystem:
    """The left-hand side of one Linear weight's merge, shared by all its output rows: Σₖ λₖG̃ₖ + ρI
    factorised (``factor``), or, when it is not numerically positive definite, the matrix itself (``lhs``, CPU
    float64, for a least-squares solve); ρ; ``zero`` when every Gram is zero."""

    lhs: Tensor | None
    factor: Cholesky | None
    rho: float
    zero: bool = False


def _check(
    params: list[Tensor], grams: list[Tensor], weights: list[float], alpha: float, ridge: float
) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"RegMean alpha must be in [0, 1], got {alpha}")
    if ridge < 0:
        raise ValueError(f"RegMean ridge must be >= 0, got {ridge}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"RegMean needs weights >= 0 with a positive sum, got {weights}")
    w0 = params[0]
    if w0.dim() != 2:
        raise ValueError(f"RegMean merges 2-D Linear weights [out, in], got shape {tuple(w0.shape)}")
    n_in = w0.shape[1]
    for g in grams:
        if tuple(g.shape) != (n_in, n_in):
            raise ValueError(
                f"gram shape {tuple(g.shape)} does not match a weight {tuple(w0.shape)} "
                f"(expected [in, in] = [{n_in}, {n_in}])"
            )


def _weighted_gram(g: Tensor, alpha: float, lam: float) -> Tensor:
    """λ·G̃ in float64 (a fresh copy), on g's device."""
    return reduce_off_diagonal(g.to(torch.float64, copy=True), alpha).mul_(lam)


def regmean_system(
    grams: list[Tensor],
    weights: list[float],
    alpha: float = 0.9,
    ridge: float = 1e-6,
    *,
    device: str | torch.device = "cpu",
    precision: Precision = "auto",
) -> RegmeanSystem:
    """Σₖ λₖG̃ₖ + ρI factorised on `device`, ρ = ridge·mean(diag Σₖ λₖG̃ₖ)."""
    n_in = grams[0].shape[0]
    lhs = torch.zeros(n_in, n_in, dtype=torch.float64)
    for g, lam in zip(grams, weights):
        if lam:
            lhs.add_(_weighted_gram(g, alpha, lam))
    scale = float(lhs.diagonal().mean())
    if scale <= 0:
        return RegmeanSystem(None, None, 0.0, zero=True)  # every Gram is zero: the data says nothing here
    rho = ridge * scale
    lhs.diagonal().add_(rho)
    factor = Cholesky(lhs, device=device, precision=precision)
    return RegmeanSystem(None, factor, rho) if factor.ok else RegmeanSystem(lhs, None, rho)


def regmean_solve(
    params: list[Tensor], grams: list[Tensor], weights: list[float], alpha: float, system: RegmeanSystem
) -> Tensor:
    """W* = (Σ λₖWₖG̃ₖ + ρW̄) · lhs⁻¹ for the rows that `params` hold (each output row is solved on its own,
    so a block of rows gives those rows of the whole result), on the system's device; the result on the CPU,
    in the dtype of `params`."""
    w0 = params[0]
    avg = weighted_average(params, weights).double()
    if system.zero:
        return avg.to(w0.dtype)
    dev = system.factor.device if system.factor is not None else torch.device("cpu")
    rhs = torch.zeros(w0.shape, dtype=torch.float64, device=dev)
    for w, g, lam in zip(params, grams, weights):
        if lam:
            rhs.addmm_(w.to(dev, torch.float64), _weighted_gram(g.to(dev), alpha, lam))
    rhs.add_(avg.to(dev), alpha=system.rho)
    if system.factor is not None:
        out = system.factor.solve(rhs)  # W* lhs = rhs, solved row by row
    else:  # not numerically positive definite (ridge 0 and a singular sum, or a bad statistic): least squares
        out = torch.linalg.lstsq(system.lhs, rhs.T, driver="gelsd").solution.T
    return out.to("cpu", w0.dtype)


def regmean_prepare(params: dict, stream: Stream, shape: tuple[int, ...]) -> dict:
    """RegMean on row blocks: the system (from the whole Grams) once per tensor; none without Grams."""
    first = next(iter(stream()))
    grams = first.stats.get("gram")
    if grams is None:
        return {}
    _check(first.finetuned, grams, params["weight"], params["alpha"], params["ridge"])
    system = regmean_system(
        grams, params["weight"], params["alpha"], params["ridge"], device=params.get("device", "cpu")
    )
    return {"system": system}


@merge_method(
    "regmean",
    per_model_needs=("gram",),
    per_model=("weight",),
    stat_shapes={"gram": gram_shape},
    without_statistics="call",
    ranges={"weight": "[0, inf)", "alpha": "[0, 1]", "ridge": "[0, inf)"},
    divides_by_weights=True,
    uses_device=True,
    streaming=Streaming(rows="blocks", tensor_prepare=regmean_prepare),
)
def regmean(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    gram: list[Tensor] | None = None,
    weight: PerModel[float] = 1.0,
    alpha: float = 0.9,
    ridge: float = 1e-6,
    block: RowBlock | None = None,
    device: str = "cpu",
) -> Tensor:
    """RegMean: W* = (Σₖ Wₖ G̃ₖ)(Σₖ G̃ₖ)⁻¹ per Linear weight (solved on `device`); tensors without a Gram get
    the plain average."""
    if gram is None:
        if any(w < 0 for w in weight) or sum(weight) <= 0:
            raise ValueError(f"RegMean needs weights >= 0 with a positive sum, got {weight}")
        return weighted_average(finetuned, weight)
    if block is not None:
        return regmean_solve(finetuned, gram, weight, alpha, block.prepared["system"])
    return regmean_combine(finetuned, gram, weight, alpha, ridge, device=device)
