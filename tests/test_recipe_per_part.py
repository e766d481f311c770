"""Method parameters given per part in a recipe: each tensor merged with the value of the first entry that selects
it (against brute-force formulas and the methods called per tensor), the refusals, the model card's table, and
mergekit's filtered values and gradients mapped to mergekit's own per-tensor values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_llama_with_tokenizer, build_tiny_llama, save_statistics_for
from safetensors.torch import load_file
from test_adapter_merge import adapters  # noqa: F401 (a fixture)
from test_engine import perturbed_copy, tensors

import forgetless
from forgetless.checkpoint.layout import layer_of
from forgetless.engine import build_plan
from forgetless.engine.parts import tensor_params
from forgetless.errors import ForgetlessError
from forgetless.methods.cgm import cgm

LAMBDA = [
    {"scope": "language.layers[0:1]", "value": 0.3},
    {"scope": ["lm_head", "re:norm"], "value": 0.8},
    {"value": 0.5},
]


def lambda_of(name: str) -> float:
    """LAMBDA written out on the names: layer 0, else lm_head or a norm, else the default."""
    if name.startswith("model.layers.0."):
        return 0.3
    if name.startswith("lm_head.") or "norm" in name:
        return 0.8
    return 0.5


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("perpart")
    base = build_tiny_llama(root / "base", seed=0)
    return {
        "root": root,
        "base": base,
        "fts": [perturbed_copy(base, root / f"ft{i}", seed=i + 1) for i in (0, 1)],
    }


def run(recipe: dict, out: Path) -> forgetless.MergeReport:
    return forgetless.merge(recipe, out=out, force=True, progress=False)


def recipe(fam, method: str, models: int = 1, **parameters) -> dict:
    return {
        "method": method,
        "base": str(fam["base"]),
        "models": [str(m) for m in fam["fts"][:models]],
        "parameters": parameters,
    }


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_per_part_lambda_is_the_brute_force_merge_per_tensor(fam, tmp_path, method):
    run(recipe(fam, method, **{"lambda": LAMBDA}), tmp_path / "o")
    got, base, ft = tensors(tmp_path / "o"), tensors(fam["base"]), tensors(fam["fts"][0])
    taken = set()
    for name, t0 in base.items():
        lam = lambda_of(name)
        taken.add(lam)
        want = t0 + lam * (ft[name] - t0)  # θ₀ + λ_t (θ_ft − θ₀)
        torch.testing.assert_close(got[name], want, rtol=0, atol=2e-7, msg=name)
        # and bit for bit the scalar recipe's tensor at that λ (the method's own rounding)
        assert torch.equal(got[name], t0.lerp(ft[name], lam)), name
    assert taken == {0.3, 0.8, 0.5}


def test_per_model_weights_per_part(fam, tmp_path):
    """task_arithmetic over two models, model 1's weight per part: θ₀ + λ Σ w_k,t (θ_k − θ₀)."""
    r = recipe(fam, "task_arithmetic", models=2, **{"lambda": 0.7})
    r["models"][1] = {
        "model": r["models"][1],
        "weight": [{"scope": "language.layers[-1]", "value": 0.25}, {"value": 2.0}],
    }
    run(r, tmp_path / "o")
    got, base = tensors(tmp_path / "o"), tensors(fam["base"])
    fts = [tensors(m) for m in fam["fts"]]
    for name, t0 in base.items():
        w1 = 0.25 if name.startswith("model.layers.2.") else 2.0
        want = t0 + 0.7 * (1.0 * (fts[0][name] - t0) + w1 * (fts[1][name] - t0))
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)


