"""TSV-Merge, Iso-C and Iso-CTS (methods/spectral.py) against FusionBench's steps written out independently here
(``task_singular_vector/utils/TSVM_utils.py``: ``compute_and_sum_svd_mem_reduction``;
``isotropic_merging/iso_utils.py``: ``iso_c``, ``iso_cts``), their invariants, and through ``forgetless merge``."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_llama
from safetensors.torch import load_file

import forgetless
from forgetless import engine
from forgetless.cli import cli
from forgetless.errors import ForgetlessError
from forgetless.methods.spectral import (
    iso_c_delta,
    iso_cts_delta,
    iso_cts_sizes,
    mean_task_vector,
    polar,
    top_svd,
    tsv_delta,
    tsv_rank,
)

SHAPES = [(24, 40), (40, 24), (31, 31)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_taus(shape: tuple[int, ...], tasks: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(tasks)]


def known_spectrum(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, s.numel(), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, s.numel(), generator=g, dtype=torch.float64)).Q
    return ((U * s) @ V.T).float()


# ---------------------------------------------------------------------------------------------- FusionBench's steps
def fb_tsv(taus: list[torch.Tensor]) -> torch.Tensor:
    """compute_and_sum_svd_mem_reduction for one key: zero-padded [m, p] / [p] / [p, n] buffers, k = int(p·(1/T))
    placed block after block, each buffer's U·Vᵀ, multi_dot; the running mean for a tensor that is not 2-D."""
    T = len(taus)
    if taus[0].dim() != 2:
        out = taus[0].clone()
        for i, v in enumerate(taus[1:], start=1):
            out += (v - out) / (i + 1)
        return out
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        r = int(s.shape[0] * (1 / T))
        sum_u[:, i * r : (i + 1) * r] = u[:, :r]
        sum_s[i * r : (i + 1) * r] = s[:r]
        sum_vh[i * r : (i + 1) * r, :] = vh[:r, :]
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_vh, _, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))


def fb_iso_c(taus: list[torch.Tensor]) -> torch.Tensor:
    out = sum(taus) / len(taus)
    if taus[0].dim() != 2:
        return out
    out *= len(taus)
    U, S, V = torch.linalg.svd(out, full_matrices=False)
    return torch.linalg.multi_dot((U, torch.diag(torch.ones_like(S) * S.mean()), V))


def fb_iso_cts_sizes(p: int, T: int, fraction: float) -> tuple[int, int]:
    c = int(p * fraction)
    c = p - round((p - c) / T) * T
    return c, int((p - c) / T)


def fb_iso_cts(taus: list[torch.Tensor], fraction: float) -> torch.Tensor:
    T, shape = len(taus), taus[0].shape
    c, d = fb_iso_cts_sizes(min(shape), T, fraction)
    u, s, v = torch.linalg.svd(sum(taus), full_matrices=False)
    cu, cs, cv = u[:, :c], s[:c], v[:c, :]
    for i, w in enumerate(taus):
        w_ts = w - cu @ cu.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        if i == 0:
            all_u, all_s, all_v = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
        all_u[:, i * d : (i + 1) * d] = u_ts[:, :d]
        all_s[i * d : (i + 1) * d] = s_ts[:d]
        all_v[i * d : (i + 1) * d, :] = v_ts[:d, :]
    all_u[:, T * d : T * d + c] = cu
    all_s[T * d : T * d + c] = cs
    all_v[T * d : T * d + c, :] = cv
    uu, _, vu = torch.linalg.svd(all_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(all_v, full_matrices=False)
    flat = torch.ones_like(all_s) * all_s.mean()
    return torch.linalg.multi_dot((uu @ vu, torch.diag(flat), uv @ vv))


# ---------------------------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tasks", [1, 2, 3, 5])
def test_tsv_matches_fusionbench(shape, tasks):
    taus = random_taus(shape, tasks, seed=tasks)
    assert rel(tsv_delta(taus), fb_tsv(taus)) < 2e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tasks", [1, 3, 4])
def test_iso_c_matches_fusionbench(shape, tasks):
    taus = random_taus(shape, tasks, seed=10 + tasks)
    assert rel(iso_c_delta(taus), fb_iso_c(taus)) < 2e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("tasks", "fraction"), [(2, 0.8), (3, 0.8), (4, 0.5), (3, 0.0), (2, 1.0)])
def test_iso_cts_matches_fusionbench(shape, tasks, fraction):
    taus = random_taus(shape, tasks, seed=20 + tasks)
    assert rel(iso_cts_delta(taus, fraction), fb_iso_cts(taus, fraction)) < 2e-5


