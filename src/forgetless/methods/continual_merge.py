"""Continual merging baselines: MagMax and OPCM, on models fine-tuned one task after another.

θ₀ is the base, θ₁ … θₜ the models after each task (sequentially fine-tuned: θₜ starts from θₜ₋₁), τₖ = θₖ − θ₀.
The task vectors are taken in float32 (float64 for a float64 tensor), the merged tensor cast back to θ₀'s dtype.

MagMax (Marczak et al., ECCV 2024): per entry, the τₖ of largest magnitude among τ₁ … τₜ (a tie goes to the later
task, as in the authors' release and FusionBench), and θ = θ₀ + λ·τ_max (λ = 0.5 by default: the authors' released
scripts, FusionBench's default). What a step keeps: τ_max.

OPCM (Tang et al. 2025, "Merging Models on the Fly Without Retraining"), as FusionBench's ``opcm.py`` runs it: a
running sum S₁ = τ₁, Sₜ = Sₜ₋₁ + Pₜ(τₜ), where for a Linear weight Pₜ removes from τₜ its coefficients, in the
singular bases U, V of Sₜ₋₁, on the block i, j < k and on the whole diagonal (uᵢᵀτₜvᵢ for every i), k the first
index at which the cumulative share of Sₜ₋₁'s singular values exceeds α; every other tensor adds τₜ whole. The
merged model is θ₀ + (n̄ₜ/‖Sₜ‖)·Sₜ, n̄ₜ the mean of ‖τ₁‖ … ‖τₜ‖ and the norms taken over the whole model: the merged
task vector keeps the average task vector's norm. FusionBench holds Mₜ = Sₜ/λₜ, λₜ = ‖Sₜ‖/n̄ₜ, which is the same
model. What a step keeps: Sₜ and the norms ‖τ₁‖ … ‖τₜ‖. How Linear weights are told apart, and where this differs
from FusionBench: docs/methods-notes.md, "MagMax and OPCM".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import Tensor

from .linalg import thin_svd
from .registry import RowBlock, Streaming, merge_method

MAGMAX_LAMBDA = 0.5
OPCM_ALPHA = 0.5
_EMBEDDING = re.compile(r"embed|^wte$|^wpe$")  # nn.Embedding tables: 2-D weights that are not Linear


# ---------------------------------------------------------------------------------------------- both
def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype task vectors are taken in: float32, or float64 for a float64 tensor."""
    return torch.promote_types(dtype, torch.float32)


def task_vector(theta: Tensor, theta0: Tensor) -> Tensor:
    """τ = θ − θ₀ in :func:`work_dtype`."""
    dtype = work_dtype(theta0.dtype)
    return theta.to(dtype) - theta0.to(dtype)


def apply(theta0: Tensor, delta: Tensor, scale: float) -> Tensor:
    """θ₀ + scale·Δ, in the work dtype, cast to θ₀'s dtype."""
    return theta0.to(delta.dtype).add(delta, alpha=scale).to(theta0.dtype)


def merged_tensor(dtype: torch.dtype) -> bool:
    """Whether a tensor of this dtype is merged (floating point); integer and boolean buffers keep θ₀'s."""
    return dtype.is_floating_point


def is_linear(name: str, shape: Iterable[int]) -> bool:
    """A Linear layer's weight, as a checkpoint names it: 2-D, ``….weight``, and not an embedding table (a module
    named ``*embed*``, ``wte``, ``wpe``). A tied ``lm_head`` is stored as the input embedding, so it counts as one."""
    if len(tuple(shape)) != 2 or not name.endswith(".weight"):
        return False
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return _EMBEDDING.search(module) is None


# ---------------------------------------------------------------------------------------------- MagMax
def magmax_select(tau_max: Tensor | None, tau: Tensor) -> Tensor:
    """The running selection after one more task: τ where |τ| ≥ |τ_max| (the later task wins a tie), else τ_max."""
    if tau_max is None:
        return tau
    return torch.where(tau.abs() >= tau_max.abs(), tau, tau_max)


def magmax_rule(theta0: Tensor, thetas: list[Tensor], lambda_: float = MAGMAX_LAMBDA) -> Tensor:
    """MagMax of one tensor: θ₀ + λ·τ_max, τ_max the entry-wise largest-magnitude τₖ over the models in order."""
    tau_max = None
    for theta in thetas:
        tau_max = magmax_select(tau_max, task_vector(theta, theta0))
    return apply(theta0, tau_max, lambda_)


