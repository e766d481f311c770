"""Curvature-Guided Mixing: CGM (soft) and CGM† (hard) (METHODS.md, "CGM" and "CGM†"; seed 000).

One fine-tuned model θ_ft and its pre-trained base θ₀, with two diagonal Fishers shaped like each weight:
``fisher_task`` (F_task, the task loss's curvature on task data; the published scripts take it at θ₀, not θ_ft)
and ``fisher_general`` (F_gen, the general loss's curvature at θ₀ on general data). Δ = θ_ft − θ₀.

- ``cgm``, soft mixing: the per-element minimiser of ½ΣF_task(θ−θ_ft)² + (α/2)ΣF_gen(θ−θ₀)²,
  m = F_task / (F_task + α·F_gen + ε), θ = θ₀ + m ⊙ Δ; m = 0 (θ₀) where the denominator is 0.
- ``cgm_dagger`` (alias ``cgm_plus``, the published code's name), hard mixing: every element takes θ_ft or θ₀.
  A score S (default (α·F_gen − F_task) ⊙ Δ², the general loss saved minus the task loss paid by reverting the
  element) is sorted ascending per row; the lowest ⌊in·keep⌋ keep θ_ft, the rest revert to θ₀.

Both follow the published code (github zzsyjl/CGM-ECCV-2026, ``cgm/pruning.py``): the 0/0 rule of the soft mix,
the stable per-row sort (ties: the lower column keeps θ_ft first), k = int(in·keep) (the floor of the float
product, as the published code computes it), and the score ablations. Beyond it: a per-tensor budget, the
"revert only where S > 0" rule, ε, and tensors that are not 2-D (see :func:`cgm_dagger_mask`).
Negative Fisher entries (not a Fisher) count as zero, as in Fisher merging.

Element counts. :func:`cgm_dagger_mask` returns the boolean keep mask and :func:`cgm_mix_ratio` the soft ratio, so
that "kept / reverted / mixed" counts per part are one ``count_nonzero`` away once the engine offers a hook.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import torch
from torch import Tensor

from .registry import RowBlock, Streaming, merge_method
from .select import Cut, one_piece, top_k_cut

Score = Literal["cgm", "delta2", "task", "general"]
Budget = Literal["row", "tensor", "global"]
Revert = Literal["budget", "positive"]
SCORES = ("cgm", "delta2", "task", "general")
BUDGETS = ("row", "tensor", "global")
REVERTS = ("budget", "positive")


def _check(alpha: float, **choices: tuple[str, tuple[str, ...]]) -> None:
    if not alpha >= 0:  # also refuses NaN
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key} must be {' | '.join(allowed)}, got {value!r}")


# ---------------------------------------------------------------------------------------------- soft mixing
def cgm_mix_ratio(fisher_task: Tensor, fisher_general: Tensor, alpha: float = 0.2, epsilon: float = 0.0) -> Tensor:
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


@merge_method("cgm", models="one", needs=("fisher_task", "fisher_general"),
              ranges={"alpha": "[0, inf)", "epsilon": "[0, inf)"}, streaming=Streaming(rows="blocks"))
def cgm(base: Tensor, finetuned: Tensor, *, fisher_task: Tensor, fisher_general: Tensor, alpha: float = 0.2,
        epsilon: float = 0.0, counts: Counter | None = None, block: RowBlock | None = None) -> Tensor:
    """CGM soft mixing: θ = θ₀ + m⊙Δ, m = F_task / (F_task + α·F_gen), the minimiser of two quadratics.

    Per element, θ minimises ½·F_task·(θ − θ_ft)² + (α/2)·F_gen·(θ − θ₀)² (each loss expanded around its own
    optimum with a diagonal Fisher as its Hessian). Where F_task + α·F_gen + ε = 0 nothing constrains θ and it
    keeps θ₀ (m = 0), as in the published code. ``alpha`` (published: 0.2) weighs general knowledge against the
    task; ``epsilon`` (default 0, as published) is added to the denominator only, pulling weakly-seen elements
    toward θ₀. m = 1 gives θ_ft and m = 0 gives θ₀ bit for bit (``lerp``).
    """
    m = cgm_mix_ratio(fisher_task, fisher_general, alpha, epsilon)
    if counts is not None:  # for the report: elements that keep θ_ft (m = 1), revert to θ₀ (m = 0), or mix
        kept, reverted = int(torch.count_nonzero(m == 1)), int(torch.count_nonzero(m == 0))
        counts.update(kept=kept, reverted=reverted, mixed=m.numel() - kept - reverted)
    return base.lerp_(finetuned, m)


# ---------------------------------------------------------------------------------------------- hard mixing
def cgm_dagger_score(base: Tensor, finetuned: Tensor, fisher_task: Tensor, fisher_general: Tensor,
                     alpha: float = 1.0, score: Score = "cgm") -> Tensor:
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


def _lowest_k(rows: Tensor, k: int) -> Tensor:
    """Boolean mask of the k lowest entries of each row of a 2-D tensor; ties at the k-th value go to the lower
    column first, as a stable ascending sort would. Selection, not a sort: O(n) and no int64 index tensor."""
    n = rows.shape[1]
    if k >= n:
        return torch.ones_like(rows, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(rows, dtype=torch.bool)
    t = rows.kthvalue(k, dim=1, keepdim=True).values
    keep = rows < t  # at most k − 1 per row
    need = k - torch.count_nonzero(keep, dim=1).unsqueeze(1)
    ties = rows == t
    keep |= ties & (ties.cumsum(1, dtype=torch.int32) <= need)
    return keep


def cgm_dagger_mask(score: Tensor, keep: float = 0.95, budget: Budget = "row", revert: Revert = "budget",
                    threshold: float | None = None, cut: Cut | None = None, offset: int = 0) -> Tensor:
    """Boolean mask, True where the element keeps θ_ft, False where it reverts to θ₀.

    revert="budget" (default, published): the lowest-scoring ⌊n·keep⌋ elements keep θ_ft, n counted
      - budget="row" (published): per row; a row is an output neuron, i.e. a weight of shape [out, …] has `out`
        rows of n = numel/out elements (a Linear [out, in]: n = in). A 1-D tensor (bias, norm) or a scalar is
        one row. The published code has no such tensors in scope (Linear weights only).
      - budget="tensor": over the whole tensor, n = numel.
      - budget="global": over every tensor in scope: the engine's pre-pass (``cgm_dagger_prepare``) finds the
        ⌊N·keep⌋-th lowest score of the whole model, `threshold`; elements with S ≤ threshold keep θ_ft (with no
        tie at the threshold, exactly ⌊N·keep⌋ of them).
      ⌊n·keep⌋ is ``int(n * keep)`` as in the published code; ties keep the lower (flat, row-major) index first.
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
            raise ValueError("budget 'global' needs the threshold of the whole model's scores (the engine's "
                             "pre-pass computes it; pass `threshold` when calling the function directly)")
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
    return _lowest_k(score.reshape(score.shape[0], -1), int(score[0].numel() * keep)).view(score.shape)


