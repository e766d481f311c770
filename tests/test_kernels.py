"""The fused kernels (`methods/fast/_kernels.c`, wrapped by `methods/fast/kernels.py`) against the torch code each
replaces, bit for bit, on values chosen to break them: ±0, subnormals, ±∞, NaN, exact ties, every weight and λ
convention, cut splits inside a block, one to five models. The torch code is the reference (itself held against the
rules and brute force in test_select.py and test_methods.py); here it runs with the kernels switched off
(``kernels.ENABLED`` patched)."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from test_select import same_bits, stable_top

from forgetless.methods.fast import baselines, kernels, select
from forgetless.methods.fast.select import AbsDiff, Cut, top_k_cuts


def awkward(n: int, seed: int) -> torch.Tensor:
    """Gaussian values with ±0, subnormals, ±∞, NaN and exact repeats mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.rand(n, generator=g) < 0.1] = 0.0
    x[torch.rand(n, generator=g) < 0.05] = -0.0
    x[torch.rand(n, generator=g) < 0.05] = torch.finfo(torch.float32).tiny / 4
    x[torch.rand(n, generator=g) < 0.05] = 0.5  # exact ties
    x[torch.rand(n, generator=g) < 0.01] = math.inf
    x[torch.rand(n, generator=g) < 0.01] = -math.inf
    x[torch.rand(n, generator=g) < 0.01] = math.nan
    return x


@pytest.fixture
def torch_rule(monkeypatch):
    """Runs the code under test with the kernels switched off."""

    def off():
        monkeypatch.setattr(kernels, "ENABLED", False)

    return off


def test_the_kernels_are_built():
    assert kernels._kernels is not None, (
        "forgetless.methods.fast._kernels was not built: reinstall with a C compiler present (`pip install -e .`); "
        "the methods then fall back to torch, several times slower"
    )
    assert kernels.ENABLED == (os.environ.get("FORGETLESS_KERNELS", "1") != "0")  # =0: torch on purpose


def test_histogram_counts_the_top_bits_of_the_magnitudes():
    a, b = awkward(5000, 1), awkward(5000, 2)
    b[:300] = a[:300]  # exact zeros; ∞ − ∞ gives NaN
    x = (a - b).abs()
    keys = x.view(torch.int32)[~x.isnan()] >> 16
    hist = kernels.histogram(a, b, torch.zeros(select.BINS, dtype=torch.int64))
    assert torch.equal(hist, torch.bincount(keys, minlength=select.BINS))
    kernels.histogram(a[:17], b[:17], hist)  # adds to what is there
    assert int(hist.sum()) == int((~x.isnan()).sum()) + int((~x[:17].isnan()).sum())


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("diff", [False, True])
def test_count_gather_equals_compares_and_nonzero(largest, diff):
    a, b = awkward(3001, 3), awkward(3001, 4)  # odd length: the vector loop and its scalar tail
    x = (a - b).abs() if diff else a
    values, index = torch.empty(3001), torch.empty(3001, dtype=torch.int32)
    finite = x[torch.isfinite(x)].sort().values
    for lo, hi in [
        (-math.inf, math.inf),
        (float(finite[100]), float(finite[2000])),
        (0.0, 0.0),
        (0.5, 0.5),
        (-math.inf, float(finite[5])),
        (float(finite[-3]), math.inf),
        (math.inf, math.inf),
        (1.0, -1.0),
    ]:
        beyond, k = kernels.count_gather(a, b if diff else None, lo, hi, largest, values, index)
        assert beyond == int((x > hi).sum() if largest else (x < lo).sum()), (lo, hi)
        at = ((x >= lo) & (x <= hi)).nonzero().view(-1)
        assert k == at.numel() and torch.equal(index[:k].long(), at) and same_bits(values[:k], x[at]), (
            lo,
            hi,
        )