def test_iso_cts_sizes_are_fusionbenchs_where_fusionbench_has_them():
    checked = 0
    for p in range(1, 70):
        for T in range(1, 9):
            for f in (0.0, 0.1, 0.5, 0.8, 0.95, 1.0):
                c, d = iso_cts_sizes((p, p + 3), T, f)
                assert c >= 0 and d >= 0 and c + T * d == p
                fc, fd = fb_iso_cts_sizes(p, T, f)
                if fc >= 0:  # FusionBench's sizes exist (below 0 its slices fail)
                    assert (c, d) == (fc, fd)
                    checked += 1
    assert checked > 3000
    assert fb_iso_cts_sizes(3, 2, 0.0) == (-1, 2) and iso_cts_sizes((3, 5), 2, 0.0) == (1, 1)


def test_tsv_rank_is_fusionbenchs_for_the_default_fraction():
    for p in (1, 7, 24, 4096, 11008):
        for T in range(1, 9):
            assert tsv_rank((p, p + 1), T) == int(p * (1 / T)) == p // T
    assert tsv_rank((100, 200), 3, 0.5) == 16


def test_weights_scale_each_task_before_the_svd_as_fusionbench_alpha_lists():
    taus = random_taus((20, 36), 3, seed=4)
    w = [1.0, 0.5, 2.0]
    assert rel(tsv_delta([t * x for t, x in zip(taus, w)]), fb_tsv([t * x for t, x in zip(taus, w)])) < 2e-5


def test_not_a_matrix_gets_the_mean_task_vector():
    taus = random_taus((50,), 3, seed=5)
    torch.testing.assert_close(mean_task_vector(taus), fb_tsv(taus))
    torch.testing.assert_close(mean_task_vector(taus), fb_iso_c(taus))


# ---------------------------------------------------------------------------------------------- invariants
def test_iso_c_singular_values_all_equal_the_mean():
    taus = random_taus((30, 45), 3, seed=6)
    s = torch.linalg.svdvals(iso_c_delta(taus).double())
    want = torch.linalg.svdvals(sum(taus).double()).mean()
    torch.testing.assert_close(s, torch.full_like(s, float(want)), rtol=1e-5, atol=0)


