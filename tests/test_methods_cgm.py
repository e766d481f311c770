"""CGM (soft mixing) and CGM† (hard mixing) against their objective, closed forms and brute-force selections, and the
registered methods against their rules (`cgm_rule`, `cgm_dagger_rule`) bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_llama, save_statistics_for
from safetensors.torch import load_file

import forgetless
from forgetless.methods.cgm import cgm, cgm_dagger, cgm_dagger_mask, cgm_dagger_rule, cgm_rule
from forgetless.methods.registry import METHODS, Rows

SHAPE = (12, 20)


def _weights(shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, base + torch.randn(shape, generator=g)


def _fishers(shape=SHAPE, seed=1, lo=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 3 + lo, torch.rand(shape, generator=g) * 3 + lo


def _soft(base, ft, ftask, fgen, **kw):
    return cgm(base.clone(), ft.clone(), fisher_task=ftask.clone(), fisher_general=fgen.clone(), **kw)


def _hard(base, ft, ftask, fgen, **kw):
    return cgm_dagger(base.clone(), ft.clone(), fisher_task=ftask.clone(), fisher_general=fgen.clone(), **kw)


def test_registrations():
    for name in ("cgm", "cgm_dagger", "cgm_plus"):
        spec = METHODS[name]
        assert spec.models == "one" and spec.needs == ("fisher_task", "fisher_general")
    assert METHODS["cgm_plus"] is METHODS["cgm_dagger"]
    assert METHODS["cgm"].params == {"alpha": 0.2, "epsilon": 0.0}
    assert METHODS["cgm_dagger"].params == {
        "keep": 0.95,
        "alpha": 1.0,
        "score": "cgm",
        "budget": "row",
        "revert": "budget",
        "threshold": None,
    }
    assert METHODS["cgm_dagger"].streaming.prepare is not None


# ------------------------------------------------------------------------------------------------ CGM (soft)
def _objective(theta, base, ft, ftask, fgen, alpha):
    t = theta.double()
    return (
        0.5 * (ftask.double() * (t - ft.double()) ** 2).sum()
        + 0.5 * alpha * (fgen.double() * (t - base.double()) ** 2).sum()
    )


def test_soft_mixing_minimises_the_two_quadratics():
    base, ft = _weights()
    ftask, fgen = _fishers()
    alpha = 0.2
    out = _soft(base, ft, ftask, fgen, alpha=alpha)
    grad = ftask.double() * (out.double() - ft.double()) + alpha * fgen.double() * (
        out.double() - base.double()
    )
    scale = ftask.double() * ft.double().abs() + alpha * fgen.double() * base.double().abs()
    assert (grad.abs() / scale).max() < 1e-5
    best = _objective(out, base, ft, ftask, fgen, alpha)
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        assert _objective(out + 1e-2 * torch.randn(SHAPE, generator=g), base, ft, ftask, fgen, alpha) > best


def test_soft_mixing_closed_form():
    base, ft = _weights()
    ftask, fgen = _fishers()
    for alpha, eps in ((0.2, 0.0), (1.0, 0.0), (3.0, 0.5)):
        m = ftask.double() / (ftask.double() + alpha * fgen.double() + eps)
        want = base.double() + m * (ft.double() - base.double())
        torch.testing.assert_close(
            _soft(base, ft, ftask, fgen, alpha=alpha, epsilon=eps).double(), want, rtol=0, atol=1e-6
        )


def test_soft_mixing_limits_of_alpha():
    base, ft = _weights()
    ftask, fgen = _fishers()
    ftask[0] = 0.0  # no task curvature: θ₀ whatever α
    out = _soft(base, ft, ftask, fgen, alpha=1e-12)
    torch.testing.assert_close(out[1:], ft[1:], rtol=0, atol=1e-6)
    assert torch.equal(out[0], base[0])
    torch.testing.assert_close(_soft(base, ft, ftask, fgen, alpha=1e12), base, rtol=0, atol=1e-6)


def test_soft_mixing_zero_over_zero_keeps_the_base_exactly():
    base, ft = _weights()
    ftask, fgen = _fishers()
    ftask[:, :5] = 0.0
    fgen[:, :5] = 0.0
    fgen[:, 5:8] = 0.0  # F_task > 0, F_gen = 0: m = 1, θ_ft exactly
    out = _soft(base, ft, ftask, fgen)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :5], base[:, :5])
    assert torch.equal(out[:, 5:8], ft[:, 5:8])
    zero = torch.zeros(SHAPE)
    assert torch.equal(_soft(base, ft, zero, zero), base)


def test_soft_mixing_gives_its_rule_s_bits():
    base, ft = _weights(seed=5)
    ftask, fgen = _fishers(seed=6, lo=0.0)
    ftask.view(-1)[:40] = 0.0  # 0/0 where F_gen is 0 too: θ₀
    fgen.view(-1)[20:60] = 0.0
    ftask.view(-1)[60:70] = -0.5  # not a Fisher: counts as 0
    for alpha, epsilon in ((0.2, 0.0), (1.0, 1e-3), (0.0, 0.0)):
        want = cgm_rule(base, ft, ftask, fgen, alpha, epsilon)
        assert torch.equal(_soft(base, ft, ftask, fgen, alpha=alpha, epsilon=epsilon), want), (alpha, epsilon)


# ------------------------------------------------------------------------------------------------ CGM† (hard)
def _score(base, ft, ftask, fgen, alpha, score):
    d2 = (ft.double() - base.double()) ** 2
    return {
        "cgm": (alpha * fgen.double() - ftask.double()) * d2,
        "delta2": d2,
        "task": -ftask.double() * d2,
        "general": alpha * fgen.double() * d2,
    }[score]


def _brute_keep(s_rows, keep):
    """Per row, Python's sorted on (score, column): the first int(in·keep) keep θ_ft."""
    mask = torch.zeros(s_rows.shape, dtype=torch.bool)
    n = s_rows.shape[1]
    for r in range(s_rows.shape[0]):
        order = sorted(range(n), key=lambda j: (float(s_rows[r, j]), j))
        mask[r, order[: int(n * keep)]] = True
    return mask


