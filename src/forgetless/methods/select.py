"""Exact top-k selection over a tensor streamed in pieces: the k largest (or smallest) entries, ties broken by the
lower flat index first, as a stable sort would.

    cut = top_k_cut(lambda: iter([(a.reshape(-1), 0)]), k, a.numel())    # one piece: a tensor in memory
    keep = cut.mask(a.reshape(-1), 0)                                      # exactly k True

The same function serves a tensor in memory (one piece) and a tensor read in row blocks (many pieces, each with the
flat index of its first entry), so a method that selects gives the same result whether the engine hands it the
whole tensor or its blocks one at a time (:class:`Cut` carries everything a block needs: the k-th value and the flat
index of the last tie kept).

The answer is found without sorting and without holding more than one piece: a seeded random sample of every piece
brackets the k-th value (±6 standard errors of the sample quantile; the sample grows with the tensor so that about
:data:`GATHER` entries fall inside), one pass counts the entries beyond the bracket and gathers the values inside
it, and an exact selection runs on that small set. Only when the k-th value is tied and some of its ties are left
out does one more pass find the flat index of the last tie kept. A bracket that misses is detected, not trusted:
the pass is repeated with an unbounded bracket (every entry gathered).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

Pieces = Callable[[], Iterable[tuple[Tensor, int]]]  # each call: a fresh iterator of (flat piece, flat offset)
SAMPLE = 1 << 16  # the least sample for the bracket
GATHER = 1 << 22  # entries expected inside the bracket: the sample is sized for it (16 MiB of fp32 per selection)


@dataclass(frozen=True)
class Cut:
    """The k entries selected: every entry beyond ``value`` (above it for the largest, below for the smallest) and
    the entries equal to it at flat indices ≤ ``last`` (−1: none of them)."""

    value: float
    last: int
    largest: bool = True
    every_tie: bool = False  # every entry equal to `value` is selected (the common case: one compare per entry)

    def mask(self, piece: Tensor, offset: int = 0) -> Tensor:
        """Boolean mask of the selected entries of a flat `piece` whose first entry has flat index `offset`."""
        if self.every_tie:
            return piece >= self.value if self.largest else piece <= self.value
        keep = piece > self.value if self.largest else piece < self.value
        n = piece.numel()
        if self.last < offset:
            return keep
        ties = piece == self.value
        if self.last < offset + n - 1:
            ties[self.last - offset + 1:] = False
        return keep.logical_or_(ties)


_ALL = {True: Cut(-math.inf, 1 << 62, True), False: Cut(math.inf, 1 << 62, False)}  # k ≥ n: every entry
_NONE = {True: Cut(math.inf, -1, True), False: Cut(-math.inf, -1, False)}


def top_k_cut(pieces: Pieces, k: int, n: int, *, largest: bool = True, sample: int = SAMPLE) -> Cut:
    """The :class:`Cut` of the `k` largest (``largest``) or smallest entries among the `n` entries that
    ``pieces()`` yields, ties to the lower flat index. ``pieces`` is called once per pass (two; three if the
    sampled bracket misses). NaN entries are never selected nor counted (callers refuse them first)."""
    return top_k_cuts(lambda: (([p], o) for p, o in pieces()), [k], n, largest=largest, sample=sample)[0]


def top_k_cuts(pieces: Callable[[], Iterable[tuple[list[Tensor], int]]], ks: list[int], n: int, *,
               largest: bool = True, sample: int = SAMPLE) -> list[Cut]:
    """Several selections in the same passes: ``pieces()`` yields, per piece, one flat tensor per selection (all
    of one length, e.g. every model's |Δ| of the same rows) and their flat offset; selection j takes the ``ks[j]``
    largest / smallest of its `n` entries. One :class:`Cut` per selection, each as :func:`top_k_cut` finds it."""
    cuts: list[Cut | None] = [_ALL[largest] if k >= n else _NONE[largest] if k <= 0 else None for k in ks]
    todo = [j for j, c in enumerate(cuts) if c is None]
    if not todo:
        return cuts  # type: ignore[return-value]
    bounds = {j: (-math.inf, math.inf) for j in todo}
    # the bracket ±6/√s wide in quantile holds ≈ 12·n/√s entries: a sample of (12·n/GATHER)² keeps that near GATHER
    s_want = max(sample, math.ceil((12 * n / GATHER) ** 2))
    if n > 4 * s_want:  # a sampled bracket; below this size one exact pass is as cheap
        rate = s_want / n
        picks: dict[int, list[Tensor]] = {j: [] for j in todo}
        for i, (ps, _) in enumerate(pieces()):
            m = max(1, round(ps[0].numel() * rate)) if ps[0].numel() else 0
            if m:
                at = torch.randint(ps[0].numel(), (m,), generator=torch.Generator().manual_seed(i))
                for j in todo:
                    picks[j].append(ps[j][at])
        for j in todo:
            pool = torch.cat(picks[j])
            sz, margin = pool.numel(), 6.0 / math.sqrt(pool.numel())
            # the k-th largest lies near the (1 − k/n)-quantile, the k-th smallest near the (k/n)-quantile
            q = 1.0 - ks[j] / n if largest else ks[j] / n
            lo = float(pool.kthvalue(max(1, int((q - margin) * sz))).values) if q - margin > 0 else -math.inf
            hi = float(pool.kthvalue(min(sz, int((q + margin) * sz) + 1)).values) if q + margin < 1 else math.inf
            bounds[j] = (lo, hi)
        del picks
    found: dict[int, tuple[float, int, int]] = {}  # j -> (value, ties to keep, ties in all)
    while todo:
        beyond = dict.fromkeys(todo, 0)
        values: dict[int, list[Tensor]] = {j: [] for j in todo}
        for ps, _ in pieces():
            for j in todo:
                p, (lo, hi) = ps[j], bounds[j]
                beyond[j] += int(torch.count_nonzero(p > hi if largest else p < lo))
                values[j].append(p[(p >= lo) & (p <= hi)])
        missed = []
        for j in todo:
            vals = torch.cat(values.pop(j))
            r = ks[j] - beyond[j]  # the answer's rank among the gathered entries, from the top / bottom
            if not 1 <= r <= vals.numel():
                if bounds[j] == (-math.inf, math.inf):
                    raise AssertionError("top_k_cuts: the k-th entry was not found (NaN entries?)")
                missed.append(j)
                continue
            v = vals.kthvalue(vals.numel() - r + 1 if largest else r).values
            before = int(torch.count_nonzero(vals > v if largest else vals < v))
            found[j] = (float(v), r - before, int(torch.count_nonzero(vals == v)))  # every tie lies in the bracket
        todo = missed
        bounds.update(dict.fromkeys(missed, (-math.inf, math.inf)))  # a missed bracket: gather everything
    for j, (v, keep, ties) in found.items():
        if keep == ties:
            cuts[j] = Cut(v, 1 << 62, largest, every_tie=True)
    partial = {j: 0 for j, (v, keep, ties) in found.items() if keep < ties}  # j -> ties seen so far
    if partial:  # the flat index of the last tie kept: one more pass, until every such selection has found it
        for ps, offset in pieces():
            for j in list(partial):
                v, keep, _ = found[j]
                eq = ps[j] == v
                c = int(torch.count_nonzero(eq))
                if partial[j] + c >= keep:
                    at = int(eq.nonzero()[keep - partial[j] - 1]) + offset
                    cuts[j] = Cut(v, at, largest)
                    del partial[j]
                else:
                    partial[j] += c
            if not partial:
                break
    return cuts  # type: ignore[return-value]


def kth_largest(a: Tensor, k: int) -> Tensor:
    """The exact k-th largest value of a 1-D tensor (:func:`top_k_cut`: a sampled bracket and one selection on the
    few entries inside it, no sort). Same result as ``a.kthvalue(n − k + 1)``."""
    if k >= a.numel():
        return a.min()
    return torch.tensor(top_k_cut(one_piece(a), k, a.numel()).value, dtype=a.dtype)


def one_piece(flat: Tensor) -> Pieces:
    """``pieces`` for a tensor in memory."""
    def gen() -> Iterator[tuple[Tensor, int]]:
        yield flat, 0
    return gen