@merge_method(
    "magmax",
    ranges={"lambda": "(0, inf)"},
    streaming=Streaming(rows="blocks", reads_finetuned=True),
)
def magmax(
    base: Tensor, finetuned: list[Tensor], *, lambda_: float = MAGMAX_LAMBDA, block: RowBlock | None = None
) -> Tensor:
    """MagMax: per entry, the task vector of largest magnitude over the models in order (ties: the later), ×λ, + θ₀.

    :func:`magmax_rule` on the engine's float32 tensors (the models in the recipe's order: the tasks'). The same
    merge one model at a time: ``forgetless continual merge --method magmax``."""
    tau_max = None
    for theta in finetuned:
        tau_max = magmax_select(tau_max, theta - base)
    return base.add_(tau_max, alpha=lambda_)


# ---------------------------------------------------------------------------------------------- OPCM
def split_rank(s: Tensor, alpha: float) -> int:
    """k: the first index at which the cumulative share of the singular values `s` (descending) exceeds α (0 when
    none does, or when they are all 0)."""
    above = s.cumsum(0) / s.sum() > alpha
    return int(above.to(torch.int8).argmax()) if s.numel() else 0


def opcm_project(
    previous: Tensor, tau: Tensor, alpha: float = OPCM_ALPHA, device: str | torch.device = "cpu"
) -> Tensor:
    """Pₜ(τ) for a Linear weight: τ less U·C·Vᵀ, U diag(s) Vᵀ the thin SVD of `previous` (Sₜ₋₁) and C the
    coefficients UᵀτV kept on the block [:k, :k] (k = :func:`split_rank`) and on the diagonal, zero elsewhere.
    The SVD and the products run on `device` in the inputs' dtype (float32 for float32 tensors, as FusionBench
    runs them in the model's); the result comes back to the CPU."""
    dev = torch.device(device)
    dtype = torch.promote_types(previous.dtype, tau.dtype)
    s_prev, t = previous.to(dev, dtype), tau.to(dev, dtype, copy=True)  # t is worked in place
    u, s, vh = thin_svd(s_prev)
    del s_prev
    k = split_rank(s, alpha)
    coef = (u.T @ t) @ vh.T
    kept = torch.zeros_like(coef)
    kept[:k, :k] = coef[:k, :k]
    kept.diagonal().copy_(coef.diagonal())
    del coef
    t -= (u @ kept) @ vh
    return t.to("cpu", tau.dtype)


def opcm_add(
    previous: Tensor | None,
    tau: Tensor,
    linear: bool,
    alpha: float = OPCM_ALPHA,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Sₜ of one tensor from Sₜ₋₁ (None on the first task: S₁ = τ₁): Sₜ₋₁ + Pₜ(τ) for a Linear weight, else
    Sₜ₋₁ + τ."""
    if previous is None:
        return tau
    return previous + (opcm_project(previous, tau, alpha, device) if linear else tau)


def square_norm(t: Tensor) -> float:
    """‖t‖², summed in float64: one tensor's share of a whole-model norm."""
    return float(t.double().square().sum())


def model_norm(squares: Iterable[float]) -> float:
    """The whole-model norm from its tensors' :func:`square_norm` (an exactly rounded sum: any order gives it)."""
    return math.sqrt(math.fsum(squares))


def opcm_scale(norms: list[float], sum_norm: float) -> float:
    """n̄ₜ/‖Sₜ‖: the mean task-vector norm over the running sum's (1 when the sum is 0)."""
    mean = math.fsum(norms) / len(norms)
    return mean / sum_norm if sum_norm > 0 else 1.0


def opcm_rule(
    theta0: dict[str, Tensor],
    thetas: list[dict[str, Tensor]],
    alpha: float = OPCM_ALPHA,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """OPCM over whole models (state dicts, the models in task order): θ₀ + (n̄ₜ/‖Sₜ‖)·Sₜ on every floating-point
    tensor, θ₀'s own elsewhere."""
    names = [n for n, t in theta0.items() if merged_tensor(t.dtype)]
    sums: dict[str, Tensor] = {}
    norms = []
    for theta in thetas:
        taus = {n: task_vector(theta[n], theta0[n]) for n in names}
        norms.append(model_norm(square_norm(t) for t in taus.values()))
        sums = {n: opcm_add(sums.get(n), taus[n], is_linear(n, taus[n].shape), alpha, device) for n in names}
    scale = opcm_scale(norms, model_norm(square_norm(t) for t in sums.values()))
    return {n: apply(t, sums[n], scale) if n in sums else t for n, t in theta0.items()}


__all__ = [
    "MAGMAX_LAMBDA",
    "OPCM_ALPHA",
    "apply",
    "is_linear",
    "magmax",
    "magmax_rule",
    "magmax_select",
    "model_norm",
    "opcm_add",
    "opcm_project",
    "opcm_rule",
    "opcm_scale",
    "split_rank",
    "square_norm",
    "task_vector",
]
