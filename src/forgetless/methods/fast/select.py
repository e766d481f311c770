"""Exact top-k over a tensor streamed in pieces: the k largest (or smallest) entries, ties to the lower flat index
first, as a stable sort would — without sorting, and holding one piece at a time.

    cut = top_k_cut(lambda: iter([(a.reshape(-1), 0)]), k, a.numel())    # one piece: a tensor in memory
    keep = cut.mask(a.reshape(-1), 0)                                      # exactly k True

A tensor in memory is one piece; a tensor read in row blocks is many, each with the flat index of its first entry,
and both give the same :class:`Cut` (the k-th value and the flat index of the last tie kept), so a method selects
alike on whole tensors and on blocks. How (a bracket from a sample or a histogram, one counting pass, a selection
on the few entries inside the bracket) and what it costs: docs/methods-notes.md, "Exact streamed top-k".
NaN entries are never selected nor counted (callers refuse or propagate them first).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from . import kernels

Pieces = Callable[
    [], Iterable[tuple[Tensor, int]]
]  # each call: a fresh iterator of (flat piece, flat offset)
Sampler = Callable[[Tensor], list[Tensor]]  # flat indices -> the values there, one tensor per selection
SAMPLE = 1 << 12  # the least sample for the bracket (below 4× this many entries one exact pass is as cheap)
GATHER = (
    1 << 22
)  # entries at most expected inside the bracket: the sample grows for it (32 MiB: values, positions)
CHUNK = 1 << 19  # entries per operation: large enough that the per-call overhead (and GIL time) is small
BINS = 1 << 15  # the histogram of magnitudes: one bin per value of the top 16 bits of a non-negative float32
MARGIN = 4.0  # the bracket: ± this many standard errors of the sample quantile (a miss: 3× as wide)


@dataclass(frozen=True)
class AbsDiff:
    """|a − b| of two flat float tensors of one length, as a selection's piece: read chunk by chunk and never
    formed whole (the fused kernel reads `a` and `b` themselves; the torch rule forms each chunk in scratch).
    Sliced like a flat tensor (:func:`part`)."""

    a: Tensor
    b: Tensor

    def numel(self) -> int:
        return self.a.numel()

    def __getitem__(self, span: slice) -> AbsDiff:
        return AbsDiff(self.a[span], self.b[span])

    def index_select(self, dim: int, at: Tensor) -> Tensor:
        return self.a.index_select(dim, at).sub_(self.b.index_select(dim, at)).abs_()

    def into(self, out: Tensor) -> Tensor:
        return torch.sub(self.a, self.b, out=out).abs_()


Selections = Callable[
    [], Iterable[tuple[list[Tensor | AbsDiff], int]]
]  # per piece: one per selection, its offset


@dataclass(frozen=True)
class Cut:
    """The k entries selected: every entry beyond ``value`` (above it for the largest, below for the smallest) and
    the entries equal to it at flat indices ≤ ``last`` (−1: none of them)."""

    value: float
    last: int
    largest: bool = True
    every_tie: bool = (
        False  # every entry equal to `value` is selected (the common case: one compare per entry)
    )

    def split(self, n: int, offset: int) -> int:
        """How many leading entries of a piece of `n` entries at flat `offset` select the ties of ``value``."""
        return n if self.every_tie else min(n, max(0, self.last - offset + 1))

    def mask(self, piece: Tensor, offset: int = 0) -> Tensor:
        """Boolean mask of the selected entries of a flat `piece` whose first entry has flat index `offset`."""
        return self._into(piece, offset, torch.empty(piece.shape, dtype=torch.bool))

    @cached_property
    def below(self) -> float:
        """The float32 just below ``value`` toward −∞ (``value`` itself when infinite)."""
        if math.isinf(self.value):
            return self.value
        return float(torch.nextafter(torch.tensor(self.value, dtype=torch.float32), torch.tensor(-math.inf)))

    def trim(self, piece: Tensor, offset: int = 0, out: Tensor | None = None) -> Tensor:
        """`piece` with every entry whose magnitude is not selected set to 0, into `out` (may be `piece`), in one
        operation: ``hardshrink(x, l)`` keeps x where |x| > l, and for float32 |x| ≥ v ⇔ |x| > the float just
        below v. Kept entries are `piece`'s bit for bit; dropped ones are +0 (TIES never sees the sign of a
        dropped zero: agreement needs a nonzero entry)."""
        assert self.largest and piece.dtype == torch.float32, "Cut.trim: magnitudes of float32 entries"
        out = torch.empty_like(piece) if out is None else out
        n = piece.numel()
        at = self.split(n, offset)
        if at:
            torch.ops.aten.hardshrink.out(part(piece, 0, at), self.below, out=part(out, 0, at))
        if at < n:
            torch.ops.aten.hardshrink.out(part(piece, at, n), self.value, out=part(out, at, n))
        return out

    def _into(self, piece: Tensor, offset: int, out: Tensor) -> Tensor:
        n = piece.numel()
        at = self.split(n, offset)
        with_ties, without = (torch.ge, torch.gt) if self.largest else (torch.le, torch.lt)
        if at:
            with_ties(part(piece, 0, at), self.value, out=part(out, 0, at))
        if at < n:
            without(part(piece, at, n), self.value, out=part(out, at, n))
        return out


_ALL = {True: Cut(-math.inf, 1 << 62, True), False: Cut(math.inf, 1 << 62, False)}  # k ≥ n: every entry
_NONE = {True: Cut(math.inf, -1, True), False: Cut(-math.inf, -1, False)}


def top_k_cut(
    pieces: Pieces,
    k: int,
    n: int,
    *,
    largest: bool = True,
    sample: int = SAMPLE,
    sampler: Callable[[Tensor], Tensor] | None = None,
) -> Cut:
    """The :class:`Cut` of the `k` largest (``largest``) or smallest entries among the `n` entries that
    ``pieces()`` yields, ties to the lower flat index. ``pieces`` is called once per pass (two; three if the
    sampled bracket misses; one fewer with a ``sampler``, the values at given flat indices). NaN entries are never
    selected nor counted."""
    many = None if sampler is None else (lambda at: [sampler(at)])
    return top_k_cuts(
        lambda: (([p], o) for p, o in pieces()), [k], n, largest=largest, sample=sample, sampler=many
    )[0]


def sample_size(n: int, sample: int = SAMPLE) -> int:
    """Entries sampled to bracket the k-th of `n`: at least `sample`, about (3n)^⅔ (the sample's own selection
    and the one on the ≈ 12n/√s entries inside the bracket then cost alike), and enough that at most
    :data:`GATHER` entries fall inside."""
    return max(sample, math.ceil((3 * n) ** (2 / 3)), math.ceil((12 * n / GATHER) ** 2))


def top_k_cuts(
    pieces: Selections,
    ks: list[int],
    n: int,
    *,
    largest: bool = True,
    sample: int = SAMPLE,
    sampler: Sampler | None = None,
    histogram: bool = False,
) -> list[Cut]:
    """Several selections in the same passes: ``pieces()`` yields, per piece, one flat tensor per selection (all
    of one length, e.g. every model's |Δ| of the same rows) and their flat offset; selection j takes the ``ks[j]``
    largest / smallest of its `n` entries. One :class:`Cut` per selection, each as :func:`top_k_cut` finds it.
    ``sampler(at)``: the values of every selection at the flat indices `at` (else the first pass samples
    the pieces). ``histogram``: the pieces are :class:`AbsDiff` and the k-th largest is bracketed exactly, by the
    bin of a histogram of the magnitudes' top bits (:func:`_histograms`: one fused pass, the bracket never misses
    and holds a few thousandths of the entries), where the kernels take them; else as without."""
    cuts = {j: _ALL[largest] if k >= n else _NONE[largest] for j, k in enumerate(ks) if k >= n or k <= 0}
    todo = [j for j in range(len(ks)) if j not in cuts]
    if not todo:
        return [cuts[j] for j in range(len(ks))]
    unbounded = (-math.inf, math.inf)
    bounds = dict.fromkeys(todo, unbounded)
    pools: dict[int, Tensor] = {}
    s_want = sample_size(n, sample)
    hists = _histograms(pieces, todo) if histogram and largest and kernels.ENABLED else None
    if hists is not None:  # the bin of the k-th largest, exactly
        bounds = {j: _bin_bracket(hists[j], ks[j]) for j in todo}
    elif n > 4 * s_want:  # a sampled bracket; below this size one exact pass is as cheap
        pools = {
            j: p[~p.isnan()] for j, p in _sample(pieces, sampler, todo, n, s_want).items()
        }  # NaN: never selected
        bounds = {j: _bracket(pools[j], ks[j] / n, largest, MARGIN) for j in todo}
    while todo:
        tallies = _count_and_gather(pieces, todo, bounds, largest)
        missed = []
        for j in todo:
            t = tallies.pop(j)
            r = ks[j] - t.beyond  # the answer's rank among the gathered entries, from the top / bottom
            if 1 <= r <= t.values.numel():
                cuts[j] = t.cut(r, largest)
            elif bounds[j] == unbounded:
                raise AssertionError("top_k_cuts: the k-th entry was not found (NaN entries?)")
            else:  # a missed bracket (rare): once more, 3× as wide, then unbounded (every entry gathered)
                missed.append(j)
                wide = _bracket(pools[j], ks[j] / n, largest, 3 * MARGIN) if j in pools else unbounded
                pools.pop(j, None)
                bounds[j] = unbounded if wide == bounds[j] else wide
        todo = missed
    return [cuts[j] for j in range(len(ks))]


@dataclass
class _Tally:
    """One selection's counting pass as it goes: the entries beyond its bracket, and the values inside it with
    where they are (per chunk: its flat offset and how many it holds; per value: its index in its chunk)."""

    beyond: int = 0
    values: list[Tensor] = field(default_factory=list)
    local: list[Tensor] = field(default_factory=list)  # int32
    starts: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def add(self, piece: Tensor, inside: Tensor, offset: int) -> None:
        at = inside.nonzero().view(-1)
        if at.numel():
            self.gathered(piece.index_select(0, at), at.to(torch.int32), offset)

    def gathered(self, values: Tensor, local: Tensor, offset: int) -> None:
        """A chunk's entries inside the bracket (its own tensors) and their indices in the chunk at `offset`."""
        self.values.append(values)
        self.local.append(local)
        self.starts.append(offset)
        self.counts.append(local.numel())

    def done(self) -> _Gathered:
        values = torch.cat(self.values) if self.values else torch.empty(0)
        local = torch.cat(self.local) if self.local else torch.empty(0, dtype=torch.int32)
        return _Gathered(self.beyond, values, local, self.starts, self.counts)


