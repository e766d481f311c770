"""LPM — MAny's Low-rank Parameter Merging (inferred from the paper's abstract; no public code).

For one LoRA-adapted Linear (y = x Wᵀ, W [out, in]) and tasks i = 1…t, each with its update ΔWᵢ = (α/r)·BᵢAᵢ and the
Gram Gᵢ [in, in] of that layer's inputs on task i's data, the merged update is RegMean's optimum in delta space,
with a ridge ρₜ toward ΔW = 0 (the base):

    batch:      ΔW*ₜ = (Σᵢ≤ₜ ΔWᵢGᵢ)(Σᵢ≤ₜ Gᵢ + ρₜI)⁻¹ = argmin_ΔW Σᵢ ‖Xᵢ(ΔW − ΔWᵢ)ᵀ‖² + ρₜ‖ΔW‖²
    recursive:  Hₜ = Hₜ₋₁ + Gₜ,  ρₜ = ρₜ₋₁ + δₜ,  ΔW*ₜ = ΔW*ₜ₋₁ + (ΔWₜGₜ − ΔW*ₜ₋₁(Gₜ + δₜI))(Hₜ + ρₜI)⁻¹

The recursion is exact and needs only (ΔW*ₜ₋₁, Hₜ₋₁, ρₜ₋₁) of the past. γ's two readings (``gamma_mode``), its
default, the numerics and ``approx="diagonal"``: docs/methods-notes.md, "LPM".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce
from typing import Any, Literal

import torch
from torch import Tensor

from .linalg import Cholesky, Precision, resolve_device

GammaMode = Literal["relative", "absolute"]
Approx = Literal["full", "diagonal"]
DEFAULT_GAMMA = 1e-4


class SingularGramError(ValueError):
    """The Gram sum plus ridge is not positive definite (γ = 0 and an input direction no task's data excites)."""


def lpm_batch(
    deltas: Sequence[Tensor],
    grams: Sequence[Tensor],
    *,
    gamma: float = DEFAULT_GAMMA,
    gamma_mode: GammaMode = "relative",
    approx: Approx = "full",
) -> Tensor:
    """The rule: ΔW* = (Σᵢ ΔWᵢGᵢ)(Σᵢ Gᵢ + ρI)⁻¹ over all the tasks at once, float64; ρ = Σᵢ δᵢ
    (:func:`ridge_increment`)."""
    _check(gamma, gamma_mode, approx)
    if not deltas or len(deltas) != len(grams):
        raise ValueError(f"LPM needs one Gram per delta, got {len(deltas)} deltas and {len(grams)} Grams")
    gs = [as_gram(g, approx) for g in grams]
    h = torch.stack(gs).sum(dim=0)
    ridge = sum(
        ridge_increment(g, first=i == 0, gamma=gamma, gamma_mode=gamma_mode) for i, g in enumerate(gs)
    )
    num = reduce(torch.add, [_times_gram(d.double(), g) for d, g in zip(deltas, gs)])
    return Solver(h, ridge).solve(num)


def lpm_recursive(deltas: Sequence[Tensor], grams: Sequence[Tensor], **options: Any) -> list[Tensor]:
    """ΔW*₁, …, ΔW*ₜ by the recursion, one task at a time (what a continual state does, in memory);
    ``options`` are :func:`lpm_batch`'s, passed to :func:`lpm_accumulate`."""
    merged: Tensor | None = None
    h: Tensor | None = None
    ridge = 0.0
    out = []
    for d, g in zip(deltas, grams, strict=True):
        h, ridge, inc, gt = lpm_accumulate(h, ridge, g, **options)
        merged = lpm_update(merged, d, gt, inc, Solver(h, ridge))
        out.append(merged)
    return out


def option_problem(gamma: Any, gamma_mode: Any, approx: Any) -> str | None:
    """What is out of range among LPM's options, or None."""
    if type(gamma) not in (int, float) or not (math.isfinite(gamma) and gamma >= 0):
        return f"gamma={gamma!r} (a finite number >= 0)"
    if gamma_mode not in ("relative", "absolute"):
        return f"gamma_mode={gamma_mode!r} (relative | absolute)"
    if approx not in ("full", "diagonal"):
        return f"approx={approx!r} (full | diagonal)"
    return None


def _check(gamma: float, gamma_mode: str, approx: str) -> None:
    problem = option_problem(float(gamma), gamma_mode, approx)  # any real number type a caller passes
    if problem is not None:
        raise ValueError(f"LPM {problem}")


def as_gram(gram: Tensor, approx: Approx) -> Tensor:
    """A Gram in the form the approximation keeps, float64: [in, in] (full) or its diagonal [in] (diagonal). A
    diagonal approximation may be given its diagonal already."""
    g = gram.double()
    if approx == "diagonal":
        return g.diagonal().clone() if g.dim() == 2 else g.clone()
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"a full Gram matrix is [in, in], got shape {tuple(g.shape)}")
    return g


