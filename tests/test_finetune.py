"""`forgetless finetune`: accumulation, schedule, clipping, hooks, the answer-position head, full and LoRA outputs.

Each fact is checked against an independent computation: a big batch against accumulated small ones, the schedule
against its closed form written out here, the fast head against full logits, the LoRA adapter against PEFT's own
merge, the saved folder byte for byte against the input.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TEXT, build_llama_with_tokenizer, tiny_qwen25vl_model, write_qa_jsonl
from PIL import Image
from safetensors.torch import load_file
from test_stats_data import tiny_llava_processor
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from forgetless.checkpoint.lora import open_model
from forgetless.checkpoint.writer import human_bytes
from forgetless.cli import main
from forgetless.embedded import export_smollm2
from forgetless.errors import ForgetlessError
from forgetless.stats.data import Encoder, Sample, answer_loss, collate, load_samples
from forgetless.train import LoraSpec, StepInfo, answer_losses, finetune

torch.set_num_threads(1)

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230), "yellow": (230, 220, 30)}
QA = [
    ("What is two plus two?", "four"),
    ("Name a colour.", "blue"),
    ("Capital of France?", "Paris, of course"),
    ("Say hello.", "hello there"),
    ("Opposite of up?", "down"),
    ("A fruit?", "an apple"),
    ("Count to three.", "one two three"),
    ("Is ice cold?", "yes, very"),
]


# ---------------------------------------------------------------------------------------------------- fixtures
def tiny_llava_for(tok) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(**{**TEXT, "vocab_size": len(tok), "max_position_embeddings": 256})
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA folder with a real processor: SmolLM2's tokenizer + <image>, CLIP preprocessing at 32×32."""
    d = tmp_path_factory.mktemp("llava")
    proc = tiny_llava_processor()
    tiny_llava_for(proc.tokenizer).save_pretrained(d)
    proc.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_llama_with_tokenizer(tmp_path_factory.mktemp("llama"), layers=2, tie=False)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    return write_qa_jsonl(tmp_path_factory.mktemp("text") / "train.jsonl", QA)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    """Four samples, each a plain colour image and its colour's name as the answer."""
    d = tmp_path_factory.mktemp("images")
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(d / f"{name}.png")
        rows.append({"id": name, "image": f"{name}.png", "question": "What colour is it?", "answer": name})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "train.jsonl"


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def quiet(_line: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------- the loop
def test_grad_accumulation_equals_one_big_batch(tmp_path, llama_dir, text_data):
    kw: dict[str, Any] = {
        "train": ["language.layers[1]"],
        "steps": 2,
        "lr": 1e-3,
        "weight_decay": 0.1,
        "clip": None,
        "schedule": "constant",
        "seed": 3,
        "log": quiet,
    }
    small = finetune(llama_dir, text_data, tmp_path / "accum", batch_size=2, grad_accum=2, **kw)
    big = finetune(llama_dir, text_data, tmp_path / "big", batch_size=4, grad_accum=1, **kw)
    a, b, base = tensors(tmp_path / "accum"), tensors(tmp_path / "big"), tensors(llama_dir)
    assert small.trained == big.trained and len(small.trained) == 9  # 7 Linear weights + 2 norms of layer 1
    for name in small.trained:
        assert not torch.equal(a[name], base[name])
        assert (a[name] - b[name]).abs().max().item() < 1e-6, name
    assert small.losses == pytest.approx(big.losses, abs=1e-6)


def test_lr_schedule_is_the_closed_form_and_hooks_run_once_per_step(tmp_path, llama_dir, text_data):
    steps, warmup, peak = 7, 2, 1e-3
    seen: list[tuple[str, int, float, float]] = []
    before_weights: dict[int, dict[str, torch.Tensor]] = {}

    class Hook:
        def before_step(self, info: StepInfo) -> None:
            assert all(g is not None and torch.isfinite(g).all() for g in info.grads.values())
            seen.append(("before", info.step, info.lr, info.optimizer.param_groups[0]["lr"]))
            before_weights[info.step] = {n: p.detach().clone() for n, p in info.params.items()}

        def after_step(self, info: StepInfo) -> None:
            assert all(g is not None for g in info.grads.values())  # not cleared yet
            assert any(not torch.equal(p, before_weights[info.step][n]) for n, p in info.params.items())
            seen.append(("after", info.step, info.lr, info.optimizer.param_groups[0]["lr"]))
            if info.step == info.steps:  # a rewrite after the last step is what gets saved
                with torch.no_grad():
                    info.params["model.layers.0.mlp.down_proj.weight"][0].fill_(0.25)

    report = finetune(
        llama_dir,
        text_data,
        tmp_path / "out",
        train=["language.layers[0]"],
        steps=steps,
        warmup=warmup,
        lr=peak,
        batch_size=2,
        grad_accum=2,
        hook=Hook(),
        log=quiet,
    )

    def closed_form(t: int) -> float:
        if t <= warmup:
            return peak * t / warmup
        low = 0.1 * peak
        return low + (peak - low) * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup))) / 2

    assert [(w, s) for w, s, *_ in seen] == [(w, s) for s in range(1, steps + 1) for w in ("before", "after")]
    for _, t, lr, group_lr in seen:
        assert lr == pytest.approx(closed_form(t), rel=1e-12) and group_lr == lr
    assert report.lrs[-1] == pytest.approx(0.1 * peak) and report.lrs[warmup - 1] == peak
    # the weights a step starts from are the ones the previous step's after_step left
    for t in range(2, steps + 1):
        assert not any(torch.equal(before_weights[t][n], before_weights[t - 1][n]) for n in before_weights[t])
    saved = tensors(tmp_path / "out")["model.layers.0.mlp.down_proj.weight"]
    assert torch.all(saved[0] == 0.25)
    meta = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert meta["lrs"] == report.lrs and len(meta["losses"]) == steps and meta["recipe"]["warmup"] == warmup


