"""Adapter-space merging (CoPA, SVD baselines): the rules against brute-force loops written from METHODS.md, the
baselines against PEFT's add_weighted_adapter, the written adapter against PEFT's loader and the folded model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny_llava, tiny_llava_model
from peft import LoraConfig, PeftModel
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file
from test_lora import train_adapter
from transformers import LlavaForConditionalGeneration

import forgetless
from forgetless.errors import ForgetlessError
from forgetless.methods import METHODS
from forgetless.methods.adapter import (
    copa,
    lora_dare_linear,
    lora_dare_ties,
    lora_task_arithmetic,
    lowrank_sum_svd,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------- brute force
def _flat(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.reshape(-1)]


def brute_keep_top(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·n⌋ largest |entries|, ties to the lowest index: a sort over (−|v|, index)."""
    vals = _flat(t)
    k = int(density * len(vals))
    keep = {i for _, i in sorted((-abs(v), i) for i, v in enumerate(vals))[:k]}
    return torch.tensor([v if i in keep else 0.0 for i, v in enumerate(vals)]).reshape(t.shape)


def brute_keep_ge_kth(t: torch.Tensor, density: float) -> torch.Tensor:
    """The published mask: the k-th smallest |v| (k = int(n·(1−density)), 1-based) and every |v| ≥ it."""
    vals = _flat(t)
    k = int(len(vals) * (1 - density))
    if k == 0:
        return t.clone()
    thr = sorted(abs(v) for v in vals)[k - 1]
    return torch.tensor([v if abs(v) >= thr else 0.0 for v in vals]).reshape(t.shape)


def brute_scale(A: torch.Tensor, kept: torch.Tensor) -> list[float]:
    out = []
    for i in range(A.shape[0]):
        full = sum(abs(float(x)) for x in A[i])
        part = sum(abs(float(x)) for x in kept[i])
        out.append(full / part if part > 0 else 1.0)
    return out


def brute_copa(pairs, lam: float, density: float, variant: str) -> torch.Tensor:
    """ΔW of CoPA by explicit loops over ranks, rows and columns (METHODS.md)."""
    r = pairs[0][0].shape[0]
    out_, in_ = pairs[0][1].shape[0], pairs[0][0].shape[1]
    keep = brute_keep_top if variant == "paper" else brute_keep_ge_kth
    As, Bs, Ss = [], [], []
    for A, B in pairs:
        a = keep(A, density)
        s = brute_scale(A, a)
        if variant == "reference":
            floor = sorted(s)[min(int(0.8 * r), r - 1)]
            s = [max(x, floor) for x in s]
        As.append(a)
        Bs.append(keep(B, density))
        Ss.append(s)
    A_sum = [[sum(float(a[i, j]) for a in As) for j in range(in_)] for i in range(r)]
    B_m = [[0.0] * r for _ in range(out_)]
    for i in range(r):
        tot = sum(s[i] for s in Ss)
        for n in range(len(pairs)):
            w = (Ss[n][i] / tot if tot > 0 else 0.0) if variant == "paper" else Ss[n][i] / tot
            for o in range(out_):
                B_m[o][i] += w * float(Bs[n][o, i])
    lam_total = lam if variant == "paper" else lam * lam
    return torch.tensor(
        [
            [lam_total * sum(B_m[o][i] * A_sum[i][j] for i in range(r)) for j in range(in_)]
            for o in range(out_)
        ]
    )


