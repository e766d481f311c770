"""LPM — MAny's Low-rank Parameter Merging (METHODS.md, "MAny"; inferred from the abstract, no public code).

For one LoRA-adapted Linear (y = x Wᵀ, W [out, in]) and a sequence of tasks i = 1…t, each with its update
ΔWᵢ = (α/r)·BᵢAᵢ [out, in] and the Gram matrix Gᵢ [in, in] of that layer's inputs on task i's data, the merged
update is RegMean's optimum in delta space, with a ridge that pulls towards ΔW = 0 (the base):

    batch:      ΔW*ₜ = (Σᵢ≤ₜ ΔWᵢGᵢ)(Σᵢ≤ₜ Gᵢ + ρₜI)⁻¹
                     = argmin_ΔW Σᵢ ‖Xᵢ(ΔW − ΔWᵢ)ᵀ‖² + ρₜ‖ΔW‖²
    recursive:  Hₜ = Hₜ₋₁ + Gₜ,  ρₜ = ρₜ₋₁ + δₜ,  Pₜ = (Hₜ + ρₜI)⁻¹
                ΔW*ₜ = ΔW*ₜ₋₁ + (ΔWₜGₜ − ΔW*ₜ₋₁(Gₜ + δₜI)) Pₜ       (ΔW*₀ = 0, H₀ = 0, ρ₀ = 0)

The recursion is exact: ΔW*ₜ₋₁(Hₜ₋₁ + ρₜ₋₁I) = Σᵢ<ₜ ΔWᵢGᵢ, so ΔW*ₜ(Hₜ + ρₜI) = Σᵢ≤ₜ ΔWᵢGᵢ. It needs only
(ΔW*ₜ₋₁, Hₜ₋₁, ρₜ₋₁) of the past, never the earlier tasks' ΔWᵢ or Gᵢ, and its cost does not grow with t.

γ (``gamma``) — the choice made here
------------------------------------
METHODS.md writes the ridge as γI. Two readings, both offered, both exact under the recursion:

* ``gamma_mode="relative"`` (default): ρₜ = γ · mean(diag Hₜ), i.e. each task adds δₜ = γ · mean(diag Gₜ). The
  same scale-free convention as :mod:`.regmean`'s ``ridge`` (γ is a fraction of the average input energy, so one
  value fits every layer whatever its activation scale), and the ridge keeps the same strength relative to the
  data as tasks accumulate. With δₜ ≠ 0 the update carries the extra term −ΔW*ₜ₋₁δₜPₜ above.
* ``gamma_mode="absolute"``: ρₜ = γ for every t (δ₁ = γ, δₜ₊₁ = 0): literally METHODS.md's
  ``ΔW*ₜ = ΔW*ₜ₋₁ + (ΔWₜ − ΔW*ₜ₋₁)GₜPₜ``, in the units of G.

Default γ = 1e-4 (relative): a numerical safeguard, as RegMean's, that keeps the solve finite when the Gram sum
is singular (an input direction no task's data excites — there ΔW* is 0, the base) and changes ΔW* by O(γ) on the
directions the data sees. Why not smaller: Gram files are float32, and rounding a rank-deficient Gram to float32
leaves eigenvalues as low as −4e-6 × its mean diagonal on the testbed's MLP inputs (156 tokens, 1536 features,
largest eigenvalue ≈ 950 × the mean diagonal); a ridge below that fails the Cholesky factorisation. Larger γ shrinks the merged update towards the base. γ = 0 is allowed when the Gram sum
is positive definite; a singular sum with γ = 0 is refused.

Numerics: every solve is a Cholesky factorisation of the symmetric Hₜ + ρₜI (``cholesky_solve``), never an
explicit inverse; float64 on the CPU (the default), on the device ``device`` names otherwise, in float64 where
that device does float64 well and else in float32 refined with float64 residuals (:mod:`.linalg`). The results
come back to the CPU in float64 either way.

What a step cannot avoid (:func:`lpm_step_flops`): per distinct Gram the factorisation (in³/3), per module the
two triangular solves of its ``out`` rows (2·out·in²), ΔWₜGₜ from the factors (2·(r·in² + out·r·in)) and, from
the second task on, ΔW*ₜ₋₁Gₜ (2·out·in²) — the state keeps ΔW*, not the numerator Σᵢ ΔWᵢGᵢ.

``approx="diagonal"`` — the bounded-memory variant
--------------------------------------------------
Gᵢ → diag(Gᵢ): the merge becomes a per-input-feature weighted average,
ΔW*[:, j] = Σᵢ ΔWᵢ[:, j]·Gᵢ[j, j] / (Σᵢ Gᵢ[j, j] + ρ), the recursion the same with vectors. Cost: the state keeps
``in`` numbers per Gram instead of ``in²`` (a LLaVA-1.5-7B decoder layer with every Linear adapted has four
distinct Grams, 3 × 4096² + 11008² entries: 654 MiB → 91 KiB per layer in float32, 20.5 GiB → 2.8 MiB for 32 layers) and a step is O(out·in) instead of O(in³ + out·in²); what it gives up is the interaction
between input features (the off-diagonal correlation RegMean exploits; RegMean's ``alpha = 0``). It is the exact
LPM of the diagonal Grams — recursive equals batch — not an approximation of the full LPM's result; how much that
costs in accuracy is a measurement on real tasks (issue 13, part 4), not a number known here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .linalg import Cholesky, Precision, resolve_device

GammaMode = Literal["relative", "absolute"]
Approx = Literal["full", "diagonal"]
DEFAULT_GAMMA = 1e-4


class SingularGramError(ValueError):
    """The Gram sum plus ridge is not positive definite (γ = 0 and an input direction no task's data excites)."""


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

    def __init__(self, gram_sum: Tensor, ridge: float, *, overwrite: bool = False,
                 device: str | torch.device = "cpu", precision: Precision = "auto"):
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
            self.chol = Cholesky(h, shift=ridge, device=self.device, precision=precision,
                                 overwrite=overwrite and h is gram_sum)
            if not self.chol.ok:
                raise SingularGramError("the Gram sum plus ridge is not positive definite (a singular Gram sum with "
                                        f"a ridge of {ridge:.3g} — {ridge / max(mean_diag, 1e-300):.2g} × its "
                                        "mean diagonal — below its float32 rounding error, or a non-symmetric "
                                        "statistic)")

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
    flops = in_ ** 3 / 3 if factorise else 0.0
    flops += 2 * out * in_ ** 2
    if rank is not None:
        flops += 2 * (rank * in_ ** 2 + out * rank * in_)
    if previous:
        flops += 2 * out * in_ ** 2
    return float(flops)


def _times_gram(x: Tensor, gram: Tensor) -> Tensor:
    """x G for x [out, in]; G full [in, in] or diagonal [in]."""
    return x * gram if gram.dim() == 1 else x @ gram


def lpm_batch(deltas: Sequence[Tensor], grams: Sequence[Tensor], *, gamma: float = DEFAULT_GAMMA,
              gamma_mode: GammaMode = "relative", approx: Approx = "full") -> Tensor:
    """ΔW* = (Σᵢ ΔWᵢGᵢ)(Σᵢ Gᵢ + ρI)⁻¹ over all the tasks at once, float64 (ρ as the module docstring says)."""
    _check(gamma, gamma_mode, approx)
    if not deltas or len(deltas) != len(grams):
        raise ValueError(f"LPM needs one Gram per delta, got {len(deltas)} deltas and {len(grams)} Grams")
    gs = [as_gram(g, approx) for g in grams]
    h = torch.stack(gs).sum(dim=0)
    ridge = sum(ridge_increment(g, first=i == 0, gamma=gamma, gamma_mode=gamma_mode) for i, g in enumerate(gs))
    num = sum(_times_gram(d.double(), g) for d, g in zip(deltas, gs))
    return Solver(h, ridge).solve(num)  # type: ignore[arg-type]


def lpm_accumulate(gram_sum: Tensor | None, ridge: float, gram: Tensor, *, gamma: float = DEFAULT_GAMMA,
                   gamma_mode: GammaMode = "relative",
                   approx: Approx = "full") -> tuple[Tensor, float, float, Tensor]:
    """One task's Gram into the running sum: ``(Hₜ, ρₜ, δₜ, Gₜ)`` (Gₜ in the approximation's form, float64).
    ``gram_sum=None`` starts the sequence. Modules that share an input share this, and one :class:`Solver`."""
    _check(gamma, gamma_mode, approx)
    g = as_gram(gram, approx)
    first = gram_sum is None
    if not first and tuple(gram_sum.shape) != tuple(g.shape):  # type: ignore[union-attr]
        raise ValueError(f"Gram shape {tuple(g.shape)} does not match the running sum's "
                         f"{tuple(gram_sum.shape)}")  # type: ignore[union-attr]
    inc = ridge_increment(g, first=first, gamma=gamma, gamma_mode=gamma_mode)
    h = g.clone() if first else g.clone().add_(gram_sum)  # type: ignore[arg-type]  # no float64 copy of the sum
    return h, ridge + inc, inc, g


Delta = Tensor | tuple[Tensor, Tensor]  # ΔW [out, in], or its LoRA factors (A [r, in], B [out, r]): ΔW = B·A


def _delta_times_gram(delta: Delta, gram: Tensor) -> Tensor:
    """ΔW G, float64 on G's device; from the factors as B(AG): r·in² + out·r·in operations, not out·in²."""
    if isinstance(delta, Tensor):
        return _times_gram(delta.to(gram.device, torch.float64), gram)
    A, B = (f.to(gram.device, torch.float64) for f in delta)
    return B @ _times_gram(A, gram)


def lpm_update(merged: Tensor | None, delta: Delta | None, gram: Tensor, ridge_inc: float,
               solver: Solver) -> Tensor:
    """ΔW*ₜ = ΔW*ₜ₋₁ + (ΔWₜGₜ − ΔW*ₜ₋₁(Gₜ + δₜI)) Pₜ, float64 on the CPU. ``merged=None``: the first task
    (ΔW*₀ = 0); ``delta=None``: task t did not adapt this module (ΔWₜ = 0: its data asks for the base's
    outputs); ``delta`` may be the adapter's factors (A, B), never multiplied out. ``gram`` is Gₜ as
    :func:`lpm_accumulate` returns it, ``solver`` Pₜ's factorisation of its (Hₜ, ρₜ). The products and the
    solve run on the solver's device (give ``gram`` there already to move it once for the modules that share
    it)."""
    if merged is None and delta is None:
        raise ValueError("an LPM step needs the previous merged delta or the task's delta")
    gram = gram.to(solver.device)
    rhs = _delta_times_gram(delta, gram) if delta is not None else None
    if merged is None:
        return solver.solve(rhs)  # type: ignore[arg-type]
    prev = merged.to(solver.device, torch.float64)
    resid = _times_gram(prev, gram)
    if ridge_inc:
        resid.add_(prev, alpha=ridge_inc)
    resid = resid.neg_() if rhs is None else rhs.sub_(resid)
    del rhs
    return solver.solve_here(resid).add_(prev).cpu()


def lpm_recursive(deltas: Sequence[Tensor], grams: Sequence[Tensor], *, gamma: float = DEFAULT_GAMMA,
                  gamma_mode: GammaMode = "relative", approx: Approx = "full") -> list[Tensor]:
    """ΔW*₁, …, ΔW*ₜ by the recursion, one task at a time (what a continual state does, in memory)."""
    merged: Tensor | None = None
    h: Tensor | None = None
    ridge = 0.0
    out = []
    for d, g in zip(deltas, grams, strict=True):
        h, ridge, inc, gt = lpm_accumulate(h, ridge, g, gamma=gamma, gamma_mode=gamma_mode, approx=approx)
        merged = lpm_update(merged, d, gt, inc, Solver(h, ridge))
        out.append(merged)
    return out


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