@dataclass(frozen=True)
class _Gathered:
    """One selection's finished counting pass: :class:`_Tally`'s, the gathered values and their indices each in
    one tensor."""

    beyond: int
    values: Tensor
    local: Tensor  # int32
    starts: list[int]
    counts: list[int]

    def cut(self, r: int, largest: bool) -> Cut:
        """The cut whose last selected entry is the `r`-th of the gathered values from the top (``largest``) or
        bottom: every tie of that value lies inside the bracket, so the flat index of the last tie kept is
        found among the gathered ones (ties to the lower flat index)."""
        vals = self.values
        v = vals.kthvalue(vals.numel() - r + 1 if largest else r).values
        before = int(torch.count_nonzero(vals > v if largest else vals < v))
        tied = (vals == v).nonzero().view(-1)
        keep = r - before
        if keep == tied.numel():
            return Cut(float(v), 1 << 62, largest, every_tie=True)
        chunk = torch.searchsorted(torch.tensor(self.counts).cumsum(0), tied, right=True)
        flat = torch.tensor(self.starts).index_select(0, chunk) + self.local.index_select(0, tied)
        if not bool((flat[1:] > flat[:-1]).all()):  # pieces out of flat order
            flat = flat.sort().values
        return Cut(float(v), int(flat[keep - 1]), largest)