def hand_pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three tasks, rank 3: ties in |A| (±0.5 repeated), an all-zero rank row, one row pruned away entirely."""
    A1 = torch.tensor([[0.5, -0.5, 0.5, 0.1, -0.2], [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.3, 0.3, 0.01]])
    A2 = torch.tensor(
        [[0.05, 0.02, -0.01, 0.03, 0.01], [0.7, -0.1, 0.2, -0.9, 0.4], [-0.3, 0.3, -0.3, 0.3, 0.6]]
    )
    A3 = torch.tensor([[1.5, 0.2, -0.4, 0.0, 0.9], [-0.2, 0.8, 0.8, -0.8, 0.1], [0.2, -0.1, 0.05, 0.7, -1.1]])
    g = torch.Generator().manual_seed(3)
    Bs = [torch.randn(4, 3, generator=g) for _ in range(3)]
    Bs[0][1, 2] = Bs[0][2, 2] = 0.25  # ties in |B| too
    Bs[0][3, 2] = -0.25
    return [(A1, Bs[0]), (A2, Bs[1]), (A3, Bs[2])]


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.75])
def test_copa_matches_brute_force(variant, density):
    pairs = hand_pairs()
    A, B = copa([(a.clone(), b.clone()) for a, b in pairs], lambda_=2.0, density=density, variant=variant)
    want = brute_copa(pairs, 2.0, density, variant)
    torch.testing.assert_close(B @ A, want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()  # the zero row and the pruned row: no 0/0


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_copa_one_task_without_pruning_gives_it_back(variant):
    A, B = hand_pairs()[2]
    A_m, B_m = copa([(A, B)], lambda_=1.0, density=1.0, variant=variant)
    torch.testing.assert_close(B_m @ A_m, B @ A, rtol=1e-6, atol=1e-7)
    A_m, B_m = copa(
        [(A, B)], lambda_=2.0, density=1.0, variant=variant
    )  # λ on B (paper), on A and B (reference)
    torch.testing.assert_close(
        B_m @ A_m, (2.0 if variant == "paper" else 4.0) * (B @ A), rtol=1e-6, atol=1e-7
    )


def test_copa_inputs_untouched_and_one_task_pruned_keeps_its_mass():
    pairs = hand_pairs()
    before = [(a.clone(), b.clone()) for a, b in pairs]
    copa(pairs, density=0.4)
    copa(pairs, density=0.4, variant="reference")
    for (a, b), (a0, b0) in zip(pairs, before):
        assert torch.equal(a, a0) and torch.equal(b, b0)
    # one task, paper rule: S̃ = 1 wherever something is kept, so ΔW = λ·B̃·Ã exactly
    A, B = pairs[2]
    A_m, B_m = copa([(A, B)], lambda_=2.0, density=0.4)
    torch.testing.assert_close(B_m @ A_m, 2.0 * brute_keep_top(B, 0.4) @ brute_keep_top(A, 0.4))


def test_lowrank_sum_svd_is_the_exact_truncated_svd():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(3, 40, generator=g), torch.randn(30, 3, generator=g)) for _ in range(4)]
    coeffs = [0.5, -1.0, 2.0, 0.3]
    full = sum(c * B.double() @ A.double() for (A, B), c in zip(pairs, coeffs))
    U, S, Vh = torch.linalg.svd(full)
    for rank in (3, 7, 12):
        A, B = lowrank_sum_svd(pairs, coeffs, rank)
        want = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        torch.testing.assert_close((B @ A).double(), want, rtol=1e-4, atol=1e-4)
    A, B = lowrank_sum_svd(pairs, coeffs, 12)  # rank ≥ Σr: the sum itself
    torch.testing.assert_close((B @ A).double(), full, rtol=1e-4, atol=1e-4)


def test_dare_matches_peft_with_the_same_random_stream():
    """PEFT draws DARE's masks from torch's global generator, task by task; ours from the per-tensor generator:
    seeded alike, the masks are the same draws, so the merged updates agree (rank 20 = the full update here)."""
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(4, 24, generator=g), torch.randn(20, 4, generator=g)) for _ in range(3)]
    weights = [0.7, 1.3, 0.5]
    torch.manual_seed(11)
    peft = merge_utils.dare_linear([B @ A for A, B in pairs], torch.tensor(weights), 0.6)
    A, B = lora_dare_linear(
        pairs, weight=weights, density=[0.6] * 3, rank=20, generator=torch.Generator().manual_seed(11)
    )
    torch.testing.assert_close(B @ A, peft, rtol=1e-4, atol=1e-5)
    torch.manual_seed(12)
    peft = merge_utils.dare_ties([B @ A for A, B in pairs], torch.tensor(weights), 0.6, "total")
    A, B = lora_dare_ties(
        pairs,
        weight=weights,
        density=[0.6] * 3,
        rank=20,
        convention="peft",
        generator=torch.Generator().manual_seed(12),
    )
    torch.testing.assert_close(B @ A, peft, rtol=1e-4, atol=1e-5)


def test_task_arithmetic_is_lambda_weighted_sum():
    g = torch.Generator().manual_seed(2)
    pairs = [(torch.randn(2, 9, generator=g), torch.randn(7, 2, generator=g)) for _ in range(2)]
    A, B = lora_task_arithmetic(pairs, weight=[1.0, 3.0], lambda_=0.5, rank=4)
    torch.testing.assert_close(
        B @ A, 0.5 * (pairs[0][1] @ pairs[0][0] + 3.0 * pairs[1][1] @ pairs[1][0]), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------- real PEFT files
@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny LLaVA base and three PEFT adapters of rank 4 with different alphas (different scales); the first
    also saves the projector (modules_to_save). (root, base, adapter paths)"""
    root = tmp_path_factory.mktemp("adapters")
    base = build_tiny_llava(root / "base")
    paths = []
    for i, alpha in enumerate((8, 16, 4)):
        cfg = LoraConfig(
            r=4,
            lora_alpha=alpha,
            target_modules=TARGETS,
            modules_to_save=["multi_modal_projector"] if i == 0 else None,
        )
        train_adapter(tiny_llava_model(), cfg, root / f"a{i}", seed=i + 1)
        paths.append(root / f"a{i}")
    return root, base, paths


