"""SLERP and Model Stock against mergekit's formulas, written out here op for op (``slerp.py``'s ``slerp`` in numpy
float32, ``model_stock.py``'s ``ModelStockMergeTask.execute`` in torch float32), and their mergekit configs.

What is compared, and how closely:
- the fallback to linear interpolation (|cos Ω| > 0.9995), t = 0 and t = 1: bit for bit;
- SLERP proper and Model Stock: forgetless sums the angles in float64, mergekit in float32, so the coefficients may
  differ by float32 rounding: each result within :data:`ULPS` float32 ulps of the largest |entry| (most bit for bit);
- a mergekit config merged on tiny model folders: every tensor equal, bit for bit, to the rule applied to it with
  the value of ``t`` mergekit's ``evaluate_setting`` gives it (written out), and to mergekit's formula as above.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import build_llama_with_tokenizer
from test_engine import perturbed_copy, tensors
from test_recipe_per_part import evaluate_setting, mergekit_t  # mergekit's, written out

import forgetless
from forgetless.engine import budget as engine_budget
from forgetless.engine import build_plan
from forgetless.errors import ForgetlessError
from forgetless.methods import METHODS
from forgetless.methods.interpolation import model_stock, model_stock_rule, slerp_rule

torch.set_num_threads(1)
ULPS = 8  # float32 ulps (of the largest |entry|) between forgetless and mergekit where their sums differ
LAYERS = 5


# ------------------------------------------------------------------------------------ mergekit, op for op
def mk_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, float]:
    """mergekit's ``slerp``: numpy float32, normalised copies, dot, lerp above 0.9995, else the sines' ratios on the
    unnormalised tensors. Also the dot it decided on."""
    a, b = v0.numpy().astype(np.float32), v1.numpy().astype(np.float32)
    a_copy, b_copy = np.copy(a), np.copy(b)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    a = a / na if na > 1e-8 else a
    b = b / nb if nb > 1e-8 else b
    dot = np.sum(a * b)
    if np.abs(dot) > 0.9995:
        return torch.from_numpy((1 - t) * a_copy + t * b_copy), float(dot)
    theta_0 = np.arccos(dot)
    sin_theta_0 = np.sin(theta_0)
    theta_t = theta_0 * t
    s0 = np.sin(theta_0 - theta_t) / sin_theta_0
    s1 = np.sin(theta_t) / sin_theta_0
    return torch.from_numpy(s0 * a_copy + s1 * b_copy), float(dot)


def mk_model_stock(w_0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """mergekit's ``ModelStockMergeTask.execute`` after gathering the tensors."""
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.view(-1), [w.view(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = (n * cos_theta) / (1 + (n - 1) * cos_theta)
    w_avg = sum(ws) / len(ws)
    return (t * w_avg + (1 - t) * w_0).reshape(out_shape)


def assert_near(got: torch.Tensor, want: torch.Tensor, what) -> None:
    scale = float(want.abs().max()) or 1.0
    assert (got - want).abs().max() <= ULPS * scale * 2**-23, what


# ------------------------------------------------------------------------------------------------ SLERP
def pairs():
    """(θ₀, θ₁, label): independent, correlated, nearly and exactly parallel, opposite, and zero tensors."""
    g = torch.Generator().manual_seed(0)
    for shape in ((301,), (40, 27), (6, 5, 7)):
        a = torch.randn(shape, generator=g)
        noise = torch.randn(shape, generator=g)
        for scale in (10.0, 1.0, 0.1, 0.03, 0.01, 1e-3):
            yield a, a + scale * noise, f"{shape} noise {scale}"
        yield a, 2.5 * a, f"{shape} parallel"
        yield a, -a, f"{shape} opposite"
        yield a, torch.zeros(shape), f"{shape} to zero"
        yield torch.zeros(shape), torch.zeros(shape), f"{shape} zeros"


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_slerp_rule_is_mergekits_formula(t):
    branches = set()
    for a, b, label in pairs():
        want, dot = mk_slerp(t, a, b)
        got = slerp_rule(a, b, t)
        lerp = abs(dot) > 0.9995
        branches.add(lerp)
        if lerp or t in (0.0, 1.0):
            assert torch.equal(got, want), label
        else:
            assert_near(got, want, label)
    assert branches == {True, False}  # both of mergekit's branches were met


def test_slerp_ends_are_the_models_and_the_fallback_is_linear():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 33, generator=g)
    for b in (a + 0.5 * torch.randn(64, 33, generator=g), a + 1e-3 * torch.randn(64, 33, generator=g)):
        assert torch.equal(slerp_rule(a, b, 0.0), a) and torch.equal(slerp_rule(a, b, 1.0), b)
    b = a * 1.01 + 1e-4 * torch.randn(64, 33, generator=g)  # cos Ω ≈ 1: (1 − t)·θ₀ + t·θ₁ in float32
    assert torch.equal(slerp_rule(a, b, 0.3), a * 0.7 + b * 0.3)
    c = torch.randn(64, 33, generator=g)  # nearly orthogonal: a great-circle arc, not a chord
    mid = slerp_rule(a, c, 0.5)
    assert mid.norm() > 1.3 * (0.5 * (a + c)).norm()


# ------------------------------------------------------------------------------------------ Model Stock
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_rule_is_mergekits_formula(n, filter_wise):
    g = torch.Generator().manual_seed(n)
    for shape in ((257,), (48, 31), (5, 6, 9)):
        w0 = torch.randn(shape, generator=g)
        shared = 0.05 * torch.randn(shape, generator=g)  # fine-tunes from one base share a direction
        ws = [w0 + shared + 0.05 * torch.randn(shape, generator=g) for _ in range(n)]
        assert_near(model_stock_rule(w0, ws, filter_wise), mk_model_stock(w0, ws, filter_wise), shape)


def test_model_stock_degenerate_cases_as_mergekit():
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(20, 11, generator=g)
    tau = 0.1 * torch.randn(20, 11, generator=g)
    for filter_wise in (False, True):
        # no task vector: ‖τᵢ‖‖τⱼ‖ floored at 1e-6, cos θ = 0, r = 0: the base
        assert torch.equal(model_stock_rule(w0, [w0.clone(), w0.clone()], filter_wise), w0)
        # one task vector twice: cos θ = 1, r = 1: the fine-tune (mergekit's float32 cosines may fall short of 1)
        same = model_stock_rule(w0, [w0 + tau, w0 + tau], filter_wise)
        assert torch.equal(same, w0 + tau)
        assert_near(same, mk_model_stock(w0, [w0 + tau, w0 + tau], filter_wise), filter_wise)
    # opposite task vectors: cos θ = −1 = −1/(N − 1), r = N·cos θ / 0 (mergekit: inf and NaN); refused
    with pytest.raises(ForgetlessError, match=r"−1/\(N − 1\)"):
        model_stock(w0.clone(), [w0 + tau, w0 - tau], name="w")
    assert not torch.isfinite(mk_model_stock(w0, [w0 + tau, w0 - tau], False)).all()


# ---------------------------------------------------------------------------------------- mergekit configs
@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """A tiny Llama of five decoder layers and three fine-tunes of it (θ₀ + noise), float32."""
    root = tmp_path_factory.mktemp("interp")
    base = build_llama_with_tokenizer(root / "base", layers=LAYERS)
    return root, base, [perturbed_copy(base, root / f"ft{i}", seed=i + 1, scale=0.02) for i in range(3)]


def merged(root: Path, config: dict, name: str, **kw) -> dict[str, torch.Tensor]:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    forgetless.merge(str(path), out=root / name, force=True, progress=False, **kw)
    return tensors(root / name)


SLERP_T = [  # as mergekit's README example: attention and MLP on opposite gradients, interpolated between layers
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0]},
    {"value": 0.5},
]


