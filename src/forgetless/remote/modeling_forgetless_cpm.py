"""A routed CPM model folder as transformers loads it with ``trust_remote_code=True``.

forgetless copies this file and ``cpm_router.py`` into every routed folder it writes, and names the class of
the folder's architecture in config.json's ``auto_map``; then

    AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)

returns the folder's architecture with its projector replaced by the routed one (``cpm_router``'s
``RoutedProjector``) over the folder's ``cpm_routing.json`` and ``cpm_projectors.safetensors``: the model that
``forgetless.load_model`` returns. It imports torch, safetensors and transformers only, so an evaluation
harness without forgetless loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration
from transformers.utils import cached_file

from .cpm_router import PROJECTORS_FILE, ROUTING_FILE, format_problem, routed_copy, unpack

# what from_pretrained takes to find a file in a local folder or a Hub repository
_HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def install_routing(model, folder, **hub) -> None:
    """Replace the loaded model's projector by the routed one that ``folder`` (a path or a Hub id) holds."""
    routing = Path(cached_file(folder, ROUTING_FILE, **hub))
    cfg = json.loads(routing.read_text())
    problem = format_problem(cfg)
    if problem is not None:
        raise ValueError(f"{routing}: {problem}")
    projectors, prototypes = unpack(cfg, load_file(cached_file(folder, PROJECTORS_FILE, **hub)))
    holder = model.model
    holder.multi_modal_projector = routed_copy(
        holder.multi_modal_projector, projectors, prototypes, tau=float(cfg["tau"]), hard=bool(cfg["hard"])
    )


def share_conversions(cls) -> None:
    """Give ``cls`` its architecture's checkpoint renames (the legacy tensor names a folder may hold): transformers
    5 applies them by model type but not to custom code, unless registered under the custom class's name."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4: the renames are a class attribute, which the subclass inherits
        return
    conversions = get_checkpoint_conversion_mapping(cls.config_class.model_type)
    if conversions is not None:
        register_checkpoint_conversion_mapping(cls.__name__, conversions, overwrite=True)


class RoutedMixin:
    """``from_pretrained`` loads the architecture's weights, then installs the folder's routing."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        share_conversions(cls)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        hub = {k: kwargs[k] for k in _HUB_KEYS if kwargs.get(k) is not None}
        install_routing(model, pretrained_model_name_or_path, **hub)
        return loaded


class RoutedLlavaForConditionalGeneration(RoutedMixin, LlavaForConditionalGeneration):
    """LLaVA (llava-hf) with CPM's routed ``multi_modal_projector``."""