def _merge(base, paths, method, out, **kw):
    recipe = {"method": method, "base": str(base), "models": [str(p) for p in paths], **kw}
    return forgetless.merge(recipe, out=out, force=True, progress=False, log=None)


def _peft_with(paths) -> PeftModel:
    m = PeftModel.from_pretrained(tiny_llava_model(), paths[0], adapter_name="t0")
    for i, p in enumerate(paths[1:], 1):
        m.load_adapter(p, adapter_name=f"t{i}")
    return m


def _deltas(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    return {
        name: mod.get_delta_weight(adapter).detach()
        for name, mod in model.named_modules()
        if hasattr(mod, "lora_A") and adapter in mod.lora_A
    }


PEFT_CASES = [  # (our method, parameters, PEFT combination, PEFT keyword arguments)
    ("lora_cat", {}, "cat", {}),
    ("lora_task_arithmetic", {}, "svd", {}),
    ("lora_task_arithmetic", {"rank": 6}, "svd", {"svd_rank": 6}),
    ("lora_ties", {"density": 0.5, "convention": "peft"}, "ties_svd", {"density": 0.5}),
    (
        "lora_ties",
        {"density": 0.3, "convention": "peft", "sign": "frequency"},
        "ties_svd",
        {"density": 0.3, "majority_sign_method": "frequency"},
    ),
    ("lora_dare_linear", {"density": 1.0}, "dare_linear_svd", {"density": 1.0}),
    ("lora_linear", {}, "linear", {}),
]


@pytest.mark.parametrize("method,params,combination,peft_kw", PEFT_CASES)
def test_agrees_with_peft_add_weighted_adapter(adapters, tmp_path, method, params, combination, peft_kw):
    _, base, paths = adapters
    weights = [0.7, 1.3, 0.5]
    _merge(
        base,
        paths,
        method,
        tmp_path / "out",
        parameters=params,
        models=[{"model": str(p), "weight": w} for p, w in zip(paths, weights)],
    )
    peft = _peft_with(paths)
    peft.add_weighted_adapter(["t0", "t1", "t2"], weights, "merged", combination_type=combination, **peft_kw)
    want = _deltas(peft, "merged")
    ours = PeftModel.from_pretrained(tiny_llava_model(), tmp_path / "out", adapter_name="ours")
    got = _deltas(ours, "ours")
    assert set(got) == set(want) and len(got) == 3 * 3 + 2 * 2  # language: 3 layers × 3; vision: 2 × (q, v)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize(
    "method,params",
    [("copa", {}), ("copa", {"variant": "reference"}), ("lora_ties", {"density": 0.4}), ("lora_cat", {})],
)
def test_written_adapter_loads_in_peft_and_equals_the_fold(adapters, tmp_path, method, params):
    _, base, paths = adapters
    _merge(base, paths, method, tmp_path / "adapter", parameters=params)
    _merge(base, paths, method, tmp_path / "folded", parameters=params, fold=True)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    x = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    peft = PeftModel.from_pretrained(tiny_llava_model(), tmp_path / "adapter").eval()
    folded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "folded").eval()
    with torch.no_grad():
        a, b = peft(input_ids=x).logits, folded(input_ids=x).logits
        plain = tiny_llava_model()(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - plain).abs().max() > 1e-3  # the merge changed something
    # the fold is base + the update the adapter's own factors give (PEFT's merge_and_unload of the written adapter)
    merged = (
        PeftModel.from_pretrained(tiny_llava_model(), tmp_path / "adapter").merge_and_unload().state_dict()
    )
    fold = load_file(str(tmp_path / "folded" / "model.safetensors"))
    name = "model.language_model.layers.1.self_attn.q_proj.weight"
    key = next(k for k in fold if k.endswith("layers.1.self_attn.q_proj.weight"))
    torch.testing.assert_close(fold[key], merged[name], rtol=1e-6, atol=1e-6)


