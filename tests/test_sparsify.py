"""Model Breadcrumbs and DELLA (`methods/sparsify.py`) against mergekit's ``sparsify.py`` written out here op for op
(``magnitude_outliers``, ``della_magprune``, ``rescaled_masked_tensor``; and DELLA's first, 1/p rescale), the
registered methods against their rules bit for bit, on row blocks, and mergekit configs merged end to end.

What is compared, and how closely:
- Breadcrumbs has no randomness: bit for bit, mergekit's counts and slice included, against the formula with a
  stable order among equal |τ| (mergekit's ``torch.sort`` is not stable: it may drop another of equal magnitudes at
  a boundary);
- DELLA draws its masks from a generator: mergekit from torch's global one, forgetless from generators seeded per
  tensor name, so the tools' outputs are not the same bits. Given the same generator (the same masks) the keep
  probabilities and the result are bit for bit mergekit's; the draws themselves are checked in distribution (keep
  frequencies, and the mean over many seeds of the 1/p-rescaled drop is the task vector).
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from test_engine import tensors as block_tensors
from test_engine_blocks import call, gens_for, on_blocks, resolved, small_allowances, tied_family  # noqa: F401  (fixtures)
from test_mergekit_recipe import gta, mergekit_config, run, tensors, ws  # noqa: F401  (ws: a fixture)

import forgetless
from forgetless import engine
from forgetless.engine import tensor_generators
from forgetless.errors import ForgetlessError
from forgetless.methods import METHODS, sparsify
from forgetless.recipe import load_recipe

torch.set_num_threads(1)


# ------------------------------------------------------------------------------- mergekit, op for op
def mk_rescaled(tensor, mask, l1):
    """rescaled_masked_tensor with norm l1 (or None)."""
    masked = tensor * mask
    if not l1:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def mk_outlier_counts(num, density, gamma):
    target_n = int(density * num)
    n_top = int(gamma * num)
    n_bot = num - target_n - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_bot, n_top


def mk_magnitude_outliers(tensor, density, gamma, l1=False, paper=False):
    """magnitude_outliers, its sort made stable; ``paper``: the slice [n_bot : num − n_top] (mergekit's
    [n_bot:-n_top] is empty when n_top is 0)."""
    if density >= 1:
        return tensor
    n_bot, n_top = mk_outlier_counts(tensor.numel(), density, gamma)
    indices = torch.sort(tensor.abs().view(-1).float(), descending=False, stable=True).indices
    mask = torch.zeros_like(tensor)
    mask.view(-1)[indices[n_bot : tensor.numel() - n_top] if paper else indices[n_bot:-n_top]] = 1
    return mk_rescaled(tensor, mask, l1)


def mk_della_probs(tensor, density, epsilon):
    """della_magprune's probabilities (its argsort made stable), on the tensor as della_magprune shapes it."""
    if len(tensor.shape) < 2:
        tensor = tensor.unsqueeze(0)
    sorted_indices = torch.argsort(tensor.abs(), dim=1, descending=False, stable=True)
    ranks = sorted_indices.argsort(dim=1).to(torch.float32) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def mk_della(tensor, density, epsilon, rescale, generator):
    """della_magprune with rescale_norm l1 or None; "probability": mergekit's first DELLA (res / probs)."""
    if density >= 1:
        return tensor
    shape = tensor.shape
    probs = mk_della_probs(tensor, density, epsilon)
    mask = torch.bernoulli(probs, generator=generator)
    flat = tensor.unsqueeze(0) if len(shape) < 2 else tensor
    if rescale == "probability":
        return (flat * mask / probs).reshape(shape)
    return mk_rescaled(flat, mask, rescale == "l1").reshape(shape)


# ------------------------------------------------------------------------------- inputs
SHAPES = [(37,), (64,), (1000,), (23, 17), (9, 4, 5)]


def task_vector(shape, seed, ties=False):
    """A task vector; ``ties``: on a coarse grid with exact zeros (equal |τ| at every boundary)."""
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(shape, generator=g)
    if ties:
        tau = torch.round(tau * 3) / 3
    return tau


def family(n=3, shape=(23, 17), seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + task_vector(shape, seed + 1 + k, ties) / 8 for k in range(n)]


def same_bits(a, b):
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


