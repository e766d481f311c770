"""Curvature-Guided Mixing (github zzsyjl/CGM-ECCV-2026): CGM (soft) and CGM† (hard) mix one fine-tuned model θ_ft
back toward its base θ₀ entry by entry, guided by two diagonal Fishers shaped like each weight: F_task (the task
loss's curvature) and F_gen (the general loss's, at θ₀). Δ = θ_ft − θ₀. The rules come first, as the published code
computes them; the registered methods add the published ablations and budgets, and row blocks. Where the published
code is followed and where this goes beyond it: docs/methods-notes.md, "CGM and CGM†".
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import torch
from torch import Tensor

from .fast.select import Cut, Pieces, lowest_k_per_row, one_piece, top_k_cut
from .registry import RowBlock, Rows, Stream, Streaming, merge_method

Score = Literal["cgm", "delta2", "task", "general"]
Budget = Literal["row", "tensor", "global"]
Revert = Literal["budget", "positive"]
SCORES = ("cgm", "delta2", "task", "general")
BUDGETS = ("row", "tensor", "global")
REVERTS = ("budget", "positive")


# ---------------------------------------------------------------------------------------------- the rules
def cgm_rule(
    theta0: Tensor, theta_ft: Tensor, f_task: Tensor, f_gen: Tensor, alpha: float = 0.2, epsilon: float = 0.0
) -> Tensor:
    """CGM: θ = θ₀ + m ⊙ Δ with m = F_task / (F_task + α·F_gen + ε), per entry the minimiser of
    ½·F_task·(θ − θ_ft)² + (α/2)·F_gen·(θ − θ₀)²; m = 0 (θ₀) where the denominator is 0. A negative Fisher entry
    counts as 0."""
    f_task, f_gen = f_task.clamp(min=0), f_gen.clamp(min=0)
    den = alpha * f_gen + f_task + epsilon
    m = torch.where(den == 0, 0.0, f_task / den)
    return theta0.lerp(theta_ft, m)


def cgm_dagger_rule(
    theta0: Tensor, theta_ft: Tensor, f_task: Tensor, f_gen: Tensor, keep: float = 0.95, alpha: float = 1.0
) -> Tensor:
    """CGM†: every entry takes θ_ft or θ₀. S = (α·F_gen − F_task) ⊙ Δ² (the general loss saved minus the task loss
    paid by reverting the entry); per row, the ⌊in·keep⌋ entries of lowest S — a stable sort, ties to the lower
    column — keep θ_ft, the rest revert to θ₀. A tensor of fewer than two dimensions is one row."""
    s = (alpha * f_gen.clamp(min=0) - f_task.clamp(min=0)) * (theta_ft - theta0).square()
    rows = s.reshape(s.shape[0] if s.dim() >= 2 else 1, -1)
    lowest = rows.sort(dim=1, stable=True).indices[:, : int(rows.shape[1] * keep)]
    kept = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, lowest, True)
    return torch.where(kept.view_as(s), theta_ft, theta0)


def _check(alpha: float, **choices: tuple[str, tuple[str, ...]]) -> None:
    if not alpha >= 0:  # also refuses NaN
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key} must be {' | '.join(allowed)}, got {value!r}")


# ---------------------------------------------------------------------------------------------- soft mixing
def cgm_mix_ratio(
    fisher_task: Tensor, fisher_general: Tensor, alpha: float = 0.2, epsilon: float = 0.0
) -> Tensor:
    """m = F_task / (F_task + α·F_gen + ε), 0 where the denominator is 0. In place: consumes both Fishers and
    returns the ratio in `fisher_task`'s storage."""
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    _check(alpha)
    ft = fisher_task.clamp_(min=0)
    den = fisher_general.clamp_(min=0).mul_(alpha).add_(ft)
    if epsilon:
        den.add_(epsilon)
    zero = den == 0
    return ft.div_(den).masked_fill_(zero, 0.0)  # 0/0 = NaN there; F ≥ 0, so den = 0 only where F_task = 0


