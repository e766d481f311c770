"""The exact streamed top-k (`methods/fast/select.py`) against brute force, and the fast TIES, DARE-TIES and task
arithmetic built on it (`methods/fast/baselines.py`) against their rules (`methods/baselines.py`).

Every selection is compared with a stable sort (ties to the lower flat index), the independent reference, on inputs
chosen to break a threshold search: many exact ties at the k-th value, zeros and ±0, denormals, a huge dynamic range,
NaN entries, a constant tensor, pieces of uneven sizes (a tensor read in row blocks), the sampled bracket and the
exact pass, with and without a caller's sampler, and chunks much smaller than a piece (``CHUNK`` patched) so that
every chunk boundary case is met on small data; each with the fused kernels (the histogram bracket, the fused count
and combine) and with torch alone. TIES is compared bit for bit (sign of zero included) with its rule, written on
whole tensors with a sort-based trim (itself held against PEFT and brute force in test_methods.py).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from forgetless.methods import baselines
from forgetless.methods.fast import baselines as fast
from forgetless.methods.fast import kernels, select
from forgetless.methods.fast.select import Cut, top_k_cut, top_k_cuts
from forgetless.methods.registry import RowBlock, Rows


def stable_top(x: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Mask of the k largest/smallest non-NaN entries, ties to the lower index, by a stable sort."""
    keep = ~torch.isnan(x)
    idx = keep.nonzero().view(-1)
    order = torch.sort(x[idx], descending=largest, stable=True).indices[:k]
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[idx[order]] = True
    return mask


def split(x: torch.Tensor, cuts: list[int]):
    bounds = [0, *cuts, x.numel()]
    return lambda: ((x[a:b], a) for a, b in itertools.pairwise(bounds))