def reference_ties(base, fts, cuts, offset, weights, lambda_, sign, convention, torch_rule):
    torch_rule()
    return baselines.trim_and_combine(base.clone(), fts, cuts, offset, weights, lambda_, sign, convention)


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize(
    "weights, lambda_, sign, convention",
    [
        ("ones", 1.0, "total", "mergekit"),
        ("ones", 0.7, "total", "mergekit"),
        ("mixed", 1.0, "total", "mergekit"),  # weights below and above 1: den + (den == 0)
        ("large", 1.3, "total", "mergekit"),  # every weight ≥ 1: max(den, 1)
        ("mixed", 0.6, "frequency", "mergekit"),
        ("ones", 1.0, "frequency", "peft"),  # PEFT's rule where it is mergekit's: the kernel runs
    ],
)
def test_the_ties_kernel_is_the_torch_rule_bit_for_bit(
    monkeypatch, torch_rule, m, weights, lambda_, sign, convention
):
    n = 5000  # several of the kernel's blocks and a partial one
    base = awkward(n, 10 + m)
    base[torch.isinf(base) | torch.isnan(base)] = 1.0
    fts = [base + awkward(n, 20 + k) * 0.25 for k in range(m)]
    w = {"ones": [1.0] * m, "mixed": [0.3, 1.0, 2.5, 0.8, 1.0][:m], "large": [1.0, 2.0, 1.5, 3.0, 1.0][:m]}[
        weights
    ]
    vals = (fts[0] - base).abs()
    finite = vals[torch.isfinite(vals)].sort().values
    picks = [
        Cut(float(finite[len(finite) // 2]), 1 << 62, every_tie=True),  # every tie kept
        Cut(0.5 * 0.25, 2345, every_tie=False),  # ties kept up to flat index 2345 (mid-block)
        Cut(-math.inf, 1 << 62, every_tie=True),  # every entry (density 1)
        Cut(math.inf, -1),  # none
        Cut(float(finite[10]), 1030),
    ]
    cuts = [picks[k % len(picks)] for k in range(m)]
    for offset in (0, 1000):  # a row block whose first entry is at flat index 1000
        want = reference_ties(base, fts, cuts, offset, w, lambda_, sign, convention, torch_rule)
        monkeypatch.setattr(kernels, "ENABLED", True)
        fused = kernels.fits(base)
        got = baselines.trim_and_combine(base.clone(), fts, cuts, offset, w, lambda_, sign, convention)
        assert fused and same_bits(got, want), offset
        assert int(torch.isnan(got).sum()) > 0  # NaN and ∞ met on the way, as the torch code meets them


def test_peft_s_rule_with_unequal_weights_stays_with_torch(monkeypatch):
    """The kernel runs mergekit's order of operations; PEFT's differs once a weight or λ is not 1 (a fused
    multiply-add), so that case is left to torch — the kernel is never asked for it."""
    called = []
    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "ties", lambda *a, **k: called.append(1))
    base = torch.randn(100)
    fts = [base + torch.randn(100) for _ in range(2)]
    cuts = [Cut(-math.inf, 1 << 62, every_tie=True)] * 2
    baselines.trim_and_combine(base.clone(), fts, cuts, 0, [0.5, 1.0], 1.0, "total", "peft")
    baselines.trim_and_combine(base.clone(), fts, cuts, 0, [1.0, 1.0], 0.5, "total", "peft")
    assert not called
    baselines.trim_and_combine(base.clone(), fts, cuts, 0, [1.0, 1.0], 1.0, "total", "peft")
    assert called


@pytest.mark.parametrize("kernels_on", [True, False], ids=["histogram", "sampled"])
def test_the_histogram_bracket_selects_exactly_what_a_stable_sort_does(monkeypatch, kernels_on):
    monkeypatch.setattr(select, "CHUNK", 256)  # many chunks per piece
    monkeypatch.setattr(kernels, "ENABLED", kernels_on)
    n = 6000
    a = [awkward(n, 30), torch.round(awkward(n, 31) * 4) / 4, torch.zeros(n)]  # ties everywhere; all zero
    b = [awkward(n, 32), torch.zeros(n), torch.zeros(n)]
    b[0][:50] = a[0][:50]
    xs = [(x - y).abs() for x, y in zip(a, b)]
    for k in (1, 2, 999, n // 2, n - 70, n - 1):
        for bounds in ([0, n], [0, 1, 2500, 2501, n]):  # pieces: a whole tensor, uneven row blocks
            passes: list[int] = []

            def pieces(bounds=bounds, passes=passes):
                passes.append(1)
                for s, e in itertools.pairwise(bounds):
                    yield [AbsDiff(x[s:e], y[s:e]) for x, y in zip(a, b)], s

            ks = [min(k, int((~x.isnan()).sum())) for x in xs]  # NaN: never selected
            cuts = top_k_cuts(pieces, ks, n, sample=16, histogram=True)
            for cut, x, kx in zip(cuts, xs, ks):
                assert torch.equal(cut.mask(x), stable_top(x, kx, True)), (k, bounds)
            if kernels_on:  # the histogram's bracket never misses: it and the counting pass, no third
                assert len(passes) == 2