def test_iso_cts_spectrum_is_flat_and_fraction_one_is_iso_c():
    taus = random_taus((30, 45), 3, seed=7)
    s = torch.linalg.svdvals(iso_cts_delta(taus).double())
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), rtol=1e-5, atol=0)
    assert rel(iso_cts_delta(taus, 1.0), iso_c_delta(taus)) < 1e-5


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_tsv_vectors_orthonormal_and_spectrum_is_the_kept_singular_values(shape):
    taus = random_taus(shape, 3, seed=8)
    k = tsv_rank(shape, 3)
    trip = [top_svd(t, k) for t in taus]
    U = polar(torch.cat([u for u, _, _ in trip], dim=1))
    Vh = polar(torch.cat([vh for _, _, vh in trip]))
    eye = torch.eye(3 * k)
    torch.testing.assert_close(U.T @ U, eye, atol=2e-6, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, eye, atol=2e-6, rtol=0)
    kept = torch.cat([s for _, s, _ in trip]).sort(descending=True).values
    got = torch.linalg.svdvals(tsv_delta(taus).double())[: 3 * k]
    torch.testing.assert_close(got, kept.double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_one_task_at_full_rank_is_task_arithmetic(shape):
    (tau,) = random_taus(shape, 1, seed=9)
    assert rel(tsv_delta([tau]), tau) < 1e-5
    assert tsv_rank(shape, 2, 0.01) == 0 and torch.equal(tsv_delta([tau, tau], 0.01), torch.zeros_like(tau))


def test_randomized_truncation_agrees_with_the_exact_one_on_a_decaying_spectrum():
    s = 0.7 ** torch.arange(40, dtype=torch.float64)
    taus = [known_spectrum(40, 90, s, seed) for seed in range(4)]
    assert rel(tsv_delta(taus, svd="randomized"), tsv_delta(taus)) < 1e-4
    assert rel(iso_cts_delta(taus, svd="randomized"), iso_cts_delta(taus)) < 1e-4


# ---------------------------------------------------------------------------------------------- through the engine
@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("spectral")
    return build_tiny_llama(root / "base", seed=0), [
        build_tiny_llama(root / f"ft{i}", seed=i + 1) for i in range(3)
    ]


def _delta(method: str, taus: list[torch.Tensor]) -> torch.Tensor:
    if taus[0].dim() != 2:
        return mean_task_vector(taus)
    if method == "tsv_m":
        return tsv_delta(taus, 0.6)
    return iso_c_delta(taus) if method == "iso_c" else iso_cts_delta(taus, 0.5)


PARAMS = {"tsv_m": {"rank_fraction": 0.6}, "iso_c": {}, "iso_cts": {"common_space_fraction": 0.5}}


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_forgetless_merge_equals_the_rule_per_tensor(family, tmp_path, method):
    base, fts = family
    weights = [1.0, 0.5, 2.0]
    recipe = {
        "method": method,
        "base": str(base),
        "models": [{"model": str(f), "weight": w} for f, w in zip(fts, weights)],
        "parameters": {"lambda": 0.7, **PARAMS[method]},
        "dtype": "float32",
        "out": str(tmp_path / "m"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    res = CliRunner().invoke(cli, ["merge", str(path), "--quiet"])
    assert res.exit_code == 0, res.output
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    sd0 = load_file(str(base / "model.safetensors"))
    sds = [load_file(str(f / "model.safetensors")) for f in fts]
    matrices = 0
    for k, theta0 in sd0.items():
        taus = [(sd[k].float() - theta0.float()) * w for sd, w in zip(sds, weights)]
        want = theta0.float() + 0.7 * _delta(method, taus)
        # float32 SVDs differ by thread count (LAPACK's blocking): the bound is on the tensor's scale, not per entry
        err, scale = (got[k] - want).abs().max().item(), want.abs().max().item()
        assert err <= 1e-6 + 1e-5 * scale, (k, err, scale)
        matrices += theta0.dim() == 2
    assert matrices >= 10


def test_out_of_range_parameters_are_refused_at_plan_time(family, tmp_path):
    base, fts = family
    for method, params in (("tsv_m", {"rank_fraction": 0.0}), ("iso_cts", {"common_space_fraction": 1.5})):
        recipe = {"method": method, "base": str(base), "models": [str(f) for f in fts], "parameters": params}
        with pytest.raises(ForgetlessError, match="outside"):
            engine.build_plan(recipe, out=tmp_path / "o")


def test_the_recipe_device_reaches_every_svd(family, tmp_path, monkeypatch):
    from forgetless.methods import spectral

    base, fts = family
    seen, real = [], spectral.resolve_device

    def recording(device="auto"):
        seen.append(str(device))
        return real(device)

    monkeypatch.setattr(spectral, "resolve_device", recording)
    for method in ("tsv_m", "iso_c", "iso_cts"):
        seen.clear()
        recipe = {"method": method, "base": str(base), "models": [str(f) for f in fts], "device": "cpu"}
        forgetless.merge(recipe, out=tmp_path / method, progress=False)
        matrices = sum(t.dim() == 2 for t in load_file(str(base / "model.safetensors")).values())
        assert seen == ["cpu"] * matrices, method


# ---------------------------------------------------------------------------------------------- thin_svd
@pytest.fixture
def float32_svd_gives_up(monkeypatch):
    """torch.linalg.svd refusing every float32 matrix as LAPACK's divide and conquer refused one of a 2-step LoRA
    smoke run's Iso-CTS stacks (576 × 1536, the sum's singular values float32 noise beyond rank 32); float64 runs."""
    svd = torch.linalg.svd
    calls = []

    def refusing(x, full_matrices=True, **kw):
        calls.append(x.dtype)
        if x.dtype != torch.float64:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(x, full_matrices=full_matrices, **kw)

    monkeypatch.setattr(torch.linalg, "svd", refusing)
    return svd, calls


def test_thin_svd_is_torchs_where_it_converges():
    from forgetless.methods.linalg import thin_svd

    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    for full in (False, True):
        assert all(
            torch.equal(a, b) for a, b in zip(thin_svd(x, full), torch.linalg.svd(x, full_matrices=full))
        )


def test_thin_svd_retries_in_float64_where_float32_does_not_converge(float32_svd_gives_up, monkeypatch):
    from forgetless.methods.linalg import thin_svd

    svd, calls = float32_svd_gives_up
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(1))
    U, S, Vh = thin_svd(x)
    want = svd(x.double(), full_matrices=False)
    assert calls == [torch.float32, torch.float64]
    assert all(a.dtype == torch.float32 and torch.equal(a, b.float()) for a, b in zip((U, S, Vh), want))
    never = torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(never))
    with pytest.raises(torch.linalg.LinAlgError):  # float64 that does not converge is not retried
        thin_svd(x.double())


@pytest.mark.parametrize("rule", ["tsv_m", "iso_c", "iso_cts"])
def test_spectral_merges_finish_where_float32_svd_gives_up(rule, float32_svd_gives_up):
    """Every SVD of the three rules goes through thin_svd: with float32 refused throughout, each still returns
    its float32 Δ, within float32 rounding of the same rule in float64."""
    taus = random_taus((24, 40), 3, seed=4)
    fn = {"tsv_m": tsv_delta, "iso_c": iso_c_delta, "iso_cts": iso_cts_delta}[rule]
    got = fn(taus)
    assert got.dtype == torch.float32 and rel(got, fn([t.double() for t in taus])) < 1e-5