def test_cgm_per_part_alpha_is_the_method_per_tensor(fam, tmp_path):
    base, ft = tensors(fam["base"]), tensors(fam["fts"][0])
    g = torch.Generator().manual_seed(5)
    stats = {k: {n: torch.rand(t.shape, generator=g) for n, t in base.items()} for k in ("task", "general")}
    paths = {k: save_statistics_for(fam["base"], tmp_path / f"{k}.safetensors", v) for k, v in stats.items()}
    alpha = [{"scope": ["language.embed", "language.layers[1:]"], "value": 3.0}, {"value": 0.05}]
    r = recipe(fam, "cgm", alpha=alpha)
    r["statistics"] = {"fisher_task": str(paths["task"]), "fisher_general": str(paths["general"])}
    run(r, tmp_path / "o")
    got = tensors(tmp_path / "o")
    for name, t0 in base.items():
        a = 3.0 if name.startswith(("model.embed_tokens.", "model.layers.1.", "model.layers.2.")) else 0.05
        want = cgm(
            t0.clone(),
            ft[name],
            fisher_task=stats["task"][name],
            fisher_general=stats["general"][name],
            alpha=a,
        )
        assert torch.equal(got[name], want), name


def test_card_and_dry_run_show_the_values_by_entry(fam, tmp_path):
    run(recipe(fam, "linear", **{"lambda": LAMBDA}), tmp_path / "o")
    card = (tmp_path / "o" / "README.md").read_text()
    assert "## Parameters per part" in card
    names = list(tensors(fam["base"]))
    counts = [sum(lambda_of(n) == v for n in names) for v in (0.3, 0.8, 0.5)]
    for i, (v, c) in enumerate(zip((0.3, 0.8, 0.5), counts)):
        line = next(x for x in card.splitlines() if x.startswith(f"parameters.lambda[{i}]"))
        assert line.split()[1:3] == [str(v), str(c)], line
    recorded = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recorded["parameters"]["lambda"] == LAMBDA  # the recipe that re-runs it
    lines: list[str] = []
    forgetless.merge(
        recipe(fam, "linear", **{"lambda": LAMBDA}), out=tmp_path / "d", dry_run=True, log=lines.append
    )
    assert "parameters.lambda[2]" in lines[0] and "lambda=per part (0.3, 0.8; default 0.5)" in lines[0]


@pytest.mark.parametrize(
    "params,words",
    [
        (
            {"lambda": [{"scope": "vision", "value": 0.1}, {"value": 0.5}]},
            "parameters.lambda[0].scope: unknown selector",
        ),
        (
            {"lambda": [{"scope": "re:nothing_here", "value": 0.1}, {"value": 0.5}]},
            "parameters.lambda[0].scope: selector 're:nothing_here' matches no tensor",
        ),
        ({"lambda": [{"scope": "lm_head", "value": 0.1}]}, "parameters.lambda: no default"),
        (
            {"lambda": [{"value": 0.5}, {"scope": "lm_head", "value": 0.1}]},
            "parameters.lambda[0]: the default",
        ),
        (
            {"lambda": [{"scope": "lm_head", "value": "x"}, {"value": 0.5}]},
            "parameters.lambda[0].value: 'x' is not a number",
        ),
        ({"lambda": [{"scope": "lm_head"}, {"value": 0.5}]}, "parameters.lambda[0].value: required"),
        (
            {"lambda": [{"scope": "lm_head", "value": 1, "x": 2}, {"value": 0.5}]},
            "parameters.lambda[0].x: unknown key",
        ),
        (
            {"lambda": [{"scope": [], "value": 1}, {"value": 0.5}]},
            "parameters.lambda[0].scope: give one selector",
        ),
        ({"lambda": []}, "parameters.lambda: an empty list"),
        ({"lambda": [0.1, 0.5]}, "parameters.lambda[0]: each entry is a mapping"),
        (
            {"convention": [{"scope": "lm_head", "value": "mergekit"}, {"value": "forgetless"}]},
            "parameters.convention: a value per part is for number parameters",
        ),
    ],
)
def test_refusals_name_the_key_and_the_file(fam, tmp_path, params, words):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(fam, "task_arithmetic", **params)))
    with pytest.raises(ForgetlessError) as e:
        forgetless.merge(path, out=tmp_path / "o", dry_run=True)
    assert words in str(e.value) and str(path) in str(e.value), str(e.value)
    assert not (tmp_path / "o").exists()