# ------------------------------------------------------------------------------- Breadcrumbs
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 0.9, 0.995, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.1, 0.6])
def test_breadcrumbs_drop_is_mergekits_magnitude_outliers(shape, ties, density, gamma):
    tau = task_vector(shape, 7, ties)
    for l1 in (False, True):
        got = sparsify.breadcrumbs_drop(tau.clone(), density, gamma, rescale=l1, mergekit_slice=True)
        assert same_bits(got, mk_magnitude_outliers(tau, density, gamma, l1)), l1
        got = sparsify.breadcrumbs_drop(tau.clone(), density, gamma, rescale=l1)
        assert same_bits(got, mk_magnitude_outliers(tau, density, gamma, l1, paper=True)), l1


def test_breadcrumbs_counts_and_mergekits_empty_slice():
    # 100 entries at density 0.9, γ 0.01: the top 1 and the bottom 9 dropped
    assert sparsify.kept_ranks(100, 0.9, 0.01) == (9, 99)
    # density + γ > 1: fewer top entries dropped, none at the bottom (mergekit's n_top += n_bot)
    assert sparsify.kept_ranks(1000, 0.995, 0.01) == (0, 995)
    # ⌊γ·n⌋ = 0: the paper keeps the top; mergekit's slice [n_bot:-0] keeps nothing
    assert sparsify.kept_ranks(64, 0.5, 0.01) == (32, 64)
    assert sparsify.kept_ranks(64, 0.5, 0.01, mergekit_slice=True) == (32, 32)
    tau = task_vector((64,), 1)
    assert not sparsify.breadcrumbs_drop(tau.clone(), 0.5, 0.01, mergekit_slice=True).any()
    assert int(sparsify.breadcrumbs_drop(tau.clone(), 0.5, 0.01).count_nonzero()) == 32
    assert sparsify.kept_ranks(64, 1.0, 0.5, mergekit_slice=True) == (0, 64)  # density 1: every entry


def test_breadcrumbs_keeps_the_middle_magnitudes_ties_to_the_lower_index():
    tau = torch.tensor([3.0, -1.0, 2.0, -2.0, 1.0, 5.0, 0.5, -2.0, 4.0, 1.0])
    # ascending stable: 0.5(6) 1(1) 1(4) 1(9) 2(2) 2(3) 2(7) 3(0) 4(8) 5(5); drop 3 at the bottom, 1 at the top
    got = sparsify.breadcrumbs_drop(tau.clone(), 0.6, 0.1)
    assert got.nonzero().view(-1).tolist() == [0, 2, 3, 7, 8, 9]


# ------------------------------------------------------------------------------- DELLA
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("density,epsilon", [(0.5, 0.15), (0.2, 0.19), (0.9, 0.0), (0.7, 0.29), (1.0, 0.3)])
def test_della_drop_is_mergekits_della_magprune_given_the_draws(shape, ties, density, epsilon):
    tau = task_vector(shape, 11, ties)
    if density < 1:
        probs = sparsify.keep_probabilities(tau, density, epsilon)
        assert same_bits(probs, mk_della_probs(tau, density, epsilon).reshape(shape))
    for rescale in ("l1", "none", "probability"):
        got = sparsify.della_drop(tau.clone(), density, epsilon, rescale, gens(1)[0])
        assert same_bits(got, mk_della(tau, density, epsilon, rescale, gens(1)[0])), rescale


def test_della_probabilities_run_from_density_minus_to_plus_epsilon_by_rank():
    tau = task_vector((6, 41), 3)
    p = sparsify.keep_probabilities(tau, 0.4, 0.25)
    ranks = tau.abs().argsort(dim=1).argsort(dim=1).double()  # no ties: 0 … 40
    torch.testing.assert_close(p.double(), 0.15 + 0.5 * ranks / 40, rtol=0, atol=1e-7)
    assert torch.equal(p.min(dim=1).values, torch.full((6,), 0.4 - 0.25))
    assert torch.equal(p.max(dim=1).values, torch.full((6,), 0.4 + 0.25))
    one = sparsify.keep_probabilities(torch.randn(5, 1), 0.4, 0.25)  # rows of one entry (mergekit: 0/0)
    assert torch.equal(one, torch.full((5, 1), 0.4))


def test_della_refuses_probabilities_outside_0_1():
    for density, epsilon in ((0.1, 0.1), (0.9, 0.1), (0.5, 0.6)):
        with pytest.raises(ForgetlessError, match="epsilon"):
            sparsify.della_drop(torch.randn(4, 4), density, epsilon)
    tau = torch.randn(4, 4)
    assert torch.equal(sparsify.della_drop(tau.clone(), 1.0, 0.6), tau)  # density 1: no drop


