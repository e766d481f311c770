"""Fisher merging and RegMean against their closed forms and independent least-squares solves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forgetless.methods.fisher import fisher, fisher_with_base
from forgetless.methods.registry import METHODS
from forgetless.methods.regmean import gram_shape, regmean, regmean_rule

SHAPE = (24, 20)


def _params(n=3, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) for _ in range(n)]


def _fishers(n=3, shape=SHAPE, seed=1, lo=0.05):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g) * 3 + lo for _ in range(n)]


def _c(ts):
    return [t.clone() for t in ts]


# ------------------------------------------------------------------------------------------------ Fisher
def test_fisher_registrations():
    f, fb = METHODS["fisher"], METHODS["fisher_with_base"]
    assert f.needs == ("fisher",) and f.per_model_needs == ("fisher",) and f.per_model == ("weight",)
    assert set(f.params) == {"weight", "epsilon", "normalize"}
    assert fb.needs == ("fisher_base", "fisher") and fb.per_model_needs == ("fisher",)
    assert set(fb.params) == {"weight", "base_weight", "epsilon", "normalize"}


def _objective(theta, params, fishers, weights):
    t = theta.double()
    return sum(w * (f.double() * (t - p.double()) ** 2).sum() for p, f, w in zip(params, fishers, weights))


def test_fisher_is_the_minimiser_of_the_weighted_quadratic():
    base, fts = _params()
    fs = _fishers()
    weights = [1.0, 0.5, 2.0]
    out = fisher(base, _c(fts), fisher=_c(fs), weight=weights)
    grad = sum(2 * w * f.double() * (out.double() - p.double()) for p, f, w in zip(fts, fs, weights))
    scale = sum(w * f.double() * p.double().abs() for p, f, w in zip(fts, fs, weights))
    assert (grad.abs() / scale).max() < 1e-5
    best = _objective(out, fts, fs, weights)
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        worse = _objective(out + 1e-2 * torch.randn(SHAPE, generator=g), fts, fs, weights)
        assert worse > best


def test_fisher_closed_form_and_weight_scales_the_fisher():
    base, fts = _params()
    fs = _fishers()
    out = fisher(base, _c(fts), fisher=_c(fs), weight=[2.0, 1.0, 1.0])
    doubled = fisher(base, _c(fts), fisher=[fs[0] * 2, fs[1], fs[2]], weight=[1.0, 1.0, 1.0])
    ref = (2 * fs[0] * fts[0] + fs[1] * fts[1] + fs[2] * fts[2]) / (2 * fs[0] + fs[1] + fs[2])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, doubled, rtol=1e-6, atol=1e-6)


def test_fisher_equal_fishers_give_the_plain_average():
    base, fts = _params()
    f = _fishers(1)[0]
    out = fisher(base, _c(fts), fisher=[f.clone() for _ in fts], weight=[1.0] * 3)
    torch.testing.assert_close(out, sum(fts) / 3, rtol=1e-5, atol=1e-6)


def test_fisher_zero_fisher_in_one_model_takes_the_others_value():
    base, fts = _params(2)
    fs = _fishers(2)
    mask = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)) < 0.3
    fs[0][mask] = 0
    out = fisher(base, _c(fts[:2]), fisher=_c(fs), weight=[1.0, 1.0])
    torch.testing.assert_close(out[mask], fts[1][mask], rtol=1e-6, atol=1e-6)
    ref = (fs[0] * fts[0] + fs[1] * fts[1]) / (fs[0] + fs[1])
    torch.testing.assert_close(out[~mask], ref[~mask], rtol=1e-5, atol=1e-6)


def test_fisher_all_zero_gives_the_weighted_average():
    base, fts = _params()
    fs = _fishers()
    mask = torch.rand(SHAPE, generator=torch.Generator().manual_seed(4)) < 0.3
    for f in fs:
        f[mask] = 0
    weights = [1.0, 2.0, 3.0]
    avg = sum(w * p for p, w in zip(fts, weights)) / 6
    out = fisher(base, _c(fts), fisher=_c(fs), weight=weights)
    torch.testing.assert_close(out[mask], avg[mask], rtol=1e-5, atol=1e-6)
    everywhere = fisher(base, _c(fts), fisher=[torch.zeros(SHAPE) for _ in fts], weight=weights)
    torch.testing.assert_close(everywhere, avg, rtol=1e-5, atol=1e-6)
    no_floor = fisher(base, _c(fts), fisher=[torch.zeros(SHAPE) for _ in fts], weight=weights, epsilon=0.0)
    torch.testing.assert_close(no_floor, avg, rtol=1e-5, atol=1e-6)


def test_fisher_is_invariant_to_the_fishers_scale_and_normalize_matches_by_hand():
    base, fts = _params()
    fs = _fishers()
    out = fisher(base, _c(fts), fisher=_c(fs), weight=[1.0] * 3)
    tiny = fisher(base, _c(fts), fisher=[f * 1e-12 for f in fs], weight=[1.0] * 3)
    torch.testing.assert_close(out, tiny, rtol=1e-5, atol=1e-6)
    scaled = [fs[0] * 100, fs[1], fs[2] * 0.01]
    for how, red in (("mean", torch.mean), ("max", torch.max)):
        got = fisher(base, _c(fts), fisher=_c(scaled), weight=[1.0] * 3, normalize=how)
        n = [f / red(f) for f in scaled]
        ref = sum(f * p for f, p in zip(n, fts)) / sum(n)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_fisher_with_base_is_one_more_term():
    base, fts = _params(2)
    fs = _fishers(3)
    out = fisher_with_base(
        base, _c(fts), fisher=_c(fs[1:]), fisher_base=fs[0].clone(), weight=[1.0, 2.0], base_weight=0.5
    )
    ref = (0.5 * fs[0] * base + fs[1] * fts[0] + 2 * fs[2] * fts[1]) / (0.5 * fs[0] + fs[1] + 2 * fs[2])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_fisher_rejects_bad_weights():
    base, fts = _params(2)
    with pytest.raises(ValueError):
        fisher(base, fts, fisher=_fishers(2), weight=[1.0, -1.0])
    with pytest.raises(ValueError):
        fisher(base, fts, fisher=_fishers(2), weight=[0.0, 0.0])


# ------------------------------------------------------------------------------------------------ RegMean
OUT, IN = 12, 10


def _regmean_case(n=3, tokens=(40, 25, 60), seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((t, IN)) * rng.uniform(0.5, 2.0, IN) for t in tokens[:n]]
    ws = [rng.standard_normal((OUT, IN)) for _ in range(n)]
    return xs, ws


def _t(a):
    return torch.tensor(a, dtype=torch.float32)


def _run(xs, ws, **kw):
    grams = [_t(x.T @ x) for x in xs]
    return (
        regmean(_t(ws[0]), [_t(w) for w in ws], gram=grams, weight=kw.pop("weight", [1.0] * len(ws)), **kw)
        .double()
        .numpy()
    )


def _stacked_lstsq(xs, ws, weights=None):
    weights = weights or [1.0] * len(xs)
    a = np.vstack([np.sqrt(lam) * x for x, lam in zip(xs, weights)])
    b = np.vstack([np.sqrt(lam) * x @ w.T for x, w, lam in zip(xs, ws, weights)])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


def test_regmean_registration_and_gram_shape():
    spec = METHODS["regmean"]
    assert spec.needs == ("gram",) and spec.per_model_needs == ("gram",) and spec.per_model == ("weight",)
    assert set(spec.params) == {"weight", "alpha", "ridge"} and spec.params["alpha"] == 0.9
    assert gram_shape((OUT, IN)) == (IN, IN) and gram_shape((OUT,)) is None


def test_regmean_alpha_1_is_the_stacked_least_squares_solution():
    xs, ws = _regmean_case()
    ref = _stacked_lstsq(xs, ws)
    np.testing.assert_allclose(_run(xs, ws, alpha=1.0), ref, rtol=0, atol=1e-5)
    weights = [1.0, 3.0, 0.5]
    np.testing.assert_allclose(
        _run(xs, ws, alpha=1.0, weight=weights), _stacked_lstsq(xs, ws, weights), rtol=0, atol=1e-5
    )


def test_regmean_alpha_0_is_the_per_feature_diagonal_average():
    xs, ws = _regmean_case()
    d = [np.diag(x.T @ x) for x in xs]  # [in] per model
    ref = sum(w * dk for w, dk in zip(ws, d)) / sum(d)  # column j weighted by Gₖ[j, j]
    np.testing.assert_allclose(_run(xs, ws, alpha=0.0), ref, rtol=0, atol=1e-5)


def test_regmean_intermediate_alpha_matches_the_formula():
    xs, ws = _regmean_case()
    alpha = 0.9
    gt = []
    for x in xs:
        g = x.T @ x
        gt.append(alpha * g + (1 - alpha) * np.diag(np.diag(g)))
    ref = sum(w @ g for w, g in zip(ws, gt)) @ np.linalg.inv(sum(gt))
    np.testing.assert_allclose(_run(xs, ws, alpha=alpha), ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_run(xs, ws), ref, rtol=0, atol=1e-5)  # 0.9 is the default


@pytest.mark.parametrize(
    "alpha, weights", [(0.9, [1.0, 1.0, 1.0]), (0.3, [1.0, 3.0, 0.5]), (1.0, [2.0, 0.0, 1.0])]
)
def test_regmean_solves_its_rule(alpha, weights):
    """The registered method (Cholesky, the system shared by every row) against the rule (one dense solve)."""
    xs, ws = _regmean_case()
    grams = [_t(x.T @ x) for x in xs]
    grams[1][:, 3] = grams[1][3, :] = 0.0  # an input feature model 1 never saw
    want = regmean_rule([_t(w) for w in ws], grams, weights, alpha, ridge=1e-6).double().numpy()
    got = regmean(
        _t(ws[0]), [_t(w) for w in ws], gram=[g.clone() for g in grams], weight=weights, alpha=alpha
    )
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-5)


def test_regmean_identical_models_are_a_fixed_point():
    xs, ws = _regmean_case()
    np.testing.assert_allclose(_run(xs, [ws[0]] * 3, alpha=0.5), ws[0], rtol=0, atol=1e-5)


def test_regmean_zero_input_feature_stays_finite_and_optimal_elsewhere():
    xs, ws = _regmean_case()
    j = 3
    for x in xs:
        x[:, j] = 0.0
    out = _run(xs, ws, alpha=1.0)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:, j], sum(ws)[:, j] / 3, rtol=0, atol=1e-6)  # unseen feature: the average
    keep = [i for i in range(IN) if i != j]
    reduced = _stacked_lstsq([x[:, keep] for x in xs], [w[:, keep] for w in ws])
    np.testing.assert_allclose(out[:, keep], reduced, rtol=0, atol=1e-5)
    exact = _run(xs, ws, alpha=1.0, ridge=0.0)  # no ridge: least squares on the singular system, still finite
    assert np.isfinite(exact).all()
    np.testing.assert_allclose(exact[:, keep], reduced, rtol=0, atol=1e-4)


def test_regmean_fewer_tokens_than_features_reaches_the_least_squares_minimum():
    xs, ws = _regmean_case(tokens=(4, 3, 2))  # Σ rank 9 < 10 features
    out = _run(xs, ws, alpha=1.0)
    assert np.isfinite(out).all()

    def loss(w):
        return sum(np.sum((x @ w.T - x @ wk.T) ** 2) for x, wk in zip(xs, ws))

    assert loss(out) == pytest.approx(loss(_stacked_lstsq(xs, ws)), rel=1e-5, abs=1e-6)


def test_regmean_without_gram_is_the_weighted_average():
    _, ws = _regmean_case()
    bias = [_t(w[:, 0]) for w in ws]
    out = regmean(bias[0], [b.clone() for b in bias], weight=[1.0, 1.0, 2.0])
    torch.testing.assert_close(out, (bias[0] + bias[1] + 2 * bias[2]) / 4)
    zero = regmean(_t(ws[0]), [_t(w) for w in ws], gram=[torch.zeros(IN, IN)] * 3, weight=[1.0] * 3)
    torch.testing.assert_close(zero, _t(sum(ws) / 3))


def test_regmean_rejects_mismatched_shapes_and_parameters():
    xs, ws = _regmean_case()
    grams = [_t(x.T @ x) for x in xs]
    with pytest.raises(ValueError, match="gram shape"):
        regmean(_t(ws[0]).T, [_t(w).T for w in ws], gram=grams, weight=[1.0] * 3)
    with pytest.raises(ValueError, match="alpha"):
        regmean(_t(ws[0]), [_t(w) for w in ws], gram=grams, weight=[1.0] * 3, alpha=1.5)
    with pytest.raises(ValueError, match="2-D"):
        regmean(
            torch.zeros(2, 3, 4), [torch.zeros(2, 3, 4)] * 3, gram=[torch.zeros(4, 4)] * 3, weight=[1.0] * 3
        )
