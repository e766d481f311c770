"""How the engine feeds statistics files to methods that need them, and refuses statistics of another model."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama, linear_weight_shapes, save_statistics_for
from safetensors.torch import load_file, save_file

import forgetless
from forgetless.errors import ForgetlessError
from forgetless.methods import METHODS, merge_method


@pytest.fixture(scope="module")
def curvature_method():
    """A method that needs one shared and one per-model statistic: θ₀ + Σₖ sₖ·gₖ·Δₖ / (1 + g)."""

    @merge_method("_test_curvature", per_model_needs=("score",), needs=("shared",))
    def _curv(base, finetuned, *, score, shared, lambda_: float = 1.0):
        out = base.clone()
        for ft, s in zip(finetuned, score):
            out += lambda_ * s * (ft - base) / (1 + shared)
        return out

    yield "_test_curvature"
    METHODS.pop("_test_curvature")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    base = build_tiny_llama(root / "base", seed=0)
    fts = [build_tiny_llama(root / f"ft{i}", seed=i + 1) for i in range(2)]
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    files = {}
    for name in ("s0", "s1", "shared"):
        stats = {k: torch.rand(shape, generator=g) for k, shape in linear_weight_shapes(base).items()}
        files[name] = (save_statistics_for(base, root / f"{name}.safetensors", stats), stats)
    return root, base, fts, files, sd


def recipe(base, fts, files, **kw):
    return {
        "method": "_test_curvature",
        "base": str(base),
        "models": [
            {"model": str(ft), "statistics": {"score": str(files[f"s{i}"][0])}} for i, ft in enumerate(fts)
        ],
        "statistics": {"shared": str(files["shared"][0])},
        **kw,
    }


def test_statistics_reach_the_method_per_tensor_and_per_model(curvature_method, setup, tmp_path):
    _, base, fts, files, sd = setup
    report = forgetless.merge(
        recipe(base, fts, files, scope={"no_statistics": "base"}), out=tmp_path / "m", progress=False
    )
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    ft_sd = [load_file(str(f / "model.safetensors")) for f in fts]
    for k, b in sd.items():
        if k in files["shared"][1]:
            want = b.clone()
            for i in range(2):
                want += files[f"s{i}"][1][k] * (ft_sd[i][k] - b) / (1 + files["shared"][1][k])
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[k], b)
    assert report.routes["method"][0] == len(files["shared"][1])
    assert "N=4" in (tmp_path / "m" / "README.md").read_text()


def test_missing_statistics_are_an_error_by_default(curvature_method, setup, tmp_path):
    _, base, fts, files, _ = setup
    with pytest.raises(ForgetlessError, match="have no statistics.*scope.no_statistics"):
        forgetless.merge(recipe(base, fts, files), out=tmp_path / "m", progress=False)
    r = recipe(base, fts, files)
    del r["statistics"]
    with pytest.raises(ForgetlessError, match=r"statistics\.shared: required"):
        forgetless.merge(r, out=tmp_path / "m", progress=False)


def test_statistics_of_another_model_are_refused(curvature_method, setup, tmp_path):
    root, base, fts, files, _ = setup
    _, stats = files["s0"]
    bad = root / "other.safetensors"
    save_file(stats, str(bad), metadata={"kind": "fisher", "model_fingerprint": "0123456789abcdef"})
    r = recipe(base, fts, files, scope={"no_statistics": "base"})
    r["models"][0]["statistics"]["score"] = str(bad)
    with pytest.raises(ForgetlessError, match="computed on another model") as e:
        forgetless.merge(r, out=tmp_path / "m", progress=False)
    assert str(bad) in str(e.value)
    shaped = root / "shape.safetensors"
    k = next(iter(stats))
    save_file({k: torch.zeros(3, 3)}, str(shaped))
    r["models"][0]["statistics"]["score"] = str(shaped)
    with pytest.raises(ForgetlessError, match=r"shape \[3, 3\] differs"):
        forgetless.merge(r, out=tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
