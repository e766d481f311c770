"""Spectral merges: the singular value decompositions of the task matrices decide each merged 2-D weight.

θ₀ is the base, θₖ the T fine-tuned models, τₖ = wₖ·(θₖ − θ₀) their weighted task matrices [m, n], p = min(m, n),
λ the scale (the papers' α); ``polar(X)`` is P·Qᵀ from X = P·S·Qᵀ, the nearest matrix to X with orthonormal columns
(rows, for a wide X). Every 2-D tensor in the method's scope is a matrix; any other tensor (biases, norms) gets
θ₀ + λ·(1/T)·Σₖ τₖ.

- ``tsv_m``: TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
  Merging"): each τₖ truncated to its top k = ⌊rank_fraction·p/T⌋ singular triplets, the Uₖ and Vₖ concatenated and
  orthogonalised, Δ = polar([U₁ … U_T])·diag(S₁ … S_T)·polar([V₁ … V_T])ᵀ.
- ``iso_c``: Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces"): the SVD of Σₖ τₖ with every singular value replaced by their mean.
- ``iso_cts``: Iso-CTS (same paper): the top singular directions of Σₖ τₖ (the common subspace) plus each task's
  top directions orthogonal to it, orthogonalised, every singular value the mean of the kept ones.

The rules (``*_delta``) take the task matrices and return Δ, so the merged weight is θ₀ + λ·Δ; their SVDs run on
``device`` (:mod:`.linalg`) and Δ comes back to the CPU. FusionBench (``method/task_singular_vector``,
``method/isotropic_merging``) is the reference; where forgetless differs: docs/methods-notes.md, "Spectral merges".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .adapter import randomized_svd
from .linalg import resolve_device, thin_svd
from .registry import F, PerModel, merge_method

Svd = Literal["exact", "randomized"]
Triplets = tuple[Tensor, Tensor, Tensor]  # U [m, k], S [k], Vᵀ [k, n]


# ---------------------------------------------------------------------------------------------- building blocks
def polar(x: Tensor) -> Tensor:
    """P·Qᵀ from the thin SVD x = P·S·Qᵀ: x's columns (rows, when wide) made orthonormal with the least change
    (the orthogonal Procrustes solution; TSV's "whitening")."""
    P, _, Qh = thin_svd(x)
    return P @ Qh


def top_svd(x: Tensor, k: int, svd: Svd = "exact") -> Triplets:
    """The top-`k` singular triplets of `x`: from the exact thin SVD, or from :func:`.adapter.randomized_svd`
    (seeded; the factor U·S split back into U and S by its column norms)."""
    if svd == "exact":
        U, S, Vh = thin_svd(x)
        return U[:, :k], S[:k], Vh[:k]  # views: the caller copies them out (Blocks.put), freeing the rest
    Vh, US = randomized_svd(x, k)
    S = US.norm(dim=0)
    U = US / torch.where(S > 0, S, torch.ones_like(S))
    return U, S, Vh


def task_vectors_(base: Tensor, finetuned: list[Tensor], weights: list[float]) -> list[Tensor]:
    """τₖ = wₖ·(θₖ − θ₀), each written over its θₖ."""
    return [ft.sub_(base).mul_(w) for ft, w in zip(finetuned, weights)]


def mean_task_vector(taus: list[Tensor]) -> Tensor:
    """(1/T)·Σₖ τₖ: what every method here gives a tensor that is not a matrix."""
    return _sum_on(taus, taus[0].device).div_(len(taus))


def _sum_on(taus: list[Tensor], device: torch.device) -> Tensor:
    """Σₖ τₖ on `device`, each τₖ moved there in turn."""
    total = taus[0].to(device, copy=True)
    for tau in taus[1:]:
        total.add_(tau.to(device))
    return total


class Blocks:
    """U [m, r], S [r], Vᵀ [r, n] filled block by block with singular triplets, on the device and in the dtype of
    `like`; :meth:`recompose` orthogonalises and multiplies them, releasing each buffer once used (at 7B each is
    up to a weight's size)."""

    def __init__(self, m: int, r: int, n: int, like: Tensor):
        self.U: Tensor | None = like.new_empty(m, r)
        self.S: Tensor | None = like.new_empty(r)
        self.Vh: Tensor | None = like.new_empty(r, n)

    def put(self, at: int, triplets: Triplets) -> None:
        """Copy (U, S, Vᵀ) of k triplets into columns / entries / rows at..at+k."""
        U, S, Vh = triplets
        part = slice(at, at + S.numel())
        self.U[:, part], self.S[part], self.Vh[part] = U, S, Vh

    def recompose(self, flat: bool = False) -> Tensor:
        """polar(U)·diag(S)·polar(Vᵀ), every singular value replaced by their mean when `flat`; on the CPU."""
        S = self.S.mean().expand_as(self.S) if flat else self.S
        left = polar(self.U).mul_(S)
        self.U = self.S = None
        right = polar(self.Vh)
        self.Vh = None
        return (left @ right).cpu()


# ---------------------------------------------------------------------------------------------- the rules
def tsv_rank(shape: tuple[int, ...], tasks: int, rank_fraction: float = 1.0) -> int:
    """k = ⌊rank_fraction·min(m, n)/T⌋, the singular triplets TSV keeps of each task (0: the matrix is left
    as θ₀)."""
    return int(rank_fraction * min(shape) / tasks)


def tsv_delta(
    taus: list[Tensor], rank_fraction: float = 1.0, svd: Svd = "exact", device: str | torch.device = "cpu"
) -> Tensor:
    """TSV-Merge's Δ = polar(U)·diag(S)·polar(Vᵀ) with U = [U₁ … U_T], S = [S₁ … S_T], Vᵀ = [V₁ᵀ; …; V_Tᵀ] the
    top-k triplets of each τₖ (:func:`tsv_rank`). Δ on the CPU."""
    dev = resolve_device(device)
    (m, n), T = taus[0].shape, len(taus)
    k = tsv_rank((m, n), T, rank_fraction)
    if k == 0:
        return torch.zeros_like(taus[0])
    blocks = Blocks(m, T * k, n, taus[0].new_empty(0, device=dev))
    for i, tau in enumerate(taus):
        blocks.put(i * k, top_svd(tau.to(dev), k, svd))
    return blocks.recompose()


def iso_c_delta(taus: list[Tensor], device: str | torch.device = "cpu") -> Tensor:
    """Iso-C's Δ = σ̄·U·Vᵀ from the SVD U·diag(σ)·Vᵀ of Σₖ τₖ, σ̄ the mean of its p singular values: the sum's
    singular directions with a flat (isotropic) spectrum. Δ on the CPU."""
    U, S, Vh = thin_svd(_sum_on(taus, resolve_device(device)))
    return (U.mul_(S.mean()) @ Vh).cpu()


def iso_cts_sizes(shape: tuple[int, ...], tasks: int, common_space_fraction: float = 0.8) -> tuple[int, int]:
    """(c, d): the common subspace's dimension and each task's, with c + T·d = min(m, n). FusionBench's sizes:
    c₀ = ⌊f·p⌋, d = round((p − c₀)/T) (Python's round, half to even), at most ⌊p/T⌋; c = p − T·d."""
    p = min(shape)
    d = min(round((p - int(p * common_space_fraction)) / tasks), p // tasks)
    return p - tasks * d, d


def iso_cts_delta(
    taus: list[Tensor],
    common_space_fraction: float = 0.8,
    svd: Svd = "exact",
    device: str | torch.device = "cpu",
) -> Tensor:
    """Iso-CTS's Δ = σ̄·polar(U)·polar(Vᵀ): U, Vᵀ each task's top-d singular vectors of τₖ − U_c·U_cᵀ·τₖ (its part
    outside the common column space) and the top-c of Σₖ τₖ (U_c, the common subspace; :func:`iso_cts_sizes`), in
    FusionBench's order; σ̄ the mean of the p singular values kept. Δ on the CPU."""
    dev = resolve_device(device)
    (m, n), T = taus[0].shape, len(taus)
    c, d = iso_cts_sizes((m, n), T, common_space_fraction)
    common = top_svd(_sum_on(taus, dev), c)
    blocks = Blocks(m, min(m, n), n, common[1])  # allocated after that SVD: not held during it
    blocks.put(T * d, common)
    del common
    Uc = blocks.U[:, T * d :]
    for i, tau in enumerate(taus if d else ()):
        outside = tau.to(dev, copy=True)
        outside.addmm_(Uc, Uc.T @ outside, alpha=-1)
        blocks.put(i * d, top_svd(outside, d, svd))
        del outside
    del Uc
    return blocks.recompose(flat=True)


# ---------------------------------------------------------------------------------------------- methods
def _merge(
    base: Tensor, finetuned: list[Tensor], weights: list[float], lambda_: float, delta: Callable[..., Tensor]
) -> Tensor:
    """θ₀ + λ·Δ, Δ = delta(τ₁ … τ_T) for a matrix, (1/T)·Σₖ τₖ otherwise; in place on the engine's copies."""
    taus = task_vectors_(base, finetuned, weights)
    return base.add_(delta(taus) if base.dim() == 2 else mean_task_vector(taus), alpha=lambda_)


def _spectral_method(name: str, temporaries: int, **ranges: str) -> Callable[[F], F]:
    """The registration of a method here: a weight per model, λ ≥ 0, its own `ranges`, its SVDs on the recipe's
    device, and the float32 copies of a weight its SVDs hold at their peak (measured at two tasks on a
    4096×11008 weight: BENCHMARKS.md)."""
    return merge_method(
        name,
        per_model=("weight",),
        ranges={"lambda": "[0, inf)", **ranges},
        uses_device=True,
        temporaries=temporaries,
    )


@_spectral_method("tsv_m", 5, rank_fraction="(0, 1]")
def tsv_m(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    lambda_: float = 1.0,
    rank_fraction: float = 1.0,
    svd: Svd = "exact",
    device: str = "cpu",
) -> Tensor:
    """TSV-Merge: each Δₖ cut to its top ⌊rank_fraction·min(m,n)/T⌋ singular triplets, the singular vectors
    orthogonalised across tasks, θ = θ₀ + λ·Δ per matrix (mean Δₖ elsewhere).

    :func:`tsv_delta` on each 2-D weight, its SVDs on `device`; ``svd: randomized`` truncates each Δₖ by a seeded
    randomized SVD."""
    return _merge(base, finetuned, weight, lambda_, lambda taus: tsv_delta(taus, rank_fraction, svd, device))


@_spectral_method("iso_c", 5)
def iso_c(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    lambda_: float = 1.0,
    device: str = "cpu",
) -> Tensor:
    """Iso-C: the SVD of Σₖ Δₖ with every singular value set to their mean, θ = θ₀ + λ·Δ per matrix (mean Δₖ
    elsewhere).

    :func:`iso_c_delta` on each 2-D weight, its SVD on `device`."""
    return _merge(base, finetuned, weight, lambda_, lambda taus: iso_c_delta(taus, device))


@_spectral_method("iso_cts", 6, common_space_fraction="[0, 1]")
def iso_cts(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    lambda_: float = 1.0,
    common_space_fraction: float = 0.8,
    svd: Svd = "exact",
    device: str = "cpu",
) -> Tensor:
    """Iso-CTS: the top directions of Σₖ Δₖ plus each task's own top directions outside them, orthogonalised,
    with a flat spectrum; θ = θ₀ + λ·Δ per matrix (mean Δₖ elsewhere).

    :func:`iso_cts_delta` on each 2-D weight, its SVDs on `device`; ``svd: randomized`` takes each task's
    directions by a seeded randomized SVD."""
    return _merge(
        base,
        finetuned,
        weight,
        lambda_,
        lambda taus: iso_cts_delta(taus, common_space_fraction, svd, device),
    )


__all__ = [
    "Blocks",
    "iso_c",
    "iso_c_delta",
    "iso_cts",
    "iso_cts_delta",
    "iso_cts_sizes",
    "mean_task_vector",
    "polar",
    "top_svd",
    "tsv_delta",
    "tsv_m",
    "tsv_rank",
]