@pytest.mark.parametrize("score", ["cgm", "delta2", "task", "general"])
def test_hard_mixing_keeps_the_lowest_scores_per_row(score):
    base, ft = _weights()
    ftask, fgen = _fishers()
    alpha, keep = 0.7, 0.75
    out = _hard(base, ft, ftask, fgen, alpha=alpha, keep=keep, score=score)
    kept = out == ft
    assert torch.equal(
        kept | (out == base), torch.ones(SHAPE, dtype=torch.bool)
    )  # every element is one or other
    assert kept.sum(1).tolist() == [math.floor(SHAPE[1] * keep)] * SHAPE[0]
    # the score in float32, as the method computes it, so that near-ties order alike
    s = _score(base, ft, ftask, fgen, alpha, score).float()
    assert torch.equal(kept, _brute_keep(s, keep))


def test_hard_mixing_default_is_the_published_rule():
    base, ft = _weights()
    ftask, fgen = _fishers()
    out = _hard(base, ft, ftask, fgen)
    want = _brute_keep(_score(base, ft, ftask, fgen, 1.0, "cgm").float(), 0.95)
    assert torch.equal(out, torch.where(want, ft, base))
    assert (out == ft).sum(1).tolist() == [int(20 * 0.95)] * SHAPE[0]


@pytest.mark.parametrize("shape", [(12, 20), (6, 4, 5), (20,)])
def test_hard_mixing_gives_its_rule_s_bits(shape):
    """The registered method (a selection per row, no sort) against the rule (a stable sort per row), with exact
    ties in the scores (Δ = 0 in many columns)."""
    base, ft = _weights(shape, seed=7)
    ft.view(-1)[::3] = base.view(-1)[::3]
    ftask, fgen = _fishers(shape, seed=8)
    for keep, alpha in ((0.95, 1.0), (0.5, 0.3), (0.0, 1.0), (1.0, 1.0)):
        want = cgm_dagger_rule(base, ft, ftask, fgen, keep, alpha)
        assert torch.equal(_hard(base, ft, ftask, fgen, keep=keep, alpha=alpha), want), (keep, alpha)


def test_hard_mixing_ties_keep_the_lower_columns_first():
    s = torch.zeros(3, 10)
    s[1, 4:] = -1.0  # six lowest at columns 4..9, then the tie at 0 goes to columns 0, 1
    s[2] = torch.tensor([3.0, 1, 1, 1, 1, 1, 1, 1, 1, -1])
    mask = cgm_dagger_mask(s, keep=0.8)
    assert mask[0].tolist() == [True] * 8 + [False] * 2
    assert mask[1].tolist() == [True, True, False, False] + [True] * 6
    assert mask[2].tolist() == [False] + [True] * 7 + [False, True]
    assert torch.equal(mask, _brute_keep(s, 0.8))
    # through the method: Δ = 0 except in column 0, so S = Δ² ties at 0 in columns 1..19
    base, _ = _weights()
    ftask, fgen = _fishers()
    ft = base.clone()
    ft[:, 0] += 1.0
    out = _hard(base, ft, ftask, fgen, score="delta2", keep=0.5)
    kept = torch.zeros(SHAPE, dtype=torch.bool)
    kept[:, 1:11] = True  # the 10 lowest (zeros) are columns 1..10; column 0 (S = 1) reverts
    assert torch.equal(out, torch.where(kept, ft, base))