def test_della_keeps_at_its_probabilities_and_its_expectation_is_the_task_vector():
    tau = task_vector((8, 50), 5) + 0.01  # no zeros: a dropped entry is a zero
    p = sparsify.keep_probabilities(tau, 0.5, 0.2).double()
    seeds = 4000
    kept = torch.zeros(tau.shape, dtype=torch.float64)
    total = torch.zeros(tau.shape, dtype=torch.float64)
    for s in range(seeds):
        out = sparsify.della_drop(tau.clone(), 0.5, 0.2, "probability", torch.Generator().manual_seed(s))
        kept += out != 0
        total += out
    z_keep = (kept / seeds - p) / (p * (1 - p) / seeds).sqrt()
    assert z_keep.abs().max() < 5.5
    sigma = tau.double().abs() * ((1 - p) / p / seeds).sqrt()
    assert ((total / seeds - tau.double()) / sigma).abs().max() < 5.5
    assert abs(float(z_keep.mean())) < 5.5 / math.sqrt(tau.numel())  # no bias overall


# ------------------------------------------------------------------------------- the registered methods
def _run(name, base, fts, generator_seed=0, **params):
    spec = METHODS[name]
    kw = {"generator": gens(len(fts), generator_seed)} if "generator" in spec.context else {}
    return spec.fn(base.clone(), [f.clone() for f in fts], **params, **kw)


@pytest.mark.parametrize("convention", ["forgetless", "mergekit"])
@pytest.mark.parametrize("shape", [(37,), (23, 17), (9, 4, 5)])
def test_registered_sums_give_their_rules_bits(convention, shape):
    base, fts = family(shape=shape)
    w, d = [0.7, 1.0, -1.3], [0.5, 0.9, 1.0]
    for rescale, mk in ((False, False), (True, True)):
        got = _run(
            "breadcrumbs", base, fts, weight=w, density=d, gamma=[0.05, 0.0, 0.1], lambda_=0.8,
            rescale=rescale, mergekit_slice=mk, convention=convention,
        )  # fmt: skip
        rule = sparsify.breadcrumbs_rule(base, fts, w, d, [0.05, 0.0, 0.1], 0.8, rescale, mk, convention)
        assert same_bits(got, rule)
    for rescale in ("probability", "l1", "none"):
        got = _run(
            "della_linear", base, fts, weight=w, density=d, epsilon=[0.2, 0.05, 0.3], lambda_=0.8,
            rescale=rescale, convention=convention,
        )  # fmt: skip
        rule = sparsify.della_linear_rule(
            base, fts, w, d, [0.2, 0.05, 0.3], 0.8, rescale, convention, generator=gens(3)
        )
        assert same_bits(got, rule)


@pytest.mark.parametrize(
    "convention,sign", [("mergekit", "total"), ("mergekit", "frequency"), ("peft", "total")]
)
@pytest.mark.parametrize("normalize", [True, False])
def test_registered_ties_variants_give_their_rules_bits(convention, sign, normalize):
    base, fts = family()
    w, d = [0.5, 1.0, 2.0], [0.6, 0.3, 1.0]
    common = {"weight": w, "density": d, "lambda_": 0.9, "sign": sign, "normalize": normalize}
    got = _run(
        "breadcrumbs_ties", base, fts, gamma=[0.02, 0.1, 0.0], rescale=True, convention=convention, **common
    )
    rule = sparsify.breadcrumbs_ties_rule(
        base, fts, w, d, [0.02, 0.1, 0.0], 0.9, True, False, sign, normalize, convention
    )
    assert same_bits(got, rule)
    got = _run("della", base, fts, epsilon=[0.1, 0.2, 0.0], rescale="l1", convention=convention, **common)
    rule = sparsify.della_rule(
        base, fts, w, d, [0.1, 0.2, 0.0], 0.9, "l1", sign, normalize, convention, generator=gens(3)
    )
    assert same_bits(got, rule)


def test_without_normalize_the_agreeing_entries_are_added():
    base, fts = family(n=2)
    kw = {"weight": [1.0, 1.0], "density": [1.0, 1.0], "gamma": [0.0, 0.0]}
    summed = _run("breadcrumbs_ties", base, fts, normalize=False, **kw)
    averaged = _run("breadcrumbs_ties", base, fts, **kw)
    taus = [f - base for f in fts]
    agree = (taus[0] * taus[1]) > 0  # both agree: the sum, not the mean
    torch.testing.assert_close((summed - base)[agree], (taus[0] + taus[1])[agree])
    torch.testing.assert_close((averaged - base)[agree], ((taus[0] + taus[1]) / 2)[agree])