def test_refusals_of_range_and_of_a_model_wide_pre_pass(fam, tmp_path):
    r = recipe(fam, "ties", models=2)
    r["models"][0] = {
        "model": r["models"][0],
        "density": [{"scope": "lm_head", "value": 1.5}, {"value": 0.5}],
    }
    with pytest.raises(ForgetlessError, match=r"models\[0\]\.density\[0\]\.value: 1.5 is outside \(0, 1\]"):
        build_plan(r)
    r = recipe(fam, "cgm_dagger", keep=[{"scope": "lm_head", "value": 0.5}, {"value": 0.9}])
    with pytest.raises(ForgetlessError, match=r"parameters\.keep: 'cgm_dagger' takes one value"):
        build_plan(r)


def test_weights_summing_to_zero_in_one_part_are_refused(fam):
    r = recipe(fam, "linear", models=2)
    r["models"][1] = {
        "model": r["models"][1],
        "weight": [{"scope": "lm_head", "value": -1.0}, {"value": 1.0}],
    }
    with pytest.raises(ForgetlessError, match=r"tensor 'lm_head.weight': models\[\*\]\.weight: .* sum to 0"):
        build_plan(r)


def test_adapter_space_takes_values_per_part(adapters, tmp_path):
    """lora_task_arithmetic with λ per part: each module's merged factors are the scalar recipe's at its λ."""
    _, base, paths = adapters
    common = {"method": "lora_task_arithmetic", "base": str(base), "models": [str(a) for a in paths]}
    lam = [{"scope": "language.layers[0]", "value": 0.25}, {"value": 1.5}]
    plan = build_plan({**common, "parameters": {"lambda": lam}})
    layer0 = {m.module for m in plan.modules if layer_of(plan.layout, m.name) == 0}
    assert 0 < len(layer0) < len(plan.modules)
    outs = {}
    for label, value in (("part", lam), ("low", 0.25), ("high", 1.5)):
        run({**common, "parameters": {"lambda": value}}, tmp_path / label)
        outs[label] = load_file(str(tmp_path / label / "adapter_model.safetensors"))
    assert outs["part"].keys() == outs["low"].keys()
    for k, v in outs["part"].items():
        which = "low" if any(f"{m}.lora_" in k for m in layer0) else "high"
        assert torch.equal(v, outs[which][k]), k


# ------------------------------------------------------------------------------------------------ mergekit
def evaluate_setting(tensor_name, setting, t=0.0):
    """mergekit's config.evaluate_setting, written out (its values parsed to floats, as its config does)."""
    if isinstance(setting, (float, int, bool, str)):
        return setting
    if all(isinstance(e, (int, float)) for e in setting):
        setting = [float(e) for e in setting]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(tensor_name, cond["value"], t)
    return None


def mergekit_t(name: str, num_layers: int) -> float:
    """mergekit's plan.py: a decoder layer's idx / (num_layers − 1) (1 alone); embeddings, norm, head: 0."""
    if not name.startswith("model.layers."):
        return 0.0
    idx = int(name.split(".")[2])
    return idx / (num_layers - 1) if num_layers > 1 else 1.0


def mergekit_parameter(name, model_setting, top_setting, default, t):
    """mergekit's ConfigReader.parameter: the model's setting, else the top-level one, else the default."""
    for s in (model_setting, top_setting):
        if s is not None:
            v = evaluate_setting(name, s, t)
            if v is not None:
                return v
    return default


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkdeep")
    base = build_llama_with_tokenizer(root / "base", layers=7)
    return base, [perturbed_copy(base, root / f"ft{i}", seed=i + 1) for i in (0, 1)]


