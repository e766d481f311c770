"""Merge memory bounded whatever the largest tensor: tensors over the budget are merged in blocks of rows, and
every method gives exactly what it gives on the whole tensor.

Three levels: the exact streamed selection (`select.top_k_cuts`) against a stable sort; every method called on
row blocks (the registry's contract: `tensor_prepare` over the blocks, then one call per block) against the same
method on the whole tensor, for 1-D, 2-D and 3-D tensors; and the engine end to end on tiny checkpoints with a tiny
budget (the runtime and read-ahead allowances shrunk so that a few kB split every tensor) against the same merge
with no budget pressure, bit for bit, with the estimate within the budget.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os

import pytest
import torch
from conftest import build_tiny_llama, linear_weight_shapes, save_statistics_for
from safetensors.torch import load_file, save_file
from test_engine import perturbed_copy, tensors

import forgetless
from forgetless import engine
from forgetless.checkpoint.lora import open_model
from forgetless.checkpoint.reader import CheckpointReader
from forgetless.checkpoint.writer import Entry, StreamingWriter
from forgetless.engine import budget as engine_budget
from forgetless.errors import ForgetlessError
from forgetless.methods import METHODS
from forgetless.methods.fast.select import top_k_cut, top_k_cuts
from forgetless.methods.registry import RowBlock, Rows, Streaming
from forgetless.recipe import load_recipe

BLOCK_METHODS = sorted({s.name for s in METHODS.values() if s.streaming.rows == "blocks"})


# ----------------------------------------------------------------------------------------------- selection
def stable_top(x: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Mask of the k largest/smallest entries, ties to the lower index: a stable sort, the independent reference."""
    order = torch.sort(x, descending=largest, stable=True).indices[:k]
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order] = True
    return mask


def split(x: torch.Tensor, cuts: list[int]):
    bounds = [0, *cuts, x.numel()]
    return lambda: ((x[a:b], a) for a, b in itertools.pairwise(bounds))


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("sample", [16, 1 << 16])  # 16: the sampled bracket; 65536: one exact pass
def test_top_k_cut_over_pieces_equals_a_stable_sort(largest, sample):
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(5000, generator=g), torch.randint(0, 7, (5000,), generator=g).float()):  # many ties
        for k in (1, 17, 2500, 4999):
            want = stable_top(x, k, largest)
            for cuts in ([], [1], [333, 334, 4000]):
                cut = top_k_cut(split(x, cuts), k, x.numel(), largest=largest, sample=sample)
                got = torch.cat([cut.mask(p, o) for p, o in split(x, [1234])()])
                assert torch.equal(got, want), (k, cuts)
    assert top_k_cut(split(x, []), 0, 5000).mask(x).sum() == 0
    assert top_k_cut(split(x, []), 5000, 5000).mask(x).all()


def test_a_missed_bracket_is_detected_and_the_answer_still_exact():
    """The sampling pass sees other data than the counting passes (as if the sample were unlucky): the bracket
    misses, the miss is detected, a bracket three times as wide misses too, and the pass over every entry finds
    the exact cut: sampling, counting, counting wider, counting everything."""
    x = torch.arange(20_000.0)
    calls = []

    def pieces():
        calls.append(1)
        yield ([x + 20_000.0] if len(calls) == 1 else [x]), 0

    (cut,) = top_k_cuts(pieces, [100], x.numel(), sample=1000)
    assert len(calls) == 4
    assert torch.equal(cut.mask(x), stable_top(x, 100, True))


def test_a_slightly_missed_bracket_is_widened_not_dropped():
    """A sample that misses by a little (its values shifted by less than the wider bracket's margin): the second
    count pass, three times as wide, finds the exact cut without gathering every entry."""
    x = torch.arange(200_000.0)
    calls, gathered = [], []

    def pieces():
        calls.append(1)
        yield [x + 15_000.0 if len(calls) == 1 else x], 0  # beyond ±4 standard errors, within ±12

    from forgetless.methods.fast import select

    count = select._count_and_gather

    def spy(*args):
        out = count(*args)
        gathered.append(out[0].values.numel())
        return out

    select._count_and_gather = spy
    try:
        (cut,) = top_k_cuts(pieces, [100_000], x.numel(), sample=1000)
    finally:
        select._count_and_gather = count
    assert len(calls) == 3 and gathered[0] < gathered[1] < x.numel()
    assert torch.equal(cut.mask(x), stable_top(x, 100_000, True))