def test_hard_mixing_tensor_budget_and_one_dimensional_tensors():
    base, ft = _weights()
    ftask, fgen = _fishers()
    keep = 0.6
    out = _hard(base, ft, ftask, fgen, keep=keep, budget="tensor")
    kept = out == ft
    assert int(kept.sum()) == int(base.numel() * keep)
    s = _score(base, ft, ftask, fgen, 1.0, "cgm").float()
    assert torch.equal(kept, _brute_keep(s.reshape(1, -1), keep).view(SHAPE))
    b1, f1, t1, g1 = base[0], ft[0], ftask[0], fgen[0]  # a bias: one row, budget row = budget tensor
    row = _hard(b1, f1, t1, g1, keep=keep)
    assert torch.equal(row, _hard(b1, f1, t1, g1, keep=keep, budget="tensor"))
    assert torch.equal(row == f1, _brute_keep(s[0:1], keep)[0])


def test_hard_mixing_revert_positive_reverts_exactly_where_the_score_is_positive():
    base, ft = _weights()
    ftask, fgen = _fishers()
    out = _hard(base, ft, ftask, fgen, revert="positive", keep=0.1)  # keep is ignored
    s = _score(base, ft, ftask, fgen, 1.0, "cgm").float()
    assert 0 < int((s > 0).sum()) < s.numel()
    assert torch.equal(out, torch.where(s > 0, base, ft))


def test_hard_mixing_keep_one_and_zero():
    base, ft = _weights()
    ftask, fgen = _fishers()
    for budget in ("row", "tensor"):
        assert torch.equal(_hard(base, ft, ftask, fgen, keep=1.0, budget=budget), ft)
        assert torch.equal(_hard(base, ft, ftask, fgen, keep=0.0, budget=budget), base)