MK_WEIGHTS = (
    [{"filter": "self_attn", "value": [0.1, 0.9, 0.35, 0.6]}, {"filter": "mlp.up", "value": 0.7}],
    [0.2, 1.3, 0.45],
)
MK_TOP = {
    "weight": [{"filter": "norm", "value": 0.33}, {"value": [1.0, 0.0]}],
    "density": [{"filter": "proj", "value": [0.3, 1.0, 0.55]}, {"value": 0.9}],
}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_mergekit_filters_and_gradients_map_to_mergekit_values_bit_for_bit(deep, method):
    base, fts = deep
    models = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(fts, MK_WEIGHTS)]
    top = dict(MK_TOP) if method == "ties" else {"weight": MK_TOP["weight"]}
    top["lambda"] = [{"filter": "lm_head", "value": 0.5}, {"value": [0.8, 1.2]}]
    cfg = {"merge_method": method, "base_model": str(base), "models": models, "parameters": top}
    plan = build_plan(cfg)
    n = plan.layout.num_layers
    assert n == 7
    seen = set()
    for name in plan.base.names():
        t = mergekit_t(name, n)
        got = tensor_params(plan.params, name)
        assert got["lambda_"] == mergekit_parameter(name, None, top["lambda"], 1.0, t), name
        for k, w in enumerate(MK_WEIGHTS):
            want = mergekit_parameter(name, w, top["weight"], None, t)
            assert got["weight"][k] == want, (name, k)
            seen.add(want)
            if method == "ties":
                want = min(mergekit_parameter(name, None, top["density"], 1.0, t), 1.0)
                assert got["density"][k] == want, (name, k)
    assert len(seen) > 10  # the filters and gradients did give many values


def test_mergekit_gradient_on_one_layer_and_linear(tmp_path):
    """One decoder layer: mergekit's t is 1 there; linear's per-tensor weights."""
    base = build_llama_with_tokenizer(tmp_path / "b1", layers=1)
    ft = perturbed_copy(base, tmp_path / "f1", seed=3)
    g = [0.25, 0.5, 2.0]
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(base), "parameters": {"weight": g}},
            {"model": str(ft), "parameters": {"weight": 1.0}},
        ],
    }
    plan = build_plan(cfg)
    for name in plan.base.names():
        assert tensor_params(plan.params, name)["weight"] == [
            evaluate_setting(name, g, mergekit_t(name, 1)),
            1.0,
        ]


@pytest.mark.parametrize(
    "params,words",
    [
        ({"normalize": [True, False]}, "parameters.normalize: a per-layer gradient or a filtered value"),
        ({"weight": {"filter": "mlp", "value": 0.3}}, "parameters.weight: a filtered value is a list"),
        ({"weight": [{"filter": "mlp", "value": "x"}]}, "parameters.weight[0].value: 'x' is not a number"),
        (
            {"weight": [{"filter": "mlp", "value": 0.3}]},
            "models[0].parameters.weight: mergekit's task_arithmetic requires it",
        ),
        ({"weight": [0.2, 0.5], "normalize": True}, "parameters.normalize: true with weights per tensor"),
    ],
)
def test_mergekit_refusals(deep, params, words):
    base, fts = deep
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(fts[0])}],
        "parameters": params,
    }
    with pytest.raises(ForgetlessError) as e:
        build_plan(cfg)
    assert words in str(e.value), str(e.value)


def test_ties_density_per_part_in_row_blocks_is_the_rule_per_tensor(fam, tmp_path, monkeypatch):
    """A tensor merged in row blocks (its pre-pass included) takes its entry's value in every block."""
    from forgetless.engine import budget
    from forgetless.methods.baselines import ties_rule

    monkeypatch.setattr(budget, "RUNTIME_BYTES", 0)
    monkeypatch.setattr(budget, "PREFETCH_BYTES", 512)
    density = [{"scope": "language.embed", "value": 0.2}, {"value": 0.7}]
    r = recipe(fam, "ties", models=2, density=density)
    plan = build_plan(r, out=tmp_path / "blocks", memory=12_000)
    assert "model.embed_tokens.weight" in plan.block_rows
    forgetless.engine.execute(plan, progress=False)
    got, base = tensors(tmp_path / "blocks"), tensors(fam["base"])
    fts = [tensors(m) for m in fam["fts"]]
    for name, t0 in base.items():
        d = 0.2 if name.startswith("model.embed_tokens.") else 0.7
        want = ties_rule(t0, [f[name] for f in fts], [1.0, 1.0], [d, d])
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-7, msg=name)
