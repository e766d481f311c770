"""Original LLaVA folders (``LlavaLlamaForCausalLM``: ``model.layers.N``, ``model.mm_projector.{0,2}``,
``model.vision_tower.vision_tower.*``, a Llama config with ``mm_*`` keys, a tokenizer without ``<image>``) in every
command that loads a model: the model, statistics, evaluation and fine-tune equal those of the same weights in the
llava-hf layout, keyed and written by the folder's own names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TEXT, llava_legacy_to_original, save_renamed
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from forgetless.checkpoint import original
from forgetless.errors import ForgetlessError
from forgetless.eval.harness import evaluate
from forgetless.stats.data import Encoder, collate, load_samples
from forgetless.stats.footprint import meta_model
from forgetless.stats.run import compute_statistics, load_model
from forgetless.train.loop import finetune

torch.set_num_threads(1)
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}
# what the LLaVA repository writes beside the Llama keys (llava-v1.5's config.json)
MM_KEYS = {
    "architectures": ["LlavaLlamaForCausalLM"],
    "model_type": "llava_llama",
    "freeze_mm_mlp_adapter": False,
    "image_aspect_ratio": "pad",
    "mm_hidden_size": 32,
    "mm_patch_merge_type": "flat",
    "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu",
    "mm_resampler_type": None,
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "tune_mm_mlp_adapter": False,
    "tune_mm_vision_resampler": False,
    "unfreeze_mm_vision_tower": False,
    "use_mm_proj": True,
    "torch_dtype": "float32",
    "pad_token_id": 0,
}
COLOURS = {"red": (220, 20, 20), "blue": (30, 40, 230), "green": (20, 200, 40)}


def smol_tokenizer():
    from transformers import AutoTokenizer

    from forgetless.embedded import export_smollm2

    return AutoTokenizer.from_pretrained(export_smollm2())


def hf_model(vocab: int, image_token: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    text = LlamaConfig(**{**TEXT, "vocab_size": vocab, "max_position_embeddings": 256})
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=text,
        image_token_index=image_token,
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def write_original(hf_dir: Path, dst: Path, *, clip: Path | None, **overrides) -> Path:
    """The hf folder's weights under the original names, with the config and tokenizer the LLaVA code writes."""
    text = json.loads((hf_dir / "config.json").read_text())["text_config"]
    cfg = {
        **text,
        **MM_KEYS,
        "mm_vision_tower": str(clip) if clip else "openai/clip-vit-large-patch14-336",
        **overrides,
    }
    save_renamed(hf_dir, dst, llava_legacy_to_original, cfg)
    smol_tokenizer().save_pretrained(dst)  # no <image>, no chat template of the LLaVA kind
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(hf folder, original folder, data file): the same weights; the hf processor has what the original one
    derives (<image> after the vocabulary, llava_v1's template, CLIP preprocessing at 32 px)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = tmp_path_factory.mktemp("original")
    tok = smol_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    hf = root / "hf"
    hf_model(len(tok), tok.convert_tokens_to_ids("<image>")).save_pretrained(hf)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=original.CHAT_TEMPLATE,
    ).save_pretrained(hf)
    clip = root / "clip"
    clip.mkdir()
    CLIPVisionConfig(**VISION).to_json_file(str(clip / "config.json"))
    ip.save_pretrained(clip)
    orig = write_original(hf, root / "orig", clip=clip)
    data = root / "data"
    data.mkdir()
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (32, 32), rgb).save(data / f"{name}.png")
        records.append(
            {
                "id": f"c{i}",
                "image": f"{name}.png",
                "question": "What colour is it?",
                "answer": name,
                "options": list(COLOURS),
            }
        )
        records.append({"id": f"t{i}", "question": f"Say {name}.", "answer": name})
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if "options" in r))
    return hf, orig, data


def renamed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {llava_legacy_to_original(k): v for k, v in tensors.items()}