def test_copa_file_matches_the_rule_on_the_adapters_factors(adapters, tmp_path):
    """The written update of one module is the rule applied to the adapters' (√s·A, √s·B) — scales folded in."""
    _, base, paths = adapters
    _merge(base, paths, "copa", tmp_path / "out", parameters={"variant": "reference"})
    out = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["modules_to_save"] == ["multi_modal_projector"]
    key = "base_model.model.model.language_model.layers.2.mlp.down_proj"
    pairs = []
    for p in paths:
        sd, c = (
            load_file(str(p / "adapter_model.safetensors")),
            json.loads((p / "adapter_config.json").read_text()),
        )
        s = math.sqrt(c["lora_alpha"] / c["r"])
        pairs.append((sd[f"{key}.lora_A.weight"] * s, sd[f"{key}.lora_B.weight"] * s))
    want = brute_copa(pairs, 2.0, 0.2, "reference")
    got = (8 / 4) * out[f"{key}.lora_B.weight"] @ out[f"{key}.lora_A.weight"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_full_tensors_averaged_or_taken_from_one(adapters, tmp_path):
    _, base, paths = adapters
    name = "base_model.model.model.multi_modal_projector.linear_1.weight"
    a0 = load_file(str(paths[0] / "adapter_model.safetensors"))[name]
    base_w = next(
        v
        for k, v in load_file(str(base / "model.safetensors")).items()
        if k.endswith("multi_modal_projector.linear_1.weight")
    )
    _merge(base, paths, "copa", tmp_path / "avg")
    got = load_file(str(tmp_path / "avg" / "adapter_model.safetensors"))[name]
    torch.testing.assert_close(got, (a0 + 2 * base_w) / 3)  # adapters without it stand on the base
    _merge(base, paths, "copa", tmp_path / "one", non_lora=0)
    assert torch.equal(load_file(str(tmp_path / "one" / "adapter_model.safetensors"))[name], a0)
    assert "models[0]" in (tmp_path / "one" / "README.md").read_text()


def test_dry_run_writes_nothing(adapters, tmp_path, capsys):
    _, base, paths = adapters
    report = forgetless.merge(
        {"method": "copa", "base": str(base), "models": [str(p) for p in paths]},
        out=tmp_path / "x",
        dry_run=True,
        log=print,
    )
    assert report.dry_run and not (tmp_path / "x").exists()
    text = capsys.readouterr().out
    assert "copa" in text and "peak memory estimate" in text
    assert sum(j.route == "method" for j in report.plan.jobs) == 2 * 13  # lora_A and lora_B of 13 modules


# ---------------------------------------------------------------------------------------------- bad input
def _copy_adapter(src, dst, config=None, rename=None):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    sd = load_file(str(src / "adapter_model.safetensors"))
    save_file(
        {(rename(k) if rename else k): v for k, v in sd.items()}, str(dst / "adapter_model.safetensors")
    )
    return dst


def _refused(base, paths, tmp_path, match, method="copa"):
    with pytest.raises(ForgetlessError, match=match) as e:
        _merge(base, paths, method, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    return str(e.value)


def test_different_ranks_refused_by_copa_accepted_by_svd(adapters, tmp_path):
    _, base, paths = adapters
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)
    train_adapter(tiny_llava_model(), cfg, tmp_path / "r2", seed=9)
    msg = _refused(base, [paths[1], tmp_path / "r2"], tmp_path, "rank 2, models\\[0\\] has 4")
    assert "r2" in msg and "q_proj" in msg
    _merge(base, [paths[1], tmp_path / "r2"], "lora_ties", tmp_path / "ok", parameters={"density": 0.5})
    assert json.loads((tmp_path / "ok" / "adapter_config.json").read_text())["r"] == 4


def test_different_targets_and_bases_listed_in_one_error(adapters, tmp_path):
    _, base, paths = adapters
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])
    train_adapter(tiny_llava_model(), cfg, tmp_path / "qk", seed=5)
    _refused(base, [paths[0], tmp_path / "qk"], tmp_path, "adapts other modules", method="lora_ties")
    many = [
        f"model.language_model.layers.{i}.self_attn.q_proj" for i in range(200)
    ]  # full paths, as a fine-tune
    long = _copy_adapter(tmp_path / "qk", tmp_path / "long", config={"target_modules": many})  # writes them
    msg = _refused(base, [paths[0], long], tmp_path, "adapts other modules", method="lora_ties")
    assert "197 more" in msg and len(msg) < 2000
    other = _copy_adapter(
        paths[1], tmp_path / "other", config={"base_model_name_or_path": "org/another-model"}
    )
    first = _copy_adapter(paths[0], tmp_path / "first", config={"base_model_name_or_path": "org/llava"})
    msg = _refused(base, [first, other], tmp_path, "base_model_name_or_path differs")
    assert "org/another-model" in msg