def test_breadcrumbs_l1_rescale_on_row_blocks_is_the_whole_tensors_to_rounding():
    spec = METHODS["breadcrumbs"]
    base, fts = family(shape=(40, 30), ties=False)
    params = resolved("breadcrumbs", 3, {"density": 0.7, "gamma": 0.05, "rescale": True})
    whole = call(spec, params, base.clone(), [f.clone() for f in fts], {}, None)
    for step in (1, 7):
        got = on_blocks(spec, params, base, fts, {}, step, 0)
        torch.testing.assert_close(got, whole, rtol=2e-7, atol=1e-7)
        assert torch.equal(got != base, whole != base)  # the same entries kept


@pytest.mark.parametrize("shape", [(40, 30), (300,)])
def test_della_l1_rescale_on_row_blocks_is_the_whole_tensors_to_rounding(shape):
    """The pre-pass draws each block's masks as the blocks will (rows ranked in the block, a 1-D tensor ranked
    whole) and sums the norms: the same entries kept, the values to float32 rounding."""
    spec = METHODS["della"]
    base, fts = family(shape=shape, ties=False)
    params = resolved("della", 3, {"density": 0.6, "epsilon": 0.1, "rescale": "l1"})
    whole = call(spec, params, base.clone(), [f.clone() for f in fts], {}, None, gens_for(spec, 3, 5))
    for step in (1, 7):
        got = on_blocks(spec, params, base, fts, {}, step, 5)
        assert torch.equal(got != base, whole != base)
        scale = float(whole.abs().max())  # the factor's last bit: an ulp or so of the tensor's scale
        torch.testing.assert_close(got, whole, rtol=0, atol=4 * torch.finfo(torch.float32).eps * scale)


def test_the_methods_list_their_parameters_and_ranges():
    bc, de = METHODS["breadcrumbs_ties"], METHODS["della"]
    assert bc.per_model == ("weight", "density", "gamma") and de.per_model == ("weight", "density", "epsilon")
    assert str(bc.ranges["gamma"]) == "[0, 1]" and str(de.ranges["epsilon"]) == "[0, 0.5)"
    assert de.choices["rescale"] == ("probability", "l1", "none")
    assert de.problem("epsilon", 0.5) is not None and bc.problem("density", 0.0) is not None
    assert de.context == ("generator", "block") and bc.streaming.rows == "blocks"


@pytest.mark.parametrize(
    "method,params",
    [
        ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.05}),
        ("della", {"density": 0.6, "epsilon": 0.2}),
        ("della_linear", {"density": 0.5, "rescale": "none"}),
    ],
)
def test_a_merge_in_row_blocks_is_the_whole_merge_bit_for_bit(
    tied_family, tmp_path, small_allowances, method, params
):
    b, fts = str(tied_family["base"]), [str(p) for p in tied_family["fts"]]
    recipe = {"method": method, "base": b, "models": fts, "parameters": params, "seed": 4}
    forgetless.merge(recipe, out=tmp_path / "whole", progress=False, memory="1GiB")
    plan = engine.build_plan(recipe, out=tmp_path / "blocks", memory=12_000)
    assert "model.embed_tokens.weight" in plan.block_rows and plan.peak_memory_estimate() <= 12_000
    engine.execute(plan, progress=False)
    whole, blocks = block_tensors(tmp_path / "whole"), block_tensors(tmp_path / "blocks")
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)


@pytest.mark.parametrize("method", ["della", "dare_ties"])
def test_an_l1_rescale_merged_in_row_blocks_is_the_whole_merge_to_rounding(
    tied_family, tmp_path, small_allowances, method
):
    b, fts = str(tied_family["base"]), [str(p) for p in tied_family["fts"]]
    recipe = {"method": method, "base": b, "models": fts, "parameters": {"rescale": "l1"}, "seed": 4}
    plan = forgetless.engine.build_plan(recipe, out=tmp_path / "blocks", memory=12_000)
    assert plan.block_rows  # some tensors are merged in row blocks
    forgetless.merge(recipe, out=tmp_path / "blocks", progress=False, memory=12_000)
    forgetless.merge(recipe, out=tmp_path / "whole", progress=False)
    blocks, whole = block_tensors(tmp_path / "blocks"), block_tensors(tmp_path / "whole")
    eps = torch.finfo(torch.float32).eps
    for name, w in whole.items():  # the factor's last bit: an ulp or so of the tensor's scale
        torch.testing.assert_close(blocks[name], w, rtol=0, atol=4 * eps * float(w.abs().max()), msg=name)