def test_the_original_folder_loads_as_its_hf_twin(folders):
    hf, orig, data = folders
    a, _ = load_model(orig, "cpu", "float32")
    b, _ = load_model(hf, "cpu", "float32")
    assert dict(a.named_parameters()).keys() == dict(b.named_parameters()).keys()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    samples = load_samples(data / "train.jsonl", image_folder=data)
    enc_a, enc_b = Encoder(orig), Encoder(hf)
    batch_a = collate([enc_a(s) for s in samples[:2]], enc_a.pad_token_id)
    batch_b = collate([enc_b(s) for s in samples[:2]], enc_b.pad_token_id)
    assert torch.equal(batch_a["input_ids"], batch_b["input_ids"]) and torch.equal(
        batch_a["labels"], batch_b["labels"]
    )
    assert torch.equal(batch_a["pixel_values"], batch_b["pixel_values"])
    inputs = {k: batch_a[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert torch.equal(a(**inputs).logits, b(**inputs).logits)


def test_the_meta_model_names_tensors_as_the_folder(folders):
    from forgetless.stats.fisher import checkpoint_names

    _, orig, _ = folders
    names = set(checkpoint_names(meta_model(orig, "float32")).values())
    assert names == set(load_file(str(orig / "model.safetensors")))


@pytest.mark.parametrize("kind", ["fisher", "gram"])
def test_statistics_equal_the_hf_twins_under_the_original_names(folders, tmp_path, kind):
    hf, orig, data = folders
    files = {}
    for name, folder in (("hf", hf), ("orig", orig)):
        files[name] = tmp_path / f"{name}.safetensors"
        compute_statistics(
            kind,
            folder,
            data / "train.jsonl",
            files[name],
            images=data,
            device="cpu",
            batch_size=2,
            log=None,
            progress=False,
        )
    got, want = load_file(str(files["orig"])), renamed(load_file(str(files["hf"])))
    assert got.keys() == want.keys() and any(".mm_projector." in k for k in got)
    assert set(got) <= set(load_file(str(orig / "model.safetensors")))
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0, msg=k)


def test_evaluation_equals_the_hf_twins(folders):
    hf, orig, data = folders
    results = [
        evaluate(folder, {"quiz": data / "quiz.jsonl"}, device="cpu", batch_size=2, log=None)
        for folder in (orig, hf)
    ]
    a, b = (r["tasks"]["quiz"]["predictions"] for r in results)
    assert [p["correct"] for p in a] == [p["correct"] for p in b]
    for p, q in zip(a, b):
        assert p["logprobs"] == pytest.approx(q["logprobs"], abs=1e-5)


@pytest.fixture(scope="module")
def finetuned(folders, tmp_path_factory):
    """Two steps of a full fine-tune (a decoder layer and the projector) of each twin."""
    hf, orig, data = folders
    root = tmp_path_factory.mktemp("finetuned")
    kw = {
        "train": ["language.layers[1:2]", "projector"],
        "steps": 2,
        "batch_size": 2,
        "lr": 1e-3,
        "images": data,
        "device": "cpu",
        "log": None,
        "tensorboard": False,
    }
    for name, folder in (("hf", hf), ("orig", orig)):
        finetune(folder, data / "train.jsonl", root / name, **kw)
    return root / "hf", root / "orig"


def test_a_full_fine_tune_writes_the_original_layout(folders, finetuned):
    _, orig, _ = folders
    hf_out, orig_out = finetuned
    before = load_file(str(orig / "model.safetensors"))
    got, want = (
        load_file(str(orig_out / "model.safetensors")),
        renamed(load_file(str(hf_out / "model.safetensors"))),
    )
    assert got.keys() == before.keys()
    assert json.loads((orig_out / "config.json").read_text())["architectures"] == ["LlavaLlamaForCausalLM"]
    changed = [k for k in got if not torch.equal(got[k], before[k])]
    assert changed and all(".layers.1." in k or ".mm_projector." in k for k in changed)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_cgm_chain_equals_the_hf_twins(folders, finetuned, tmp_path):
    from forgetless.chains.cgm import cgm_chain

    hf, orig, data = folders
    outs = {}
    for name, base, tuned in (("hf", hf, finetuned[0]), ("orig", orig, finetuned[1])):
        outs[name] = tmp_path / name
        cgm_chain(
            base,
            tuned,
            general_data=data / "quiz.jsonl",
            task_data=data / "train.jsonl",
            general_images=data,
            task_images=data,
            out=outs[name],
            n=3,
            batch_size=2,
            device="cpu",
            log=None,
            stats_dir=tmp_path / f"stats_{name}",
        )
    got, want = (
        load_file(str(outs["orig"] / "model.safetensors")),
        renamed(load_file(str(outs["hf"] / "model.safetensors"))),
    )
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)


