"""CPM — MAny's Cross-modal Projection Merging (inferred from the paper's abstract; no public code).

Every task t keeps its own projector Pₜ (the LLaVA ``multi_modal_projector`` its fine-tune produced) and a visual
prototype pₜ. At inference each image x is routed:

    wₜ(x) = softmax_t( cos(pool(f(x)), pₜ) / τ )        (τ = 0.1; ``hard``: wₜ = 1 for the argmax, 0 elsewhere)
    projected(x) = Σₜ wₜ(x) · Pₜ(f(x))

Choices (inferred)
------------------
* f(x) is what the projector takes: the vision tower's hidden states at the model's ``vision_feature_layer`` with
  its ``vision_feature_select_strategy`` (LLaVA-1.5: layer −2, CLS dropped), [patches, d]. pool = the mean over
  patches. So routing needs no second pass through the vision tower: :class:`RoutedProjector` replaces the
  projector module and routes on its own input.
* pₜ = the mean of pool(f(x)) over the images of task t's data (every sample with an image, or a seeded subset
  ``n``), computed at the base model. This is only valid while the vision tower stays the base's: the continual
  state refuses CPM when the adapters adapt vision-tower layers.
* Pₜ = the projector tensors the task's adapter carries (PEFT ``modules_to_save`` or LLaVA's
  ``non_lora_trainables.bin``); a task whose adapter has none keeps the base projector (its routing weight then
  selects the base projector for images like its own).
* Soft routing computes every projector on every image (T times the projector's cost, small next to the language
  model); hard routing computes only the chosen one per image.

A routed model is a model folder (the LPM-merged weights) plus ``cpm_projectors.safetensors`` (``<t>/<tensor>``
for every task's projector, ``prototypes`` [T, d]) and ``cpm_routing.json`` (format, τ, hard, the task names).
:func:`load_model` loads any model folder, and installs the routing when the folder has it. The folder also
carries its own routing code (``modeling_forgetless_cpm.py``, ``cpm_router.py``: :mod:`forgetless.remote`,
where :class:`RoutedProjector` lives) and names it in config.json's ``auto_map``, so transformers' auto
classes with ``trust_remote_code=True`` load it routed without forgetless; without it (or through the concrete
``LlavaForConditionalGeneration``) transformers loads the plain merged model (the base projector).

LLaVA-family models: llava-hf's ``multi_modal_projector`` and the original ``mm_projector`` (loaded as llava-hf's);
Qwen2.5-VL's merger is refused with a clear error.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import ForgetlessError, naming
from .remote import REMOTE_DIR
from .remote.cpm_router import (
    AUTO_CLASSES,
    DEFAULT_TAU,
    FORMAT,
    MODELING_FILE,
    PROJECTORS_FILE,
    ROUTED_CLASSES,
    ROUTING_FILE,
    VERSION,
    RoutedProjector,
    format_problem,
    routed_copy,
    unpack,
)
from .safeload import read_json

ROUTER_FILE = "cpm_router.py"

_PROJ = re.compile(
    r"^(?:model\.)?(?:multi_modal_projector\.(?P<hf>.+)|mm_projector\.(?P<layer>[02])\.(?P<rest>.+))$"
)
_ORIGINAL_LAYERS = {"0": "linear_1", "2": "linear_2"}  # the original nn.Sequential's Linear layers


def projector_key(name: str) -> str | None:
    """The projector-relative name (``linear_1.weight``) of a checkpoint tensor, or None when it is not one
    (llava-hf's ``multi_modal_projector.linear_1.weight``, the original ``model.mm_projector.0.weight``)."""
    m = _PROJ.match(name)
    if m is None:
        return None
    return m["hf"] or f"{_ORIGINAL_LAYERS[m['layer']]}.{m['rest']}"


def base_projector(names: Sequence[str], where: Any) -> list[str]:
    """The checkpoint names of a model's projector tensors; refuses a model without a llava-hf projector."""
    found = [n for n in names if projector_key(n) is not None]
    if not found:
        raise ForgetlessError(
            "no LLaVA multi_modal_projector in this model",
            file=where,
            remedy="CPM routes LLaVA projectors; drop the CPM options",
        )
    return found


# ---------------------------------------------------------------------------------------------- routing
def _projector_module(model: nn.Module) -> tuple[nn.Module, str]:
    holder = getattr(model, "model", model)
    if not hasattr(holder, "multi_modal_projector"):
        raise ForgetlessError(
            f"{type(model).__name__} has no multi_modal_projector", remedy="CPM routes LLaVA models"
        )
    return holder, "multi_modal_projector"


def install_routing(
    model: nn.Module,
    projectors: Sequence[Mapping[str, Tensor]],
    prototypes: Tensor,
    *,
    tau: float = DEFAULT_TAU,
    hard: bool = False,
) -> RoutedProjector:
    """Replace the model's projector by a :class:`RoutedProjector` over ``projectors`` (state dicts of the
    projector module: ``linear_1.weight``, …)."""
    holder, attr = _projector_module(model)
    routed = routed_copy(getattr(holder, attr), projectors, prototypes, tau=tau, hard=hard)
    setattr(holder, attr, routed)
    return routed


# ---------------------------------------------------------------------------------------------- prototypes
def visual_features(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """pool(f(x)) per image [images, d]: the patch-mean of what the projector takes, in float64."""
    holder, attr = _projector_module(model)
    seen: list[Tensor] = []

    def hook(_module, args):
        seen.append(args[0].detach())

    h = getattr(holder, attr).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            holder.get_image_features(pixel_values=pixel_values.to(next(model.parameters()).dtype))
    finally:
        h.remove()
    f = seen[0].double()
    return f.mean(dim=-2).reshape(-1, f.shape[-1])


def compute_prototype(
    model: nn.Module,
    model_dir: str | Path,
    data: str | Path,
    *,
    images: str | Path | None = None,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> tuple[Tensor, str, int]:
    """pₜ: the mean of :func:`visual_features` over the images of the task's data. Returns (prototype, the data's
    fingerprint, images used)."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from .stats.data import data_fingerprint, load_samples

    samples = load_samples(data, image_folder=images, n=n, seed=seed)
    with_image = [s for s in samples if s.image is not None]
    if not with_image:
        raise ForgetlessError(
            "no sample has an image: a visual prototype needs the task's images",
            file=data,
            remedy="give the task's data with its images (--cpm-images for their folder)",
        )
    try:
        processor = AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ForgetlessError(
            f"no image processor ({str(e).splitlines()[0]})",
            file=model_dir,
            remedy="give the base model folder with its preprocessor_config.json",
        ) from None
    total, count = None, 0
    for i in range(0, len(with_image), batch_size):
        batch = []
        for s in with_image[i : i + batch_size]:
            if not s.image.is_file():
                raise ForgetlessError("image not found", file=s.image, remedy="check --cpm-images")
            with Image.open(s.image) as im:
                batch.append(im.convert("RGB"))
        pv = processor(images=batch, return_tensors="pt")["pixel_values"]
        feats = visual_features(model, pv)
        total = feats.sum(dim=0) if total is None else total + feats.sum(dim=0)
        count += feats.shape[0]
    return (total / count).float(), data_fingerprint(data, samples), count


# ---------------------------------------------------------------------------------------------- folders
def write_routing(
    folder: str | Path,
    names: Sequence[str],
    projectors: Sequence[Mapping[str, Tensor]],
    prototypes: Tensor,
    *,
    tau: float = DEFAULT_TAU,
    hard: bool = False,
) -> None:
    """Write the CPM files into a model folder (before it is renamed into place): the routing, and the code
    that routes it under ``trust_remote_code`` (:func:`remote_code_config` names it in config.json)."""
    folder = Path(folder)
    for name in (MODELING_FILE, ROUTER_FILE):
        with naming(folder / name):
            shutil.copyfile(REMOTE_DIR / name, folder / name)
    tensors = {f"{t}/{k}": v.contiguous() for t, sd in enumerate(projectors) for k, v in sd.items()}
    tensors["prototypes"] = prototypes.float().contiguous()
    with naming(folder / PROJECTORS_FILE):
        save_file(tensors, str(folder / PROJECTORS_FILE), metadata={"format": "pt"})
    with naming(folder / ROUTING_FILE):
        (folder / ROUTING_FILE).write_text(
            json.dumps(
                {"format": FORMAT, "version": VERSION, "tau": tau, "hard": hard, "tasks": list(names)},
                indent=1,
            )
            + "\n"
        )


def read_routing(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Tensor]], Tensor] | None:
    """(routing config, projector state dicts, prototypes) of a routed folder; None for a plain model folder."""
    folder = Path(folder)
    f = folder / ROUTING_FILE
    if not f.is_file():
        return None
    cfg = read_json(f, remedy="restore the routed model folder", expect=dict)
    problem = format_problem(cfg)
    if problem is not None:
        raise ForgetlessError(problem, file=f, remedy="use the forgetless version that wrote it")
    if not (folder / PROJECTORS_FILE).is_file():
        raise ForgetlessError(
            f"{PROJECTORS_FILE} is missing", file=folder, remedy="restore the routed model folder"
        )
    try:
        projectors, prototypes = unpack(cfg, load_file(str(folder / PROJECTORS_FILE)))
    except ValueError as e:
        raise ForgetlessError(str(e), file=folder, remedy="restore the routed model folder") from None
    return cfg, projectors, prototypes


def remote_code_config(model_dir: str | Path) -> dict[str, Any]:
    """The config.json entries (``auto_map``) that make transformers load a routed folder made from
    ``model_dir`` routed with ``trust_remote_code=True``; none for an architecture the routed code lacks."""
    cfg = read_json(Path(model_dir) / "config.json", remedy="give a model folder", expect=dict)
    routed = ROUTED_CLASSES.get((cfg.get("architectures") or [None])[0])
    if routed is None:
        return {}
    module = MODELING_FILE.removesuffix(".py")
    return {"auto_map": {auto: f"{module}.{routed}" for auto in AUTO_CLASSES}}


def load_model(path: str | Path, *, dtype: str = "float32", device: str = "cpu") -> nn.Module:
    """Any model folder as transformers loads it (image-text-to-text or causal LM); a routed CPM folder with its
    :class:`RoutedProjector` installed."""
    from .stats.run import load_model as load_plain

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ForgetlessError("not a model folder (no config.json)", file=path, remedy="give a model folder")
    model, _ = load_plain(path, device, dtype)
    routing = read_routing(path)
    if routing is not None:
        cfg, projectors, prototypes = routing
        install_routing(model, projectors, prototypes, tau=float(cfg["tau"]), hard=bool(cfg["hard"]))
    return model


def routing_accuracy(model: nn.Module, images_by_task: Mapping[str, Tensor]) -> dict[str, float]:
    """The fraction of each task's images (pixel values) whose largest routing weight is its own task's (the task
    order is the routed model's)."""
    holder, attr = _projector_module(model)
    routed = getattr(holder, attr)
    if not isinstance(routed, RoutedProjector):
        raise ForgetlessError(
            "the model has no CPM routing", remedy="load a routed folder with cpm.load_model"
        )
    out = {}
    for t, (name, pv) in enumerate(images_by_task.items()):
        w = routed.route(visual_features(model, pv))
        out[name] = float((w.argmax(dim=-1) == t).double().mean())
    return out


__all__ = [
    "DEFAULT_TAU",
    "PROJECTORS_FILE",
    "ROUTING_FILE",
    "RoutedProjector",
    "base_projector",
    "compute_prototype",
    "install_routing",
    "load_model",
    "projector_key",
    "read_routing",
    "remote_code_config",
    "routing_accuracy",
    "visual_features",
    "write_routing",
]