def _mean_diag(g: Tensor) -> float:
    return float(g.diagonal().mean()) if g.dim() == 2 else float(g.mean())


def ridge_increment(gram: Tensor, *, first: bool, gamma: float, gamma_mode: GammaMode) -> float:
    """δₜ, what task t adds to the ridge: γ·mean(diag Gₜ) (relative), or γ on the first task and 0 after (absolute)."""
    if gamma_mode == "relative":
        return gamma * _mean_diag(gram)
    return gamma if first else 0.0


class Solver:
    """X ↦ X (H + ρI)⁻¹ for one Gram sum, factorised once (Cholesky on `device`, in the precision
    :mod:`.linalg` chooses; elementwise on the CPU for a diagonal)."""

    def __init__(
        self,
        gram_sum: Tensor,
        ridge: float,
        *,
        overwrite: bool = False,
        device: str | torch.device = "cpu",
        precision: Precision = "auto",
    ):
        """``overwrite=True`` factorises a float64 ``gram_sum`` in place (one [in, in] matrix less at peak; the
        caller must not use it afterwards). On the CPU in float64 (the defaults) the result is the same, bit
        for bit, as a plain float64 Cholesky solve."""
        h = gram_sum.double()
        self.diagonal = h.dim() == 1
        self.device = torch.device("cpu") if self.diagonal else resolve_device(device)
        mean_diag = _mean_diag(h)
        self.zero = mean_diag + ridge == 0.0  # no data and no ridge: nothing is known, ΔW* = 0
        if self.zero:
            return
        if self.diagonal:
            d = h + ridge
            if not bool((d > 0).all()):
                raise SingularGramError("the diagonal Gram sum has zero entries and the ridge is 0")
            self.d = d
        else:
            self.chol = Cholesky(
                h, shift=ridge, device=self.device, precision=precision, overwrite=overwrite and h is gram_sum
            )
            if not self.chol.ok:
                raise SingularGramError(
                    "the Gram sum plus ridge is not positive definite (a singular Gram sum with "
                    f"a ridge of {ridge:.3g} — {ridge / max(mean_diag, 1e-300):.2g} × its "
                    "mean diagonal — below its float32 rounding error, or a non-symmetric "
                    "statistic)"
                )

    def solve(self, x: Tensor) -> Tensor:
        """x (H + ρI)⁻¹ for x [out, in], float64 on the CPU."""
        return self.solve_here(x).cpu()

    def solve_here(self, x: Tensor) -> Tensor:
        """x (H + ρI)⁻¹ for x [out, in], float64 on the solver's device."""
        x = x.to(self.device, torch.float64)
        if self.zero:
            return torch.zeros_like(x)
        if self.diagonal:
            return x / self.d
        return self.chol.solve(x)


def lpm_step_flops(out: int, in_: int, rank: int | None, *, previous: bool, factorise: bool = True) -> float:
    """Floating-point operations of one full-Gram LPM step of one module [out, in] (a multiply-add counts
    two): the Cholesky factorisation in³/3 (``factorise=False`` for a module whose Gram another module of the
    step already factorised), the two triangular solves of its rows 2·out·in², ΔWₜGₜ as B(AG) from
    rank-``rank`` factors 2·(r·in² + out·r·in) (``rank=None``: the task did not adapt the module) and, when
    there is a previous merged delta (``previous``), ΔW*ₜ₋₁Gₜ 2·out·in². Elementwise work (the ridge term,
    the sums) is left out: it is O(out·in). The floor a step's time is measured against."""
    flops = in_**3 / 3 if factorise else 0.0
    flops += 2 * out * in_**2
    if rank is not None:
        flops += 2 * (rank * in_**2 + out * rank * in_)
    if previous:
        flops += 2 * out * in_**2
    return float(flops)


