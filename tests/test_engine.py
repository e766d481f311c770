"""The engine end to end on tiny checkpoints: identities, agreement with the per-tensor functions, scope, shards,
dtypes, legacy .bin input, LoRA input, the model card, and transformers loading the result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, tiny_llama_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import forgetless
from forgetless.checkpoint.lora import open_model
from forgetless.engine import Count, budget, tensor_seed
from forgetless.methods.baselines import dare_linear, dare_ties, ties


def perturbed_copy(
    src: Path, dst: Path, seed: int, scale: float = 0.05, dtype: torch.dtype | None = None
) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            v = v + scale * torch.randn(v.shape, generator=g)
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (
        set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    )
    out = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base, three fine-tuned copies, and a bf16 base + copy."""
    root = tmp_path_factory.mktemp("family")
    base = build_tiny_llama(root / "base", seed=0)
    fts = [perturbed_copy(base, root / f"ft{i}", seed=i + 1) for i in range(3)]
    base16 = perturbed_copy(base, root / "base16", seed=10, scale=0.0, dtype=torch.bfloat16)
    ft16 = perturbed_copy(base, root / "ft16", seed=11, dtype=torch.bfloat16)
    return {"base": base, "fts": fts, "base16": base16, "ft16": ft16, "root": root}


def run(recipe: dict, out: Path, **kw) -> forgetless.MergeReport:
    return forgetless.merge(recipe, out=out, force=True, progress=False, **kw)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
@pytest.mark.parametrize("which", ["fp32", "bf16"])
def test_identities_are_bit_exact(family, tmp_path, method, which):
    base, ft = (family["base"], family["fts"][0]) if which == "fp32" else (family["base16"], family["ft16"])
    for lam, expect in ((0.0, base), (1.0, ft)):
        out = tmp_path / f"{lam}"
        run({"method": method, "base": str(base), "models": [str(ft)], "parameters": {"lambda": lam}}, out)
        got, want = tensors(out), tensors(expect)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_ties_through_the_engine_equals_the_function_per_tensor(family, tmp_path):
    recipe = {
        "method": "ties",
        "base": str(family["base"]),
        "models": [str(p) for p in family["fts"]],
        "parameters": {"density": 0.4, "lambda": 0.9},
        "shard_size": 20_000,
    }
    report = run(recipe, tmp_path / "m")
    got = tensors(tmp_path / "m")
    base = tensors(family["base"])
    fts = [tensors(p) for p in family["fts"]]
    for k, b in base.items():
        want = ties(b.float(), [f[k].float() for f in fts], weight=[1.0] * 3, density=[0.4] * 3, lambda_=0.9)
        assert torch.equal(got[k], want), k
    assert report.routes == {"method": Count(len(base), sum(t.numel() * 4 for t in base.values()))}
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # 20 kB shards
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in base.values())


def test_dare_is_seeded_per_tensor_name_and_independent_of_sharding(family, tmp_path):
    recipe = {
        "method": "dare_ties",
        "base": str(family["base"]),
        "models": [str(p) for p in family["fts"]],
        "parameters": {"density": 0.5},
        "seed": 7,
    }
    run(recipe, tmp_path / "a")
    run({**recipe, "shard_size": 30_000}, tmp_path / "b")
    run({**recipe, "seed": 8}, tmp_path / "c")
    a, b, c = tensors(tmp_path / "a"), tensors(tmp_path / "b"), tensors(tmp_path / "c")
    name = "model.layers.1.mlp.up_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[name], c[name])
    base, fts = tensors(family["base"]), [tensors(p) for p in family["fts"]]

    def gens():
        return [
            torch.Generator().manual_seed(tensor_seed(7, name if k == 0 else f"{name}#{k}")) for k in range(3)
        ]

    want = dare_ties(
        base[name].clone(),
        [f[name].clone() for f in fts],
        weight=[1.0] * 3,
        density=[0.5] * 3,
        generator=gens(),
    )
    assert torch.equal(a[name], want)
    # each model draws from its own stream: model 1's kept entries do not depend on model 0
    d1 = [f[name] - base[name] for f in fts][1]
    kept = dare_linear(
        torch.zeros_like(d1),
        [torch.zeros_like(d1), d1.clone()],
        weight=[1.0, 1.0],
        density=[0.5, 0.5],
        generator=gens()[:2],
    )
    mask = torch.bernoulli(
        torch.full_like(d1, 0.5), generator=torch.Generator().manual_seed(tensor_seed(7, f"{name}#1"))
    )
    assert torch.equal(kept, d1 * mask / 0.5)