def test_clipping_bounds_the_gradient_the_hook_sees(tmp_path, llama_dir, text_data):
    clip, norms = 0.05, []

    def hook(info: StepInfo) -> None:
        total = torch.sqrt(sum((g.double() ** 2).sum() for g in info.grads.values())).item()
        norms.append((info.grad_norm, total))

    finetune(
        llama_dir,
        text_data,
        tmp_path / "out",
        train=["language.layers"],
        steps=3,
        lr=1e-3,
        clip=clip,
        batch_size=4,
        hook=hook,
        log=quiet,
    )
    assert len(norms) == 3
    for before, after in norms:
        assert before > clip  # clipping happened
        assert after <= clip * (1 + 1e-5) and after == pytest.approx(clip, rel=1e-4)


# ---------------------------------------------------------------------------------------------------- the loss
def qwen_processor_and_model():
    class ImageOnlyProcessor(Qwen2_5_VLProcessor):  # no video processor (it needs torchvision)
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
            )

    tok = AutoTokenizer.from_pretrained(export_smollm2())
    tok.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
    ip = Qwen2VLImageProcessorPil(
        min_pixels=64, max_pixels=1024, patch_size=4, merge_size=2, temporal_patch_size=2
    )
    proc = ImageOnlyProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    return proc, tiny_qwen25vl_model(0, tok)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_answer_position_head_equals_full_logits(family, llava_dir, image_data):
    if family == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
        enc = Encoder(llava_dir)
    else:
        proc, model = qwen_processor_and_model()
        enc = Encoder(proc)
    image = image_data.parent / "red.png"
    samples = [
        Sample("a", image, [("user", "What colour is it?"), ("assistant", "red")]),
        Sample(
            "b",
            None,
            [("user", "A much longer question, without any image at all?"), ("assistant", "a longer answer")],
        ),
        Sample(
            "c", image, [("user", "Colour?"), ("assistant", "red"), ("user", "Sure?"), ("assistant", "yes")]
        ),
    ]
    batch = collate([enc(s) for s in samples], enc.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # padding is in play
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_index")}
        full = answer_loss(model(**inputs).logits, batch["labels"])
        fast = answer_losses(model, batch)
    # within 1e-6 relative: at a loss of ~11 that is about two float32 ulps (the sums run in another order)
    assert fast.shape == (3,) and ((fast - full).abs() / full).max().item() < 1e-6


def test_bfloat16_autocast_keeps_float32_weights_and_the_loss(tmp_path, llama_dir, text_data):
    kw: dict[str, Any] = {
        "train": ["language.layers[0]"],
        "steps": 2,
        "lr": 1e-3,
        "batch_size": 4,
        "log": quiet,
    }
    ref = finetune(llama_dir, text_data, tmp_path / "fp32", **kw)
    dtypes: set[torch.dtype] = set()
    bf16 = finetune(
        llama_dir,
        text_data,
        tmp_path / "bf16",
        dtype="bfloat16",
        **kw,
        hook=lambda info: dtypes.update(p.grad.dtype for p in info.params.values()),
    )
    assert dtypes == {torch.float32}
    assert bf16.losses[0] == pytest.approx(ref.losses[0], rel=2e-2) and bf16.losses[0] != ref.losses[0]
    assert {t.dtype for t in tensors(tmp_path / "bf16").values()} == {torch.float32}


def test_bfloat16_holds_the_frozen_weights_in_bf16_and_the_trained_in_float32(tmp_path, llama_dir, text_data):
    """Frozen weights in the compute dtype (half their memory), trainable weights and AdamW state float32; the
    untouched tensors of the output are the input's bytes, and finetune.json says what ran in which precision."""
    kw: dict[str, Any] = {
        "train": ["language.layers[0]"],
        "steps": 2,
        "lr": 1e-3,
        "batch_size": 4,
        "log": quiet,
    }
    seen: dict[str, set] = {"frozen": set(), "trained": set(), "state": set()}

    def look(info) -> None:
        trained = {id(p) for p in info.params.values()}
        seen["frozen"] |= {p.dtype for p in info.model.parameters() if id(p) not in trained}
        seen["trained"] |= {p.dtype for p in info.params.values()}
        seen["state"] |= {v.dtype for st in info.optimizer.state.values() for v in st.values() if v.dim()}

    finetune(llama_dir, text_data, tmp_path / "bf16", dtype="bfloat16", hook=look, **kw)
    assert seen == {"frozen": {torch.bfloat16}, "trained": {torch.float32}, "state": {torch.float32}}
    out, base = tensors(tmp_path / "bf16"), tensors(llama_dir)
    report = json.loads((tmp_path / "bf16" / "finetune.json").read_text())
    assert report["recipe"]["precision"] == {
        "trainable": "float32",
        "optimizer": "float32",
        "frozen": "bfloat16",
    }
    for name in set(base) - set(report["trained_tensors"]):
        assert torch.equal(out[name], base[name]), name


@pytest.mark.parametrize("how", ["full", "lora"])
def test_bfloat16_loads_in_bf16_and_trains_what_a_float32_load_trains(
    tmp_path, llama_dir, text_data, monkeypatch, how
):
    """Under bfloat16 the model is loaded in bf16 (the frozen weights never in float32), then the trainable tensors
    are given the checkpoint's values in float32: at the first step they are the stored values exactly (stored in
    float32 here, most of them not bf16 values), and the trained weights are bit for bit those of a float32 load
    whose frozen weights are cast to bf16 afterwards. LoRA: PEFT's adapters keep their float32 initial values."""
    from forgetless.train import loop

    real = loop.load_model
    asked: list[str] = []
    monkeypatch.setattr(loop, "load_model", lambda d, dev, dt: asked.append(dt) or real(d, dev, dt))
    kw: dict[str, Any] = {
        "train": ["language.layers[1]"],
        "steps": 3,
        "batch_size": 4,
        "lr": 1e-2,
        "dtype": "bfloat16",
        "log": quiet,
    }
    if how == "lora":
        kw.update(lora=LoraSpec(r=4, alpha=8, dropout=0.0), lr=1e-3)
    first: dict[str, dict[str, torch.Tensor]] = {}

    def keep_first(label: str):
        return lambda info: first.setdefault(label, {n: p.detach().clone() for n, p in info.params.items()})

    finetune(llama_dir, text_data, tmp_path / "bf16", hook=keep_first("bf16"), **kw)
    assert asked == ["bfloat16"]
    monkeypatch.setattr(loop, "load_model", lambda d, dev, dt: real(d, dev, "float32"))  # the float32 load
    finetune(llama_dir, text_data, tmp_path / "fp32", hook=keep_first("fp32"), **kw)
    stored = tensors(llama_dir)
    for name, t in first["bf16"].items():
        assert t.dtype == torch.float32 and torch.equal(t, first["fp32"][name]), name
        if how == "full":
            assert torch.equal(t, stored[name]), name
    if how == "full":
        assert any(not torch.equal(stored[n].bfloat16().float(), stored[n]) for n in first["bf16"])
    weights = "model.safetensors" if how == "full" else "adapter_model.safetensors"
    a, b = (load_file(str(tmp_path / d / weights)) for d in ("bf16", "fp32"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_steps(tmp_path, llama_dir, text_data):
    """Activations recomputed in the backward: the same losses and weights, to rounding."""
    kw: dict[str, Any] = {
        "train": ["language.layers"],
        "steps": 2,
        "lr": 1e-3,
        "batch_size": 4,
        "seed": 1,
        "log": quiet,
    }
    flags = {False: set(), True: set()}

    def look(on: bool):
        return lambda info: flags[on].update(
            layer.gradient_checkpointing for layer in info.model.model.layers
        )

    plain = finetune(llama_dir, text_data, tmp_path / "plain", hook=look(False), **kw)
    ckpt = finetune(
        llama_dir, text_data, tmp_path / "ckpt", gradient_checkpointing=True, hook=look(True), **kw
    )
    assert flags == {False: {False}, True: {True}}  # every decoder layer recomputed in the backward, or none
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)
    a, b = tensors(tmp_path / "plain"), tensors(tmp_path / "ckpt")
    for name in plain.trained:
        assert (a[name] - b[name]).abs().max().item() < 1e-6, name
    assert json.loads((tmp_path / "ckpt" / "finetune.json").read_text())["recipe"]["gradient_checkpointing"]


# ---------------------------------------------------------------------------------------------------- outputs
def test_full_finetune_changes_only_the_selected_tensors(tmp_path, llava_dir, image_data):
    last: dict[str, torch.Tensor] = {}

    def after(info: StepInfo) -> None:
        last.update({n: p.detach().clone() for n, p in info.params.items()})

    hook = type("H", (), {"after_step": staticmethod(after)})()
    out = tmp_path / "ft"
    report = finetune(
        llava_dir,
        image_data,
        out,
        train=["language.layers[1]", "projector"],
        steps=2,
        lr=1e-3,
        batch_size=2,
        hook=hook,
        log=quiet,
    )
    base, new = tensors(llava_dir), tensors(out)
    expected = {n for n in base if re.match(r"language_model\.model\.layers\.1\.|multi_modal_projector\.", n)}
    assert set(report.trained) == expected == set(last) and len(expected) == 13
    assert list(new) == list(base)
    for name, t in base.items():
        assert new[name].dtype == t.dtype and new[name].shape == t.shape
        if name in expected:
            assert torch.equal(new[name], last[name]) and not torch.equal(new[name], t), name
        else:
            assert torch.equal(new[name].view(torch.uint8), t.view(torch.uint8)), name  # bit for bit
    for side in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        if (llava_dir / side).exists():
            assert (out / side).read_bytes() == (llava_dir / side).read_bytes(), side
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["trained_tensors"] == sorted(expected) and meta["kind"] == "full" and len(meta["losses"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_tied_embedding_trains_once_and_is_saved_once(tmp_path, text_data):
    tied = build_llama_with_tokenizer(tmp_path / "tied", layers=1, tie=True)
    names: list[list[str]] = []
    report = finetune(
        tied,
        text_data,
        tmp_path / "out",
        train=["language.embed"],
        steps=1,
        lr=1e-2,
        batch_size=2,
        hook=lambda info: names.append(sorted(info.params)),
        log=quiet,
    )
    assert report.trained == names[0] == ["model.embed_tokens.weight"]
    base, new = tensors(tied), tensors(tmp_path / "out")
    assert set(new) == set(base) and "lm_head.weight" not in new
    assert not torch.equal(new["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_lora_adapter_loads_in_peft_and_forgetless_alike(tmp_path, llava_dir, image_data):
    from peft import PeftModel

    out = tmp_path / "adapter"
    spec = LoraSpec(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    report = finetune(
        llava_dir,
        image_data,
        out,
        train=["language.layers[1:]"],
        lora=spec,
        steps=3,
        lr=1e-2,
        batch_size=2,
        log=quiet,
    )
    targets = {
        f"language_model.model.layers.{i}.self_attn.{p}.weight" for i in (1, 2) for p in ("q_proj", "v_proj")
    }
    assert set(report.trained) == targets
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    base_model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    merged = PeftModel.from_pretrained(base_model, out).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    peft_merged, base = tensors(tmp_path / "merged"), tensors(llava_dir)
    with open_model(f"{llava_dir}+{out}") as ours:
        assert set(ours.names()) == set(peft_merged)
        for name in ours.names():
            mine = ours.get(name)
            assert (mine - peft_merged[name]).abs().max().item() < 1e-6, name
            assert torch.equal(mine, base[name]) != (name in targets), name


def test_init_adapter_continues_from_the_adapters_own_weights(tmp_path, llava_dir, image_data):
    """Sequential fine-tuning: the second run starts from the first adapter's tensors (B ≠ 0), not PEFT's init."""
    from safetensors.torch import load_file

    spec = LoraSpec(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    first = tmp_path / "task1"
    finetune(
        llava_dir,
        image_data,
        first,
        train=["language.layers[1:]"],
        lora=spec,
        steps=2,
        lr=1e-2,
        batch_size=2,
        log=quiet,
    )
    saved = load_file(str(first / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())
    seen: dict[str, torch.Tensor] = {}

    def before(info: StepInfo) -> None:
        if info.step == 1:
            seen.update({k: p.detach().clone() for k, p in info.params.items()})

    second = tmp_path / "task2"
    finetune(
        llava_dir,
        image_data,
        second,
        train=["language.layers[1:]"],
        lora=spec,
        steps=1,
        lr=1e-2,
        batch_size=2,
        init_adapter=first,
        hook=before,
        log=quiet,
    )
    assert set(seen) == set(saved)
    for k in saved:
        assert torch.equal(seen[k], saved[k]), k
    assert json.loads((second / "finetune.json").read_text())["recipe"]["init_adapter"] == str(first)
    after = load_file(str(second / "adapter_model.safetensors"))
    assert any(not torch.equal(after[k], saved[k]) for k in saved)  # and it trained on from there

    with pytest.raises(ForgetlessError, match="rank 4 and alpha 8, this run trains rank 2"):
        finetune(
            llava_dir,
            image_data,
            tmp_path / "x",
            train=["language.layers[1:]"],
            lora=LoraSpec(r=2, alpha=8),
            init_adapter=first,
            log=quiet,
        )
    with pytest.raises(ForgetlessError, match="not in it"):
        finetune(
            llava_dir,
            image_data,
            tmp_path / "y",
            train=["language.layers[1:]"],
            lora=LoraSpec(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj"]),
            init_adapter=first,
            log=quiet,
        )
    with pytest.raises(ForgetlessError, match="full fine-tune"):
        finetune(llava_dir, image_data, tmp_path / "z", init_adapter=first, log=quiet)
    assert not any((tmp_path / n).exists() for n in "xyz")


# ---------------------------------------------------------------------------------------------------- errors
def test_bad_selector_and_existing_output_are_refused_up_front(tmp_path, llama_dir, text_data):
    with pytest.raises(ForgetlessError, match=re.escape("language.layerz[1]")):
        finetune(llama_dir, text_data, tmp_path / "a", train=["language.layerz[1]"], log=quiet)
    with pytest.raises(ForgetlessError, match="'k_prj'"):
        finetune(llama_dir, text_data, tmp_path / "b", lora=LoraSpec(targets=["k_prj"]), log=quiet)
    (tmp_path / "c").mkdir()
    with pytest.raises(ForgetlessError, match="already exists"):
        finetune(llama_dir, text_data, tmp_path / "c", log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# ---------------------------------------------------------------------------------------------------- end to end
def test_tiny_llava_learns_its_four_images(tmp_path, llava_dir, image_data):
    report = finetune(
        llava_dir, image_data, tmp_path / "out", steps=20, lr=3e-2, batch_size=4, warmup=2, log=quiet
    )
    assert len(report.losses) == 20 and report.num_samples == 4
    assert report.losses[-1] < 0.1 * report.losses[0] and min(report.losses[-3:]) < min(report.losses[:3])
    # Each answer is one colour token + end of turn, after the same question. A model blind to the image gives the
    # four colours some fixed distribution q, so its mean loss is at least Σ -log q(c) / (4·2) ≥ ln(4) / 2:
    # getting below that means the images (through the trained projector) are being used.
    enc = Encoder(llava_dir)
    assert all(int((enc(s)["labels"] != -100).sum()) == 2 for s in load_samples(image_data))
    assert report.losses[-1] < math.log(4) / 2


def test_cli_finetune(tmp_path, llama_dir, text_data, capsys):
    out = tmp_path / "cli"
    main(
        [
            "finetune",
            str(llama_dir),
            "--data",
            str(text_data),
            "--out",
            str(out),
            "--train",
            "language.layers[-1]",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--lr",
            "1e-3",
            "--clip",
            "0",
            "-n",
            "6",
        ]
    )
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["recipe"]["grad_accum"] == 2 and meta["recipe"]["clip"] is None and meta["num_samples"] == 6
    assert len(meta["losses"]) == 3 and all(n.startswith("model.layers.1.") for n in meta["trained_tensors"])
    assert "step 3/3" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["full", "lora"])
def test_dry_run_accounts_the_trained_tensors_without_loading(
    tmp_path, llama_dir, text_data, monkeypatch, how
):
    """--dry-run: the memory per rank from the meta-device model, before any weight is read, nothing written; its
    trainable count is what the real run trains."""
    from forgetless.train import loop

    kw: dict[str, Any] = {
        "train": ["language.layers[1]"],
        "steps": 1,
        "batch_size": 4,
        "keep": "spider",
        "dtype": "bfloat16",
    }
    if how == "lora":
        kw.update(lora=LoraSpec(r=4, alpha=8), keep="none")
    said: list[str] = []
    monkeypatch.setattr(loop, "load_model", lambda *a: pytest.fail("the dry run loaded the model"))
    assert finetune(llama_dir, text_data, tmp_path / "dry", dry_run=True, log=said.append, **kw) is None
    monkeypatch.undo()
    assert not (tmp_path / "dry").exists() and said[-2].startswith("memory per rank:")
    seen: dict[str, int] = {}
    report = finetune(
        llama_dir,
        text_data,
        tmp_path / "real",
        log=quiet,
        **kw,
        hook=lambda info: seen.setdefault("n", sum(p.numel() for p in info.params.values())),
    )
    assert report is not None
    n = seen["n"]  # the values the run trained
    frozen = sum(t.numel() for t in tensors(llama_dir).values()) - (n if how == "full" else 0)
    line = said[-2]
    for what, size in [
        ("frozen weights", frozen * 2),
        ("trainable weights", n * 4),
        ("gradients", n * 4),
        ("optimizer", n * 8),
        ("keep rule", n * (8 if how == "full" else 0)),
    ]:
        assert f"{what} {human_bytes(size)}" in line, (what, line)