def test_a_routed_original_folder_loads_with_its_routing(folders, tmp_path):
    """CPM on an original folder: its projector read as llava-hf's, routed; the first task's projector and a
    prototype its images are nearest to route every image to it, so the logits equal the plain folder's."""
    from forgetless import cpm

    _, orig, data = folders
    routed = tmp_path / "routed"
    shutil.copytree(orig, routed)
    sd = load_file(str(orig / "model.safetensors"))
    projector = {cpm.projector_key(k): v for k, v in sd.items() if cpm.projector_key(k) is not None}
    assert sorted(projector) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    other = {k: v + 1.0 for k, v in projector.items()}
    plain, _ = load_model(orig, "cpu", "float32")
    enc = Encoder(orig)
    batch = collate([enc(s) for s in load_samples(data / "quiz.jsonl", image_folder=data)], enc.pad_token_id)
    mine = cpm.visual_features(plain, batch["pixel_values"]).mean(dim=0).float()
    cpm.write_routing(routed, ["a", "b"], [projector, other], torch.stack([mine, -mine]), hard=True)
    model = cpm.load_model(routed)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, plain(**inputs).logits, rtol=0, atol=0)


def test_an_image_token_past_the_vocabulary_reads_row_zero(tmp_path):
    """LLaVA-1.5's case: the tokenizer's vocabulary is the embedding's, so <image> gets an id past it; the image
    features replace those positions, as the original code splices them into the text embeddings."""
    tok = smol_tokenizer()
    hf = tmp_path / "hf"
    hf_model(len(tok), 0).save_pretrained(hf)
    clip = tmp_path / "clip"
    clip.mkdir()
    CLIPVisionConfig(**VISION).to_json_file(str(clip / "config.json"))
    orig = write_original(hf, tmp_path / "orig", clip=clip)
    model, _ = load_model(orig, "cpu", "float32")
    enc = Encoder(orig)
    image_id = enc.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == len(tok) == model.get_input_embeddings().num_embeddings
    Image.new("RGB", (48, 32), (10, 200, 30)).save(tmp_path / "g.png")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"image": "g.png", "question": "Colour?", "answer": "green"})
    )
    batch = collate(
        [enc(s) for s in load_samples(tmp_path / "d.jsonl", image_folder=tmp_path)], enc.pad_token_id
    )
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    assert int((ids == image_id).sum()) == 16
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        embeds = model.get_input_embeddings()(ids.masked_fill(ids == image_id, 5))
        embeds[ids == image_id] = features  # the original code's splice
        want = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_the_vision_config_from_the_weights_shapes(tmp_path):
    """Without a local CLIP folder: OpenAI CLIP's config from the tensors (64 values per head)."""
    torch.manual_seed(0)
    vision = {
        **VISION,
        "hidden_size": 128,
        "num_attention_heads": 2,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "hidden_act": "quick_gelu",
    }
    tok = smol_tokenizer()
    text = LlamaConfig(**{**TEXT, "vocab_size": len(tok)})
    LlavaForConditionalGeneration(
        LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text, image_token_index=0)
    ).save_pretrained(tmp_path / "hf")
    orig = write_original(tmp_path / "hf", tmp_path / "orig", clip=None, mm_hidden_size=128)
    got = original.hf_config(orig).vision_config
    for k, v in vision.items():
        if k != "projection_dim":
            assert getattr(got, k) == v, k
    processor = Encoder(orig).processor
    assert processor.image_processor.crop_size["height"] == 32 and processor.image_processor.do_pad