# ----------------------------------------------------------------------------------------------- methods
PARAMS = {
    "ties": [{"density": 0.3}, {"density": 0.7, "sign": "frequency", "convention": "peft"}],
    "dare_ties": [{"density": 0.4}],
    "dare_linear": [{"density": 0.6, "rescale": False}],
    "linear": [{"lambda": 0.3}],
    "task_arithmetic": [{"lambda": 0.7}],
    "cgm": [{"alpha": 0.5}],
    "cgm_dagger": [
        {"budget": "row", "keep": 0.6},
        {"budget": "tensor", "keep": 0.3},
        {"revert": "positive"},
        {"budget": "global", "threshold": 0.0},
    ],
    "fisher": [{"normalize": "none"}, {"normalize": "mean"}, {"normalize": "max", "epsilon": 0.5}],
    "fisher_with_base": [{"normalize": "mean", "base_weight": 2.0}],
    "regmean": [{"alpha": 0.5}],
    "slerp": [{"t": 0.3}, {"t": 0.9}],
    "model_stock": [{}, {"filter_wise": True}],
    "breadcrumbs": [{"density": 0.6, "gamma": 0.05}, {"gamma": 0.0, "mergekit_slice": True}],
    "breadcrumbs_ties": [{"density": 0.5, "gamma": 0.02}, {"density": 0.8, "gamma": 0.1, "normalize": False}],
    "della": [{"density": 0.5, "epsilon": 0.2}, {"density": 0.7, "rescale": "none", "normalize": False}],
    "della_linear": [{"density": 0.4, "epsilon": 0.3, "convention": "mergekit"}],
    "magmax": [{"lambda": 0.5}, {"lambda": 1.0}],
}


def test_every_block_method_is_covered():
    assert set(PARAMS) == set(BLOCK_METHODS)


