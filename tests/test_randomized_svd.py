"""The randomized re-factoring of the adapter-space SVD baselines (``svd: randomized``) against the exact truncated
SVD: on matrices of known spectrum, of exact low rank, narrower than the rank, inside lora_ties/DARE, and through a
recipe."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_adapter_merge import _merge, adapters  # noqa: F401  (adapters: the fixture)

from forgetless.errors import ForgetlessError
from forgetless.methods.adapter import lora_dare_ties, lora_ties, randomized_svd, truncated_svd
from forgetless.methods.baselines import dare_ties, ties


def rel_err(M: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """‖M − B·A‖_F / ‖M‖_F, in float64."""
    return float((M.double() - B.double() @ A.double()).norm() / M.double().norm())


def known_spectrum(out: int, inp: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, s.numel(), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(inp, s.numel(), generator=g, dtype=torch.float64)).Q
    return ((U * s) @ V.T).float()


def test_on_a_decaying_spectrum_it_is_as_good_as_the_exact_svd():
    s = 0.8 ** torch.arange(300, dtype=torch.float64)
    M = known_spectrum(300, 500, s)
    A, B = randomized_svd(M, 16)
    assert A.shape == (16, 500) and B.shape == (300, 16)
    optimum = float((s[16:] ** 2).sum().sqrt() / (s**2).sum().sqrt())  # Eckart–Young, in closed form
    assert rel_err(M, *truncated_svd(M, 16)) == pytest.approx(optimum, rel=1e-4)
    assert rel_err(M, A, B) <= optimum * (1 + 1e-4)
    got = torch.linalg.svdvals((B @ A).double())[:16]
    torch.testing.assert_close(got, s[:16], rtol=1e-4, atol=0)
    # without oversampling and power iterations the range finder alone is measurably worse: they matter
    assert rel_err(M, *randomized_svd(M, 16, oversample=2, power_iters=0)) > optimum * (1 + 1e-2)


def test_a_matrix_of_exact_low_rank_is_reproduced_and_the_result_is_seeded():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(200, 12, generator=g) @ torch.randn(12, 90, generator=g)
    A, B = randomized_svd(M, 12)
    assert rel_err(M, A, B) < 1e-5
    A2, B2 = randomized_svd(M, 12)
    assert torch.equal(A, A2) and torch.equal(B, B2)  # same seed, same bits
    A3, _ = randomized_svd(M, 12, seed=1)
    assert not torch.equal(A, A3)


def test_a_rank_above_the_matrix_pads_with_zero_factors():
    M = torch.randn(6, 40)
    A, B = randomized_svd(M, 10)
    assert A.shape == (10, 40) and B.shape == (6, 10)
    assert rel_err(M, A, B) < 1e-5 and not A[6:].any() and not B[:, 6:].any()


@pytest.mark.parametrize("method, rule", [(lora_ties, ties), (lora_dare_ties, dare_ties)])
def test_inside_the_adapter_merges_the_error_is_within_1e_3_of_exact(method, rule):
    g = torch.Generator().manual_seed(2)
    pairs = [(torch.randn(8, 96, generator=g) / 3, torch.randn(64, 8, generator=g) / 3) for _ in range(3)]
    kw = {"weight": [1.0] * 3, "density": [0.5] * 3}
    seeded = (lambda: {"generator": torch.Generator().manual_seed(0)}) if rule is dare_ties else dict
    full = rule(
        torch.zeros(64, 96), [B @ A for A, B in pairs], lambda_=1.0, **kw, **seeded()
    )  # what is factored
    exact = method(pairs, rank=8, **kw, **seeded())
    fast = method(pairs, rank=8, svd="randomized", **kw, **seeded())
    assert -1e-6 < rel_err(full, *fast) - rel_err(full, *exact) < 1e-5  # the optimum, to rounding


def test_a_recipe_takes_svd_randomized_and_refuses_other_values(adapters, tmp_path):
    _, base, paths = adapters
    params = {"density": 0.5, "rank": 4}
    _merge(base, paths, "lora_ties", tmp_path / "exact", parameters=params)
    _merge(base, paths, "lora_ties", tmp_path / "fast", parameters={**params, "svd": "randomized"})
    exact = load_file(str(tmp_path / "exact" / "adapter_model.safetensors"))
    fast = load_file(str(tmp_path / "fast" / "adapter_model.safetensors"))
    assert exact.keys() == fast.keys()
    for k in [k for k in exact if "lora_A" in k]:
        kb = k.replace("lora_A", "lora_B")
        want, got = exact[kb] @ exact[k], fast[kb] @ fast[k]
        assert float((got - want).norm() / want.norm()) < 1e-3, k
    with pytest.raises(ForgetlessError, match="svd: 'fast' is not one of exact, randomized"):
        _merge(base, paths, "lora_ties", tmp_path / "never", parameters={**params, "svd": "fast"})
