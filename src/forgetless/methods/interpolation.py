"""Interpolation merges: SLERP and Model Stock, each as mergekit computes it.

θ₀ is the base, θₖ the fine-tuned models, τₖ = θₖ − θ₀. Both rules need sums over a whole tensor (SLERP the
angle between θ₀ and θ₁, Model Stock the angles between the τₖ), taken here in float64 in a fixed order that
does not depend on how the tensor is cut into row blocks or on the thread count: the products of float32 values
(exact in float64) summed pairwise along each row by elementwise adds, then the rows' sums added exactly
(``math.fsum``). A tensor in row blocks thus gets the coefficients its whole gets, bit for bit; mergekit sums in
float32, so its coefficients differ from these by float32 rounding (docs/methods-notes.md, "Interpolation"). The
combination itself is mergekit's float32 operations, one by one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ..errors import ForgetlessError
from .registry import RowBlock, Stream, Streaming, merge_method

DOT_THRESHOLD = 0.9995  # mergekit's: |cos θ| above it, SLERP falls back to linear interpolation
EPS = 1e-8  # mergekit's: a vector whose norm is at most this is not normalised
NORM_FLOOR = 1e-6  # mergekit's floor of ‖τᵢ‖·‖τⱼ‖ in Model Stock's cosines
# |1 + (N − 1)·cos θ| at most this: Model Stock's ratio has no value (mergekit's is ±inf or NaN)
DEGENERATE = 1e-12
CHUNK = 1 << 20  # entries summed at once (float64 copies of this size)


# ---------------------------------------------------------------------------------------------- the rules
def slerp_rule(theta0: Tensor, theta1: Tensor, t: float) -> Tensor:
    """SLERP (Shoemake 1985) from θ₀ (t = 0) to θ₁ (t = 1): with cos Ω = θ₀·θ₁ / (‖θ₀‖‖θ₁‖) over the whole
    tensor, θ = sin((1 − t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁; (1 − t)·θ₀ + t·θ₁ when |cos Ω| > 0.9995."""
    s0, s1 = slerp_coefficients(t, gram(theta0, [theta1]))
    return combine(theta0.clone(), [theta1], s0, s1)


def model_stock_rule(theta0: Tensor, thetas: list[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al. 2024): θ = r·θ̄ + (1 − r)·θ₀, θ̄ the mean of the N ≥ 2 θₖ, r = N·cos θ /
    (1 + (N − 1)·cos θ), cos θ the mean over pairs of the τₖ's cosines: over the whole tensor, or (`filter_wise`)
    along its last dimension, one r per filter (a 1-D tensor: one r)."""
    r = stock_ratio(stock_cosine(stock_gram(theta0, thetas, filter_wise), len(thetas)), len(thetas))
    return combine(theta0.clone(), thetas, *stock_coefficients(r, theta0.shape, filter_wise))


# ---------------------------------------------------------------------------------------------- their steps
def slerp_coefficients(t: float, g: Tensor) -> tuple[float, float]:
    """(s₀, s₁) of θ = s₀·θ₀ + s₁·θ₁ from the Gram matrix g of θ₀, θ₁ (mergekit's ``slerp``: a vector is
    normalised only when its norm exceeds 1e-8; linear interpolation above the threshold), rounded to float32 as
    mergekit's are."""
    norms = [n if n > EPS else 1.0 for n in (math.sqrt(g[0, 0]), math.sqrt(g[1, 1]))]
    dot = float(g[0, 1]) / (norms[0] * norms[1])
    if abs(dot) > DOT_THRESHOLD:
        return f32(1.0 - t), f32(t)
    omega = math.acos(dot)
    return f32(math.sin(omega - omega * t) / math.sin(omega)), f32(math.sin(omega * t) / math.sin(omega))


def stock_cosine(g: Tensor, n: int) -> Tensor:
    """Model Stock's cos θ: the mean over pairs i < j of τᵢ·τⱼ / max(‖τᵢ‖‖τⱼ‖, 1e-6) clamped to [−1, 1]
    (mergekit's); `g` holds the τₖ's Gram matrices [..., N, N], float64."""
    norms = g.diagonal(dim1=-2, dim2=-1).sqrt()
    total = torch.zeros(g.shape[:-2], dtype=torch.float64)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for i, j in pairs:
        floor = (norms[..., i] * norms[..., j]).clamp(min=NORM_FLOOR)
        total += (g[..., i, j] / floor).clamp(-1.0, 1.0)
    return total / len(pairs)


def stock_ratio(cos: Tensor, n: int) -> Tensor:
    """Model Stock's r = N·cos θ / (1 + (N − 1)·cos θ)."""
    return n * cos / (1 + (n - 1) * cos)


def stock_coefficients(
    r: Tensor, shape: torch.Size | tuple[int, ...], filter_wise: bool
) -> tuple[Tensor, Tensor]:
    """(1 − r, r) in float32 as mergekit's (the base's coefficient, the mean's), shaped to broadcast over the
    tensor: one value, or (filter-wise) one per filter."""
    r32 = r.float()
    if filter_wise and len(shape) > 1:
        r32 = r32.unsqueeze(-1)
    return 1 - r32, r32


def gram(theta0: Tensor, others: list[Tensor]) -> Tensor:
    """The Gram matrix [m, m] (float64) of θ₀ and `others`, each summed over the whole tensor."""
    return total(row_gram([theta0, *others]))


def stock_gram(theta0: Tensor, thetas: list[Tensor], filter_wise: bool) -> Tensor:
    """The τₖ's Gram matrix: [N, N] over the whole tensor, or per filter [..., N, N] (filter-wise, 2-D and up)."""
    if filter_wise and theta0.dim() > 1:
        return row_gram(thetas, origin=theta0, along_last=True)
    return total(row_gram(thetas, origin=theta0))


def row_gram(xs: list[Tensor], origin: Tensor | None = None, along_last: bool = False) -> Tensor:
    """Per row (a slice along dim 0; `along_last`: along the last dimension, per filter) the Gram matrix of the
    tensors' rows less `origin`'s (the difference in float32, as mergekit's), [rows, m, m] in float64 (with
    `along_last`, shaped like the tensor without its last dim)."""
    shape = xs[0].shape
    last = along_last and len(shape) > 1
    width = shape[-1] if last else math.prod(shape[1:])
    flat = [x.reshape(-1, width) for x in xs]
    o = None if origin is None else origin.reshape(-1, width)
    rows, m = flat[0].shape[0], len(xs)
    out = torch.empty(rows, m, m, dtype=torch.float64)
    for rs in row_chunks(rows, width):
        ds = [(x[rs] if o is None else x[rs] - o[rs]).double() for x in flat]
        for i in range(m):
            for j in range(i, m):
                out[rs, i, j] = out[rs, j, i] = pairwise_row_sums(ds[i] * ds[j])
    return out.reshape(*shape[:-1], m, m) if last else out


def pairwise_row_sums(x: Tensor) -> Tensor:
    """Each row's sum, halves added to halves until one column is left: elementwise adds only, so a row's sum does
    not depend on the other rows or the thread count."""
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        y = x[:, :half] + x[:, half : 2 * half]
        if x.shape[1] % 2:
            y[:, 0] += x[:, 2 * half]
        x = y
    return x[:, 0]


def total(g: Tensor) -> Tensor:
    """The rows' Gram matrices [rows, m, m] added exactly (``math.fsum``, rounded once): [m, m]."""
    m = g.shape[-1]
    flat = g.reshape(-1, m * m).T.tolist()
    return torch.tensor([math.fsum(v) for v in flat], dtype=torch.float64).reshape(m, m)


def combine(base: Tensor, others: list[Tensor], s0: float | Tensor, s1: float | Tensor) -> Tensor:
    """s₀·θ₀ + s₁·(Σ others / their count), in place into `base`, row chunk by row chunk: mergekit's float32
    operations (the sum from the first model on, ÷ count, each product, then their sum) without a whole-tensor
    temporary. A coefficient may be a tensor of one value per row (or filter) of the chunk."""
    n = len(others)
    flat_b = base.view(base.shape[0] if base.dim() else 1, -1)
    flat_o = [o.reshape(flat_b.shape) for o in others]
    per_row = [isinstance(s, Tensor) and s.numel() > 1 for s in (s0, s1)]
    for rs in row_chunks(flat_b.shape[0], flat_b.shape[1]):
        mixed = flat_o[0][rs].clone() if n > 1 else flat_o[0][rs]
        for o in flat_o[1:]:
            mixed.add_(o[rs])
        if n > 1:
            mixed.div_(n)
        b = flat_b[rs].view(-1, *base.shape[1:])
        a, c = (s[rs] if p else s for s, p in zip((s0, s1), per_row))
        b.mul_(a).add_(mixed.view_as(b) * c)
    return base


def row_chunks(rows: int, width: int) -> Iterator[slice]:
    """Slices of whole rows of about :data:`CHUNK` entries."""
    step = max(1, CHUNK // max(1, width))
    for a in range(0, rows, step):
        yield slice(a, min(a + step, rows))


def f32(x: float) -> float:
    """`x` rounded to float32 (mergekit's scalars are)."""
    return torch.tensor(x, dtype=torch.float32).item()


# ---------------------------------------------------------------------------------------------- pre-passes
def slerp_prepare(params: dict, stream: Stream, shape: tuple[int, ...]) -> dict:
    """SLERP on row blocks: the Gram matrix of θ₀, θ₁ over the whole tensor, from every block's rows."""
    return {"gram": total(torch.cat([row_gram([r.base, r.finetuned]) for r in stream()]))}


def stock_prepare(params: dict, stream: Stream, shape: tuple[int, ...]) -> dict:
    """Model Stock on row blocks: the τₖ's Gram matrix over the whole tensor (filter-wise, a 2-D or larger tensor's
    filters lie in its rows: nothing to find)."""
    if params["filter_wise"] and len(shape) > 1:
        return {}
    return {"gram": total(torch.cat([row_gram(r.finetuned, origin=r.base) for r in stream()]))}


# ---------------------------------------------------------------------------------------------- methods
@merge_method(
    "slerp",
    models="one",
    ranges={"t": "(-inf, inf)"},  # beyond [0, 1] the great circle is extrapolated, as in mergekit
    streaming=Streaming(rows="blocks", tensor_prepare=slerp_prepare, reads_finetuned=True),
)
def slerp(base: Tensor, finetuned: Tensor, *, t: float, block: RowBlock | None = None) -> Tensor:
    """SLERP from the base (t = 0) to the fine-tuned model (t = 1) along the great circle through both, as
    mergekit's ``slerp`` (linear interpolation when they are nearly parallel, |cos Ω| > 0.9995).

    :func:`slerp_rule`, in place; on a row block with the angle its pre-pass found over the whole tensor."""
    g = gram(base, [finetuned]) if block is None else block.prepared["gram"]
    return combine(base, [finetuned], *slerp_coefficients(t, g))


@merge_method(
    "model_stock",
    min_models=2,
    streaming=Streaming(rows="blocks", tensor_prepare=stock_prepare, reads_finetuned=True),
)
def model_stock(
    base: Tensor,
    finetuned: list[Tensor],
    *,
    filter_wise: bool = False,
    name: str = "",
    block: RowBlock | None = None,
) -> Tensor:
    """Model Stock, of N ≥ 2 models: θ = r·θ̄ + (1 − r)·θ₀, r = N·cos θ / (1 + (N − 1)·cos θ) from the mean angle
    between the task vectors (mergekit's ``model_stock``; ``filter_wise``: one r per row of the last dimension).

    :func:`model_stock_rule`, in place; on a row block with the angles its pre-pass found over the whole tensor
    (filter-wise, each block's own rows)."""
    n = len(finetuned)
    local = block is None or "gram" not in block.prepared
    g = stock_gram(base, finetuned, filter_wise) if local else block.prepared["gram"]
    cos = stock_cosine(g, n)
    if ((n - 1) * cos + 1).abs().min() <= DEGENERATE:
        raise ForgetlessError(
            f"model_stock: the task vectors' mean cosine is −1/(N − 1) = {-1 / (n - 1):g}, where the ratio "
            "N·cos θ / (1 + (N − 1)·cos θ) has no value",
            tensor=name,
            remedy="merge fine-tuned models whose task vectors do not point in opposite directions",
        )
    r = stock_ratio(cos, n)
    return combine(base, finetuned, *stock_coefficients(r, base.shape, filter_wise))
