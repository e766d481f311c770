"""mergekit configs as they are: every mapped method against mergekit 0.1.5's formula, written out here op for op
(``GTATask.execute`` and ``LinearMergeTask.execute``, ``sparsify.magnitude`` / ``bernoulli``), and the refusals.

What is compared, and how closely:
- task arithmetic: bit for bit (mergekit's order of operations, ``convention: mergekit``);
- TIES: bit for bit against the formula with a stable top-k order (lowest flat index first among equal |Δ|);
  mergekit's ``argsort(descending=True)`` is not stable, so it may keep another of the equal entries at the k-th
  magnitude (BENCHMARKS.md: every difference on a real checkpoint was such a boundary tie);
- DARE: the masks are random in both tools (mergekit draws from torch's global RNG, forgetless from generators
  seeded per tensor name), so the formula is compared *given forgetless's masks*, re-drawn here from the same
  seeds: bit for bit, DARE-linear and DARE-TIES, at density 0.6 with ``rescale: false`` and at mergekit's defaults
  (its L1 ``rescale``, ``normalize: false``); at density 1 mergekit keeps every entry and the result is task
  arithmetic / TIES without a trim, bit for bit;
- linear, and ``normalize: true`` for task arithmetic: to rounding (forgetless scales the weights by 1/Σw first).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_llama
from safetensors.torch import load_file, save_file

from forgetless import merge
from forgetless.cli import main
from forgetless.engine import tensor_generators
from forgetless.recipe import load_recipe

torch.set_num_threads(1)
SEED = 3  # the recipe's `seed` is not a mergekit key: the mapped recipe's default, 0, is what runs
DARE_SEED = 0


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """A tiny Llama and three fine-tunes of it (θ₀ + small noise, as a fine-tune is), float32."""
    root = tmp_path_factory.mktemp("mergekit")
    base = build_tiny_llama(root / "base", seed=0)
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(SEED)
    fts = []
    for i in range(3):
        d = root / f"ft{i}"
        d.mkdir()
        save_file(
            {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()},
            str(d / "model.safetensors"),
            metadata={"format": "pt"},
        )
        shutil.copy(base / "config.json", d / "config.json")
        fts.append(d)
    return root, base, fts


def run(root: Path, config: dict, name: str) -> dict[str, torch.Tensor]:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    merge(str(path), out=root / name, force=True, progress=False)
    return load_file(str(root / name / "model.safetensors"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------- mergekit 0.1.5, op for op
def magnitude_stable(delta: torch.Tensor, density: float) -> torch.Tensor:
    """sparsify.magnitude with a stable order among equal |Δ| (mergekit's argsort is not stable)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    mask = torch.zeros_like(delta)
    mask.view(-1)[torch.argsort(delta.abs().view(-1).float(), descending=True, stable=True)[:k]] = 1
    return delta * mask


def gta(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """GTATask.execute after sparsification: weigh, (sign consensus 'sum'), sum, (normalize), ×λ, + base."""
    stacked = torch.stack(deltas, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype)
    while len(stacked.shape) > len(w.shape):
        w.unsqueeze_(-1)
    weighted = stacked * w
    if consensus:
        majority = (weighted.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        mask = weighted.sign() == majority
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


def mergekit_config(method: str, base: Path, fts: list[Path], per_model: list[dict], **top) -> dict:
    models = [{"model": str(base)}] + [{"model": str(f), "parameters": p} for f, p in zip(fts, per_model)]
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": top,
        "dtype": "float32",
        "tokenizer_source": "base",
    }


# ------------------------------------------------------------------------------- what maps, and its numbers
def test_task_arithmetic_is_mergekits_bit_for_bit(ws):
    root, base, fts = ws
    w = [0.7, -0.35, 1.3]
    out = run(
        root,
        mergekit_config("task_arithmetic", base, fts, [{"weight": x} for x in w], **{"lambda": 0.85}),
        "ta",
    )
    b, f = tensors(base), [tensors(p) for p in fts]
    for name, got in out.items():
        expect = gta(b[name], [ft[name] - b[name] for ft in f], w, consensus=False, normalize=False, lam=0.85)
        assert torch.equal(got, expect), name
    # one model, weight 1, λ 1: θ₀ + (θ − θ₀), which is not always θ in float32 — mergekit's value, not θ
    one = run(root, mergekit_config("task_arithmetic", base, fts[:1], [{"weight": 1.0}]), "ta1")
    assert all(torch.equal(one[n], b[n] + (f[0][n] - b[n])) for n in one)


def test_task_arithmetic_normalize_maps_to_weights_over_their_sum(ws):
    root, base, fts = ws
    w = [0.5, 1.5]
    out = run(
        root,
        mergekit_config("task_arithmetic", base, fts[:2], [{"weight": x} for x in w], normalize=True),
        "ta_norm",
    )
    b, f = tensors(base), [tensors(p) for p in fts]
    for name, got in out.items():
        expect = gta(
            b[name], [ft[name] - b[name] for ft in f[:2]], w, consensus=False, normalize=True, lam=1.0
        )
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weights,lam", [([1.0, 1.0, 1.0], 1.0), ([0.6, 1.4, 0.9], 0.8)])
def test_ties_is_mergekits_up_to_the_order_of_equal_magnitudes(ws, weights, lam):
    root, base, fts = ws
    dens = [0.5, 0.3, None]  # the third from the top-level density
    per = [{"weight": w, **({"density": d} if d else {})} for w, d in zip(weights, dens)]
    out = run(root, mergekit_config("ties", base, fts, per, density=0.7, **{"lambda": lam}), "ties")
    b, f = tensors(base), [tensors(p) for p in fts]
    for name, got in out.items():
        deltas = [magnitude_stable(ft[name] - b[name], d or 0.7) for ft, d in zip(f, dens)]
        expect = gta(b[name], deltas, weights, consensus=True, normalize=True, lam=lam)
        assert torch.equal(got, expect), name


def test_ties_density_defaults_to_mergekits_1_not_forgetless_half(ws):
    root, base, fts = ws
    out = run(root, mergekit_config("ties", base, fts[:2], [{"weight": 1.0}, {"weight": 1.0}]), "ties_d1")
    b, f = tensors(base), [tensors(p) for p in fts]
    for name, got in out.items():
        expect = gta(
            b[name], [ft[name] - b[name] for ft in f[:2]], [1.0, 1.0], consensus=True, normalize=True, lam=1.0
        )
        assert torch.equal(got, expect), name
    assert load_recipe(root / "ties_d1.yaml").models[0].params["density"] == 1.0


def mk_rescaled_l1(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sparsify.rescaled_masked_tensor with norm l1: the kept entries scaled to Δ's L1 norm (not below 1e-7)."""
    masked = delta * mask
    before, after = delta.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("defaults", [False, True])
def test_dare_is_mergekits_formula_given_the_masks(ws, method, defaults):
    """With ``rescale: false, normalize: true``, and at mergekit's defaults (``rescale: true`` — its L1 rescale —
    and ``normalize: false``), which map to forgetless's ``rescale: l1`` and, for DARE-TIES, ``normalize: false``."""
    root, base, fts = ws
    w, density = [0.8, 1.2], 0.6
    top = {"lambda": 0.9} if defaults else {"lambda": 0.9, "rescale": False, "normalize": True}
    per_model = [{"weight": x, "density": density} for x in w]
    out = run(root, mergekit_config(method, base, fts[:2], per_model, **top), f"{method}-{defaults}")
    b, f = tensors(base), [tensors(p) for p in fts]
    kept, total = 0, 0
    for name, got in out.items():
        gens = tensor_generators(DARE_SEED, name, 2)  # forgetless's draws for this tensor, model by model
        deltas = []
        for ft, gen in zip(f, gens):
            mask = torch.bernoulli(torch.full_like(b[name], density), generator=gen)
            kept, total = kept + int(mask.sum()), total + mask.numel()
            delta = ft[name] - b[name]
            deltas.append(mk_rescaled_l1(delta, mask) if defaults else delta * mask)  # sparsify.bernoulli
        consensus = method == "dare_ties"
        expect = gta(b[name], deltas, w, consensus=consensus, normalize=not defaults, lam=0.9)
        if consensus or defaults:
            assert torch.equal(got, expect), name
        else:  # normalize: true divides by Σw: mapped as weights w/Σw (to rounding)
            torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)
    assert abs(kept / total - density) < 5 * (density * (1 - density) / total) ** 0.5
    params = load_recipe(root / f"{method}-{defaults}.yaml").parameters
    assert params["rescale"] == ("l1" if defaults else False)
    assert params.get("normalize", True) == (not (defaults and consensus))


@pytest.mark.parametrize("method,consensus", [("dare_linear", False), ("dare_ties", True)])
def test_dare_at_density_1_keeps_every_entry_as_mergekit_does(ws, method, consensus):
    root, base, fts = ws
    w = [0.8, 1.2]
    extra = {"normalize": True} if consensus else {}
    out = run(
        root, mergekit_config(method, base, fts[:2], [{"weight": x} for x in w], **extra), f"{method}_1"
    )
    b, f = tensors(base), [tensors(p) for p in fts]
    for name, got in out.items():
        expect = gta(
            b[name],
            [ft[name] - b[name] for ft in f[:2]],
            w,
            consensus=consensus,
            normalize=consensus,
            lam=1.0,
        )
        assert torch.equal(got, expect), name


def test_linear_is_the_weighted_average_with_the_unlisted_base_averaged_in(ws):
    root, base, fts = ws
    cfg = {
        "merge_method": "linear",
        "base_model": str(base),
        "parameters": {"weight": 0.5},
        "models": [{"model": str(fts[0]), "parameters": {"weight": 2.0}}, {"model": str(fts[1])}],
    }
    out = run(root, cfg, "linear")
    b, f = tensors(base), [tensors(p) for p in fts]
    for name, got in out.items():  # LinearMergeTask: Σ wₖθₖ / Σ wₖ over fts[0], fts[1], base (added last)
        stacked = torch.stack([f[0][name], f[1][name], b[name]])
        w = torch.tensor([2.0, 0.5, 0.5]).view(-1, *[1] * b[name].dim())
        torch.testing.assert_close(got, (w * stacked).sum(0) / w.sum(0), rtol=1e-6, atol=1e-7)


def test_dry_run_prints_the_mapped_recipe(ws, capsys):
    root, base, fts = ws
    cfg = mergekit_config(
        "ties",
        base,
        fts[:2],
        [{"weight": 1.0, "density": 0.4}, {"weight": 0.5}],
        density=0.9,
        int8_mask=True,
        **{"lambda": 1.0},
    )
    cfg["out_dtype"] = "bfloat16"
    path = root / "dry.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["merge", str(path), "--out", str(root / "dry-out"), "--dry-run"])
    printed = capsys.readouterr().out
    head = printed.partition("\nmethod ")[0]
    mapped = yaml.safe_load("\n".join(line[2:] for line in head.splitlines()[1:]))
    assert "mapped from a mergekit config" in head.splitlines()[0]
    assert mapped == {
        "method": "ties",
        "base": str(base),
        "dtype": "bfloat16",
        "models": [
            {"model": str(fts[0]), "weight": 1.0, "density": 0.4},
            {"model": str(fts[1]), "weight": 0.5, "density": 0.9},
        ],
        "parameters": {"lambda": 1.0, "convention": "mergekit"},
    }
    assert not (root / "dry-out").exists()


def test_a_dry_run_without_an_output_is_refused_as_the_run_is(ws, capsys):
    """A mergekit config names no output folder: the dry run says so, as the run would, instead of passing."""
    root, base, fts = ws
    path = root / "no-out.yaml"
    path.write_text(
        yaml.safe_dump(
            mergekit_config("ties", base, fts[:2], [{"weight": 1.0}, {"weight": 0.5}], density=0.5)
        )
    )
    for dry in (["--dry-run"], []):
        with pytest.raises(SystemExit) as e:
            main(["merge", str(path), *dry])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "no output folder" in err and "--out" in err and str(path) in err


# ------------------------------------------------------------------------------- what is refused
def _refusal(ws, capsys, cfg: dict) -> str:
    root = ws[0]
    path = root / "refused.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["merge", str(path), "--out", str(root / "refused-out"), "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(path) in err, err
    return err


def _cfg(ws, kind="ties", **change) -> dict:
    _, base, fts = ws
    cfg = mergekit_config(kind, base, fts[:2], [{"weight": 1.0, "density": 0.5} for _ in range(2)])
    for k, v in change.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


@pytest.mark.parametrize(
    "change,key,words",
    [
        ({"merge_method": "nuslerp"}, "merge_method", "'nuslerp' is not in forgetless"),
        ({"merge_method": "karcher"}, "merge_method", "'karcher' is not in forgetless"),
        ({"merge_method": "passthrough"}, "merge_method", "'passthrough' is not in forgetless"),
        (
            {"models": None, "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]},
            "slices",
            "layer slices",
        ),
        ({"tokenizer_source": "union"}, "tokenizer_source", "never builds another vocabulary"),
        ({"tokenizer": {"source": "union"}}, "tokenizer", "never changes the vocabulary"),
        ({"chat_template": "chatml"}, "chat_template", "chat template included"),
        ({"parameters": {"normalize": [True, False]}}, "parameters.normalize", "per-layer gradient"),
        (
            {"parameters": {"density": {"filter": "mlp", "value": 0.3}}},
            "parameters.density",
            "filtered value is a list",
        ),
        ({"parameters": {"normalize": False}}, "parameters.normalize", "always divides"),
        ({"parameters": {"rescale": True}}, "parameters.rescale", "L1 norm"),
        ({"parameters": {"gamma": 0.01}}, "parameters.gamma", "not a parameter of mergekit's ties"),
        ({"base_model": None}, "base_model", "required"),
        ({"dtype": "int64"}, "dtype", "forgetless writes"),
        ({"random_seed": 1}, "random_seed", "not a key of a mergekit config"),
        ({"method": "ties"}, "merge_method", "either `method` (forgetless) or `merge_method` (mergekit)"),
    ],
)
def test_refusals_name_the_key_and_what_to_do(ws, capsys, change, key, words):
    err = _refusal(ws, capsys, _cfg(ws, **change))
    assert f": {key}: " in err and words in err and " — " in err, err


def test_refusals_of_models_entries(ws, capsys):
    fts = ws[2]
    cfg = _cfg(ws)
    cfg["models"][1]["parameters"] = {"density": 0.5}  # no weight, none at the top either
    err = _refusal(ws, capsys, cfg)
    assert "models[1].parameters.weight: mergekit's ties requires it" in err
    cfg = _cfg(ws)
    cfg["models"][1]["model"] = f"{fts[0]}@main"
    assert "models[1].model: " in (err := _refusal(ws, capsys, cfg)) and "Hub revision" in err
    cfg = _cfg(ws, "task_arithmetic")
    cfg["models"][2]["parameters"]["epsilon"] = 0.1
    assert "models[2].parameters.epsilon: not a per-model parameter" in _refusal(ws, capsys, cfg)


def test_ties_rescale_and_normalize_false_are_refused(ws, capsys):
    # forgetless's ties has neither mergekit's L1 rescale nor its sum of the agreeing entries
    err = _refusal(ws, capsys, _cfg(ws, "ties", parameters={"rescale": True}))
    assert "parameters.rescale: true: mergekit rescales the trimmed task vector" in err
    err = _refusal(ws, capsys, _cfg(ws, "ties", parameters={"normalize": False}))
    assert "parameters.normalize: false: mergekit then adds the agreeing entries" in err


def test_linear_refusals(ws, capsys):
    _, base, fts = ws
    cfg = {
        "merge_method": "linear",
        "base_model": str(base),
        "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0}}],
    }
    assert "base_model: not among models" in _refusal(ws, capsys, cfg)
    cfg = {
        "merge_method": "linear",
        "parameters": {"normalize": False},
        "models": [{"model": str(f), "parameters": {"weight": 0.8}} for f in fts[:2]],
    }
    assert "parameters.normalize: false with weights summing to 1.6" in _refusal(ws, capsys, cfg)