def slerp_config(base: Path, other: Path, t) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(other)}],
        "parameters": {"t": t},
        "dtype": "float32",
    }


def test_a_mergekit_slerp_config_is_the_rule_per_tensor_with_mergekits_t(family):
    root, base, fts = family
    out = merged(root, slerp_config(base, fts[0], SLERP_T), "slerp")
    b, f = tensors(base), tensors(fts[0])
    ts, branches = set(), set()
    for name, got in out.items():
        t = evaluate_setting(name, SLERP_T, mergekit_t(name, LAYERS))
        ts.add(t)
        assert torch.equal(got, slerp_rule(b[name], f[name], t)), name
        want, dot = mk_slerp(t, b[name], f[name])
        branches.add(abs(dot) > 0.9995)  # the norms' weights (≈ 1 + noise) fall back to linear
        assert_near(got, want, name)
    assert len(ts) >= 6 and branches == {True, False}


def test_slerp_written_as_one_slice_of_every_layer_is_the_models_form(family):
    """mergekit's slerp examples write `slices: [{sources: [{model, layer_range: [0, L]}, …]}]`: the same merge as
    `models:`, bit for bit; a slice of some layers only is still refused."""
    root, base, fts = family
    plain = merged(root, slerp_config(base, fts[0], SLERP_T), "plain")
    sources = [{"model": str(m), "layer_range": [0, LAYERS]} for m in (base, fts[0])]
    cfg = {k: v for k, v in slerp_config(base, fts[0], SLERP_T).items() if k != "models"}
    sliced = merged(root, {**cfg, "slices": [{"sources": sources}]}, "sliced")
    assert sliced.keys() == plain.keys() and all(torch.equal(sliced[n], plain[n]) for n in plain)
    part = [{**s, "layer_range": [0, LAYERS - 1]} for s in sources]
    with pytest.raises(ForgetlessError, match="layer slices"):
        merged(root, {**cfg, "slices": [{"sources": part}]}, "part")


