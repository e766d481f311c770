"""The merge recipe: the one place that knows the YAML format.

    method: ties
    base: path/to/base                      # a Hugging Face folder (or DIR+ADAPTER)
    models:                                 # each a folder, DIR+ADAPTER, or a mapping with per-model values
      - model: path/to/finetuned-a
        weight: 1.0
        density: 0.5
      - path/to/finetuned-b
    parameters: {lambda: 1.0}               # the method's knobs (`forgetless methods` lists them); a number
                                            # may be given per part, the first entry that selects a tensor wins:
                                            #   lambda: [{scope: "language.layers[0:10]", value: 0.3},
                                            #            {scope: [projector, vision], value: 0.8}, {value: 0.5}]
    statistics: {fisher_general: g.safetensors}   # shared statistics; per-model ones go under models[i].statistics
    scope:
      include: [language.layers[20:32], lm_head]  # part names, layer slices or re:<regex>; default: everything
      exclude: []
      outside: base                         # tensors outside the scope: base | finetuned
      no_statistics: error                  # in-scope tensors a statistics file lacks: error | base | finetuned
                                            # | method (its own fallback; the default for methods that have one)
    dtype: base                             # output dtype: base | float32 | bfloat16 | float16
    shard_size: 5GB
    memory: auto                            # peak memory the merge may take (e.g. 8GiB; auto: half of what is
                                            # available); larger tensors are merged in blocks of rows
    seed: 0                                 # random methods (DARE) are seeded per tensor name from this
    device: cpu                             # where RegMean's solves and the adapter SVDs run: cpu | cuda
                                            # | cuda:N | auto (CUDA when present); other methods: the CPU
    layout: auto                            # or a family name: `forgetless inspect` shows the detected one
    out: path/to/merged

Adapter-space methods (``copa``, ``lora_ties``, …; `forgetless methods` marks them) take PEFT LoRA adapter folders
as ``models`` and write a PEFT adapter folder, or, with ``fold: true``, the full model with the merged update
folded into ``base``. The adapters' full tensors (LLaVA's ``non_lora_trainables.bin``, PEFT ``modules_to_save``)
are averaged (``non_lora: average``) or taken from one adapter (``non_lora: 2``, an index into ``models``).

Validation errors name the key (``models[1].model``) and the file. The file is read by :mod:`.safeload`: a key
given twice in one mapping, aliases that expand past its node limit, nesting past its depth limit and bytes that
are not text are refused before anything is built.

A mergekit config (``merge_method:``, ``base_model:``, ``models[].parameters``, …) is read as it is: the dialect is
told by its keys and :mod:`.recipe_mergekit` maps it onto this format, or refuses what forgetless does not have.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ForgetlessError
from .recipe_mergekit import is_mergekit, translate
from .safeload import read_yaml

EXAMPLES_HINT = "see the recipes in examples/ and `forgetless methods`"
RECIPE_BYTES = 16 << 20  # a recipe is a few lines; anything this large is not one


class ModelEntry(BaseModel):
    """One input model. Keys other than `model` and `statistics` are this model's values of per-model parameters."""

    model_config = ConfigDict(extra="allow")
    model: str
    statistics: dict[str, str | list[str]] = Field(
        default_factory=dict
    )  # a list: files that complete each other

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Scope(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    outside: Literal["base", "finetuned"] | None = None
    # None: "method" when the method handles missing statistics itself (without_statistics="call"), else "error"
    no_statistics: Literal["error", "base", "finetuned", "method"] | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    base: str
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    statistics: dict[str, str | list[str]] = Field(
        default_factory=dict
    )  # a list: files that complete each other
    scope: Scope = Field(default_factory=Scope)
    dtype: Literal["base", "float32", "bfloat16", "float16"] = "base"
    shard_size: str | int = "5GB"
    memory: str | int = "auto"
    seed: int = Field(default=0, ge=0)
    device: str = "cpu"  # the linear algebra of the methods that use a device (MethodSpec.uses_device)
    layout: str = "auto"
    fold: bool = False
    # statistics taken at weights that are neither the base's nor a model's; adapters folded (fold, MODEL+ADAPTER)
    # into another model than their base_model_name_or_path
    allow_other_model: bool = False
    non_lora: Literal["average"] | int = "average"
    out: str | None = None
    source: str | None = Field(default=None, exclude=True)  # the file it came from, for error messages
    mapped_from: str | None = Field(default=None, exclude=True)  # "mergekit": translated from that dialect

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, v):
        if isinstance(v, list):
            return [{"model": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        from .methods.linalg import device_problem

        bad = device_problem(v)
        if bad is not None:
            raise ValueError(bad)
        return v

    @field_validator("shard_size", "memory")
    @classmethod
    def _size(cls, v, info):
        if info.field_name == "memory" and v == "auto":
            return v
        check_size(v, "a shard size" if info.field_name == "shard_size" else "a memory budget")
        return v

    def to_yaml(self, defaults: bool = True) -> str:
        """The recipe as YAML; ``defaults=False``: only the keys whose values are not the defaults."""
        return yaml.safe_dump(
            self.model_dump(exclude_none=True, exclude_defaults=not defaults, exclude={"source"}),
            sort_keys=False,
        )


def check_size(v: Any, what: str) -> int:
    """`v` in bytes ('5GB', '500MiB', 2e9, an int); ValueError naming `what` when it is not a positive size."""
    from .checkpoint.writer import parse_size

    try:
        n = parse_size(v)
    except (ValueError, OverflowError, TypeError):
        raise ValueError(f"{v!r} is not a size (e.g. 5GB, 500MiB, 2e9)") from None
    if n <= 0:
        raise ValueError(f"{v!r}: {what} must be positive")
    return n


def part_entries(v: list, key: str) -> list[tuple[tuple[str, ...] | None, Any]]:
    """A number given per part, ``[{scope: SELECTORS, value: V}, …, {value: DEFAULT}]``, as (selectors, value)
    pairs, the default's selectors None; ValueError naming the key of the first malformed entry (``key[1].scope``).
    A scope is one selector or a list of them, the selectors of ``scope.include``."""
    example = "e.g. [{scope: 'language.layers[0:10]', value: 0.3}, {value: 0.5}]"
    if not v:
        raise ValueError(
            f"{key}: an empty list; give entries {{scope, value}} and a default last ({example})"
        )
    out = []
    for i, e in enumerate(v):
        keys = set(e) if isinstance(e, dict) else None
        if keys is None:
            raise ValueError(f"{key}[{i}]: each entry is a mapping {{scope, value}} ({example})")
        extra = sorted(keys - {"scope", "value"}, key=str)
        if extra:
            raise ValueError(f"{key}[{i}].{extra[0]}: unknown key (an entry has scope and value)")
        if "value" not in e:
            raise ValueError(f"{key}[{i}].value: required key is missing")
        out.append((_selectors(e.get("scope"), f"{key}[{i}].scope"), e["value"]))
    defaults = [i for i, (scope, _) in enumerate(out) if scope is None]
    if not defaults:
        raise ValueError(f"{key}: no default; end the list with {{value: …}} (no scope), the value elsewhere")
    if defaults[0] != len(out) - 1:
        raise ValueError(f"{key}[{defaults[0]}]: the default (an entry without scope) must be the last entry")
    return out


def _selectors(scope: Any, key: str) -> tuple[str, ...] | None:
    """An entry's scope as a tuple of selectors (None: the default, which has none)."""
    if scope is None:
        return None
    selectors = [scope] if isinstance(scope, str) else scope
    if (
        not isinstance(selectors, list)
        or not selectors
        or not all(isinstance(s, str) and s for s in selectors)
    ):
        raise ValueError(f"{key}: give one selector or a list of them (part names, layer slices, re:<regex>)")
    return tuple(selectors)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("ModelEntry", "str", "function-before[_shorthand(), list[ModelEntry]]"):
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def parse_recipe(data: Any, source: str | os.PathLike | None = None) -> Recipe:
    where = str(source) if source else "recipe"
    if not isinstance(data, dict):
        raise ForgetlessError(
            "a recipe must be a mapping (method, base, models, …)", file=where, remedy=EXAMPLES_HINT
        )
    dialect = None
    if is_mergekit(data):  # mergekit's YAML as it is: mapped onto this format first (recipe_mergekit.py)
        data, dialect = translate(data, where), "mergekit"
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = _loc(first["loc"])
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        elif first["type"] == "missing":
            msg = "required key is missing"
        elif first["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise ForgetlessError(f"{key}: {msg}{more}", file=where, remedy=EXAMPLES_HINT) from None
    recipe.source = str(source) if source else None
    recipe.mapped_from = dialect
    return recipe


def load_recipe(recipe: Recipe | dict | str | os.PathLike) -> Recipe:
    """A Recipe from a Recipe, a dict, or a YAML (or JSON) file path, read by :func:`.safeload.read_yaml`."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    path = Path(recipe)
    if not path.is_file():
        raise ForgetlessError("recipe file not found", file=path, remedy="check the path")
    return parse_recipe(read_yaml(path, remedy="fix the syntax", limit=RECIPE_BYTES), path)