def test_bad_options_are_refused():
    base, ft = _weights()
    ftask, fgen = _fishers()
    for kw in ({"score": "nope"}, {"budget": "global"}, {"revert": "all"}, {"keep": 1.5}, {"alpha": -1.0}):
        with pytest.raises(ValueError):
            _hard(base, ft, ftask, fgen, **kw)
    with pytest.raises(ValueError):
        _soft(base, ft, ftask, fgen, epsilon=-1.0)
    ftask[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _hard(base, ft, ftask, fgen)


# ------------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cgm")
    base = build_tiny_llama(root / "base", seed=0)
    ft = build_tiny_llama(root / "ft", seed=1)
    sd = load_file(str(base / "model.safetensors"))
    linear = {k: v for k, v in sd.items() if k.endswith("proj.weight") or k == "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    files = {}
    for name in ("fisher_task", "fisher_general"):
        stats = {k: torch.rand(v.shape, generator=g) for k, v in linear.items()}
        path = root / f"{name}.safetensors"
        save_statistics_for(base, path, stats)
        files[name] = (path, stats)
    return base, ft, files, sd, load_file(str(ft / "model.safetensors"))


@pytest.mark.parametrize(
    "method,params", [("cgm", {"alpha": 0.2}), ("cgm_plus", {"keep": 0.9, "alpha": 1.0})]
)
def test_engine_merges_in_scope_and_keeps_the_rest_finetuned(tiny, tmp_path, method, params):
    base, ft, files, b_sd, ft_sd = tiny
    recipe = {
        "method": method,
        "base": str(base),
        "models": [str(ft)],
        "parameters": params,
        "statistics": {k: str(p) for k, (p, _) in files.items()},
        "scope": {
            "include": ["language.layers[1:3]", "lm_head"],
            "outside": "finetuned",
            "no_statistics": "finetuned",
        },
    }
    report = forgetless.merge(recipe, out=tmp_path / "m", progress=False)
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    fn = METHODS[method].fn
    merged = 0
    for k, b in b_sd.items():
        in_scope = ".layers.1." in k or ".layers.2." in k or k == "lm_head.weight"
        if in_scope and k in files["fisher_task"][1]:
            want = fn(
                b.clone().float(),
                ft_sd[k].clone().float(),
                fisher_task=files["fisher_task"][1][k].clone(),
                fisher_general=files["fisher_general"][1][k].clone(),
                **params,
            )
            assert torch.equal(got[k], want.to(b.dtype)), k
            assert not torch.equal(got[k], ft_sd[k]), k
            merged += 1
        else:
            assert torch.equal(got[k], ft_sd[k]), k  # out of scope, or in scope without statistics (norms)
    assert merged == 2 * 7 + 1 and report.routes["method"][0] == merged


def test_report_counts_kept_reverted_and_mixed_elements_per_part(tiny, tmp_path):
    base, ft, files, b_sd, _ = tiny
    common = {
        "base": str(base),
        "models": [str(ft)],
        "statistics": {k: str(p) for k, (p, _) in files.items()},
        "scope": {
            "include": ["language.layers[1:3]", "lm_head"],
            "outside": "finetuned",
            "no_statistics": "finetuned",
        },
    }
    report = forgetless.merge(
        {**common, "method": "cgm_dagger", "parameters": {"keep": 0.9}}, out=tmp_path / "hard", progress=False
    )
    layers = [k for k in files["fisher_task"][1] if ".layers.1." in k or ".layers.2." in k]
    kept = sum(b_sd[k].shape[0] * int(b_sd[k].shape[1] * 0.9) for k in layers)
    numel = sum(b_sd[k].numel() for k in layers)
    assert report.counts["language.layers"] == {"kept": kept, "reverted": numel - kept}
    head = b_sd["lm_head.weight"]
    assert report.counts["lm_head"]["kept"] == head.shape[0] * int(head.shape[1] * 0.9)
    assert "reverted" in report.summary() and "reverted" in (tmp_path / "hard" / "README.md").read_text()
    # soft mixing: random positive Fishers mix every element; a zero task Fisher reverts it
    soft = forgetless.merge({**common, "method": "cgm"}, out=tmp_path / "soft", progress=False)
    c = soft.counts["language.layers"]
    assert c["mixed"] == numel - c["kept"] - c["reverted"] and c["mixed"] > 0.99 * numel


@pytest.mark.parametrize("keep", [0.9, 0.37])
def test_global_budget_keeps_the_lowest_scores_of_the_whole_model(tiny, tmp_path, keep):
    """One budget over every tensor in scope: exactly ⌊N·keep⌋ elements keep θ_ft, and they are the lowest scores of
    the whole model (brute force: all scores concatenated and sorted)."""
    base, ft, files, b_sd, ft_sd = tiny
    recipe = {
        "method": "cgm_dagger",
        "base": str(base),
        "models": [str(ft)],
        "parameters": {"keep": keep, "budget": "global"},
        "statistics": {k: str(p) for k, (p, _) in files.items()},
        "scope": {
            "include": ["language.layers[1:3]", "lm_head"],
            "outside": "finetuned",
            "no_statistics": "finetuned",
        },
    }
    report = forgetless.merge(recipe, out=tmp_path / "m", progress=False)
    names = [
        k for k in files["fisher_task"][1] if ".layers.1." in k or ".layers.2." in k or k == "lm_head.weight"
    ]
    scores = {
        k: (files["fisher_general"][1][k] - files["fisher_task"][1][k]) * (ft_sd[k] - b_sd[k]) ** 2
        for k in names
    }
    flat = torch.cat([scores[k].reshape(-1) for k in names])
    k = int(flat.numel() * keep)
    threshold = flat.sort().values[k - 1]
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    kept = 0
    for name in names:
        mask = scores[name] <= threshold
        want = torch.where(mask, ft_sd[name], b_sd[name])
        assert torch.equal(got[name], want), name
        kept += int(mask.sum())
    assert kept == k == sum(c["kept"] for c in report.counts.values())


def test_global_threshold_from_a_small_sample_is_exact():
    """The pre-pass brackets the answer from a sample and selects exactly inside the bracket: the threshold equals a
    full sort's, with a sample 100x smaller than the model."""
    from forgetless.methods.cgm import cgm_dagger_prepare

    g = torch.Generator().manual_seed(5)
    tensors = {
        f"t{i}": [torch.randn(n, generator=g) for _ in range(4)] for i, n in enumerate((30_000, 50_000, 777))
    }

    def stream():
        for name, (b, f, ft_, fg) in tensors.items():
            yield Rows(name, b.clone(), f.clone(), {"fisher_task": ft_.abs(), "fisher_general": fg.abs()})

    numel = sum(t[0].numel() for t in tensors.values())
    params = {
        "keep": 0.95,
        "alpha": 1.0,
        "score": "cgm",
        "budget": "global",
        "revert": "budget",
        "threshold": None,
    }
    got = cgm_dagger_prepare(params, stream, numel, sample=800)["threshold"]
    flat = torch.cat([((fg.abs() - ft_.abs()) * (f - b) ** 2) for b, f, ft_, fg in tensors.values()])
    assert got == float(flat.sort().values[int(numel * 0.95) - 1])
