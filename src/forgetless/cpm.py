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
:func:`load_model` loads any model folder, and installs the routing when the folder has it; transformers alone
loads the same folder as the plain merged model (the base projector).

LLaVA-family models: llava-hf's ``multi_modal_projector`` and the original ``mm_projector`` (loaded as llava-hf's);
Qwen2.5-VL's merger is refused with a clear error.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import ForgetlessError, naming
from .safeload import read_json

ROUTING_FILE = "cpm_routing.json"
PROJECTORS_FILE = "cpm_projectors.safetensors"
FORMAT = "forgetless-cpm"
VERSION = 1
DEFAULT_TAU = 0.1
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
class RoutedProjector(nn.Module):
    """Σₜ wₜ(x)·Pₜ(f(x)) with wₜ from the cosine of the patch-mean of f(x) to each task's prototype."""

    def __init__(
        self,
        projectors: Sequence[nn.Module],
        prototypes: Tensor,
        *,
        tau: float = DEFAULT_TAU,
        hard: bool = False,
    ):
        super().__init__()
        if len(projectors) != prototypes.shape[0] or not projectors:
            raise ValueError(f"{len(projectors)} projectors for {prototypes.shape[0]} prototypes")
        if not tau > 0:
            raise ValueError(f"routing temperature must be > 0, got {tau}")
        self.projectors = nn.ModuleList(projectors)
        self.register_buffer("prototypes", prototypes.float().clone())
        self.tau, self.hard = float(tau), bool(hard)

    def route(self, features: Tensor) -> Tensor:
        """Routing weights [images, T] for projector input [images, patches, d]."""
        pooled = (
            features.float().mean(dim=-2)
            if features.dim() >= 3
            else features.float().mean(dim=0, keepdim=True)
        )
        pooled = pooled.reshape(-1, pooled.shape[-1])
        cos = F.normalize(pooled, dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T
        if self.hard:
            return F.one_hot(cos.argmax(dim=-1), cos.shape[-1]).float()
        return torch.softmax(cos / self.tau, dim=-1)

    def forward(self, features: Tensor) -> Tensor:
        w = self.route(features)
        lead = features.shape[:-2] if features.dim() >= 3 else (1,)
        w = w.reshape(*lead, 1, 1, w.shape[-1]) if features.dim() >= 3 else w.reshape(1, 1, -1)
        out = None
        for t, proj in enumerate(self.projectors):
            wt = w[..., t]
            if self.hard and not bool(wt.any()):
                continue
            y = proj(features) * wt.to(features.dtype)
            out = y if out is None else out + y
        return out


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
    template = getattr(holder, attr)
    if isinstance(template, RoutedProjector):
        template = template.projectors[0]
    mods = []
    for sd in projectors:
        p = copy.deepcopy(template)
        ref = next(p.parameters())
        p.load_state_dict({k: v.to(ref.dtype) for k, v in sd.items()}, strict=True)
        mods.append(p)
    routed = RoutedProjector(mods, prototypes, tau=tau, hard=hard).to(next(template.parameters()).device)
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
    """Write the CPM files into a model folder (before it is renamed into place)."""
    folder = Path(folder)
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
    if cfg.get("format") != FORMAT or cfg.get("version") != VERSION:
        raise ForgetlessError(
            f"not a {FORMAT} v{VERSION} routing file",
            file=f,
            remedy="use the forgetless version that wrote it",
        )
    if not (folder / PROJECTORS_FILE).is_file():
        raise ForgetlessError(
            f"{PROJECTORS_FILE} is missing", file=folder, remedy="restore the routed model folder"
        )
    tensors = load_file(str(folder / PROJECTORS_FILE))
    T = len(cfg["tasks"])
    projectors: list[dict[str, Tensor]] = [{} for _ in range(T)]
    for k, v in tensors.items():
        if k != "prototypes":
            t, name = k.split("/", 1)
            projectors[int(t)][name] = v
    prototypes = tensors.get("prototypes")
    if prototypes is None or prototypes.shape[0] != T or any(not p for p in projectors):
        raise ForgetlessError(
            f"{PROJECTORS_FILE} does not hold {T} projectors and prototypes",
            file=folder,
            remedy="restore the routed model folder",
        )
    return cfg, projectors, prototypes


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
    "routing_accuracy",
    "visual_features",
    "write_routing",
]