def test_truncated_or_missing_files(adapters, tmp_path):
    _, base, paths = adapters
    broken = _copy_adapter(paths[1], tmp_path / "broken")
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[:-100])
    _refused(base, [paths[0], broken], tmp_path, "cannot read")
    noconf = _copy_adapter(paths[1], tmp_path / "noconf")
    (noconf / "adapter_config.json").unlink()
    _refused(base, [paths[0], noconf], tmp_path, "not a PEFT adapter folder")


def test_model_where_adapter_expected_and_the_reverse(adapters, tmp_path):
    _, base, paths = adapters
    _refused(base, [paths[0], base], tmp_path, "a full model folder, where a LoRA adapter is expected")
    _refused(base, [paths[0], f"{base}+{paths[1]}"], tmp_path, "adapter folder alone")
    with pytest.raises(ForgetlessError, match="PEFT adapter, not a model"):
        _merge(paths[0], paths[1:], "copa", tmp_path / "never")
    with pytest.raises(
        ForgetlessError, match="PEFT adapter, not a model"
    ):  # weight-space method, adapter folder
        _merge(base, [paths[0]], "ties", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_adapter_keys_only_for_adapter_methods(adapters, tmp_path):
    _, base, paths = adapters
    with pytest.raises(ForgetlessError, match="fold: only for adapter-space methods"):
        _merge(base, [f"{base}+{paths[0]}"], "ties", tmp_path / "never", fold=True)
    assert METHODS["copa"].space == "adapter" and METHODS["ties"].space == "weight"


def test_llava_original_adapters_projector_averaged_into_non_lora_trainables(tiny_llava_dir, tmp_path):
    """Adapters from the original LLaVA code (keys under model.layers.N, projector in non_lora_trainables.bin):
    the merged adapter keeps their naming and writes the averaged projector back to non_lora_trainables.bin."""
    from conftest import build_tiny_llava_original

    from forgetless.checkpoint.reader import CheckpointReader

    base_dir = build_tiny_llava_original(tiny_llava_dir, tmp_path / "llava_orig")
    with CheckpointReader(base_dir) as base:
        shapes = {n: base.info(n).shape for n in base.names() if "mm_projector" in n}
    projectors, paths = [], []
    for i in range(2):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
        train_adapter(
            LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir),
            cfg,
            tmp_path / f"peft{i}",
            seed=i + 3,
        )
        ad = _copy_adapter(
            tmp_path / f"peft{i}",
            tmp_path / f"ad{i}",
            rename=lambda k: k.replace("model.language_model.", "model."),
        )
        g = torch.Generator().manual_seed(10 + i)
        proj = {
            f"base_model.model.{n}": torch.randn(s, generator=g).to(torch.float16) for n, s in shapes.items()
        }
        torch.save(proj, ad / "non_lora_trainables.bin")
        projectors.append(proj)
        paths.append(ad)
    _merge(base_dir, paths, "copa", tmp_path / "out")
    written = torch.load(tmp_path / "out" / "non_lora_trainables.bin", weights_only=True)
    assert set(written) == set(projectors[0]) and len(written) == 4
    for k, v in written.items():
        assert v.dtype == torch.float16
        torch.testing.assert_close(
            v.float(), ((projectors[0][k].float() + projectors[1][k].float()) / 2).half().float()
        )
    keys = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in keys) and len(keys) == 2 * 3 * 2


