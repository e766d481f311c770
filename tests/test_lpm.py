"""LPM (MAny's low-rank parameter merging): the recursion against the batch form at every step, and both against
independent computations (a stacked least-squares problem, the one-task closed form, per-feature loops)."""

from __future__ import annotations

import pytest
import torch

from forgetless.methods.lpm import DEFAULT_GAMMA, SingularGramError, lpm_batch, lpm_recursive

OUT, IN, T = 5, 7, 5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _task(seed: int, rows: int = 12):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, IN, generator=g, dtype=torch.float64) * (1 + seed % 3)
    return torch.randn(OUT, IN, generator=g, dtype=torch.float64), X


def _sequence(singular: bool):
    """Five tasks; with ``singular``, task 2's data lies in a 2-dimensional subspace and task 3 has no data at all
    (its Gram is 0), so their Grams are singular (the sum stays positive definite thanks to the other tasks)."""
    tasks = [_task(s) for s in range(T)]
    if singular:
        d, X = tasks[2]
        tasks[2] = (
            d,
            X[:, :2] @ torch.randn(2, IN, generator=torch.Generator().manual_seed(9), dtype=torch.float64),
        )
        tasks[3] = (tasks[3][0], torch.zeros(3, IN, dtype=torch.float64))
    return [d for d, _ in tasks], [X for _, X in tasks]


def _ridge(grams, gamma: float, mode: str) -> float:
    return gamma * float(sum(g.diagonal().mean() for g in grams)) if mode == "relative" else gamma


def _stacked_lstsq(deltas, Xs, rho: float) -> torch.Tensor:
    """argmin Σᵢ‖Xᵢ(ΔW − ΔWᵢ)ᵀ‖² + ρ‖ΔW‖² as one least-squares problem: rows Xᵢ with targets XᵢΔWᵢᵀ, and √ρ·I."""
    A = torch.cat([*Xs, rho**0.5 * torch.eye(IN, dtype=torch.float64)])
    Y = torch.cat([*(X @ d.T for d, X in zip(deltas, Xs)), torch.zeros(IN, OUT, dtype=torch.float64)])
    return torch.linalg.lstsq(A, Y, driver="gelsd").solution.T


@pytest.mark.parametrize("singular", [False, True])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("approx", ["full", "diagonal"])
def test_recursive_equals_batch_at_every_step(singular, mode, approx):
    deltas, Xs = _sequence(singular)
    grams = [X.T @ X for X in Xs]
    gamma = 1e-2
    rec = lpm_recursive(deltas, grams, gamma=gamma, gamma_mode=mode, approx=approx)
    assert len(rec) == T
    for t in range(T):
        batch = lpm_batch(deltas[: t + 1], grams[: t + 1], gamma=gamma, gamma_mode=mode, approx=approx)
        assert rec[t].dtype == torch.float64
        assert _rel(rec[t], batch) < 1e-6, (t, _rel(rec[t], batch))
        if approx == "full":  # and both are the least-squares optimum, solved independently
            want = _stacked_lstsq(deltas[: t + 1], Xs[: t + 1], _ridge(grams[: t + 1], gamma, mode))
            assert _rel(batch, want) < 1e-9
    # the merge moves with every task: no step is a no-op except the task without data
    for t in range(1, T):
        if singular and t == 3:
            assert _rel(rec[t], rec[t - 1]) < 1e-12  # a zero Gram contributes nothing
        else:
            assert _rel(rec[t], rec[t - 1]) > 1e-3


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_one_task_closed_form_and_the_effect_of_gamma(mode):
    d, X = _task(0)
    G = X.T @ X
    for gamma in (0.0, 1e-3, 0.1, 10.0):
        rho = gamma * float(G.diagonal().mean()) if mode == "relative" else gamma
        want = d @ G @ torch.linalg.inv(G + rho * torch.eye(IN, dtype=torch.float64))
        got = lpm_batch([d], [G], gamma=gamma, gamma_mode=mode)
        assert _rel(got, want) < 1e-10
        assert _rel(lpm_recursive([d], [G], gamma=gamma, gamma_mode=mode)[0], want) < 1e-10
    assert (
        _rel(lpm_batch([d], [G], gamma=0.0), d) < 1e-10
    )  # one task, no ridge, full-rank data: its own delta
    unit = 1.0 if mode == "relative" else float(G.diagonal().mean())
    norms = [
        float(lpm_batch([d], [G], gamma=g * unit, gamma_mode=mode).norm()) for g in (0.0, 0.1, 1.0, 100.0)
    ]
    assert norms == sorted(norms, reverse=True) and norms[-1] < 0.1 * norms[0]  # γ shrinks towards the base