def tensor_budget_cut(pieces, numel: int, keep: float) -> Cut:
    """The ⌊numel·keep⌋ lowest scores of a tensor (ties: the lower flat index first), over its flat pieces."""
    return top_k_cut(pieces, int(numel * keep), numel, largest=False)


def cgm_dagger_prepare(params: dict, stream, numel: int, sample: int = 1 << 20) -> dict | None:
    """Pre-pass of the global budget: the exact ⌊N·keep⌋-th lowest score S over every tensor in scope, by
    :func:`.select.top_k_cut` over the streamed scores (a sampled bracket, then one counting pass; never all
    scores at once)."""
    if params.get("budget") != "global" or params.get("revert") == "positive" or params.get("threshold") is not None:
        return None
    k = int(numel * params["keep"])
    if k <= 0:
        return {"threshold": float("-inf")}
    if k >= numel:
        return {"threshold": float("inf")}
    pieces = _flat_scores(stream, params)
    return {"threshold": top_k_cut(pieces, k, numel, largest=False, sample=sample).value}


def _flat_scores(stream, params: dict):
    """``pieces`` for :func:`.select.top_k_cut`: the flat scores of the streamed tensors or blocks, each with its
    flat offset in the concatenation of everything streamed."""
    def pieces():
        at = 0
        for r in stream():
            s = _score(r, params).reshape(-1)
            yield s, at
            at += s.numel()
    return pieces


def _score(r, params: dict) -> Tensor:
    return cgm_dagger_score(r.base, r.finetuned, r.stats["fisher_task"], r.stats["fisher_general"], params["alpha"],
                            params["score"])


def cgm_dagger_tensor_prepare(params: dict, stream, shape: tuple[int, ...]) -> dict:
    """CGM† on row blocks: a budget over the whole tensor ("tensor", or "row" on a 1-D tensor) is found in two
    streamed passes over its scores; a per-row budget, the global threshold and "positive" need nothing."""
    if params["revert"] == "positive" or params["budget"] == "global" or (params["budget"] == "row" and len(shape) > 1):
        return {}
    return {"cut": tensor_budget_cut(_flat_scores(stream, params), math.prod(shape), params["keep"])}


@merge_method("cgm_dagger", models="one", needs=("fisher_task", "fisher_general"), aliases=("cgm_plus",),
              ranges={"keep": "[0, 1]", "alpha": "[0, inf)"},
              streaming=Streaming(rows="blocks", tensor_prepare=cgm_dagger_tensor_prepare,
                                  prepare=cgm_dagger_prepare))
def cgm_dagger(base: Tensor, finetuned: Tensor, *, fisher_task: Tensor, fisher_general: Tensor, keep: float = 0.95,
               alpha: float = 1.0, score: Score = "cgm", budget: Budget = "row",
               revert: Revert = "budget", threshold: float | None = None,
               counts: Counter | None = None, block: RowBlock | None = None) -> Tensor:
    """CGM† hard mixing: per row, the ⌊in·keep⌋ elements of lowest S = (α·F_gen − F_task)⊙Δ² keep θ_ft, the rest θ₀.

    S estimates the general loss saved minus the task loss paid by reverting an element to θ₀ (the quadratic model
    of ``cgm``), so the elements most worth reverting are the highest-scoring. Published defaults: keep = 0.95,
    alpha = 1.0, score "cgm", budget "row". Options: ``score`` "delta2" | "task" | "general" (the published
    ablations S = Δ², −F_task·Δ², α·F_gen·Δ²), ``budget`` "tensor" (⌊numel·keep⌋ over the whole tensor),
    ``revert`` "positive" (revert exactly where S > 0, no budget). Ties keep the lower column first (the published
    stable sort). ``budget`` "global": one budget over every tensor in scope (a pre-pass over the model finds the
    threshold; ``threshold`` may also be given). Every element is exactly θ_ft or θ₀.
    """
    s = cgm_dagger_score(base, finetuned, fisher_task, fisher_general, alpha, score)
    mask = cgm_dagger_mask(s, keep, budget, revert, threshold, *((block.prepared.get("cut"), block.offset)
                                                                 if block else (None, 0)))
    if counts is not None:  # for the report: elements that keep θ_ft and that revert to θ₀
        kept = int(torch.count_nonzero(mask))
        counts.update(kept=kept, reverted=mask.numel() - kept)
    return torch.where(mask, finetuned, base, out=base)
