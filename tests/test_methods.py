"""The baseline merge rules (`methods/baselines.py`) and the registered methods that run them, against PEFT's
merge_utils and brute-force loops written from the definitions, and against each other bit for bit."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils as peft

from forgetless.methods import METHODS, baselines
from forgetless.methods.baselines import (
    dare_linear,
    dare_ties,
    linear,
    task_arithmetic,
    ties,
    trim,
)
from forgetless.methods.fast.baselines import magnitude_trim
from forgetless.methods.fast.select import kth_largest


def _models(n=3, shape=(48, 40), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


def _copies(fts):
    return [f.clone() for f in fts]


def _ties(via):
    """TIES by the registered method (on copies, as the engine gives it) or by its rule, called alike."""
    if via == "method":
        return lambda base, fts, **kw: ties(base.clone(), _copies(fts), **kw)
    return lambda base, fts, weight, density, **kw: baselines.ties_rule(base, fts, weight, density, **kw)


def _same_bits(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_registry_exposes_methods_with_their_parameters():
    assert {"linear", "wise_ft", "task_arithmetic", "ties", "dare_linear", "dare_ties"} <= set(METHODS)
    ties_spec = METHODS["ties"]
    assert ties_spec.per_model == ("weight", "density")
    assert ties_spec.params["lambda"] == 1.0 and ties_spec.arg("lambda") == "lambda_"
    assert METHODS["dare_ties"].context == ("generator", "block")


@pytest.mark.parametrize("k_frac", [0.0, 0.001, 0.3, 0.5, 0.9, 1.0])
def test_kth_largest_matches_a_full_sort(k_frac):
    g = torch.Generator().manual_seed(1)
    for a in (
        torch.randn(1000, generator=g).abs(),
        torch.randn(600_000, generator=g).abs(),
        torch.randint(0, 50, (500_000,), generator=g).float(),
    ):  # many exact ties
        k = max(1, int(k_frac * a.numel()))
        assert kth_largest(a, k) == torch.sort(a, descending=True).values[k - 1]


@pytest.mark.parametrize("magnitude_trim", [trim, magnitude_trim], ids=["rule", "fast"])
def test_magnitude_trim_keeps_exactly_the_top_k_and_breaks_ties_by_index(magnitude_trim):
    base, (ft,) = _models(1, shape=(300, 700))
    delta = ft - base
    for density in (0.1, 0.5, 0.77):
        kept = magnitude_trim(delta.clone(), density)
        k = int(density * delta.numel())
        top = torch.topk(delta.abs().reshape(-1), k).indices
        expect = torch.zeros(delta.numel())
        expect[top] = delta.reshape(-1)[top]
        assert torch.equal(kept.reshape(-1), expect)
    ties_delta = torch.tensor([3.0, -1.0, 1.0, 1.0, -1.0, 0.5])
    assert magnitude_trim(ties_delta, 3 / 6).tolist() == [3.0, -1.0, 1.0, 0.0, 0.0, 0.0]


def test_linear_and_task_arithmetic_endpoints_are_bit_exact():
    base, fts = _models(1)
    for fn in (linear, task_arithmetic):
        assert torch.equal(fn(base.clone(), _copies(fts), weight=[1.0], lambda_=0.0), base)
        assert torch.equal(fn(base.clone(), _copies(fts), weight=[1.0], lambda_=1.0), fts[0])


def test_task_arithmetic_matches_peft():
    base, fts = _models(3)
    w = [0.3, 0.5, 1.2]
    ours = task_arithmetic(base.clone(), _copies(fts), weight=w, lambda_=1.0)
    ref = base + peft.task_arithmetic([f - base for f in fts], torch.tensor(w))
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)


def test_linear_is_wise_ft_over_the_weighted_average():
    base, fts = _models(2)
    ours = linear(base.clone(), _copies(fts), weight=[1.0, 3.0], lambda_=0.4)
    avg = (fts[0] * 1.0 + fts[1] * 3.0) / 4.0
    torch.testing.assert_close(ours, 0.6 * base + 0.4 * avg, rtol=0, atol=2e-6)


@pytest.mark.parametrize("via", ["method", "rule"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_peft(density, via):
    ties = _ties(via)
    base, fts = _models(3)
    ones = ties(base, fts, weight=[1.0] * 3, density=[density] * 3)
    ref = base + peft.ties([f - base for f in fts], torch.ones(3), density)
    torch.testing.assert_close(ones, ref, rtol=0, atol=2e-6)
    w = [0.4, 1.0, 1.7]  # unequal weights: PEFT's convention on request
    ours = ties(base, fts, weight=w, density=[density] * 3, convention="peft", lambda_=0.7)
    ref = base + 0.7 * peft.ties([f - base for f in fts], torch.tensor(w), density)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("via", ["method", "rule"])
def test_ties_mergekit_convention_against_an_elementwise_loop(via):
    base, fts = _models(3, shape=(7, 9), seed=4)
    w, density = [0.5, 2.0, 1.0], [0.6, 0.4, 0.8]
    ours = _ties(via)(base, fts, weight=w, density=density, lambda_=1.3)
    trimmed = []
    for f, d in zip(fts, density):  # trim by brute force: rank every |delta|
        delta = (f - base).reshape(-1)
        order = sorted(range(delta.numel()), key=lambda i: -abs(float(delta[i])))
        keep = set(order[: int(d * delta.numel())])
        trimmed.append([float(delta[i]) if i in keep else 0.0 for i in range(delta.numel())])
    expect = []
    for i in range(base.numel()):
        total = sum(wk * t[i] for wk, t in zip(w, trimmed))
        s = 1.0 if total >= 0 else -1.0
        agree = [(wk, t[i]) for wk, t in zip(w, trimmed) if t[i] * s > 0]
        mean = sum(wk * v for wk, v in agree) / sum(wk for wk, _ in agree) if agree else 0.0
        expect.append(float(base.reshape(-1)[i]) + 1.3 * mean)
    torch.testing.assert_close(ours.reshape(-1), torch.tensor(expect), rtol=0, atol=5e-6)


def test_dare_matches_peft_with_the_same_mask():
    base, fts = _models(3)
    w = [0.5, 1.0, 1.5]
    for density in (0.1, 0.7):
        ours = dare_linear(
            base.clone(),
            _copies(fts),
            weight=w,
            density=[density] * 3,
            generator=torch.Generator().manual_seed(11),
        )
        torch.manual_seed(11)
        ref = base + peft.dare_linear([f - base for f in fts], torch.tensor(w), density)
        torch.testing.assert_close(ours, ref, rtol=0, atol=4e-6)
        ours = dare_ties(
            base.clone(),
            _copies(fts),
            weight=w,
            density=[density] * 3,
            convention="peft",
            generator=torch.Generator().manual_seed(11),
        )
        torch.manual_seed(11)
        ref = base + peft.dare_ties([f - base for f in fts], torch.tensor(w), density)
        torch.testing.assert_close(ours, ref, rtol=0, atol=4e-6)


def test_dare_drops_the_expected_fraction_and_rescales_survivors():
    base, (ft,) = _models(1, shape=(400, 500))
    out = dare_linear(
        base.clone(), [ft.clone()], weight=[1.0], density=[0.3], generator=torch.Generator().manual_seed(0)
    )
    delta, got = ft - base, out - base
    kept = got != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005  # 200k Bernoulli(0.3) draws: 5 sigma ≈ 0.005
    torch.testing.assert_close(got[kept], delta[kept] / 0.3, rtol=1e-5, atol=1e-6)


def test_dare_l1_rescale_scales_the_survivors_to_the_task_vectors_l1_norm():
    """``rescale: l1`` (mergekit's): the kept entries ×‖Δ‖₁/‖Δ⊙m‖₁, taken here in float64 from the output's own
    mask; the same draws as ``rescale: true``, so both keep the same entries."""
    base, (ft,) = _models(1, shape=(300, 200))

    def drop(rescale):
        gen = torch.Generator().manual_seed(0)
        return dare_linear(
            base.clone(), [ft.clone()], weight=[1.0], density=[0.4], rescale=rescale, generator=gen
        )

    out = {r: drop(r) for r in (True, "l1")}
    delta = (ft - base).double()
    kept = (out["l1"] - base) != 0
    assert torch.equal(kept, (out[True] - base) != 0)
    factor = delta.abs().sum() / delta[kept].abs().sum()
    torch.testing.assert_close((out["l1"] - base)[kept].double(), delta[kept] * factor, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(out["l1"], out[True])  # ‖Δ‖₁-matching is not ×1/density


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_l1_on_row_blocks_is_the_whole_tensors_to_rounding(name):
    """In row blocks the L1 factor comes from the pre-pass (its masks drawn from copies of the blocks' generators,
    the norms summed block by block in float64): the same entries kept, the values to float32 rounding; with
    nothing dropped, bit for bit."""
    from test_engine_blocks import call, gens_for, on_blocks, resolved

    spec = METHODS[name]
    base, fts = _models(2, shape=(40, 30))
    for density, exact in ((0.5, False), (1.0, True)):
        params = resolved(name, 2, {"rescale": "l1", "density": density})
        whole = call(spec, params, base.clone(), _copies(fts), {}, None, gens_for(spec, 2, 0))
        for step in (1, 7):
            got = on_blocks(spec, params, base, fts, {}, step, 0)
            assert torch.equal(got != base, whole != base)  # the same entries kept
            if exact:
                assert torch.equal(got, whole)
            else:
                # the factor's last bit moves each output by at most an ulp or so of the tensor's scale
                scale = float(whole.abs().max())
                torch.testing.assert_close(
                    got, whole, rtol=0, atol=4 * torch.finfo(torch.float32).eps * scale
                )


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "task_arithmetic", "linear"])
def test_methods_are_deterministic_and_do_something(name):
    """Same inputs (and seed) give the same output, and the default parameters change the base."""
    base, fts = _models(2)
    spec = METHODS[name]
    kwargs = {spec.arg(p): ([v] * 2 if p in spec.per_model else v) for p, v in spec.params.items()}
    outs = []
    for _ in range(2):
        if "generator" in spec.context:
            kwargs["generator"] = torch.Generator().manual_seed(3)
        outs.append(spec.fn(base.clone(), _copies(fts), **kwargs))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], base)


@pytest.mark.parametrize("via", ["method", "rule"])
def test_frequency_sign_election(via):
    ties = _ties(via)
    base = torch.zeros(1)
    fts = [torch.tensor([v]) for v in (1.0, 1.0, -5.0)]
    # total: 1 + 1 − 5 < 0 → keeps −5; frequency: two positives → mean of the 1s
    assert ties(base, fts, weight=[1.0] * 3, density=[1.0] * 3).item() == -5.0
    assert ties(base, fts, weight=[1.0] * 3, density=[1.0] * 3, sign="frequency").item() == 1.0


def _awkward_models(n=3, shape=(33, 29), seed=12):
    """Coarse deltas (ties at every threshold), exact zeros and a −0 base: where an order of operations shows."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    base.view(-1)[:30] = -0.0
    fts = []
    for _ in range(n):
        d = torch.round(torch.randn(shape, generator=g) * 4) / 8
        d.view(-1)[torch.rand(d.numel(), generator=g) < 0.3] = 0.0
        fts.append(base + d)
    return base, fts


@pytest.mark.parametrize("models", [1, 3])
@pytest.mark.parametrize("convention", ["forgetless", "mergekit"])
def test_the_registered_sums_give_their_rule_s_bits(models, convention):
    """WiSE-FT, task arithmetic and DARE-linear as the engine runs them (in place, in chunks) against their rules."""
    base, fts = _awkward_models(models)
    w, density = [0.7, 1.0, 1.3][:models], [0.6, 0.3, 1.0][:models]
    got = linear(base.clone(), _copies(fts), weight=w, lambda_=0.35)
    assert _same_bits(got, baselines.wise_ft_rule(base, fts, w, 0.35))
    got = task_arithmetic(base.clone(), _copies(fts), weight=w, lambda_=0.9, convention=convention)
    assert _same_bits(got, baselines.task_arithmetic_rule(base, fts, w, 0.9, convention))

    def gens():
        return [torch.Generator().manual_seed(k) for k in range(models)]

    got = dare_linear(
        base.clone(),
        _copies(fts),
        weight=w,
        density=density,
        lambda_=0.9,
        convention=convention,
        generator=gens(),
    )
    assert _same_bits(
        got, baselines.dare_linear_rule(base, fts, w, density, 0.9, convention=convention, generator=gens())
    )


@pytest.mark.parametrize(
    "convention, sign", [("mergekit", "total"), ("mergekit", "frequency"), ("peft", "total")]
)
def test_the_registered_ties_and_dare_ties_give_their_rule_s_bits(convention, sign):
    base, fts = _awkward_models()
    w, density = [0.5, 1.0, 2.0], [0.6, 0.3, 1.0]
    got = ties(
        base.clone(), _copies(fts), weight=w, density=density, lambda_=0.8, sign=sign, convention=convention
    )
    assert _same_bits(got, baselines.ties_rule(base, fts, w, density, 0.8, sign, convention))

    def gens():
        return [torch.Generator().manual_seed(k) for k in range(3)]

    for rescale, normalize in ((True, True), ("l1", False), (False, True)):
        got = dare_ties(
            base.clone(),
            _copies(fts),
            weight=w,
            density=density,
            lambda_=0.8,
            rescale=rescale,
            sign=sign,
            normalize=normalize,
            convention=convention,
            generator=gens(),
        )
        assert _same_bits(
            got,
            baselines.dare_ties_rule(
                base, fts, w, density, 0.8, rescale, sign, convention, gens(), normalize
            ),
        ), (rescale, normalize)
