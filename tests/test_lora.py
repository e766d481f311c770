"""LoRA folding checked against PEFT's own merge_and_unload(), computed independently of forgetless."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import TEXT, build_tiny_llava_original
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

from forgetless.checkpoint.lora import AdaptedReader, LoraAdapter, open_model, parse_model_ref
from forgetless.checkpoint.reader import CheckpointReader
from forgetless.errors import ForgetlessError

ATOL = 1e-6


# ---------------------------------------------------------------------------------------------- helpers
def legacy_to_current(name: str) -> str:
    """Saved (legacy) names -> in-memory names, written out by hand from transformers' conversion rules."""
    name = re.sub(r"^language_model\.lm_head\.", "lm_head.", name)
    name = re.sub(r"^language_model\.model\.", "model.language_model.", name)
    name = re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", name)
    name = re.sub(r"^visual\.", "model.visual.", name)
    return re.sub(r"^model\.(layers|embed_tokens|norm)\.", r"model.language_model.\1.", name)


def original_to_current(name: str) -> str:
    name = re.sub(r"^model\.(layers|embed_tokens|norm)\.", r"model.language_model.\1.", name)
    name = name.replace("model.mm_projector.0.", "model.multi_modal_projector.linear_1.")
    name = name.replace("model.mm_projector.2.", "model.multi_modal_projector.linear_2.")
    return name.replace("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.")


def train_adapter(model: torch.nn.Module, config: LoraConfig, out, seed: int = 1) -> dict[str, torch.Tensor]:
    """Wrap with PEFT, give every adapter weight random values (B is not zero), save; return PEFT's merged state."""
    pm = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(out)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def check_against_peft(
    reader, base: CheckpointReader, merged: dict[str, torch.Tensor], rename, n_targets: int
):
    assert isinstance(reader, AdaptedReader)
    targets = reader.targets()
    assert len(targets) == n_targets
    for name in reader.names():
        got = reader.get(name)
        want = merged[rename(name)]
        assert got.shape == want.shape, name
        if name in targets:
            assert got.dtype == torch.float32
            assert not reader.is_untouched(name)
            assert (want - base.get(name)).abs().max() > 1e-2, name  # the adapter really changes it
            torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=0, msg=name)
        else:
            assert torch.equal(got, base.get(name)), name
            assert reader.raw(name) == base.raw(name)


# ---------------------------------------------------------------------------------------------- against PEFT
LLAMA_CASES = {
    "plain": ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, 6),
    "rslora": ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True}, 6),
    "rank_pattern": (
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 6},
            "alpha_pattern": {"down_proj": 3},
        },
        9,
    ),
    "embedding_and_head": (
        {"r": 4, "lora_alpha": 16, "target_modules": ["embed_tokens", "lm_head", "o_proj"]},
        5,
    ),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_matches_peft_merge(tiny_llama_dir, tmp_path, case):
    kwargs, n_targets = LLAMA_CASES[case]
    merged = train_adapter(
        LlamaForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(**kwargs), tmp_path / "ad"
    )
    with (
        open_model(f"{tiny_llama_dir}+{tmp_path / 'ad'}") as reader,
        CheckpointReader(tiny_llama_dir) as base,
    ):
        check_against_peft(reader, base, merged, lambda n: n, n_targets)
        for name in reader.targets():  # factors reproduce the delta
            A, B, scale = reader.adapter.factors(name)
            delta = reader.adapter.delta(name)
            torch.testing.assert_close(scale * (B @ A).reshape(delta.shape), delta, atol=ATOL, rtol=0)
            torch.testing.assert_close(reader.adapter.apply(name, base.get(name)), reader.get(name))
        if case == "rank_pattern":
            v = reader.adapter.factors("model.layers.0.self_attn.v_proj.weight")
            q1 = reader.adapter.factors("model.layers.1.self_attn.q_proj.weight")
            down = reader.adapter.factors("model.layers.2.mlp.down_proj.weight")
            assert (v[0].shape[0], v[2]) == (2, 4.0) and (q1[0].shape[0], q1[2]) == (6, 8 / 6)
            assert down[2] == 3 / 4
        if case == "rslora":
            assert reader.adapter.factors("model.layers.0.self_attn.q_proj.weight")[2] == 8 / 2


def test_llava_current_adapter_on_legacy_folder(tiny_llava_dir, tmp_path):
    """transformers 5 trains under model.language_model.* but saves language_model.model.*: keys are aliased."""
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["multi_modal_projector"]
    )
    merged = train_adapter(
        LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir), cfg, tmp_path / "ad"
    )
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert any(k.startswith("base_model.model.model.language_model.") for k in keys)
    with (
        open_model(f"{tiny_llava_dir}+{tmp_path / 'ad'}") as reader,
        CheckpointReader(tiny_llava_dir) as base,
    ):
        # q,v in 3 text + 2 vision layers, 4 projector tensors replaced
        check_against_peft(reader, base, merged, legacy_to_current, 2 * 3 + 2 * 2 + 4)
        assert "multi_modal_projector.linear_1.weight" in reader.targets()
        assert reader.adapter.delta("multi_modal_projector.linear_1.weight") is None