def test_relative_gamma_is_scale_free_and_absolute_is_in_the_units_of_g():
    deltas, Xs = _sequence(False)
    grams = [X.T @ X for X in Xs]
    scaled = [1000.0 * g for g in grams]
    rel = lpm_batch(deltas, grams, gamma=0.05)
    assert _rel(lpm_batch(deltas, scaled, gamma=0.05), rel) < 1e-10
    ab = lpm_batch(deltas, grams, gamma=0.05, gamma_mode="absolute")
    assert _rel(lpm_batch(deltas, scaled, gamma=50.0, gamma_mode="absolute"), ab) < 1e-10
    assert _rel(lpm_batch(deltas, scaled, gamma=0.05, gamma_mode="absolute"), ab) > 1e-4


def test_diagonal_is_the_per_feature_weighted_average():
    deltas, Xs = _sequence(True)
    grams = [X.T @ X for X in Xs]
    gamma = 1e-2
    got = lpm_batch(deltas, grams, gamma=gamma, approx="diagonal")
    rho = gamma * sum(float(g.diagonal().sum()) for g in grams) / IN
    for j in range(IN):
        den = sum(float(g[j, j]) for g in grams) + rho
        for o in range(OUT):
            num = sum(float(d[o, j]) * float(g[j, j]) for d, g in zip(deltas, grams))
            assert abs(float(got[o, j]) - num / den) < 1e-12
    # the same as the full LPM of the diagonal Grams
    full_of_diag = lpm_batch(deltas, [torch.diag(g.diagonal()) for g in grams], gamma=gamma)
    assert _rel(got, full_of_diag) < 1e-12


def test_unseen_inputs_stay_at_the_base_and_a_singular_sum_without_ridge_is_refused():
    d, X = _task(1)
    X = X.clone()
    X[:, 3] = 0.0  # no task's data excites input feature 3
    G = X.T @ X
    got = lpm_batch([d, 2 * d], [G, G], gamma=1e-6)
    assert float(got[:, 3].abs().max()) == 0.0
    assert float(got[:, :3].abs().max()) > 0.1
    with pytest.raises(SingularGramError):
        lpm_batch([d], [G], gamma=0.0)
    with pytest.raises(SingularGramError):
        lpm_batch([d], [G], gamma=0.0, approx="diagonal")
    with pytest.raises(ValueError, match="gamma"):
        lpm_batch([d], [G], gamma=-1.0)


def test_default_ridge_survives_a_float32_gram_with_a_massive_activation():
    """A rank-deficient Gram (150 tokens, 1536 features) with one token 30× larger than the rest — the massive
    activations of real MLP inputs — rounded to float32 as Gram files are: its null-space eigenvalues go negative
    by more than 1e-6 × the mean diagonal (the old default ridge fails), and the default ridge clears them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 1536, generator=g, dtype=torch.float64)
    x[0] *= 30
    gram = (x.T @ x / 150).float().double()
    assert torch.linalg.eigvalsh(gram)[0] < -1e-6 * gram.diagonal().mean()
    delta = torch.randn(8, 1536, generator=g, dtype=torch.float64)
    with pytest.raises(SingularGramError):
        lpm_batch([delta], [gram], gamma=1e-6)
    merged = lpm_batch([delta], [gram])
    assert DEFAULT_GAMMA == 1e-4 and torch.isfinite(merged).all()
    # on the directions the data sees, one task's merge is its own delta, up to O(γ)
    top = torch.linalg.eigh(gram).eigenvectors[:, -100:]
    err = ((merged - delta) @ top).norm() / (delta @ top).norm()
    assert err < 1e-2


@pytest.mark.parametrize("approx", ["full", "diagonal"])
def test_a_step_from_the_adapters_factors_equals_the_step_from_their_product(approx):
    """ΔWₜGₜ taken as B(AG) from the LoRA factors gives the step of the multiplied-out ΔW = BA, to rounding."""
    from forgetless.methods.lpm import Solver, lpm_accumulate, lpm_update

    g = torch.Generator().manual_seed(3)
    factors = [
        (
            torch.randn(2, IN, generator=g, dtype=torch.float64),
            torch.randn(OUT, 2, generator=g, dtype=torch.float64),
        )
        for _ in range(3)
    ]
    grams = [X.T @ X for X in (torch.randn(10, IN, generator=g, dtype=torch.float64) for _ in range(3))]
    dense = lpm_recursive([B @ A for A, B in factors], grams, gamma=1e-2, approx=approx)
    merged, h, ridge = None, None, 0.0
    for t, ((A, B), G) in enumerate(zip(factors, grams)):
        h, ridge, inc, gt = lpm_accumulate(h, ridge, G, gamma=1e-2, approx=approx)
        merged = lpm_update(merged, (A, B), gt, inc, Solver(h, ridge))
        assert _rel(merged, dense[t]) < 1e-12, t
