"""Adapter-space merges: several LoRA adapters of one base in, one LoRA adapter out.

The unit is one adapted Linear across the N input adapters: pairs ``(A, B)`` (A [r, in], B [out, r]) with the update
ΔWₙ = BₙAₙ, each adapter's PEFT scale already folded in (the engine passes scale-free pairs and rescales the output).
A method returns one pair (A', B') with the merged update B'A'.

- ``copa``: CoPA-Merging (Zeng et al. 2025): A and B pruned and merged apart, each rank rescaled by the mass the
  pruning removed, normalised across tasks; ``variant="reference"`` follows the authors' code (github
  AuroraZengfh/RobustMerge).
- ``lora_task_arithmetic`` / ``lora_ties`` / ``lora_dare_linear`` / ``lora_dare_ties``: the full-weight rules of
  :mod:`.baselines` on the ΔWₙ, re-factored to ``rank`` by truncated SVD (PEFT's ``add_weighted_adapter`` ``svd``,
  ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``: B' = U·S, A' = Vᵀ).
- ``lora_cat``: the exact sum at rank Σrₙ (PEFT ``cat``); ``lora_linear``: PEFT's ``linear``, A and B averaged apart.

How the scales are folded, the reference code's accidents and how they are fixed: docs/methods-notes.md, "Adapter-space
merges".
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from .baselines import dare_linear, dare_ties, ties
from .fast.baselines import magnitude_trim
from .fast.select import kth_largest
from .linalg import resolve_device, thin_svd
from .registry import CONTEXT_ARGS, PerModel, merge_method

Pair = tuple[Tensor, Tensor]  # (A [r, in], B [out, r]); the update is B @ A
KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY


# ---------------------------------------------------------------------------------------------- building blocks
def deltas(pairs: list[Pair]) -> list[Tensor]:
    """ΔWₙ = Bₙ @ Aₙ for every pair."""
    return [B @ A for A, B in pairs]


def truncated_svd(delta: Tensor, rank: int) -> Pair:
    """The best rank-`rank` factors of `delta` (Eckart–Young): ``(Vᵀ[:rank], U[:, :rank]·S[:rank])``."""
    U, S, Vh = thin_svd(delta)
    return Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous()


def randomized_svd(
    delta: Tensor, rank: int, *, oversample: int = 30, power_iters: int = 6, seed: int = 0
) -> Pair:
    """Rank-`rank` factors of `delta` by a randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.4):
    Q spans ``delta`` applied to ``rank + oversample`` seeded Gaussian vectors, refined by `power_iters`
    re-orthonormalised passes through ``delta·deltaᵀ``; the exact SVD of the small ``Qᵀ·delta`` gives the factors.
    Cost O(out·in·(rank + oversample)·(2·power_iters + 2)) instead of a dense SVD's O(out·in·min(out, in)).
    The Gaussian vectors are drawn on the CPU whatever ``delta``'s device: every device starts alike."""
    k = min(rank + oversample, *delta.shape)
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(delta.shape[1], k, generator=g, dtype=delta.dtype).to(delta.device)
    Q = torch.linalg.qr(delta @ omega).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(delta.T @ Q).Q
        Q = torch.linalg.qr(delta @ Q).Q
    U, S, Vh = thin_svd(Q.T @ delta)
    A, B = Vh[:rank], (Q @ U[:, :rank]) * S[:rank]
    if A.shape[0] < rank:  # a matrix narrower than the rank: the further singular values are 0
        A = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1)
    return A.contiguous(), B.contiguous()


def refactor(
    delta: Tensor,
    rank: int,
    svd: Literal["exact", "randomized"] = "exact",
    device: str | torch.device = "cpu",
) -> Pair:
    """`delta` as rank-`rank` factors: the exact truncated SVD (PEFT's result) or the randomized one, computed
    on `device`; the factors on the CPU."""
    d = delta.to(resolve_device(device))
    A, B = truncated_svd(d, rank) if svd == "exact" else randomized_svd(d, rank)
    return A.cpu(), B.cpu()