def inputs(shape, n_models, name, ties=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    noise = [torch.randn(shape, generator=g) for _ in range(n_models)]
    if ties:  # deltas on a coarse grid: many exactly equal |Δ| at every threshold
        noise = [torch.round(d * 3) / 3 for d in noise]
    fts = [base + 0.1 * d for d in noise]
    stats = {}
    spec = METHODS[name]
    for need in spec.needs:
        want = spec.stat_shape(need, shape)
        if want is None:
            return None
        count = n_models if need in spec.per_model_needs else 1
        if need == "gram":
            xs = [torch.randn(3 * shape[1], shape[1], generator=g) for _ in range(count)]
            made = [x.T @ x for x in xs]
        else:
            made = [
                torch.rand(want, generator=g) * (torch.rand(want, generator=g) > 0.2) for _ in range(count)
            ]
        stats[need] = made if need in spec.per_model_needs else made[0]
    return base, fts, stats


def call(spec, params, base, fts, stats, rows, gens=None, block=None):
    kw = {**params, **stats}
    if "generator" in spec.context:
        kw["generator"] = gens
    if "block" in spec.context:
        kw["block"] = block
    return spec.fn(base, fts[0] if spec.models == "one" else fts, **kw)


def resolved(name, n_models, parameters):
    recipe = load_recipe(
        {"method": name, "base": "b", "models": [f"m{i}" for i in range(n_models)], "parameters": parameters}
    )
    return engine.resolve_params(recipe, METHODS[name])


def on_blocks(spec, params, base, fts, stats, step, seed):
    """What the engine does with a tensor in row blocks: the pre-pass over a stream of blocks, then one call per
    block with its RowBlock, one set of generators for the whole tensor."""
    shape, n = tuple(base.shape), base.shape[0]
    row = math.prod(shape) // n
    blocks = [(a, min(a + step, n)) for a in range(0, n, step)]

    def cut(t, a, b):
        return t[a:b].clone() if tuple(t.shape) == shape else t.clone()

    def piece(a, b):
        st = {
            k: ([cut(x, a, b) for x in v] if isinstance(v, list) else cut(v, a, b)) for k, v in stats.items()
        }
        return cut(base, a, b), [cut(f, a, b) for f in fts], st

    def stream():
        for a, b in blocks:
            bb, ff, st = piece(a, b)
            yield Rows("t", bb, ff[0] if spec.models == "one" else ff, st, a * row)

    prepare = spec.streaming.tensor_prepare
    prepare_params = (
        {**params, "generator": gens_for(spec, len(fts), seed)} if "generator" in spec.context else params
    )
    prepared = prepare(dict(prepare_params), stream, shape) if prepare else {}
    gens = gens_for(spec, len(fts), seed)
    return torch.cat(
        [call(spec, params, *piece(a, b), None, gens, RowBlock(a * row, shape, prepared)) for a, b in blocks]
    )


def gens_for(spec, n, seed):
    if "generator" not in spec.context:
        return None
    return (
        engine.tensor_generators(seed, "t", n)
        if spec.models == "many"
        else torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("name", BLOCK_METHODS)
@pytest.mark.parametrize("shape", [(37,), (23, 17), (9, 4, 5)])
def test_a_method_on_row_blocks_gives_its_result_on_the_whole_tensor(name, shape):
    spec = METHODS[name]
    n_models = 1 if spec.models == "one" else 3
    for i, parameters in enumerate(PARAMS[name]):
        made = inputs(shape, n_models, name, ties=i % 2 == 0, seed=i)
        if made is None:
            continue  # RegMean: a Gram only for 2-D weights
        base, fts, stats = made
        params = resolved(name, n_models, parameters)
        whole = call(
            spec,
            params,
            base.clone(),
            [f.clone() for f in fts],
            {k: ([x.clone() for x in v] if isinstance(v, list) else v.clone()) for k, v in stats.items()},
            None,
            gens_for(spec, n_models, 5),
        )
        for step in (1, 4, shape[0] - 1):
            got = on_blocks(spec, params, base, fts, stats, step, 5)
            assert torch.equal(got, whole), (parameters, step)


# ----------------------------------------------------------------------------------------------- engine
@pytest.fixture
def small_allowances(monkeypatch):
    """Runtime and read-ahead allowances of a few bytes, so that a budget of a few kB splits the tiny tensors."""
    monkeypatch.setattr(engine_budget, "RUNTIME_BYTES", 0)
    monkeypatch.setattr(engine_budget, "PREFETCH_BYTES", 512)


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    """A base and three fine-tunes whose deltas sit on a coarse grid (exact ties at every TIES threshold), a
    legacy .bin copy of one, and statistics for every method."""
    root = tmp_path_factory.mktemp("blocks")
    base = build_tiny_llama(root / "base", seed=0)
    sd = load_file(str(base / "model.safetensors"))
    fts = []
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        out = {
            k: (v + torch.round(torch.randn(v.shape, generator=g) * 2) / 64 if v.is_floating_point() else v)
            for k, v in sd.items()
        }
        d = perturbed_copy(base, root / f"ft{i}", seed=0, scale=0.0)
        save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
        fts.append(d)
    g = torch.Generator().manual_seed(7)
    fisher = {k: torch.rand(v.shape, generator=g) for k, v in sd.items() if v.is_floating_point()}
    stats = {
        "fisher": [
            save_statistics_for(
                base, root / f"fisher{i}.safetensors", {k: v * (i + 1) for k, v in fisher.items()}
            )
            for i in range(3)
        ]
    }
    stats["gram"] = []
    for i in range(3):
        grams = {}
        for k, s in linear_weight_shapes(base).items():
            x = torch.randn(2 * s[1], s[1], generator=g)
            grams[k] = x.T @ x
        stats["gram"].append(save_statistics_for(base, root / f"gram{i}.safetensors", grams, kind="gram"))
    return {"base": base, "fts": fts, "stats": stats, "root": root}


def recipes(fam):
    b, fts, st = str(fam["base"]), [str(p) for p in fam["fts"]], fam["stats"]
    cgm_stats = {"fisher_task": str(st["fisher"][0]), "fisher_general": str(st["fisher"][1])}
    return {
        "ties": {"method": "ties", "base": b, "models": fts, "parameters": {"density": 0.4}},
        "dare_ties": {
            "method": "dare_ties",
            "base": b,
            "models": fts,
            "parameters": {"density": 0.5},
            "seed": 3,
        },
        "task_arithmetic": {"method": "task_arithmetic", "base": b, "models": fts[:2], "dtype": "bfloat16"},
        "cgm_dagger_tensor": {
            "method": "cgm_dagger",
            "base": b,
            "models": fts[:1],
            "statistics": cgm_stats,
            "parameters": {"budget": "tensor", "keep": 0.7},
        },
        "cgm_dagger_global": {
            "method": "cgm_dagger",
            "base": b,
            "models": fts[:1],
            "statistics": cgm_stats,
            "parameters": {"budget": "global", "keep": 0.8},
        },
        "fisher": {
            "method": "fisher",
            "base": b,
            "parameters": {"normalize": "mean"},
            "models": [{"model": m, "statistics": {"fisher": str(s)}} for m, s in zip(fts, st["fisher"])],
        },
        "regmean": {
            "method": "regmean",
            "base": b,
            "models": [{"model": m, "statistics": {"gram": str(s)}} for m, s in zip(fts, st["gram"])],
        },
        "scope_copy": {
            "method": "linear",
            "base": b,
            "models": fts[:1],
            "parameters": {"lambda": 0.5},
            "scope": {"include": ["language.layers[0:1]"], "outside": "finetuned"},
            "dtype": "float16",
        },
    }


@pytest.mark.parametrize(
    "which",
    [
        "ties",
        "dare_ties",
        "task_arithmetic",
        "cgm_dagger_tensor",
        "cgm_dagger_global",
        "fisher",
        "regmean",
        "scope_copy",
    ],
)
def test_a_merge_in_row_blocks_is_bit_identical_and_within_its_budget(
    tied_family, tmp_path, small_allowances, which
):
    recipe = recipes(tied_family)[which]
    whole = forgetless.merge(recipe, out=tmp_path / "whole", progress=False, memory="1GiB")
    assert not whole.plan.block_rows
    a = tensors(tmp_path / "whole")
    short = False
    for budget in (
        (220_000, 230_000) if which == "regmean" else (12_000, 16_000)
    ):  # RegMean's Grams come whole
        plan = engine.build_plan(recipe, out=tmp_path / f"blocks{budget}", memory=budget)
        assert plan.peak_memory_estimate() <= budget
        split = plan.block_rows
        assert "model.embed_tokens.weight" in split and len(split) >= 5  # the embedding and several matrices
        short |= any(
            engine.num_rows(plan.base.info(n).shape) % r for n, r in split.items()
        )  # a short last block
        assert "row blocks" in plan.describe()
        report = engine.execute(plan, progress=False)
        b = tensors(tmp_path / f"blocks{budget}")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert report.counts == whole.counts  # CGM†'s kept / reverted counts add up over the blocks
    assert short


def test_inputs_read_in_row_blocks_from_bin_and_through_a_lora_adapter(
    tied_family, tmp_path, small_allowances
):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = tied_family["base"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((base / "config.json").read_text())
    torch.save(load_file(str(tied_family["fts"][0] / "model.safetensors")), legacy / "pytorch_model.bin")
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    for ref in (str(legacy), f"{base}+{tmp_path / 'adapter'}"):
        reader = open_model(ref)
        for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.norm.weight"):
            full = reader.get(name)
            assert torch.equal(reader.get(name, (3, 11)), full[3:11])
            raw = bytes(reader.raw(name, (3, 11)))
            assert (
                raw == full[3:11].to(reader.info(name).dtype).contiguous().view(torch.uint8).numpy().tobytes()
            )
        recipe = {
            "method": "ties",
            "base": str(base),
            "models": [ref, str(tied_family["fts"][1])],
            "parameters": {"density": 0.5},
        }
        forgetless.merge(recipe, out=tmp_path / "w", progress=False, force=True, memory="1GiB")
        assert forgetless.merge(
            recipe, out=tmp_path / "b", progress=False, force=True, memory=8000
        ).plan.block_rows
        a, b = tensors(tmp_path / "w"), tensors(tmp_path / "b")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_ties_with_the_fused_kernels_writes_the_torch_rule_s_bytes(
    tied_family, tmp_path, small_allowances, monkeypatch
):
    """The engine's TIES, whole tensors and row blocks, with the kernels (methods/fast/kernels.py: the histogram bracket,
    the fused count and the fused combine) and with the torch rule alone: the same bytes."""
    from forgetless.methods.fast import kernels

    recipe = {**recipes(tied_family)["ties"], "parameters": {"density": 0.4, "lambda": 0.9}}
    recipe["models"] = [{"model": m, "weight": w} for m, w in zip(recipe["models"], (1.0, 0.5, 2.0))]
    outs = {}
    for fused in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", fused)
        for budget in ("1GiB", 12_000):
            report = forgetless.merge(
                recipe, out=tmp_path / f"{fused}{budget}", progress=False, memory=budget
            )
            assert bool(report.plan.block_rows) == (budget == 12_000)
            outs[fused, budget] = tensors(tmp_path / f"{fused}{budget}")
    want = outs[False, "1GiB"]
    assert {t.dtype for t in want.values()} == {torch.float32}
    for got in outs.values():
        assert all(torch.equal(got[k].view(torch.int32), want[k].view(torch.int32)) for k in want)


def test_safetensors_rows_are_read_from_the_file_offsets(tied_family):
    with CheckpointReader(tied_family["base"]) as r:
        full = r.get("model.embed_tokens.weight")
        assert torch.equal(r.get("model.embed_tokens.weight", (127, 128)), full[127:])
        assert r.get("model.embed_tokens.weight", (5, 5)).shape == (0, 32)


def test_the_writer_takes_a_tensor_in_pieces_in_any_order(tmp_path):
    t = torch.arange(60.0).reshape(12, 5)
    w = StreamingWriter(
        tmp_path / "o",
        [Entry("a", (12, 5), torch.float32), Entry("b", (2,), torch.float32)],
        shard_size=10**9,
    )
    w.write("a", t[8:], at=8 * 20)
    w.write("a", t[:3], at=0)
    with pytest.raises(AssertionError, match="planned tensors never written"):
        w.commit()  # rows 3..8 missing
    w = StreamingWriter(
        tmp_path / "o",
        [Entry("a", (12, 5), torch.float32), Entry("b", (2,), torch.float32)],
        shard_size=10**9,
        force=True,
    )
    for a, b in ((8, 12), (0, 3), (3, 8)):
        w.write("a", t[a:b], at=a * 20)
    w.write("b", torch.ones(2))
    with pytest.raises(AssertionError, match="written"):
        w.write("a", t[:1], at=0)  # every byte already written
    w.commit()
    assert torch.equal(load_file(str(tmp_path / "o" / "model.safetensors"))["a"], t)


def test_the_writer_writes_a_large_tensor_in_pieces_that_interleave(tmp_path, monkeypatch):
    """Each write call takes at most WRITE_PIECE bytes (so that another thread's write of the same file waits for
    one piece, not for a whole embedding); the file holds every byte once, in place."""
    from forgetless.checkpoint import writer as W

    monkeypatch.setattr(W, "WRITE_PIECE", 28)  # not a multiple of 4: pieces split entries
    calls = []
    pwrite = os.pwrite
    monkeypatch.setattr(W.os, "pwrite", lambda fd, buf, off: calls.append(len(buf)) or pwrite(fd, buf, off))
    t, u = torch.randn(13, 7), torch.randn(3)
    w = StreamingWriter(
        tmp_path / "o",
        [Entry("t", (13, 7), torch.float32), Entry("u", (3,), torch.float32)],
        shard_size=10**9,
    )
    calls.clear()  # the header's write
    w.write("t", t)
    w.write("u", u)
    w.commit()
    assert max(calls) == 28 and sum(calls) == 13 * 7 * 4 + 3 * 4
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert torch.equal(got["t"], t) and torch.equal(got["u"], u)


def test_budget_errors_name_the_problem_before_any_work(tied_family, tmp_path, monkeypatch):
    recipe = recipes(tied_family)["ties"]
    with pytest.raises(ForgetlessError, match="below what the merge needs"):
        engine.build_plan(recipe, out=tmp_path / "o", memory="100MB")
    with pytest.raises(ForgetlessError, match="not a size"):
        engine.build_plan(recipe, out=tmp_path / "o", memory="lots")
    with pytest.raises(ForgetlessError, match="memory: .*not a size"):
        load_recipe({**recipe, "memory": "lots"})
    monkeypatch.setattr(engine_budget, "RUNTIME_BYTES", 0)
    monkeypatch.setattr(engine_budget, "PREFETCH_BYTES", 16)
    with pytest.raises(ForgetlessError, match="one row of this tensor needs") as e:
        engine.build_plan(recipe, out=tmp_path / "o", memory=600)
    assert "model." in str(e.value) or "lm_head" in str(e.value)
    monkeypatch.setitem(METHODS, "ties", dataclasses.replace(METHODS["ties"], streaming=Streaming()))
    with pytest.raises(ForgetlessError, match="merges whole tensors"):
        engine.build_plan(recipe, out=tmp_path / "o", memory=6000)
    assert not (tmp_path / "o").exists()


def test_auto_budget_is_half_the_available_memory(tied_family, tmp_path, monkeypatch):
    monkeypatch.setattr(engine_budget, "available_memory", lambda: 8 * 2**30)
    plan = engine.build_plan(recipes(tied_family)["ties"], out=tmp_path / "o")
    assert plan.memory == 4 * 2**30 and "auto" in plan.memory_note() and not plan.block_rows
    plan = engine.build_plan({**recipes(tied_family)["ties"], "memory": "2GiB"}, out=tmp_path / "o")
    assert plan.memory == 2 * 2**30


def test_cli_memory_option_reaches_the_plan(tied_family, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from forgetless.cli import cli

    monkeypatch.setattr(engine_budget, "RUNTIME_BYTES", 0)
    monkeypatch.setattr(engine_budget, "PREFETCH_BYTES", 512)
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({**recipes(tied_family)["ties"], "out": str(tmp_path / "o")}))
    res = CliRunner().invoke(cli, ["merge", str(path), "--dry-run", "--memory", "12000"])
    assert res.exit_code == 0, res.output
    assert "(budget 11.72 KiB, set; in row blocks: " in res.output
    assert "model.embed_tokens.weight (26 blocks of 5 rows)" in res.output