def test_scope_routes_every_tensor_and_reports_it(family, tmp_path):
    base, ft = family["base"], family["fts"][0]
    recipe = {
        "method": "task_arithmetic",
        "base": str(base),
        "models": [str(ft)],
        "parameters": {"lambda": 0.5},
        "scope": {
            "include": ["language.layers[1:3]", "lm_head"],
            "exclude": ["re:layernorm"],
            "outside": "finetuned",
        },
    }
    report = run(recipe, tmp_path / "m")
    got, b, f = tensors(tmp_path / "m"), tensors(base), tensors(ft)
    in_scope = {
        k
        for k in b
        if (".layers.1." in k or ".layers.2." in k or k == "lm_head.weight") and "layernorm" not in k
    }
    for k in b:
        if k in in_scope:
            assert torch.equal(got[k], torch.lerp(b[k], f[k], 0.5)), k
        else:
            assert torch.equal(got[k], f[k]), k
    assert report.routes["method"][0] == len(in_scope)
    assert report.routes["finetuned"][0] == len(b) - len(in_scope)
    assert "language.layers" in report.summary() and "finetuned" in report.summary()


def test_output_dtype_side_files_model_card_and_transformers_round_trip(family, tmp_path):
    base16, ft16 = family["base16"], family["ft16"]
    (base16 / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    out = tmp_path / "m"
    run(
        {
            "method": "linear",
            "base": str(base16),
            "models": [str(ft16)],
            "parameters": {"lambda": 0.25},
            "dtype": "float32",
        },
        out,
    )
    got = tensors(out)
    assert all(t.dtype == torch.float32 for t in got.values() if t.is_floating_point())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32"
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    card = (out / "README.md").read_text()
    reader = open_model(str(base16))
    assert reader.fingerprint() in card and "method: linear" in card and reader.weights_fingerprint() in card
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["forgetless_version"] == forgetless.__version__
    model = LlamaForCausalLM.from_pretrained(out)
    b, f = tensors(base16), tensors(ft16)
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[k], torch.lerp(b[k].float(), f[k].float(), 0.25))
    assert not list(tmp_path.glob(".m.forgetless-*"))  # no temporary folder left


def test_legacy_bin_reads_like_safetensors(family, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(family["fts"][0], legacy)
    sd = load_file(str(legacy / "model.safetensors"))
    (legacy / "model.safetensors").unlink()
    torch.save(sd, legacy / "pytorch_model.bin")
    recipe = {"method": "task_arithmetic", "base": str(family["base"]), "parameters": {"lambda": 0.3}}
    run({**recipe, "models": [str(legacy)]}, tmp_path / "a")
    run({**recipe, "models": [str(family["fts"][0])]}, tmp_path / "b")
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_lora_adapter_input_is_folded_tensor_by_tensor(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama_model(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().state_dict()
    run(
        {
            "method": "linear",
            "base": str(family["base"]),
            "models": [f"{family['base']}+{tmp_path / 'adapter'}"],
            "parameters": {"lambda": 1.0},
        },
        tmp_path / "m",
    )
    got = tensors(tmp_path / "m")
    for k, v in got.items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6)
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"],
        tensors(family["base"])["model.layers.0.self_attn.q_proj.weight"],
    )


def test_dry_run_writes_nothing_and_estimates_memory(family, tmp_path):
    lines = []
    report = forgetless.merge(
        {"method": "ties", "base": str(family["base"]), "models": [str(p) for p in family["fts"]]},
        out=tmp_path / "m",
        dry_run=True,
        log=lines.append,
    )
    assert report.dry_run and not (tmp_path / "m").exists()
    text = "\n".join(lines)
    assert "peak memory estimate" in text and "causal_lm" in text
    largest = max(t.numel() * 4 for t in tensors(family["base"]).values())
    est = report.plan.peak_memory_estimate()
    assert est >= budget.RUNTIME_BYTES + 4 * largest