def lowrank_sum_svd(
    pairs: list[Pair], coeffs: list[float], rank: int, device: str | torch.device = "cpu"
) -> Pair:
    """Truncated SVD of ``Σ cₙ Bₙ Aₙ`` without forming it: with ``[c₁B₁ … ] = Q_B R_B`` and ``[A₁; …]ᵀ = Q_A R_A``
    the sum is ``Q_B (R_B R_Aᵀ) Q_Aᵀ``, so the SVD of the small Σr × Σr core gives the exact singular triplets.
    Computed on `device`; the factors on the CPU."""
    dev = resolve_device(device)
    Bs = torch.cat([B * c for (_, B), c in zip(pairs, coeffs)], dim=1).to(dev)
    As = torch.cat([A for A, _ in pairs], dim=0).to(dev)
    if Bs.shape[1] >= min(Bs.shape[0], As.shape[1]):  # no smaller core than the matrix itself
        A, B = truncated_svd(Bs @ As, rank)
        return A.cpu(), B.cpu()
    Qb, Rb = torch.linalg.qr(Bs)
    Qa, Ra = torch.linalg.qr(As.T)
    U, S, Vh = thin_svd(Rb @ Ra.T, full_matrices=True)
    k = min(rank, S.numel())
    A, B = Vh[:k] @ Qa.T, (Qb @ U[:, :k]) * S[:k]
    if (
        k < rank
    ):  # the sum has rank ≤ Σr: the further singular values are 0 (PEFT's full SVD gives them as such)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return A.contiguous().cpu(), B.contiguous().cpu()


def _svd_rank(pairs: list[Pair], rank: int | None) -> int:
    """The output rank of the SVD re-factoring: `rank`, else the largest input rank (PEFT's default)."""
    return int(rank) if rank is not None else max(A.shape[0] for A, _ in pairs)


def _zeros_like_delta(pairs: list[Pair]) -> Tensor:
    A, B = pairs[0]
    return torch.zeros(B.shape[0], A.shape[1], dtype=A.dtype)


def keep_top(t: Tensor, density: float) -> Tensor:
    """CoPA paper: keep the ⌊density·numel⌋ entries of largest |t| per matrix (ties: lowest index), zero the rest."""
    return magnitude_trim(t.clone(), density)


def keep_at_least_kth(t: Tensor, density: float) -> Tensor:
    """CoPA reference code: threshold at the k-th smallest |t| with k = int(numel·(1−density)) and keep every entry
    ``≥`` it (so ties at the threshold are all kept, and n−k+1 entries survive without ties). k = 0: keep all."""
    n = t.numel()
    k = int(n * (1.0 - density))
    if k <= 0:
        return t.clone()
    a = t.abs().reshape(-1)
    thr = kth_largest(a, n - k + 1)  # the k-th smallest is the (n−k+1)-th largest
    return t * (t.abs() >= thr)


def rank_scale(A: Tensor, A_kept: Tensor) -> Tensor:
    """CoPA's per-rank scale ``Sⁱ = Σⱼ|A[i, j]| / Σⱼ|Ã[i, j]|`` (≥ 1). A rank row of Ã with nothing kept gets
    S = 1, the value of a row that lost nothing (the published code divides by zero there)."""
    full, kept = A.abs().sum(dim=1), A_kept.abs().sum(dim=1)
    return torch.where(kept > 0, full / kept.clamp_min(torch.finfo(A.dtype).tiny), torch.ones_like(full))


def clamp_below_at_quantile(s: Tensor, q: float) -> Tensor:
    """The reference code's clamp: raise every value below the ``int(q·r)``-th smallest (0-based) of `s` to it."""
    floor = s.sort().values[min(int(q * s.numel()), s.numel() - 1)]
    return s.clamp_min(floor)


# ---------------------------------------------------------------------------------------------- methods
def _copa_out_rank(ranks: list[int], params: dict) -> int:
    return ranks[0]