def _times_gram(x: Tensor, gram: Tensor) -> Tensor:
    """x G for x [out, in]; G full [in, in] or diagonal [in]."""
    return x * gram if gram.dim() == 1 else x @ gram


def lpm_accumulate(
    gram_sum: Tensor | None,
    ridge: float,
    gram: Tensor,
    *,
    gamma: float = DEFAULT_GAMMA,
    gamma_mode: GammaMode = "relative",
    approx: Approx = "full",
) -> tuple[Tensor, float, float, Tensor]:
    """One task's Gram into the running sum: ``(Hₜ, ρₜ, δₜ, Gₜ)`` (Gₜ in the approximation's form, float64).
    ``gram_sum=None`` starts the sequence. Modules that share an input share this, and one :class:`Solver`."""
    _check(gamma, gamma_mode, approx)
    g = as_gram(gram, approx)
    if gram_sum is not None and tuple(gram_sum.shape) != tuple(g.shape):
        raise ValueError(
            f"Gram shape {tuple(g.shape)} does not match the running sum's {tuple(gram_sum.shape)}"
        )
    inc = ridge_increment(g, first=gram_sum is None, gamma=gamma, gamma_mode=gamma_mode)
    h = g.clone() if gram_sum is None else g.clone().add_(gram_sum)  # no float64 copy of the sum
    return h, ridge + inc, inc, g


Delta = Tensor | tuple[Tensor, Tensor]  # ΔW [out, in], or its LoRA factors (A [r, in], B [out, r]): ΔW = B·A


def _delta_times_gram(delta: Delta, gram: Tensor) -> Tensor:
    """ΔW G, float64 on G's device; from the factors as B(AG): r·in² + out·r·in operations, not out·in²."""
    if isinstance(delta, Tensor):
        return _times_gram(delta.to(gram.device, torch.float64), gram)
    A, B = (f.to(gram.device, torch.float64) for f in delta)
    return B @ _times_gram(A, gram)


def lpm_update(
    merged: Tensor | None, delta: Delta | None, gram: Tensor, ridge_inc: float, solver: Solver
) -> Tensor:
    """ΔW*ₜ = ΔW*ₜ₋₁ + (ΔWₜGₜ − ΔW*ₜ₋₁(Gₜ + δₜI)) Pₜ, float64 on the CPU. ``merged=None``: the first task
    (ΔW*₀ = 0); ``delta=None``: task t did not adapt this module (ΔWₜ = 0: its data asks for the base's
    outputs); ``delta`` may be the adapter's factors (A, B), never multiplied out. ``gram`` is Gₜ as
    :func:`lpm_accumulate` returns it, ``solver`` Pₜ's factorisation of its (Hₜ, ρₜ). The products and the
    solve run on the solver's device (give ``gram`` there already to move it once for the modules that share
    it)."""
    if merged is None:
        if delta is None:
            raise ValueError("an LPM step needs the previous merged delta or the task's delta")
        return solver.solve(_delta_times_gram(delta, gram.to(solver.device)))
    gram = gram.to(solver.device)
    rhs = _delta_times_gram(delta, gram) if delta is not None else None
    prev = merged.to(solver.device, torch.float64)
    resid = _times_gram(prev, gram)
    if ridge_inc:
        resid.add_(prev, alpha=ridge_inc)
    resid = resid.neg_() if rhs is None else rhs.sub_(resid)
    del rhs
    return solver.solve_here(resid).add_(prev).cpu()


__all__ = [
    "DEFAULT_GAMMA",
    "Delta",
    "SingularGramError",
    "Solver",
    "as_gram",
    "lpm_accumulate",
    "lpm_batch",
    "lpm_recursive",
    "lpm_step_flops",
    "lpm_update",
    "ridge_increment",
]