# ------------------------------------------------------------------------------- mergekit configs
def _per_tensor(b, f, fn):
    return {name: [fn(ft[name] - b[name], k, name) for k, ft in enumerate(f)] for name in b}


@pytest.mark.parametrize(
    "method,top",
    [
        ("breadcrumbs", {}),  # mergekit's defaults: γ 0.01, rescale false, normalize false
        ("breadcrumbs", {"rescale": True, "gamma": 0.05, "lambda": 0.8}),
        ("breadcrumbs_ties", {}),  # normalize false: the agreeing entries added
        ("breadcrumbs_ties", {"normalize": True, "rescale": True}),
    ],
)
def test_breadcrumbs_configs_are_mergekits_bit_for_bit(ws, method, top):
    root, base, fts = ws
    w, dens, gammas = [0.8, 1.2], [0.6, 0.9], [None, 0.1]
    per = [{"weight": x, "density": d, **({"gamma": g} if g else {})} for x, d, g in zip(w, dens, gammas)]
    out = run(root, mergekit_config(method, base, fts[:2], per, **top), f"{method}{len(top)}")
    b, f = tensors(base), [tensors(p) for p in fts[:2]]
    gam = [g or top.get("gamma", 0.01) for g in gammas]
    deltas = _per_tensor(
        b, f, lambda tau, k, _: mk_magnitude_outliers(tau, dens[k], gam[k], top.get("rescale", False))
    )
    consensus = method == "breadcrumbs_ties"
    emptied = 0
    for name, got in out.items():
        emptied += int(not deltas[name][0].any())
        expect = gta(
            b[name], deltas[name], w, consensus=consensus, normalize=top.get("normalize", False),
            lam=top.get("lambda", 1.0),
        )  # fmt: skip
        assert torch.equal(got, expect), name
    # the norms (32 entries) with ⌊γ·32⌋ = 0 lose every entry, as mergekit's slice does
    assert emptied == (7 if int(gam[0] * 32) == 0 else 0)


@pytest.mark.parametrize("method,top", [("della", {}), ("della_linear", {}), ("della", {"rescale": False})])
def test_della_configs_are_mergekits_formula_given_the_masks(ws, method, top):
    root, base, fts = ws
    w, dens, eps = [0.8, 1.2], [0.6, 0.4], [0.2, None]
    per = [{"weight": x, "density": d, **({"epsilon": e} if e else {})} for x, d, e in zip(w, dens, eps)]
    out = run(root, mergekit_config(method, base, fts[:2], per, **top), f"{method}{len(top)}")
    b, f = tensors(base), [tensors(p) for p in fts[:2]]
    rescale = "l1" if top.get("rescale", True) else "none"  # mergekit's default: rescale true (L1)

    def drop(tau, k, name):  # forgetless's draws for this tensor and model, re-drawn here
        return mk_della(tau, dens[k], eps[k] or 0.15, rescale, tensor_generators(0, name, 2)[k])

    deltas = _per_tensor(b, f, drop)
    for name, got in out.items():
        expect = gta(
            b[name], deltas[name], w, consensus=method == "della", normalize=method == "della", lam=1.0
        )
        assert torch.equal(got, expect), name


def test_mergekit_configs_map_with_mergekits_defaults(ws, tmp_path):
    _, base, fts = ws
    for method, want in [
        ("breadcrumbs", {"rescale": False, "mergekit_slice": True}),
        ("breadcrumbs_ties", {"rescale": False, "mergekit_slice": True, "normalize": False}),
        ("della", {"rescale": "l1"}),
        ("della_linear", {"rescale": "l1"}),
    ]:
        path = tmp_path / f"{method}.yaml"
        cfg = mergekit_config(method, base, fts[:2], [{"weight": 1.0}, {"weight": 0.5, "density": 0.5}])
        path.write_text(yaml.safe_dump(cfg))
        recipe = load_recipe(path)
        assert recipe.method == method
        assert {k: recipe.parameters[k] for k in want} == want
        extra = "gamma" if method.startswith("breadcrumbs") else "epsilon"
        assert [m.params[extra] for m in recipe.models] == [0.01 if extra == "gamma" else 0.15] * 2
        assert [m.params["density"] for m in recipe.models] == [1.0, 0.5]  # mergekit's default density 1