def test_model_stock_from_mergekit_is_the_rule_per_tensor(family):
    root, base, fts = family
    b, fs = tensors(base), [tensors(f) for f in fts]
    for filter_wise in (False, True):
        cfg = {
            "merge_method": "model_stock",
            "base_model": str(base),
            "models": [{"model": str(f)} for f in fts],
            "parameters": {"filter_wise": filter_wise},
            "dtype": "float32",
        }
        out = merged(root, cfg, f"stock{filter_wise}")
        for name, got in out.items():
            ws = [f[name] for f in fs]
            assert torch.equal(got, model_stock_rule(b[name], ws, filter_wise)), name
            assert_near(got, mk_model_stock(b[name], ws, filter_wise), name)


def test_mergekit_configs_map_with_mergekits_defaults(family):
    _, base, fts = family
    plan = build_plan(slerp_config(base, fts[0], 0.3))
    assert plan.recipe.method == "slerp" and [m.model for m in plan.recipe.models] == [str(fts[0])]
    cfg = {"merge_method": "model_stock", "base_model": str(base), "models": [{"model": str(f)} for f in fts]}
    plan = build_plan(cfg)
    assert plan.recipe.method == "model_stock" and plan.params["filter_wise"] is False
    assert len(plan.models) == 3


@pytest.fixture
def small_allowances(monkeypatch):
    monkeypatch.setattr(engine_budget, "RUNTIME_BYTES", 0)
    monkeypatch.setattr(engine_budget, "PREFETCH_BYTES", 512)


def test_in_row_blocks_both_give_their_whole_tensor_result(family, small_allowances):
    root, base, fts = family
    stock = {"method": "model_stock", "base": str(base), "models": [str(f) for f in fts]}
    for name, recipe in (
        ("slerp", {"method": "slerp", "base": str(base), "models": [str(fts[1])], "parameters": {"t": 0.35}}),
        ("stock", stock),
        ("stockfw", {**stock, "parameters": {"filter_wise": True}}),
    ):
        whole = forgetless.merge(recipe, out=root / f"{name}-whole", progress=False, memory="1GiB")
        assert not whole.plan.block_rows
        split = forgetless.merge(recipe, out=root / f"{name}-blocks", progress=False, memory=400_000)
        assert "model.embed_tokens.weight" in split.plan.block_rows
        a, b = tensors(root / f"{name}-whole"), tensors(root / f"{name}-blocks")
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize(
    "change,key,words",
    [
        ({"models": 2}, "models", "exactly one other model, got 2"),
        ({"parameters": {}}, "parameters.t", "mergekit's slerp requires it"),
        ({"parameters": {"t": [{"filter": "mlp", "value": 0.2}]}}, "parameters.t", "no filter selects"),
        (
            {"parameters": {"t": 0.5, "weight": 1.0}},
            "parameters.weight",
            "not a parameter of mergekit's slerp",
        ),
        ({"base_model": None}, "base_model", "required"),
    ],
)
def test_slerp_config_refusals(family, change, key, words):
    _, base, fts = family
    cfg = {**slerp_config(base, fts[0], 0.5), **change}
    if change.get("models") == 2:
        cfg["models"] = [{"model": str(f)} for f in fts[:2]]
    with pytest.raises(ForgetlessError, match=f"{key}: .*{words}"):
        build_plan(cfg)


def test_model_stock_needs_two_fine_tuned_models(family):
    _, base, fts = family
    cfg = {"merge_method": "model_stock", "base_model": str(base), "models": [{"model": str(fts[0])}]}
    with pytest.raises(ForgetlessError, match="two or more other models, got 1"):
        build_plan(cfg)
    cfg["models"] = [{"model": str(fts[0]), "parameters": {"weight": 1.0}}, {"model": str(fts[1])}]
    with pytest.raises(ForgetlessError, match=r"models\[0\].parameters.weight: .*takes nothing"):
        build_plan(cfg)
    recipe = {"method": "model_stock", "base": str(base), "models": [str(fts[0])]}
    with pytest.raises(ForgetlessError, match="at least 2 fine-tuned models, got 1"):
        build_plan(recipe)


def test_methods_list_their_parameters_and_ranges():
    assert METHODS["slerp"].models == "one" and "t" in METHODS["slerp"].ranges
    assert METHODS["model_stock"].params == {"filter_wise": False} and METHODS["model_stock"].min_models == 2
    assert math.isinf(METHODS["slerp"].ranges["t"].hi)