def _histograms(pieces: Selections, todo: list[int]) -> dict[int, Tensor] | None:
    """One fused pass (:func:`.kernels.histogram`): per selection in `todo`, how many of its entries fall in each
    of the :data:`BINS` bins of the top 16 bits of their float32 bits (NaN left out). None — having looked at the
    first piece only — unless every piece is an :class:`AbsDiff` the kernels take (magnitudes: no −0, and the
    bits order as the values)."""
    hists: dict[int, Tensor] | None = None
    for ps, _ in pieces():
        if hists is None:
            if not all(isinstance(ps[j], AbsDiff) and kernels.fits(ps[j].a, ps[j].b) for j in todo):
                return None
            hists = {j: torch.zeros(BINS, dtype=torch.int64) for j in todo}
        for j in todo:
            kernels.histogram(ps[j].a, ps[j].b, hists[j])
    return hists


def _bin_bracket(hist: Tensor, k: int) -> tuple[float, float]:
    """The bracket [lo, hi] of the bin that holds the k-th largest entry (every entry above `hi` lies in a higher
    bin): its least and greatest float32. Unbounded when fewer than k entries were counted (NaN left out)."""
    from_top = hist.flip(0).cumsum(0)  # entries in each bin and the bins above it
    top = int(torch.searchsorted(from_top, k))  # bins above the one that holds the k-th
    if top >= hist.numel():
        return -math.inf, math.inf
    b = hist.numel() - 1 - top
    return _float_bits(b << 16), _float_bits(min(b << 16 | 0xFFFF, 0x7F800000))  # bin 0x7F80: +∞ alone


def _float_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _bracket(pool: Tensor, frac: float, largest: bool, margin: float) -> tuple[float, float]:
    """(lo, hi) around the k-th largest (``largest``; else smallest) of a tensor, k = `frac` of its entries, from a
    uniform sample `pool` of it: the sample's quantiles ± `margin` standard errors (±margin/√s in quantile)."""
    sz = pool.numel()
    if not sz:
        return -math.inf, math.inf
    m = margin / math.sqrt(sz)
    q = 1.0 - frac if largest else frac  # the k-th largest lies near the (1 − k/n)-quantile
    lo = float(pool.kthvalue(max(1, int((q - m) * sz))).values) if q - m > 0 else -math.inf
    hi = float(pool.kthvalue(min(sz, int((q + m) * sz) + 1)).values) if q + m < 1 else math.inf
    return lo, hi