def adversarial(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tiny = torch.finfo(torch.float32).tiny
    x = {
        "gaussian": torch.randn(n, generator=g),
        "few values": torch.randint(0, 5, (n,), generator=g).float(),  # every threshold is a tie
        "mostly zeros": torch.where(torch.rand(n, generator=g) < 0.8, 0.0, torch.randn(n, generator=g)),
        "signed zeros": torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)
        + torch.where(torch.rand(n, generator=g) < 0.1, 1.0, 0.0),
        "denormals": torch.randint(0, 7, (n,), generator=g).float() * tiny / 8,  # 0 and subnormal multiples
        "dynamic range": torch.randn(n, generator=g)
        * torch.exp2(torch.randint(-120, 120, (n,), generator=g).float()),
        "constant": torch.full((n,), 0.25),
        "quantized deltas": (torch.randn(n, generator=g) * 1e-3 + 1.0) - 1.0,  # multiples of an ulp of 1
    }
    x["with infinities"] = x["gaussian"].clone()
    x["with infinities"][:: max(1, n // 7)] = math.inf
    x["with infinities"][3 :: max(1, n // 5)] = -math.inf
    return x


@pytest.fixture(params=[True, False], ids=["kernels", "torch"])
def small_chunks(monkeypatch, request):
    """Chunks of 64 entries (and the samples of small tensors allowed): every piece spans many chunks. Each test
    runs twice: with the fused kernels (methods/fast/kernels.py) and with torch alone."""
    monkeypatch.setattr(select, "CHUNK", 64)
    monkeypatch.setattr(kernels, "ENABLED", request.param)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("sample", [16, 1 << 20])  # 16: a sampled bracket; 1<<20: the exact pass (n small)
def test_top_k_cut_equals_a_stable_sort_on_adversarial_inputs(small_chunks, largest, sample):
    n = 3000
    for name, x in adversarial(n).items():
        for k in (1, 2, 17, n // 2, n // 2 + 1, n - 1):
            want = stable_top(x, k, largest)
            for cuts in ([], [1], [64, 65, 1000], [999, 2999]):  # block-split tensors, uneven pieces
                cut = top_k_cut(split(x, cuts), k, n, largest=largest, sample=sample)
                got = torch.cat([cut.mask(p, o) for p, o in split(x, [130, 2000])()])
                assert torch.equal(got, want), (name, k, cuts)


def test_the_caller_s_sampler_gives_the_same_cut(small_chunks):
    n = 5000
    for name, x in adversarial(n, seed=1).items():
        for k in (3, n // 3, n - 5):
            calls: list[int] = []

            def pieces(x=x, calls=calls):
                calls.append(1)
                yield x, 0

            cut = top_k_cut(pieces, k, n, sample=16, sampler=lambda at, x=x: x[at])
            assert len(calls) == 1  # no sampling pass over the pieces
            assert torch.equal(cut.mask(x), stable_top(x, k, True)), (name, k)


def test_several_selections_in_one_pass_are_each_exact(small_chunks):
    n = 4000
    xs = list(adversarial(n, seed=2).values())[:4]
    ks = [1, n // 2, n - 1, 777]
    pieces = lambda: (([x[a:b] for x in xs], a) for a, b in itertools.pairwise([0, 1500, 1501, n]))
    for largest in (True, False):
        for cut, x, k in zip(top_k_cuts(pieces, ks, n, largest=largest, sample=16), xs, ks):
            assert torch.equal(cut.mask(x), stable_top(x, k, largest))


def test_nan_is_never_selected_nor_counted(small_chunks):
    """NaN entries are left out (as before this selection was rewritten); asking for more entries than the
    non-NaN ones is an error, not a silent answer."""
    n = 2000
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g)
    x[torch.randperm(n, generator=g)[:300]] = math.nan
    for largest in (True, False):
        for k in (1, 850, 1700):
            for sample in (16, 1 << 20):
                cut = top_k_cut(split(x, [999]), k, n, largest=largest, sample=sample)
                got = cut.mask(x)
                assert torch.equal(got, stable_top(x, k, largest)) and not torch.isnan(x[got]).any()
    with pytest.raises(AssertionError, match="NaN"):
        top_k_cut(split(x, []), 1800, n, sample=1 << 20)


def test_ties_at_the_k_th_value_are_kept_lowest_index_first_across_pieces(small_chunks):
    x = torch.zeros(1000)
    x[::3] = 1.0  # 334 ones: keep 100 of them, the first 100 in flat order
    cut = top_k_cut(split(x, [250, 251, 700]), 100, 1000, sample=16)
    assert cut.value == 1.0 and not cut.every_tie and cut.last == 3 * 99
    assert torch.equal(cut.mask(x), stable_top(x, 100, True))
    out = torch.empty(1000)
    assert cut.trim(x, 0, out) is out and int(torch.count_nonzero(out)) == 100


def test_pieces_out_of_flat_order_still_keep_the_lowest_flat_index():
    x = torch.tensor([5.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 9.0])
    pieces = lambda: iter([(x[4:], 4), (x[:4], 0)])  # the later rows first
    cut = top_k_cut(pieces, 4, 8, sample=1 << 20)
    assert cut.last == 2 and torch.equal(cut.mask(x), stable_top(x, 4, True))


def test_the_sample_grows_with_the_tensor():
    assert select.sample_size(10_000) == max(select.SAMPLE, math.ceil(30_000 ** (2 / 3)))
    big = 600_000_000
    assert select.sample_size(big) >= (12 * big / select.GATHER) ** 2  # at most ≈ GATHER entries gathered


# ----------------------------------------------------------------------------------------------- TIES
def ties_reference(base, fts, weight, density, lambda_, sign, convention):
    """The reference: TIES on whole tensors (:func:`forgetless.methods.baselines.ties_rule`)."""
    return baselines.ties_rule(base, fts, weight, density, lambda_, sign, convention)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))  # NaN, ±0 and all: bit for bit


@pytest.mark.parametrize(
    "params",
    [
        {
            "weight": [1.0] * 3,
            "density": [0.5] * 3,
            "lambda_": 1.0,
            "sign": "total",
            "convention": "mergekit",
        },
        {
            "weight": [0.5, 2.0, 1.0],
            "density": [0.6, 0.4, 0.8],
            "lambda_": 1.3,
            "sign": "total",
            "convention": "mergekit",
        },
        {
            "weight": [0.4, 1.0, 1.7],
            "density": [0.2, 0.2, 0.2],
            "lambda_": 0.7,
            "sign": "frequency",
            "convention": "peft",
        },
        {
            "weight": [1.0, 1.0],
            "density": [1.0, 0.01],
            "lambda_": 1.0,
            "sign": "total",
            "convention": "mergekit",
        },
    ],
)
def test_chunked_ties_equals_the_whole_tensor_rule_bit_for_bit(small_chunks, params):
    g = torch.Generator().manual_seed(5)
    shape = (37, 41)
    base = torch.randn(shape, generator=g)
    base.view(-1)[:40] = -0.0  # a −0 base keeps the sign of a zero update
    m = len(params["weight"])
    fts = []
    for i in range(m):
        d = torch.round(torch.randn(shape, generator=g) * 2) / 4  # coarse: ties at every threshold
        d.view(-1)[torch.rand(base.numel(), generator=g) < 0.3] = 0.0
        fts.append(base + d)
    fts[0].view(-1)[7] = math.nan  # propagates to that entry, as before: the engine then refuses the result
    want = ties_reference(base, fts, **params)
    for n_blocks in (1, 3):
        rows = [0, *[shape[0] * i // n_blocks for i in range(1, n_blocks)], shape[0]]
        if n_blocks == 1:
            got = baselines.ties(base.clone(), [f.clone() for f in fts], **params)
        else:
            prep = {"density": params["density"]}

            def stream(rows=rows):
                for a, b in itertools.pairwise(rows):
                    yield Rows("w", base[a:b].clone(), [f[a:b].clone() for f in fts], {}, a * shape[1])

            prepared = fast.ties_prepare(prep, stream, shape)
            got = torch.cat(
                [
                    baselines.ties(
                        base[a:b].clone(),
                        [f[a:b].clone() for f in fts],
                        **params,
                        block=RowBlock(a * shape[1], shape, prepared),
                    )
                    for a, b in itertools.pairwise(rows)
                ]
            )
        assert same_bits(got, want), n_blocks
    assert math.isnan(got.view(-1)[7]) and torch.isfinite(got.view(-1)[8:]).all()


def test_ties_leaves_the_fine_tuned_inputs_unchanged_and_writes_into_base():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(300, 500, generator=g)
    fts = [base + torch.randn(300, 500, generator=g) for _ in range(3)]
    before = [f.clone() for f in fts]
    b = base.clone()
    out = baselines.ties(b, fts, weight=[1.0] * 3, density=[0.5] * 3)
    assert out.data_ptr() == b.data_ptr()  # in place: no tensor-sized allocation for the result
    assert all(torch.equal(f, f0) for f, f0 in zip(fts, before))
    assert same_bits(out, ties_reference(base, before, [1.0] * 3, [0.5] * 3, 1.0, "total", "mergekit"))


def test_the_mask_keeps_what_it_says_on_every_split():
    x = torch.tensor([3.0, 1.0, 1.0, -0.0, 1.0, 0.0, 2.0, 1.0])
    for cut in (
        Cut(1.0, 2),
        Cut(1.0, 4),
        Cut(1.0, -1),
        Cut(1.0, 1 << 62, every_tie=True),
        Cut(0.0, 3, largest=False),
        Cut(0.0, 5, largest=False),
    ):
        for at in range(9):
            m = torch.cat([cut.mask(x[:at], 0), cut.mask(x[at:], at)])
            ref = (x > cut.value) if cut.largest else (x < cut.value)
            ties = (x == cut.value) & (torch.arange(8) <= cut.last)
            assert torch.equal(m, ref | ties), (cut, at)


def test_trim_zeroes_what_the_mask_of_the_magnitudes_drops(small_chunks):
    """Cut.trim (one hardshrink at the float below the cut) against the signed values times the mask of their
    magnitudes: the same values — kept entries bit for bit, ±0 alike — on every split, for cuts with some, every
    or none of their ties kept, at 0, at subnormals and at ±∞."""
    x = torch.tensor([3.0, -1.0, 1.0, -0.0, -1.0, 0.0, 2.0, 1.0, 1e-45, -1e-45, -2.0])
    cuts = [
        Cut(1.0, 2),
        Cut(1.0, 4),
        Cut(1.0, -1),
        Cut(1.0, 1 << 62, every_tie=True),
        Cut(0.0, 4),
        Cut(0.0, -1),
        Cut(1e-45, 8),
        Cut(-math.inf, 1 << 62),
        Cut(math.inf, -1),
        Cut(2.0, 6),
    ]
    for name, v in adversarial(500).items():
        if name != "with infinities":
            k = 137
            cut = top_k_cut(split(v.abs(), [100, 333]), k, v.numel())
            got = torch.cat([cut.trim(v[:250], 0), cut.trim(v[250:], 250)])
            want = v * stable_top(v.abs(), k, True)
            assert torch.equal(got, want) and int(torch.count_nonzero(got)) == int(
                torch.count_nonzero(want)
            ), name
    for cut in cuts:
        for at in range(x.numel() + 1):
            got = torch.cat([cut.trim(x[:at], 0), cut.trim(x[at:], at)])
            want = x * torch.cat([cut.mask(x[:at].abs(), 0), cut.mask(x[at:].abs(), at)])
            assert torch.equal(got, want), (cut, at)
            kept = want != 0
            assert same_bits(got[kept], x[kept])
    out = torch.empty_like(x)
    assert Cut(1.0, 2).trim(x, 0, out=out) is out


def test_dare_ties_combines_in_chunks_as_on_whole_tensors(small_chunks):
    """DARE-TIES shares the chunked sign election and disjoint mean: it gives its rule's bits (density 1: nothing
    dropped, so TIES's rule at density 1 too)."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(29, 31, generator=g)
    fts = [base + torch.round(torch.randn(29, 31, generator=g) * 4) / 8 for _ in range(3)]
    w = [0.5, 1.0, 2.0]
    got = baselines.dare_ties(
        base.clone(), [f.clone() for f in fts], weight=w, density=[1.0] * 3, lambda_=0.9
    )
    want = baselines.dare_ties_rule(base, fts, w, [1.0] * 3, 0.9)
    assert same_bits(got, want)
    assert same_bits(got, ties_reference(base, fts, w, [1.0] * 3, 0.9, "total", "mergekit"))


@pytest.mark.parametrize("convention", ["forgetless", "mergekit"])
def test_task_arithmetic_in_chunks_equals_the_whole_tensor_sum_and_reads_only(small_chunks, convention):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(23, 37, generator=g)
    base.view(-1)[:5] = -0.0
    fts = [base + torch.randn(23, 37, generator=g) * s for s in (0.1, 1.0, 0.0)]
    before = [f.clone() for f in fts]
    w, lam = [0.7, 1.0, 1.3], 0.9
    got = baselines.task_arithmetic(base.clone(), fts, weight=w, lambda_=lam, convention=convention)
    want = baselines.task_arithmetic_rule(base, before, w, lam, convention)
    deltas = [f - base for f in before]  # every Δ from θ₀ as it was, then summed in the convention's order
    if convention == "mergekit":
        mixed = deltas[0] * w[0]
        for d, wk in zip(deltas[1:], w[1:]):
            mixed = mixed + (d if wk == 1 else d * wk)
        by_hand = base + mixed * lam
    else:
        by_hand = base.clone()
        for d, wk in zip(deltas, w):
            by_hand.add_(d, alpha=lam * wk)
    assert same_bits(want, by_hand) and same_bits(got, want)
    assert all(torch.equal(f, f0) for f, f0 in zip(fts, before))  # the fine-tuned tensors are only read


def test_the_stratified_sample_takes_one_index_per_stratum():
    g = torch.Generator().manual_seed(10)
    for n, s in ((10, 10), (10, 3), (1_000_003, 19_171), (7, 100), (545_000_000, 2_700_000)):
        at = select.stratified(n, s, g)
        m = min(n, s)
        lo = torch.arange(m) * (n // m)
        assert at.numel() == m and bool(((at >= lo) & (at < lo + n // m)).all()), (
            n,
            s,
        )  # so strictly ascending
