"""CPM's routing rule and a routed folder's file format: the one implementation that forgetless
(:mod:`forgetless.cpm`) and the routed folder's own modeling code (``modeling_forgetless_cpm.py``) both use.

This file is copied into every routed model folder, so it imports only torch and the standard library: whoever
loads the folder with transformers' ``trust_remote_code=True`` needs no forgetless.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROUTING_FILE = "cpm_routing.json"
PROJECTORS_FILE = "cpm_projectors.safetensors"
FORMAT = "forgetless-cpm"
VERSION = 1
DEFAULT_TAU = 0.1
MODELING_FILE = "modeling_forgetless_cpm.py"
# the architecture a routed folder's config.json names → the class of MODELING_FILE that routes it
ROUTED_CLASSES = {"LlavaForConditionalGeneration": "RoutedLlavaForConditionalGeneration"}
# the transformers auto classes that, with trust_remote_code=True, load a routed folder as routed
AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText")


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


def routed_copy(
    template: nn.Module,
    projectors: Sequence[Mapping[str, Tensor]],
    prototypes: Tensor,
    *,
    tau: float = DEFAULT_TAU,
    hard: bool = False,
) -> RoutedProjector:
    """A :class:`RoutedProjector` over copies of the model's projector module ``template``, each holding one
    of ``projectors`` (its state dicts: ``linear_1.weight``, …), on the template's device and in its dtype."""
    if isinstance(template, RoutedProjector):
        template = template.projectors[0]
    ref = next(template.parameters())
    mods = []
    for sd in projectors:
        p = copy.deepcopy(template)
        p.load_state_dict({k: v.to(ref.dtype) for k, v in sd.items()}, strict=True)
        mods.append(p)
    return RoutedProjector(mods, prototypes, tau=tau, hard=hard).to(ref.device)


def format_problem(cfg: Any) -> str | None:
    """What makes a parsed routing file unreadable by this code, or None."""
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or cfg.get("version") != VERSION:
        return f"not a {FORMAT} v{VERSION} routing file"
    return None


def unpack(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> tuple[list[dict[str, Tensor]], Tensor]:
    """The per-task projector state dicts and the prototypes [T, d] of a projectors file's tensors
    (``<t>/<tensor>``, ``prototypes``); ValueError when they do not cover the routing file's tasks."""
    count = len(cfg["tasks"])
    projectors: list[dict[str, Tensor]] = [{} for _ in range(count)]
    for key, v in tensors.items():
        t, _, name = key.partition("/")
        if name and t.isdigit() and int(t) < count:
            projectors[int(t)][name] = v
    prototypes = tensors.get("prototypes")
    if prototypes is None or prototypes.shape[0] != count or not all(projectors):
        raise ValueError(f"{PROJECTORS_FILE} does not hold {count} projectors and prototypes")
    return projectors, prototypes
