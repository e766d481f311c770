"""Where the parts of a model live, per family — as data.

A :class:`Layout` maps each part name ("vision", "projector", "language.embed", "language.layers", "language.norm",
"lm_head") to a regular expression anchored at the start of a tensor name. The decoder-layer pattern captures the
layer index in a group named ``layer``. Families and their tensor names:

=================  =====================================================================================
llava              transformers ≥ 4.52 in memory: ``model.language_model.layers.N``, ``model.vision_tower``,
                   ``model.multi_modal_projector``, ``lm_head``
llava_hf           published llava-hf folders (and what transformers 5 still writes):
                   ``language_model.model.layers.N``, ``language_model.lm_head``, ``vision_tower``,
                   ``multi_modal_projector``
llava_original     original LLaVA repository folders (``LlavaLlamaForCausalLM``): ``model.layers.N``,
                   ``model.mm_projector``, ``model.vision_tower``, ``lm_head``
qwen2_vl           Qwen2-VL / Qwen2.5-VL in memory: ``model.visual`` (projector ``model.visual.merger``),
                   ``model.language_model.layers.N``, ``lm_head``
qwen2_vl_hf        published Qwen2(.5)-VL folders: ``visual`` (``visual.merger``), ``model.layers.N``, ``lm_head``
causal_lm          plain decoders (Llama, Qwen2, Mistral, SmolLM, …): ``model.layers.N``, ``model.embed_tokens``,
                   ``model.norm``, ``lm_head``
=================  =====================================================================================

The renames between the in-memory (``llava``, ``qwen2_vl``) and the saved names (``*_hf``) are the ones transformers applies when it loads a checkpoint
(``transformers/conversion_mapping.py``, entries "llava"/"LlavaModel" and "Qwen2VLForConditionalGeneration").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ForgetlessError

PART_NAMES = ("vision", "projector", "language.embed", "language.layers", "language.norm", "lm_head")
OTHER = "other"
LANGUAGE = "language"


@dataclass(frozen=True)
class Layout:
    family: str
    parts: dict[str, str]  # part name -> regex anchored at the start of the tensor name
    num_layers: int


# ---------------------------------------------------------------------------------------------------- the data
_LAYER = r"(?P<layer>\d+)\."

LAYOUTS: dict[str, dict[str, str]] = {
    "llava": {
        "vision": r"^model\.vision_tower\.",
        "projector": r"^model\.(?:multi_modal_projector\.|image_newline$)",
        "language.embed": r"^model\.language_model\.embed_tokens\.",
        "language.layers": r"^model\.language_model\.layers\." + _LAYER,
        "language.norm": r"^model\.language_model\.norm\.",
        "lm_head": r"^lm_head\.",
    },
    "llava_hf": {
        "vision": r"^vision_tower\.",
        "projector": r"^(?:multi_modal_projector\.|image_newline$)",
        "language.embed": r"^language_model\.model\.embed_tokens\.",
        "language.layers": r"^language_model\.model\.layers\." + _LAYER,
        "language.norm": r"^language_model\.model\.norm\.",
        "lm_head": r"^language_model\.lm_head\.",
    },
    "llava_original": {
        "vision": r"^model\.vision_tower\.",
        "projector": r"^model\.(?:mm_projector\.|image_newline$)",
        "language.embed": r"^model\.embed_tokens\.",
        "language.layers": r"^model\.layers\." + _LAYER,
        "language.norm": r"^model\.norm\.",
        "lm_head": r"^lm_head\.",
    },
    "qwen2_vl": {
        "vision": r"^model\.visual\.(?!merger\.)",
        "projector": r"^model\.visual\.merger\.",
        "language.embed": r"^model\.language_model\.embed_tokens\.",
        "language.layers": r"^model\.language_model\.layers\." + _LAYER,
        "language.norm": r"^model\.language_model\.norm\.",
        "lm_head": r"^lm_head\.",
    },
    "qwen2_vl_hf": {
        "vision": r"^visual\.(?!merger\.)",
        "projector": r"^visual\.merger\.",
        "language.embed": r"^model\.embed_tokens\.",
        "language.layers": r"^model\.layers\." + _LAYER,
        "language.norm": r"^model\.norm\.",
        "lm_head": r"^lm_head\.",
    },
    "causal_lm": {
        "language.embed": r"^model\.embed_tokens\.",
        "language.layers": r"^model\.layers\." + _LAYER,
        "language.norm": r"^model\.norm\.",
        "lm_head": r"^lm_head\.",
    },
}

RENAMED = {
    "llava_legacy": "llava_hf",
    "qwen2_vl_legacy": "qwen2_vl_hf",
}  # earlier names, still read as overrides

# config.json -> candidate families (the tensor names then pick between current and legacy naming)
_LLAVA_TYPES = {"llava", "llava_next", "llava_onevision"}
_QWEN_VL_TYPES = {"qwen2_vl", "qwen2_5_vl"}
_CANDIDATES = {
    "llava": ("llava", "llava_hf"),
    "llava_original": ("llava_original",),
    "qwen2_vl": ("qwen2_vl", "qwen2_vl_hf"),
    "causal_lm": ("causal_lm",),
}

# Renames between the two namings of one family (transformers/conversion_mapping.py), both directions.
_ALIAS_RULES: list[tuple[str, str]] = [
    # llava: legacy -> current
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^image_newline$", "model.image_newline"),
    # llava: current -> legacy
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.image_newline$", "image_newline"),
    # qwen2_vl: legacy -> current
    (r"^visual\.", "model.visual."),
    (
        r"^model\.(?!language_model\.|visual\.|vision_tower\.|multi_modal_projector\.|mm_projector\.)",
        "model.language_model.",
    ),
    # qwen2_vl: current -> legacy
    (r"^model\.visual\.", "visual."),
    (r"^model\.language_model\.", "model."),
]


@functools.lru_cache(maxsize=256)
def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


# ---------------------------------------------------------------------------------------------------- detection
def _config_num_layers(config: Mapping[str, Any]) -> int | None:
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("num_hidden_layers"), int):
        return text["num_hidden_layers"]
    n = config.get("num_hidden_layers")
    return n if isinstance(n, int) else None


def _make(family: str, config: Mapping[str, Any], names: list[str]) -> Layout:
    parts = dict(LAYOUTS[family])
    rx = _rx(parts["language.layers"])
    seen = [int(m.group("layer")) for n in names if (m := rx.match(n))]
    from_config = _config_num_layers(config)
    num_layers = max(from_config or 0, max(seen) + 1 if seen else 0)
    return Layout(family=family, parts=parts, num_layers=num_layers)


def _coverage(family: str, names: list[str]) -> int:
    pats = [_rx(p) for p in LAYOUTS[family].values()]
    return sum(1 for n in names if any(p.match(n) for p in pats))


def _parts_used(family: str, names: list[str]) -> int:
    return sum(1 for p in LAYOUTS[family].values() if any(_rx(p).match(n) for n in names))


def config_family(config: Mapping[str, Any]) -> str | None:
    """The family group config.json names (llava, llava_original, qwen2_vl, causal_lm); None if unrecognised."""
    archs = [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    model_type = str(config.get("model_type") or "")
    if model_type in _QWEN_VL_TYPES or any(a.startswith(("Qwen2VL", "Qwen2_5_VL")) for a in archs):
        return "qwen2_vl"
    if model_type in _LLAVA_TYPES or any(
        a.startswith("Llava") and a.endswith("ForConditionalGeneration") for a in archs
    ):
        return "llava"
    if (
        "mm_vision_tower" in config
        or "mm_projector_type" in config
        or any(a.startswith("Llava") and a.endswith("ForCausalLM") for a in archs)
    ):
        return "llava_original"
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal_lm"
    return None


def detect_layout(config: Mapping[str, Any], names: Iterable[str], override: str | None = None) -> Layout:
    """The layout of a checkpoint, from config.json and its tensor names (which tell current from legacy names).

    ``override`` names a family in :data:`LAYOUTS` and skips detection (for architectures not recognised here).
    """
    names = list(names)
    valid = ", ".join(LAYOUTS)
    if override is not None:
        override = RENAMED.get(override, override)
        if override not in LAYOUTS:
            raise ForgetlessError(f"unknown layout {override!r}", remedy=f"use one of: {valid}")
        return _make(override, config, names)
    group = config_family(config)
    if group is None and not config:
        # no config.json: accept the most specific family that explains every tensor name
        # (the one using the most parts; among equals the one that defines the fewest, so Llama -> causal_lm)
        complete = [f for f in LAYOUTS if names and _coverage(f, names) == len(names)]
        if complete:
            return _make(
                max(complete, key=lambda f: (_parts_used(f, names), -len(LAYOUTS[f]))), config, names
            )
    if group is None:
        arch = ", ".join(config.get("architectures") or []) or config.get("model_type") or "no architecture"
        raise ForgetlessError(
            f"unknown model architecture ({arch})", remedy=f"pass a layout override, one of: {valid}"
        )
    best = max(_CANDIDATES[group], key=lambda f: _coverage(f, names))  # ties keep the current naming
    layout = _make(best, config, names)
    rx = _rx(layout.parts["language.layers"])
    if names and not any(rx.match(n) for n in names):
        raise ForgetlessError(
            f"no decoder-layer tensors match the {best} layout ({layout.parts['language.layers']})",
            remedy=f"check the folder, or pass a layout override, one of: {valid}",
        )
    return layout


# ---------------------------------------------------------------------------------------------------- queries
def part_of(layout: Layout, name: str) -> str:
    """The part a tensor belongs to, or "other"."""
    for part, pattern in layout.parts.items():
        if _rx(pattern).match(name):
            return part
    return OTHER


def layer_of(layout: Layout, name: str) -> int | None:
    pattern = layout.parts.get("language.layers")
    m = _rx(pattern).match(name) if pattern else None
    return int(m.group("layer")) if m else None


_SELECTOR = re.compile(r"^(?P<part>[A-Za-z_.]+)(?:\[(?P<index>[^\]]*)\])?$")


def _layer_indices(index: str, num_layers: int, selector: str, file: object) -> set[int]:
    remedy = "use Python index or slice syntax over the decoder layers, e.g. language.layers[20:32] or [-4:]"
    fields = index.split(":")
    try:
        nums = [int(f) if f.strip() else None for f in fields]
    except ValueError:
        raise ForgetlessError(f"bad layer index in selector {selector!r}", file=file, remedy=remedy) from None
    layers = range(num_layers)
    if len(nums) == 1:
        if nums[0] is None:
            raise ForgetlessError(f"empty layer index in selector {selector!r}", file=file, remedy=remedy)
        try:
            return {layers[nums[0]]}
        except IndexError:
            raise ForgetlessError(
                f"layer {nums[0]} out of range in selector {selector!r} (the model has {num_layers} layers)",
                file=file,
                remedy=remedy,
            ) from None
    if len(nums) > 3:
        raise ForgetlessError(f"bad layer slice in selector {selector!r}", file=file, remedy=remedy)
    if len(nums) == 3 and nums[2] == 0:
        raise ForgetlessError(f"slice step cannot be zero in selector {selector!r}", file=file, remedy=remedy)
    return set(layers[slice(*nums)])


def select(layout: Layout, names: Iterable[str], selectors: list[str], *, file: object = None) -> set[str]:
    """The tensor names chosen by any of ``selectors``.

    A selector is a part name ("projector", "vision", "lm_head", "language.layers", …), "language" (every
    language part), a layer index or slice over ``num_layers`` ("language.layers[20:32]", "language.layers[-12:]",
    "language.layers[5]"), or "re:<regex>" (``re.search`` on the name). A selector that matches nothing is an error.
    """
    names = list(names)
    present = {part_of(layout, n) for n in names}
    valid = ", ".join([LANGUAGE, *(p for p in layout.parts if p in present), "re:<regex>"])
    remedy = f"valid selectors for this checkpoint ({layout.family}): {valid}; layers as language.layers[a:b]"
    chosen: set[str] = set()
    for sel in selectors:
        if sel.startswith("re:"):
            try:
                rx = re.compile(sel[3:])
            except re.error as e:
                raise ForgetlessError(
                    f"invalid regex in selector {sel!r} ({e})", file=file, remedy="fix the regular expression"
                ) from None
            found = {n for n in names if rx.search(n)}
        else:
            m = _SELECTOR.match(sel.strip())
            part = m.group("part") if m else None
            if part is None or (part != LANGUAGE and part not in layout.parts):
                raise ForgetlessError(f"unknown selector {sel!r}", file=file, remedy=remedy)
            index = m.group("index") if m else None
            if index is not None and part != "language.layers":
                raise ForgetlessError(
                    f"selector {sel!r}: only language.layers takes a layer index", file=file, remedy=remedy
                )
            parts = [p for p in layout.parts if p.startswith(LANGUAGE + ".")] if part == LANGUAGE else [part]
            layers = None if index is None else _layer_indices(index, layout.num_layers, sel, file)
            found = set()
            for n in names:
                if part_of(layout, n) not in parts:
                    continue
                if layers is not None and layer_of(layout, n) not in layers:
                    continue
                found.add(n)
        if not found:
            raise _matches_nothing(sel, layout, present, file, remedy)
        chosen |= found
    return chosen


def _matches_nothing(
    sel: str, layout: Layout, present: set[str | None], file: object, remedy: str
) -> ForgetlessError:
    """The error for a selector that picks no tensor; a tied lm_head (stored once, as the input embedding) is named."""
    if sel.strip() == "lm_head" and "lm_head" in layout.parts and "language.embed" in present:
        return ForgetlessError(
            "selector 'lm_head' matches no tensor: this model's lm_head is tied to its input "
            "embeddings, stored once as language.embed",
            file=file,
            remedy="select language.embed to train or merge the tied head, or drop lm_head",
        )
    return ForgetlessError(f"selector {sel!r} matches no tensor", file=file, remedy=remedy)


def describe(layout: Layout, reader_or_infos: Any) -> list[dict[str, Any]]:
    """Per-part tensor count, parameter count and dtypes, in layout order ("other" last, if any).

    Accepts a reader (anything with ``names()`` and ``info(name)``), a ``{name: TensorInfo}`` mapping or an
    iterable of TensorInfo.
    """
    src = reader_or_infos
    if hasattr(src, "names") and hasattr(src, "info"):
        infos = [src.info(n) for n in src.names()]
    elif isinstance(src, Mapping):
        infos = list(src.values())
    else:
        infos = list(src)
    rows: dict[str, dict[str, Any]] = {
        p: {"part": p, "tensors": 0, "params": 0, "dtypes": set()} for p in [*layout.parts, OTHER]
    }
    for info in infos:
        row = rows[part_of(layout, info.name)]
        row["tensors"] += 1
        row["params"] += info.numel
        row["dtypes"].add(str(info.dtype).removeprefix("torch."))
    out = []
    for row in rows.values():
        if row["tensors"] or row["part"] != OTHER:
            out.append({**row, "dtypes": sorted(row["dtypes"])})
    return out


def name_aliases(name: str) -> list[str]:
    """Names the same tensor has under the other naming of its family (llava and qwen2_vl current <-> legacy).

    Without the family the rules may offer a candidate from each family; callers keep the one that exists.
    """
    out: list[str] = []
    for pattern, repl in _ALIAS_RULES:
        alias, n = _rx(pattern).subn(repl, name, count=1)
        if n and alias != name and alias not in out:
            out.append(alias)
    return out