def _svd_out_rank(ranks: list[int], params: dict) -> int:
    return int(params.get("rank") or max(ranks))


@merge_method(
    "copa", space="adapter", out_rank=_copa_out_rank, equal_ranks=True, ranges={"density": "(0, 1]"}
)
def copa(
    loras: list[Pair],
    *,
    lambda_: float = 2.0,
    density: float = 0.2,
    variant: Literal["paper", "reference"] = "paper",
) -> Pair:
    """CoPA-Merging: prune A and B, rescale each rank by the mass pruning removed, normalise across tasks.

    paper:     Ãₙ, B̃ₙ keep the top-`density` |entries| of each matrix; Sₙ = rank_scale(Aₙ, Ãₙ);
               S̃ₙ = Sₙ / Σₘ Sₘ (per rank); ΔW = λ · (Σₙ B̃ₙ diag(S̃ₙ)) · (Σₙ Ãₙ).
    reference: masks keep every |entry| ≥ the int(numel·(1−density))-th smallest; each task's S is clamped from
               below at its int(0.8·r)-th smallest value; A' = λ Σₙ Ãₙ, B' = λ Σₙ B̃ₙ diag(Sₙ) / Σₙ Sₙ, so
               ΔW = λ² · … (the code's 2.0 on both factors: 4× the sum). A and B of one module are paired
               explicitly (the code takes B's scale from the preceding lora_A key).
    """
    if variant == "paper":
        kept = []
        for A, B in loras:
            a = keep_top(A, density)
            kept.append((a, keep_top(B, density), rank_scale(A, a)))
        total = torch.stack([s for *_, s in kept]).sum(dim=0)
        norm = [
            torch.where(total > 0, s / total.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
            for *_, s in kept
        ]
        A_out = torch.stack([a for a, _, _ in kept]).sum(dim=0)
        B_out = sum(b * n for (_, b, _), n in zip(kept, norm)) * lambda_
        return A_out, B_out
    kept = []
    for A, B in loras:
        a = keep_at_least_kth(A, density)
        kept.append((a, keep_at_least_kth(B, density), clamp_below_at_quantile(rank_scale(A, a), 0.8)))
    total = torch.stack([s for *_, s in kept]).sum(dim=0)
    A_out = lambda_ * torch.stack([a for a, _, _ in kept]).sum(dim=0)
    B_out = lambda_ * sum(b * s for _, b, s in kept) / total
    return A_out, B_out


@merge_method(
    "lora_task_arithmetic",
    aliases=("lora_svd",),
    space="adapter",
    per_model=("weight",),
    out_rank=_svd_out_rank,
    ranges={"rank": "[1, inf)"},
    uses_device=True,
)
def lora_task_arithmetic(
    loras: list[Pair],
    *,
    weight: PerModel[float] = 1.0,
    lambda_: float = 1.0,
    rank: int | None = None,
    device: str = "cpu",
) -> Pair:
    """Task arithmetic on the LoRA deltas, λ·Σ wₙ BₙAₙ, re-factored to `rank` by exact truncated SVD (PEFT `svd`)."""
    return lowrank_sum_svd(loras, [lambda_ * w for w in weight], _svd_rank(loras, rank), device)


def _svd_signature(rule: Callable[..., Tensor], drop: tuple[str, ...]) -> inspect.Signature:
    """``(loras, *, <the rule's options less `drop`>, rank, svd, <its context arguments>, device)``, each
    annotation resolved (the registry reads kinds and choices from them)."""
    hints = typing.get_type_hints(rule)
    own = [
        p.replace(annotation=hints[p.name])
        for p in inspect.signature(rule).parameters.values()
        if p.kind is KEYWORD_ONLY and p.name not in (*drop, "block")
    ]
    return inspect.Signature(
        [
            inspect.Parameter("loras", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[Pair]),
            *(p for p in own if p.name not in CONTEXT_ARGS),
            inspect.Parameter("rank", KEYWORD_ONLY, default=None, annotation=int | None),
            inspect.Parameter(
                "svd", KEYWORD_ONLY, default="exact", annotation=Literal["exact", "randomized"]
            ),
            *(p for p in own if p.name in CONTEXT_ARGS),
            inspect.Parameter("device", KEYWORD_ONLY, default="cpu", annotation=str),
        ],
        return_annotation=Pair,
    )


def _svd_variant(name: str, rule: Callable[..., Tensor], doc: str, drop: tuple[str, ...] = ()) -> Callable:
    """Register `name` (alias ``<name>_svd``, PEFT's): full-weight method `rule` on the ΔWₙ over a zero base,
    re-factored to ``rank`` by SVD (exact or randomized) on ``device``. Its options are the rule's less `drop`,
    with the rule's defaults, so the variant follows the rule."""
    signature = _svd_signature(rule, drop)

    def method(*args: Any, **kwargs: Any) -> Pair:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        options = dict(bound.arguments)
        loras, rank, svd, device = (options.pop(k) for k in ("loras", "rank", "svd", "device"))
        merged = rule(_zeros_like_delta(loras), deltas(loras), **options)
        return refactor(merged, _svd_rank(loras, rank), svd, device)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    method.__signature__ = signature
    method.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()} | {"return": Pair}
    return merge_method(
        name,
        aliases=(f"{name}_svd",),
        space="adapter",
        dense=True,
        per_model=("weight", "density"),
        out_rank=_svd_out_rank,
        ranges={"density": "(0, 1]", "rank": "[1, inf)"},
        uses_device=True,
    )(method)