def test_a_projector_in_mm_projector_bin(folders, tmp_path):
    _, orig, _ = folders
    sd = load_file(str(orig / "model.safetensors"))
    side = {k: v for k, v in sd.items() if ".mm_projector." in k}
    d = tmp_path / "split"
    d.mkdir()
    for f in orig.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    save_file(
        {k: v for k, v in sd.items() if k not in side},
        str(d / "model.safetensors"),
        metadata={"format": "pt"},
    )
    torch.save(side, d / original.PROJECTOR_FILE)
    a, _ = load_model(d, "cpu", "float32")
    b, _ = load_model(orig, "cpu", "float32")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_refusals_name_the_folder_and_the_remedy(folders, tmp_path):
    hf, _, _ = folders
    linear = write_original(hf, tmp_path / "linear", clip=None, mm_projector_type="linear")
    with pytest.raises(ForgetlessError, match="mm_projector_type='linear'") as e:
        load_model(linear, "cpu", "float32")
    assert str(linear) in str(e.value)
    sd = load_file(str(linear / "model.safetensors"))
    blind = write_original(hf, tmp_path / "blind", clip=None)
    save_file(
        {k: v for k, v in sd.items() if "vision_tower" not in k},
        str(blind / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(ForgetlessError, match=original.VISION_TOWER_ENV):
        load_model(blind, "cpu", "float32")


def test_a_lora_adapter_is_keyed_as_the_original_code_keys_it(folders, tmp_path):
    """LoRA on an original folder: the adapter's keys and target modules under the folder's module names (what
    the original code's PEFT adapters hold), its values the hf twin's, and a run continues from it."""
    from forgetless.checkpoint.lora import open_model
    from forgetless.train.loop import LoraSpec

    hf, orig, data = folders
    kw = {
        "lora": LoraSpec(r=2, alpha=4, targets=["q_proj", "v_proj"]),
        "steps": 2,
        "batch_size": 2,
        "lr": 1e-2,
        "images": data,
        "device": "cpu",
        "log": None,
        "tensorboard": False,
    }
    finetune(orig, data / "train.jsonl", tmp_path / "orig", **kw)
    finetune(hf, data / "train.jsonl", tmp_path / "hf", **kw)
    got = load_file(str(tmp_path / "orig" / "adapter_model.safetensors"))
    want = {
        k.replace("base_model.model.model.language_model.", "base_model.model.model."): v
        for k, v in load_file(str(tmp_path / "hf" / "adapter_model.safetensors")).items()
    }
    assert (
        got.keys() == want.keys() and "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in got
    )
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)
    targets = json.loads((tmp_path / "orig" / "adapter_config.json").read_text())["target_modules"]
    assert targets and all(t.startswith("model.layers.") for t in targets)
    with open_model(f"{orig}+{tmp_path / 'orig'}") as a, open_model(f"{hf}+{tmp_path / 'hf'}") as b:
        q = "self_attn.q_proj.weight"
        torch.testing.assert_close(
            a.get(f"model.layers.0.{q}"), b.get(f"language_model.model.layers.0.{q}"), rtol=1e-5, atol=1e-7
        )
    finetune(
        orig, data / "train.jsonl", tmp_path / "more", init_adapter=tmp_path / "orig", **{**kw, "steps": 1}
    )


def test_vision_weights_from_the_local_clip_folder(folders, tmp_path):
    """A folder without vision weights takes them from the CLIP folder mm_vision_tower names (only those read)."""
    _, orig, _ = folders
    sd = load_file(str(orig / "model.safetensors"))
    prefix = "model.vision_tower.vision_tower."
    clip = tmp_path / "clip"
    shutil.copytree(Path(json.loads((orig / "config.json").read_text())["mm_vision_tower"]), clip)
    save_file(
        {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)},
        str(clip / "model.safetensors"),
    )
    blind = tmp_path / "blind"
    shutil.copytree(orig, blind)
    save_file(
        {k: v for k, v in sd.items() if not k.startswith(prefix)},
        str(blind / "model.safetensors"),
        metadata={"format": "pt"},
    )
    cfg = json.loads((blind / "config.json").read_text())
    (blind / "config.json").write_text(json.dumps({**cfg, "mm_vision_tower": str(clip)}))
    a, _ = load_model(blind, "cpu", "float32")
    b, _ = load_model(orig, "cpu", "float32")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
