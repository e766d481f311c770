"""RegMean through the engine: [in, in] Gram statistics, and the method's own fallback for tensors without one."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama, linear_weight_shapes, save_statistics_for
from safetensors.torch import load_file, save_file

import forgetless
from forgetless.checkpoint.reader import CheckpointReader
from forgetless.errors import ForgetlessError
from forgetless.methods.regmean import regmean_combine


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmean")
    base = build_tiny_llama(root / "base", seed=0)
    fts = [build_tiny_llama(root / f"ft{i}", seed=i + 1) for i in range(2)]
    sd = load_file(str(base / "model.safetensors"))
    linear = linear_weight_shapes(base)
    g = torch.Generator().manual_seed(0)
    grams = []
    for i in range(2):
        stats = {}
        for k, v in linear.items():
            x = torch.randn(3 * v[1], v[1], generator=g)
            stats[k] = x.T @ x
        save_statistics_for(base, root / f"gram{i}.safetensors", stats, kind="gram")
        grams.append(stats)
    return root, base, fts, grams, sd


def _recipe(base, fts, root, **kw):
    return {
        "method": "regmean",
        "base": str(base),
        "parameters": {"alpha": 0.9},
        "models": [
            {"model": str(ft), "statistics": {"gram": str(root / f"gram{i}.safetensors")}}
            for i, ft in enumerate(fts)
        ],
        **kw,
    }


def test_regmean_merges_linears_and_averages_the_rest(setup, tmp_path):
    root, base, fts, grams, sd = setup
    report = forgetless.merge(_recipe(base, fts, root, dtype="float32"), out=tmp_path / "m", progress=False)
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    ft_sd = [load_file(str(f / "model.safetensors")) for f in fts]
    for k in sd:
        if not sd[k].is_floating_point():
            continue
        if k in grams[0]:
            want = regmean_combine(
                [f[k].float() for f in ft_sd], [g[k].clone() for g in grams], [1.0, 1.0], 0.9
            )
        else:
            want = (ft_sd[0][k].float() + ft_sd[1][k].float()) / 2
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    assert report.routes["method"][0] == len(grams[0])
    assert report.routes["method (no stats)"][0] == sum(1 for k in sd if k not in grams[0])


def test_recipe_no_statistics_still_wins_and_shapes_are_checked(setup, tmp_path):
    root, base, fts, grams, sd = setup
    forgetless.merge(
        _recipe(base, fts, root, scope={"no_statistics": "base"}), out=tmp_path / "m", progress=False
    )
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    k = next(k for k in sd if k not in grams[0])
    assert torch.equal(got[k], sd[k])
    bad = {
        k: torch.zeros(v.shape) for k, v in sd.items() if k.endswith("proj.weight")
    }  # shaped like the weight
    fp = CheckpointReader(base).fingerprint()
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata={"model_fingerprint": fp})
    r = _recipe(base, fts, root)
    r["models"][0]["statistics"]["gram"] = str(tmp_path / "bad.safetensors")
    with pytest.raises(ForgetlessError, match="differs from the expected"):
        forgetless.merge(r, out=tmp_path / "m2", progress=False)