@merge_method(
    "cgm",
    models="one",
    needs=("fisher_task", "fisher_general"),
    ranges={"alpha": "[0, inf)", "epsilon": "[0, inf)"},
    streaming=Streaming(rows="blocks"),
)
def cgm(
    base: Tensor,
    finetuned: Tensor,
    *,
    fisher_task: Tensor,
    fisher_general: Tensor,
    alpha: float = 0.2,
    epsilon: float = 0.0,
    counts: Counter | None = None,
    block: RowBlock | None = None,
) -> Tensor:
    """CGM soft mixing: θ = θ₀ + m⊙Δ, m = F_task / (F_task + α·F_gen), the minimiser of two quadratics.

    :func:`cgm_rule` in place. ``alpha`` (published: 0.2) weighs general knowledge against the task; ``epsilon``
    (default 0, as published) is added to the denominator only, pulling weakly-seen elements toward θ₀.
    """
    m = cgm_mix_ratio(fisher_task, fisher_general, alpha, epsilon)
    if counts is not None:  # for the report: elements that keep θ_ft (m = 1), revert to θ₀ (m = 0), or mix
        kept, reverted = int(torch.count_nonzero(m == 1)), int(torch.count_nonzero(m == 0))
        counts.update(kept=kept, reverted=reverted, mixed=m.numel() - kept - reverted)
    return base.lerp_(finetuned, m)


# ---------------------------------------------------------------------------------------------- hard mixing
def cgm_dagger_score(
    base: Tensor,
    finetuned: Tensor,
    fisher_task: Tensor,
    fisher_general: Tensor,
    alpha: float = 1.0,
    score: Score = "cgm",
) -> Tensor:
    """The score S of each element (reverting it to θ₀ is better the larger S is):

    - "cgm" (published):  S = (α·F_gen − F_task) ⊙ Δ²
    - "delta2":          S = Δ²
    - "task":            S = −F_task ⊙ Δ²
    - "general":         S = α·F_gen ⊙ Δ²

    Consumes the Fishers (works in place); `base` and `finetuned` are left as they are.
    """
    _check(alpha, score=(score, SCORES))
    d2 = torch.sub(finetuned, base).square_()
    if score == "delta2":
        return d2
    if score == "task":
        return d2.mul_(fisher_task.clamp_(min=0)).neg_()
    gen = fisher_general.clamp_(min=0).mul_(alpha)
    if score == "cgm":
        gen.sub_(fisher_task.clamp_(min=0))
    return gen.mul_(d2)


def cgm_dagger_mask(
    score: Tensor,
    keep: float = 0.95,
    budget: Budget = "row",
    revert: Revert = "budget",
    threshold: float | None = None,
    cut: Cut | None = None,
    offset: int = 0,
) -> Tensor:
    """Boolean mask, True where the element keeps θ_ft, False where it reverts to θ₀.

    revert="budget" (default, published): the lowest-scoring ⌊n·keep⌋ elements keep θ_ft, n counted
      - budget="row" (published): per row (an output neuron: a weight [out, …] has `out` rows of numel/out
        elements); a 1-D tensor or a scalar is one row.
      - budget="tensor": over the whole tensor, n = numel.
      - budget="global": over every tensor in scope: the engine's pre-pass (``cgm_dagger_prepare``) finds the
        ⌊N·keep⌋-th lowest score of the whole model, `threshold`; elements with S ≤ threshold keep θ_ft (with no
        tie at the threshold, exactly ⌊N·keep⌋ of them).
      ⌊n·keep⌋ is ``int(n * keep)``; ties keep the lower (flat, row-major) index first.
    revert="positive": revert exactly where S > 0 (no budget: `keep` and `budget` are ignored).
    A NaN score (NaN statistics) is an error: it has no place in the ordering.
    ``cut``/``offset``: `score` is a block of rows of a larger tensor whose one budget ("tensor", or "row" for a
    1-D tensor: one row) was found over all of it (:func:`tensor_budget_cut`); its first entry has flat index
    `offset` there.
    """
    if revert not in REVERTS:
        raise ValueError(f"revert must be {' | '.join(REVERTS)}, got {revert!r}")
    if torch.isnan(score).any():
        raise ValueError("NaN in the CGM† score: the statistics (or weights) of this tensor hold NaN")
    if revert == "positive":
        return score <= 0
    if budget == "global":
        if threshold is None:
            raise ValueError(
                "budget 'global' needs the threshold of the whole model's scores (the engine's "
                "pre-pass computes it; pass `threshold` when calling the function directly)"
            )
        return score <= threshold
    if budget not in BUDGETS:
        raise ValueError(f"budget must be {' | '.join(BUDGETS)}, got {budget!r}")
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    if budget == "tensor" or score.dim() < 2:  # one budget over the whole tensor
        flat = score.reshape(-1)
        if cut is None:
            cut = tensor_budget_cut(one_piece(flat), flat.numel(), keep)
        return cut.mask(flat, offset).view(score.shape)
    return lowest_k_per_row(score.reshape(score.shape[0], -1), int(score[0].numel() * keep)).view(score.shape)