def chunks(n: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each chunk of :data:`CHUNK` entries of `n`."""
    for at in range(0, n, CHUNK):
        yield at, min(n, at + CHUNK)


def part(t: Tensor, at: int, stop: int) -> Tensor:
    """``t[at:stop]`` of a flat tensor, `t` itself when that is all of it (a slice costs microseconds, and the
    chunked loops take thousands)."""
    return t if at == 0 and stop == t.numel() else t[at:stop]


class _Buffers:
    """One-chunk buffers reused across the chunks of a pass (a fresh chunk-sized tensor costs page faults)."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def take(self, name: str, dtype: torch.dtype, m: int) -> Tensor:
        """The first `m` entries of buffer `name` (of at least :data:`CHUNK` entries of `dtype`)."""
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < m:
            buf = self._bufs[name] = torch.empty(max(m, CHUNK), dtype=dtype)
        return part(buf, 0, m)


def stratified(n: int, s: int, generator: torch.Generator) -> Tensor:
    """`s` flat indices into `n` entries (s ≤ n), one drawn uniformly in each of `s` consecutive strata of ⌊n/s⌋
    entries (the last n mod s entries are never drawn): ascending, and a quantile estimated from them varies no
    more than from an iid sample of that size."""
    s = min(s, n)
    width = n // s
    return torch.randint(width, (s,), generator=generator).add_(torch.arange(0, s * width, width))


def _sample(
    pieces: Selections, sampler: Sampler | None, todo: list[int], n: int, s: int
) -> dict[int, Tensor]:
    """About `s` entries of every selection in `todo`, a stratified uniform sample (:func:`stratified`; seeded: the
    same draw every time)."""
    g = torch.Generator().manual_seed(0)
    if sampler is not None:
        got = sampler(stratified(n, s, g))
        return {j: got[j] for j in todo}
    rate = s / n
    picks: dict[int, list[Tensor]] = {j: [] for j in todo}
    for ps, _ in pieces():
        m = max(1, round(ps[0].numel() * rate)) if ps[0].numel() else 0
        if m:
            at = stratified(ps[0].numel(), m, g)
            for j in todo:
                picks[j].append(ps[j].index_select(0, at))
    return {j: torch.cat(picks[j]) for j in todo}


def _count_and_gather(
    pieces: Selections, todo: list[int], bounds: dict[int, tuple[float, float]], largest: bool
) -> dict[int, _Gathered]:
    """One pass: per selection, the entries beyond its bracket (above `hi` for the largest, below `lo` for the
    smallest) counted, and the values inside it (NaN excluded) gathered with where they are."""
    tallies = {j: _Tally() for j in todo}
    bufs = _Buffers()
    for ps, offset in pieces():
        for at, stop in chunks(ps[0].numel()):
            for j in todo:
                _tally_chunk(tallies[j], part(ps[j], at, stop), *bounds[j], largest, offset + at, bufs)
    return {j: t.done() for j, t in tallies.items()}


def _tally_chunk(
    t: _Tally, p: Tensor | AbsDiff, lo: float, hi: float, largest: bool, offset: int, bufs: _Buffers
) -> None:
    """One chunk (flat index `offset` on) of the counting pass into `t`: in one fused pass
    (:func:`.kernels.count_gather`) where the kernels take it, else in torch operations."""
    a, b = (p.a, p.b) if isinstance(p, AbsDiff) else (p, None)
    m = a.numel()
    values = bufs.take("values", a.dtype, m)
    if kernels.fits(a) and (b is None or kernels.fits(b)):
        index = bufs.take("index", torch.int32, m)
        beyond, k = kernels.count_gather(a, b, lo, hi, largest, values, index)
        t.beyond += beyond
        if k:
            t.gathered(values[:k].clone(), index[:k].clone(), offset)
        return
    if isinstance(p, AbsDiff):  # |a − b| of this chunk, formed in a buffer
        p = p.into(bufs.take("diff", a.dtype, m))
    if (hi if largest else lo) != (math.inf if largest else -math.inf):
        t.beyond += int((torch.gt(p, hi, out=values) if largest else torch.lt(p, lo, out=values)).sum())
    # inside the bracket: where clamping to it changes nothing (never at NaN)
    inside = bufs.take("inside", torch.bool, m)
    t.add(p, torch.eq(torch.clamp(p, lo, hi, out=values), p, out=inside), offset)


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


def lowest_k_per_row(rows: Tensor, k: int) -> Tensor:
    """Boolean mask of the k lowest entries of each row of a 2-D tensor, ties at the k-th value to the lower column
    first, as a stable ascending sort would: one ``kthvalue`` per row and a count, no sort and no int64 index."""
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