def test_bin_adapter_and_the_cli_fold(adapters, tmp_path):
    """An adapter saved as adapter_model.bin (read with weights_only) merges like its safetensors twin; the CLI's
    --fold writes the full model the recipe would write with fold: true."""
    import yaml

    from forgetless.cli import main

    _, base, paths = adapters
    twin = tmp_path / "a1bin"
    twin.mkdir()
    (twin / "adapter_config.json").write_text((paths[1] / "adapter_config.json").read_text())
    torch.save(load_file(str(paths[1] / "adapter_model.safetensors")), twin / "adapter_model.bin")
    _merge(base, paths, "copa", tmp_path / "st")
    _merge(base, [paths[0], twin, paths[2]], "copa", tmp_path / "bin")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("st", "bin"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recipe = tmp_path / "copa.yaml"
    recipe.write_text(
        yaml.safe_dump({"method": "copa", "base": str(base), "models": [str(p) for p in paths]})
    )
    main(["merge", str(recipe), "--fold", "--quiet", "--out", str(tmp_path / "cli")])
    _merge(base, paths, "copa", tmp_path / "api", fold=True)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cli", "api"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_svd_rank_beyond_the_sum_pads_and_beyond_the_layer_is_refused(adapters, tmp_path):
    _, base, paths = adapters
    _merge(base, paths[:2], "lora_task_arithmetic", tmp_path / "r10", parameters={"rank": 10})  # Σr = 8
    peft = _peft_with(paths[:2])
    peft.add_weighted_adapter(["t0", "t1"], [1.0, 1.0], "merged", combination_type="svd", svd_rank=10)
    want = _deltas(peft, "merged")
    got = _deltas(PeftModel.from_pretrained(tiny_llava_model(), tmp_path / "r10", adapter_name="o"), "o")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5)
    with pytest.raises(ForgetlessError, match="does not fit"):
        _merge(base, paths, "lora_ties", tmp_path / "never", parameters={"rank": 40})  # q_proj is 32 × 32
    assert not (tmp_path / "never").exists()