lora_ties = _svd_variant(
    "lora_ties",
    ties,
    "TIES on the LoRA deltas (trim, elect sign, disjoint mean), re-factored to `rank` by SVD (PEFT `ties_svd`), "
    "exact or randomized.",
)
lora_dare_linear = _svd_variant(
    "lora_dare_linear",
    dare_linear,
    "DARE on the LoRA deltas (random drop, rescale, sum), re-factored to `rank` by SVD (PEFT `dare_linear_svd`), "
    "exact or randomized.",
    drop=("convention",),  # the variant sums in the rule's default order
)
lora_dare_ties = _svd_variant(
    "lora_dare_ties",
    dare_ties,
    "DARE + TIES consensus on the LoRA deltas, re-factored by SVD (PEFT `dare_ties_svd`), exact or randomized.",
)


@merge_method("lora_cat", space="adapter", per_model=("weight",), out_rank=lambda ranks, params: sum(ranks))
def lora_cat(loras: list[Pair], *, weight: PerModel[float] = 1.0, lambda_: float = 1.0) -> Pair:
    """The exact sum λ·Σ wₙ BₙAₙ as one adapter of rank Σrₙ: the factors stacked (PEFT `cat`)."""
    return (
        torch.cat([A for A, _ in loras], dim=0),
        torch.cat([B * (lambda_ * w) for (_, B), w in zip(loras, weight)], dim=1),
    )


@merge_method(
    "lora_linear", space="adapter", per_model=("weight",), out_rank=_copa_out_rank, equal_ranks=True
)
def lora_linear(loras: list[Pair], *, weight: PerModel[float] = 1.0) -> Pair:
    """PEFT's `linear`: A' = Σ ±√|wₙ| Aₙ, B' = Σ √|wₙ| Bₙ (factors averaged separately; cross terms included)."""
    roots = [abs(w) ** 0.5 for w in weight]
    A_out = sum(A * (r if w >= 0 else -r) for (A, _), r, w in zip(loras, roots, weight))
    B_out = sum(B * r for (_, B), r in zip(loras, roots))
    return A_out, B_out


__all__ = [
    "Pair",
    "copa",
    "deltas",
    "lora_cat",
    "lora_dare_linear",
    "lora_dare_ties",
    "lora_linear",
    "lora_task_arithmetic",
    "lora_ties",
    "lowrank_sum_svd",
    "randomized_svd",
    "refactor",
    "truncated_svd",
]
