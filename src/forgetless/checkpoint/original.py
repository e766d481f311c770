"""Original LLaVA folders (``LlavaLlamaForCausalLM``, as the LLaVA repository saves them) as transformers models.

The folder's config.json is a Llama config plus ``mm_*`` keys, its tensors are named ``model.layers.N``,
``model.mm_projector.{0,2}`` and ``model.vision_tower.vision_tower.*`` (the projector may also sit in a separate
``mm_projector.bin``), and it names its CLIP by a Hub id. We build transformers' ``LlavaForConditionalGeneration``
from that, load the folder's tensors under their in-memory names, and record the folder's own name of every
parameter (``model.forgetless_names``), so statistics, evaluations and fine-tunes read and write the original names.

The vision tower: its weights from the folder; its config from ``mm_vision_tower`` when that (or
``$FORGETLESS_VISION_TOWER``) is a local CLIP folder, else from the weights' shapes (OpenAI CLIP: 64 values per head,
quick-GELU). A folder without vision weights takes them from that CLIP folder.

The prompt: the tokenizer gains ``<image>`` (as the llava-hf conversion does). Where that id lies past the
embedding (the original vocabulary has no image token), the embedding reads row 0 there instead — the image
features replace those positions anyway, as the original code splices them in. The conversation format is
LLaVA-1.5's ``llava_v1``, which the original code trains and evaluates with. Images are padded to a square of the mean colour when
the folder says ``image_aspect_ratio: pad``, as the original code does.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ForgetlessError, loading
from ..safeload import read_json
from .layout import config_family
from .reader import CheckpointReader, load_bin

VISION_TOWER_ENV = "FORGETLESS_VISION_TOWER"
PROJECTOR_FILE = "mm_projector.bin"
IMAGE_TOKEN = "<image>"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
# LLaVA-1.5's conv_llava_v1: "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ..."
CHAT_TEMPLATE = (
    '{% set ns = namespace(system="' + SYSTEM + '") %}'
    "{% if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] if messages[0]['content'] "
    "is string else messages[0]['content'][0]['text'] %}{% endif %}"
    "{{ bos_token + ns.system + ' ' }}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{{ 'USER: ' if m['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ ' ' if m['role'] == 'user' else eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# original name -> transformers' in-memory name (LlavaForConditionalGeneration), as from_pretrained's key_mapping;
# from_pretrained keeps it, so saving and forgetless's checkpoint_names give the original names back
KEY_MAPPING = {
    r"^model\.vision_tower\.vision_tower\.": "model.vision_tower.",
    r"^model\.mm_projector\.0\.": "model.multi_modal_projector.linear_1.",
    r"^model\.mm_projector\.2\.": "model.multi_modal_projector.linear_2.",
    r"^model\.(?!vision_tower\.|mm_projector\.|multi_modal_projector\.|language_model\.)": "model.language_model.",
}
# the same renaming as plain prefixes (original, in-memory), for names outside from_pretrained: adapters, side files
PREFIXES = [
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.", "model.language_model."),
]
PEFT_PREFIX = "base_model.model."
_LLAMA_ONLY_KEYS = re.compile(
    r"^(mm_|tune_mm|freeze_mm|unfreeze_mm|use_mm|image_aspect|architectures$|model_type$)"
)


def is_original(model_dir: Path) -> bool:
    """Whether the folder is an original LLaVA folder (by its config.json)."""
    f = Path(model_dir) / "config.json"
    return f.is_file() and config_family(_config(f)) == "llava_original"


def to_memory(name: str) -> str:
    """The in-memory name of an original tensor (or module) name."""
    for old, new in PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def to_original(name: str) -> str:
    """The original name of an in-memory tensor (or module) name."""
    for old, new in PREFIXES:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def adapter_key(key: str, rename: Callable[[str], str]) -> str:
    """A PEFT adapter key (``base_model.model.<module>.lora_A.weight``) with its module path renamed."""
    return PEFT_PREFIX + rename(key.removeprefix(PEFT_PREFIX))


def rename_adapter(folder: Path, rename: Callable[[str], str]) -> None:
    """Rename a PEFT adapter folder's tensors and target modules in place (a folder being written)."""
    from safetensors.torch import load_file, save_file

    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    tensors = load_file(str(weights))
    save_file(
        {adapter_key(k, rename): v for k, v in tensors.items()}, str(weights), metadata={"format": "pt"}
    )
    cfg = json.loads(config.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = [rename(m) for m in cfg["target_modules"]]
    config.write_text(json.dumps(cfg, indent=2))


def _config(path: Path) -> dict[str, Any]:
    return read_json(path, remedy="restore the model folder's config.json", expect=dict)


def _refuse_unsupported(cfg: dict[str, Any], file: Path) -> None:
    checks = {
        "mm_projector_type": ("mlp2x_gelu",),
        "mm_patch_merge_type": ("flat", None),
        "mm_vision_select_feature": ("patch", "cls_patch", None),
        "model_type": ("llava_llama", None),
    }
    for key, allowed in checks.items():
        if cfg.get(key) not in allowed:
            raise ForgetlessError(
                f"original LLaVA folder with {key}={cfg.get(key)!r}: transformers' LLaVA has no equivalent",
                file=file,
                remedy=f"forgetless reads {key} in {allowed}; convert "
                "the folder with transformers' LLaVA conversion script",
            )
    if cfg.get("mm_use_im_start_end"):
        raise ForgetlessError(
            "original LLaVA folder with mm_use_im_start_end: image start/end tokens are not supported",
            file=file,
            remedy="convert the folder with transformers' script",
        )


def vision_folder(model_dir: Path) -> Path | None:
    """The local CLIP folder the user named (``$FORGETLESS_VISION_TOWER``, else ``mm_vision_tower`` when it is a
    folder, absolute or relative to the model folder); None if there is none."""
    cfg = _config(Path(model_dir) / "config.json")
    for named in (os.environ.get(VISION_TOWER_ENV), cfg.get("mm_vision_tower")):
        if not named:
            continue
        for d in (Path(named), Path(model_dir) / named):
            if (d / "config.json").is_file():
                return d
        if named == os.environ.get(VISION_TOWER_ENV):
            raise ForgetlessError(
                f"${VISION_TOWER_ENV} is not a model folder (no config.json)",
                file=Path(named),
                remedy="point it at a local CLIP folder (e.g. clip-vit-large-patch14-336)",
            )
    return None


def _vision_from_folder(folder: Path):
    from transformers import CLIPVisionConfig

    cfg = _config(folder / "config.json")
    return CLIPVisionConfig(**cfg.get("vision_config", cfg))


def _vision_from_shapes(reader: CheckpointReader, file: Path):
    """CLIP's vision config from the folder's vision tensors (OpenAI CLIP: 64 values per head, quick-GELU)."""
    from transformers import CLIPVisionConfig

    prefix = "model.vision_tower.vision_tower.vision_model."

    def shape(name: str) -> tuple[int, ...]:
        return reader.info(prefix + name).shape

    names = [n for n in reader.names() if n.startswith(prefix)]
    if not names:
        raise ForgetlessError(
            "the folder holds no vision tower weights and names no local CLIP folder",
            file=file,
            remedy=f"download the CLIP its config names (mm_vision_tower) and set "
            f"{VISION_TOWER_ENV}=that folder",
        )
    hidden, _, patch, _ = shape("embeddings.patch_embedding.weight")
    grid = round((shape("embeddings.position_embedding.weight")[0] - 1) ** 0.5)
    layers = 1 + max(int(m.group(1)) for n in names if (m := re.search(r"encoder\.layers\.(\d+)\.", n)))
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        patch_size=patch,
        image_size=grid * patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


@functools.lru_cache(maxsize=16)
def _tokenizer(model_dir: Path):
    """The folder's tokenizer with ``<image>`` added (where it lacks it)."""
    from transformers import AddedToken, AutoTokenizer

    with loading(
        "the tokenizer", model_dir, "the folder needs the tokenizer files the LLaVA repository saves"
    ):
        # with the config given, transformers does not read (and warn about) the folder's llava_llama config
        tok = AutoTokenizer.from_pretrained(model_dir, config=_text_config(model_dir))
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token  # as the LLaVA-1.5 training code sets it
    return tok


def _text_config(model_dir: Path):
    """The Llama config the original config.json extends."""
    from transformers import LlamaConfig

    cfg = _config(Path(model_dir) / "config.json")
    return LlamaConfig(**{k: v for k, v in cfg.items() if not _LLAMA_ONLY_KEYS.match(k)})


def hf_config(model_dir: Path):
    """transformers' LlavaConfig equivalent to the original folder's config."""
    from transformers import LlavaConfig

    model_dir = Path(model_dir)
    cfg = _config(model_dir / "config.json")
    _refuse_unsupported(cfg, model_dir / "config.json")
    text = _text_config(model_dir)
    clip = vision_folder(model_dir)
    with CheckpointReader(model_dir) as reader:
        vision = _vision_from_folder(clip) if clip is not None else _vision_from_shapes(reader, model_dir)
    strategy = "full" if cfg.get("mm_vision_select_feature") == "cls_patch" else "default"
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        projector_hidden_act="gelu",
        image_token_index=_tokenizer(model_dir).convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _image_ids_past_vocabulary(model: nn.Module) -> None:
    """Read row 0 of the embedding where the image token id lies past it (module docstring)."""
    embed = model.get_input_embeddings()
    if model.config.image_token_id < embed.num_embeddings:
        return
    embed.register_forward_pre_hook(
        lambda m, args: (args[0].masked_fill(args[0] >= m.num_embeddings, 0), *args[1:])
    )


def build_meta(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device (shapes and names, no weights), naming its tensors as the folder does."""
    from transformers import LlavaForConditionalGeneration
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(hf_config(model_dir), dtype=dtype)
    # what from_pretrained keeps after loading the folder, and saving reverts: our renamings, CLIP's "vision_model."
    every = get_model_conversion_mapping(model, KEY_MAPPING)
    model._weight_conversions = every[: len(KEY_MAPPING)] + [c for c in every if isinstance(c, PrefixChange)]
    return model


def _side_tensors(model_dir: Path, missing: set[str]) -> dict[str, torch.Tensor]:
    """In-memory name -> tensor for what the folder's weight files lack: ``mm_projector.bin``, a local CLIP's."""
    found: dict[str, torch.Tensor] = {}
    side = model_dir / PROJECTOR_FILE
    if side.is_file():
        found.update({to_memory(n): t for n, t in load_bin(side).items()})
    clip = vision_folder(model_dir)
    if clip is not None and any(k.startswith("model.vision_tower.") for k in missing):
        with CheckpointReader(clip) as reader:  # only the tensors the model lacks are read
            wanted = {"model.vision_tower." + n.removeprefix("vision_model."): n for n in reader.names()}
            found.update({k: reader.get(n) for k, n in wanted.items() if k in missing})
    return {k: v for k, v in found.items() if k in missing}


def load(model_dir: Path, dtype: torch.dtype, **placement: Any) -> nn.Module:
    """The model with the folder's weights (``from_pretrained`` with :data:`KEY_MAPPING`), in ``dtype``; what the
    weight files lack from ``mm_projector.bin`` or the local CLIP folder; a tensor still missing is an error."""
    from transformers import LlavaForConditionalGeneration

    model_dir = Path(model_dir)
    model, info = LlavaForConditionalGeneration.from_pretrained(
        model_dir,
        config=hf_config(model_dir),
        key_mapping=KEY_MAPPING,
        dtype=dtype,
        output_loading_info=True,
        **placement,
    )
    missing = set(info["missing_keys"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in _side_tensors(model_dir, missing).items():
            params[name].copy_(t)
            missing.discard(name)
    if missing:
        raise ForgetlessError(
            f"the folder lacks {len(missing)} tensors the model needs, e.g. {min(missing)}",
            file=model_dir,
            remedy=f"restore the folder (the projector may sit in "
            f"{PROJECTOR_FILE}, the vision tower in a CLIP folder named by {VISION_TOWER_ENV})",
        )
    _image_ids_past_vocabulary(model)
    return model


def image_processor(model_dir: Path, vision):
    """CLIP preprocessing at the vision tower's size (the local CLIP folder's settings where there is one), padded
    to a square of the mean colour under ``image_aspect_ratio: pad``."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    cfg = _config(model_dir / "config.json")
    clip = vision_folder(model_dir)
    settings: dict[str, Any] = {
        "size": {"shortest_edge": vision.image_size},
        "crop_size": {"height": vision.image_size, "width": vision.image_size},
    }
    if clip is not None and (clip / "preprocessor_config.json").is_file():
        saved = json.loads((clip / "preprocessor_config.json").read_text())
        settings.update({k: saved[k] for k in ("size", "crop_size", "image_mean", "image_std") if k in saved})
    return LlavaImageProcessorPil(do_pad=cfg.get("image_aspect_ratio") == "pad", **settings)


def processor(model_dir: Path):
    """A LlavaProcessor for the folder: its tokenizer with ``<image>``, CLIP preprocessing, the chat template."""
    from transformers import LlavaProcessor

    model_dir = Path(model_dir)
    config = hf_config(model_dir)
    tok = _tokenizer(model_dir)
    return LlavaProcessor(
        image_processor=image_processor(model_dir, config.vision_config),
        tokenizer=tok,
        patch_size=config.vision_config.patch_size,
        num_additional_image_tokens=1,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE,
    )