@pytest.mark.parametrize("lora_bias", [False, True])
def test_qwen25vl_matches_peft_merge(tiny_qwen25vl_dir, tmp_path, lora_bias):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen25vl_dir)
    if lora_bias:  # modules with a bias only
        cfg, n = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "qkv"], lora_bias=True), 2 * (3 + 2)
    else:  # includes the Conv3d patch embedding
        cfg, n = (
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv", "patch_embed.proj"]),
            9,
        )
    merged = train_adapter(model, cfg, tmp_path / "ad")
    with (
        open_model(f"{tiny_qwen25vl_dir}+{tmp_path / 'ad'}") as reader,
        CheckpointReader(tiny_qwen25vl_dir) as base,
    ):
        check_against_peft(reader, base, merged, legacy_to_current, n)
        if lora_bias:
            assert "model.layers.0.self_attn.q_proj.bias" in reader.targets()
        else:
            assert len(reader.info("visual.patch_embed.proj.weight").shape) == 5


def test_fan_in_fan_out_gpt2(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    ).save_pretrained(tmp_path / "gpt2")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    merged = train_adapter(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), cfg, tmp_path / "ad")
    with (
        open_model(f"{tmp_path / 'gpt2'}+{tmp_path / 'ad'}") as reader,
        CheckpointReader(tmp_path / "gpt2") as base,
    ):
        check_against_peft(reader, base, merged, lambda n: n, 2)


def test_llava_original_with_non_lora_trainables(tiny_llava_dir, tmp_path):
    """An adapter from the original LLaVA code: PEFT keys under model.layers.N plus non_lora_trainables.bin."""
    base_dir = build_tiny_llava_original(tiny_llava_dir, tmp_path / "llava_orig")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    merged = train_adapter(
        LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir), cfg, tmp_path / "peft"
    )
    ad = tmp_path / "ad"
    ad.mkdir()
    shutil.copy(tmp_path / "peft" / "adapter_config.json", ad)
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    save_file(
        {k.replace("model.language_model.", "model."): v for k, v in keys.items()},
        str(ad / "adapter_model.safetensors"),
    )
    g = torch.Generator().manual_seed(7)
    with CheckpointReader(base_dir) as base:
        projector = {
            n: torch.randn(base.info(n).shape, generator=g) for n in base.names() if "mm_projector" in n
        }
    assert len(projector) == 4
    torch.save(
        {f"base_model.model.{n}": t.to(torch.float16) for n, t in projector.items()},
        ad / "non_lora_trainables.bin",
    )
    for n, t in projector.items():
        merged[original_to_current(n)] = t.to(torch.float16).float()
    with open_model(f"{base_dir}+{ad}") as reader, CheckpointReader(base_dir) as base:
        assert reader.config["architectures"] == ["LlavaLlamaForCausalLM"]
        check_against_peft(reader, base, merged, original_to_current, 6 + 4)


