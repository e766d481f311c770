"""Shared test helpers: tiny random models built from transformers configs, saved to temporary folders.

The ``tiny_*_dir`` fixtures are session-scoped (built once, a fraction of a second each) and must be treated as
read-only. The ``build_tiny_*`` functions build a fresh one into a given folder, for tests that need their own.
Note: transformers 5 writes LLaVA and Qwen2.5-VL checkpoints under their *legacy* tensor names
(``language_model.model.layers.N``, ``visual.*``); ``save_current_names`` writes the in-memory (current) names.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from deprecation_guard import deprecation_guard
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

# transformers' log records down to WARNING reach the deprecation guard; its own handlers print errors only, as quiet
# as set_verbosity_error() was
hf_logging.set_verbosity_warning()
for _handler in logging.getLogger("transformers").handlers:
    _handler.setLevel(logging.ERROR)
hf_logging.disable_progress_bar()


def _guarded():
    """Run a test phase; fail it when forgetless caused a deprecation in it (tests/deprecation_guard.py: how a
    warning that transformers attributes to its own or torch's frame is traced back to our call)."""
    with deprecation_guard() as found:
        result = yield
    if found:
        pytest.fail(
            "deprecated API used by forgetless (move to the current API):\n" + "\n".join(found), pytrace=False
        )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _guarded())


TEXT = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def tiny_llama_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TEXT)).eval()


def tiny_llava_model(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**TEXT),
        image_token_index=127,
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_qwen25vl_model(seed: int = 0, tok=None) -> Qwen2_5_VLForConditionalGeneration:
    """A tiny Qwen2.5-VL; with `tok` (a tokenizer that has the Qwen vision tokens) sized and wired to it."""
    torch.manual_seed(seed)
    text = {**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}}
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": 32,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "fullatt_block_indexes": [1],
        "window_size": 16,
    }
    ids = {"image": 120, "video": 121, "start": 122}
    if tok is not None:
        text["vocab_size"] = len(tok)
        ids = {
            k: tok.convert_tokens_to_ids(t)
            for k, t in (
                ("image", "<|image_pad|>"),
                ("video", "<|video_pad|>"),
                ("start", "<|vision_start|>"),
            )
        }
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["start"],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    tiny_llama_model(seed).save_pretrained(path)
    return Path(path)


def add_args(state: Path, task: tuple[Path, Path], base: Path | None = None) -> list[str]:
    """`forgetless continual add STATE` with a task's (adapter, Gram) pair, and --base for the first task."""
    first = ["--base", str(base)] if base is not None else []
    return ["continual", "add", str(state), *first, "--adapter", str(task[0]), "--gram", str(task[1])]


def build_tiny_llava(path: Path, seed: int = 0) -> Path:
    tiny_llava_model(seed).save_pretrained(path)
    return Path(path)


def build_llava_with_processor(path: Path) -> Path:
    """A tiny LLaVA folder that `forgetless eval` can run on images: the model and a real LLaVA processor."""
    from test_stats_data import tiny_llava_for, tiny_llava_processor

    processor = tiny_llava_processor()
    tiny_llava_for(processor).save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)


def build_tiny_qwen25vl(path: Path, seed: int = 0) -> Path:
    tiny_qwen25vl_model(seed).save_pretrained(path)
    return Path(path)


def save_current_names(model: torch.nn.Module, path: Path) -> Path:
    """Save ``model`` as a folder under its in-memory (transformers 5, "current") tensor names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(path / "config.json"))
    return path


def save_renamed(src: Path, dst: Path, rename, config: dict | None = None) -> Path:
    """Copy a single-file checkpoint folder with every tensor renamed by ``rename(name) -> name``."""
    from safetensors.torch import load_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(Path(src) / "model.safetensors"))
    save_file(
        {rename(k): v for k, v in sd.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"}
    )
    cfg = config if config is not None else json.loads((Path(src) / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def llava_eval_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA with its processor (evaluable on image tasks and benchmarks)."""
    return build_llava_with_processor(tmp_path_factory.mktemp("llava_eval"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA as transformers saves it (llava-hf legacy names)."""
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_qwen25vl_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL as transformers saves it (``visual.*``, ``model.layers.N``)."""
    return build_tiny_qwen25vl(tmp_path_factory.mktemp("tiny_qwen25vl"))


def llava_legacy_to_original(name: str) -> str:
    """llava-hf (legacy) tensor names -> original LLaVA repository names (``LlavaLlamaForCausalLM``)."""
    name = name.replace("language_model.model.", "model.").replace("language_model.lm_head.", "lm_head.")
    name = name.replace("multi_modal_projector.linear_1.", "model.mm_projector.0.")
    name = name.replace("multi_modal_projector.linear_2.", "model.mm_projector.2.")
    return re.sub(r"^vision_tower\.", "model.vision_tower.vision_tower.vision_model.", name)


LLAVA_ORIGINAL_CONFIG = {
    "architectures": ["LlavaLlamaForCausalLM"],
    "model_type": "llava_llama",
    "num_hidden_layers": 3,
    "hidden_size": 32,
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
}


def build_tiny_llava_original(llava_dir: Path, path: Path) -> Path:
    """An original-LLaVA-style folder holding the weights of the transformers LLaVA in ``llava_dir``."""
    return save_renamed(llava_dir, path, llava_legacy_to_original, LLAVA_ORIGINAL_CONFIG)


def save_statistics_for(
    model_dir: Path, path: Path, tensors: dict[str, torch.Tensor], kind: str = "fisher", num_samples: int = 4
) -> Path:
    """A statistics file as `forgetless stats` writes it for `model_dir` (the metadata the engine checks)."""
    from forgetless.checkpoint.reader import CheckpointReader

    meta = {
        "kind": kind,
        "num_samples": str(num_samples),
        "model_fingerprint": CheckpointReader(model_dir).fingerprint(),
    }
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def linear_weight_shapes(model_dir: Path) -> dict[str, torch.Size]:
    """Checkpoint name → shape of every projection weight (`*proj.weight`) of a tiny model folder."""
    from safetensors.torch import load_file

    return {
        k: v.shape
        for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()
        if k.endswith("proj.weight")
    }


def build_llama_with_tokenizer(path: Path, *, layers: int = 3, tie: bool = True, seed: int = 0) -> Path:
    """A tiny Llama with the embedded SmolLM2's tokenizer (and so its vocabulary and chat template) in `path`."""
    from transformers import AutoTokenizer

    from forgetless.embedded import export_smollm2

    tok = AutoTokenizer.from_pretrained(export_smollm2())
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{
            **TEXT,
            "vocab_size": len(tok),
            "num_hidden_layers": layers,
            "tie_word_embeddings": tie,
            "max_position_embeddings": 256,
        }
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def write_qa_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """A calibration file in the {question, answer} JSONL format."""
    Path(path).write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    return Path(path)