def tensor_budget_cut(pieces: Pieces, numel: int, keep: float) -> Cut:
    """The ⌊numel·keep⌋ lowest scores of a tensor (ties: the lower flat index first), over its flat pieces."""
    return top_k_cut(pieces, int(numel * keep), numel, largest=False)


def cgm_dagger_prepare(params: dict, stream: Stream, numel: int, sample: int = 1 << 20) -> dict | None:
    """Pre-pass of the global budget: the exact ⌊N·keep⌋-th lowest score S over every tensor in scope, by
    :func:`.fast.select.top_k_cut` over the streamed scores (never all scores at once)."""
    if (
        params.get("budget") != "global"
        or params.get("revert") == "positive"
        or params.get("threshold") is not None
    ):
        return None
    k = int(numel * params["keep"])
    if k <= 0:
        return {"threshold": float("-inf")}
    if k >= numel:
        return {"threshold": float("inf")}
    pieces = _flat_scores(stream, params)
    return {"threshold": top_k_cut(pieces, k, numel, largest=False, sample=sample).value}


def _flat_scores(stream: Stream, params: dict) -> Pieces:
    """``pieces`` for :func:`.fast.select.top_k_cut`: the flat scores of the streamed tensors or blocks, each with its
    flat offset in the concatenation of everything streamed."""

    def pieces():
        at = 0
        for r in stream():
            s = _score(r, params).reshape(-1)
            yield s, at
            at += s.numel()

    return pieces


def _score(r: Rows, params: dict) -> Tensor:
    return cgm_dagger_score(
        r.base,
        r.finetuned,
        r.stats["fisher_task"],
        r.stats["fisher_general"],
        params["alpha"],
        params["score"],
    )


def cgm_dagger_tensor_prepare(params: dict, stream: Stream, shape: tuple[int, ...]) -> dict:
    """CGM† on row blocks: a budget over the whole tensor ("tensor", or "row" on a 1-D tensor) is found in two
    streamed passes over its scores; a per-row budget, the global threshold and "positive" need nothing."""
    if (
        params["revert"] == "positive"
        or params["budget"] == "global"
        or (params["budget"] == "row" and len(shape) > 1)
    ):
        return {}
    return {"cut": tensor_budget_cut(_flat_scores(stream, params), math.prod(shape), params["keep"])}


@merge_method(
    "cgm_dagger",
    models="one",
    needs=("fisher_task", "fisher_general"),
    aliases=("cgm_plus",),
    ranges={"keep": "[0, 1]", "alpha": "[0, inf)"},
    streaming=Streaming(rows="blocks", tensor_prepare=cgm_dagger_tensor_prepare, prepare=cgm_dagger_prepare),
)
def cgm_dagger(
    base: Tensor,
    finetuned: Tensor,
    *,
    fisher_task: Tensor,
    fisher_general: Tensor,
    keep: float = 0.95,
    alpha: float = 1.0,
    score: Score = "cgm",
    budget: Budget = "row",
    revert: Revert = "budget",
    threshold: float | None = None,
    counts: Counter | None = None,
    block: RowBlock | None = None,
) -> Tensor:
    """CGM† hard mixing: per row, the ⌊in·keep⌋ elements of lowest S = (α·F_gen − F_task)⊙Δ² keep θ_ft, the rest θ₀.

    :func:`cgm_dagger_rule` with the published defaults (keep 0.95, alpha 1.0, score "cgm", budget "row").
    Options: ``score`` "delta2" | "task" | "general" (the published ablations S = Δ², −F_task·Δ², α·F_gen·Δ²),
    ``budget`` "tensor" (⌊numel·keep⌋ over the whole tensor) or "global" (one budget over every tensor in scope:
    a pre-pass finds the threshold, or give ``threshold``), ``revert`` "positive" (revert exactly where S > 0).
    """
    s = cgm_dagger_score(base, finetuned, fisher_task, fisher_general, alpha, score)
    mask = cgm_dagger_mask(
        s,
        keep,
        budget,
        revert,
        threshold,
        *((block.prepared.get("cut"), block.offset) if block else (None, 0)),
    )
    if counts is not None:  # for the report: elements that keep θ_ft and that revert to θ₀
        kept = int(torch.count_nonzero(mask))
        counts.update(kept=kept, reverted=mask.numel() - kept)
    return torch.where(mask, finetuned, base, out=base)