def test_dtype_raw_and_fingerprints(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TEXT)).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    train_adapter(
        LlamaForCausalLM.from_pretrained(tmp_path / "bf16"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        tmp_path / "a1",
        seed=1,
    )
    train_adapter(
        LlamaForCausalLM.from_pretrained(tmp_path / "bf16"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        tmp_path / "a2",
        seed=2,
    )
    sd = load_file(str(tmp_path / "a1" / "adapter_model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    key = "base_model.model.model.layers.1.self_attn.q_proj"
    with (
        open_model(f"{tmp_path / 'bf16'}+{tmp_path / 'a1'}") as r1,
        open_model(str(tmp_path / "bf16")) as base,
        open_model(f"{tmp_path / 'bf16'}+{tmp_path / 'a2'}") as r2,
    ):
        assert r1.info(name).dtype == torch.bfloat16
        got = r1.get(name)
        assert got.dtype == torch.float32
        want = (
            base.get(name).float()
            + 2.0 * sd[f"{key}.lora_B.weight"].float() @ sd[f"{key}.lora_A.weight"].float()
        )
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert r1.raw(name) == got.to(torch.bfloat16).view(torch.uint8).numpy().tobytes() != base.raw(name)
        assert r1.fingerprint() == r2.fingerprint() == base.fingerprint()
        assert len({r1.weights_fingerprint(), r2.weights_fingerprint(), base.weights_fingerprint()}) == 3


# ---------------------------------------------------------------------------------------------- bad input
def test_parse_model_ref(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "odd+name").mkdir()
    (tmp_path / "ad").mkdir()
    assert parse_model_ref(str(tmp_path / "odd+name")) == (tmp_path / "odd+name", None)
    assert parse_model_ref(f"{tmp_path / 'base'}+{tmp_path / 'ad'}") == (tmp_path / "base", tmp_path / "ad")
    with pytest.raises(ForgetlessError, match=re.escape(str(tmp_path / "missing_adapter"))) as e:
        parse_model_ref(f"{tmp_path / 'base'}+{tmp_path / 'missing_adapter'}")
    assert "adapter" in str(e.value)
    with pytest.raises(ForgetlessError, match=re.escape(str(tmp_path / "nobase"))):
        parse_model_ref(f"{tmp_path / 'nobase'}+{tmp_path / 'ad'}")
    with pytest.raises(ForgetlessError, match="model folder not found"):
        parse_model_ref(str(tmp_path / "nothing"))


def test_adapter_for_another_model(tiny_llama_dir, tiny_llava_dir, tmp_path):
    train_adapter(
        LlamaForCausalLM.from_pretrained(tiny_llama_dir),
        LoraConfig(r=4, target_modules=["q_proj"]),
        tmp_path / "ad",
    )
    with pytest.raises(
        ForgetlessError, match=r"match no tensor.*base_model\.model\.model\.layers\.\d\.self_attn"
    ):
        open_model(f"{tiny_llava_dir}+{tmp_path / 'ad'}")
    # same names, other shapes: the error names the tensor
    other = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(**{**TEXT, "hidden_size": 48})).save_pretrained(other)
    with pytest.raises(ForgetlessError, match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'.*shape"):
        open_model(f"{other}+{tmp_path / 'ad'}")


def test_dora_and_other_types_refused(tiny_llama_dir, tmp_path):
    train_adapter(
        LlamaForCausalLM.from_pretrained(tiny_llama_dir),
        LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
        tmp_path / "dora",
    )
    with pytest.raises(ForgetlessError, match="DoRA.*merge_and_unload"):
        open_model(f"{tiny_llama_dir}+{tmp_path / 'dora'}")
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LOHA"}))
    with pytest.raises(ForgetlessError, match="PEFT type LOHA is not supported"):
        LoraAdapter(tmp_path / "dora", CheckpointReader(tiny_llama_dir).names())
    with pytest.raises(ForgetlessError, match="PEFT adapter, not a model"):
        open_model(str(tmp_path / "dora"))


def test_sharded_save_refused(tiny_llama_dir, tmp_path):
    train_adapter(
        LlamaForCausalLM.from_pretrained(tiny_llama_dir),
        LoraConfig(r=4, target_modules=["q_proj"]),
        tmp_path / "ad",
    )
    f = tmp_path / "ad" / "adapter_model.safetensors"
    sd = load_file(str(f))
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.empty(
        0
    )  # a ZeRO-3 placeholder
    save_file(sd, str(f))
    with pytest.raises(
        ForgetlessError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight'.*shape \[0\].*ZeRO-3"
    ):
        open_model(f"{tiny_llama_dir}+{tmp_path / 'ad'}")


@pytest.mark.parametrize(
    ("kind", "fan_in_fan_out", "a_shape", "b_shape"),
    [
        ("linear", False, (8, 96), (1000, 8)),
        ("linear", True, (8, 1000), (96, 8)),  # GPT-2's Conv1D: the weight is (in, out)
        ("embedding", False, (8, 1000), (96, 8)),
        ("conv", False, (8, 3, 3, 3), (700, 8, 1, 1)),
    ],
)
def test_a_fold_read_in_row_blocks_is_the_whole_fold_bit_for_bit(kind, fan_in_fan_out, a_shape, b_shape):
    """Every row block of the update equals those rows of the whole update to the last bit (the engine merges
    big tensors in blocks; a BLAS may round a row by the shape of its call: seen on AMD EPYC), and the whole
    update is scale · B @ A to float32 rounding."""
    from forgetless.checkpoint.lora import FOLD_ROWS, _Lora

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(a_shape, generator=g), torch.randn(b_shape, generator=g)
    lora = _Lora("m", A, B, 0.5, kind, fan_in_fan_out)
    whole = lora.delta()
    a, b, scale = lora.factors()
    exact = (scale * b.double() @ a.double()).reshape(whole.shape)
    torch.testing.assert_close(whole.double(), exact, rtol=1e-6, atol=1e-6)
    assert whole.shape[0] > 2 * FOLD_ROWS
    for start, stop in [(0, 1), (3, 11), (FOLD_ROWS - 1, FOLD_ROWS + 1), (100, 613), (517, whole.shape[0])]:
        assert torch.equal(lora.delta((start, stop)), whole[start:stop])
