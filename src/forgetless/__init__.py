"""forgetless: adapt multimodal LLMs to a specialized task without losing what they knew.

The Python API is what the CLI wraps:

    import forgetless
    report = forgetless.merge("examples/ties.yaml", out="merged")   # or a dict recipe
    print(report.summary())
    model = forgetless.load_model("merged")                          # any model folder, CPM routing included

The names below are imported on first use (``import forgetless`` itself imports nothing heavy), so that a command
loads only what it needs: ``forgetless merge`` torch, safetensors' file format and the recipe's pydantic models,
never transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_WHERE = {
    "METHODS": "methods",
    "ForgetlessError": "errors",
    "MergeReport": "engine",
    "Recipe": "recipe",
    "build_plan": "engine",
    "inspect_model": "inspect",
    "load_model": "cpm",
    "load_recipe": "recipe",
    "merge": "engine",
    "merge_method": "methods",
}

__all__ = [
    "METHODS",
    "ForgetlessError",
    "MergeReport",
    "Recipe",
    "__version__",
    "build_plan",
    "inspect_model",
    "load_model",
    "load_recipe",
    "merge",
    "merge_method",
]

if TYPE_CHECKING:
    from .cpm import load_model
    from .engine import MergeReport, build_plan, merge
    from .errors import ForgetlessError
    from .inspect import inspect_model
    from .methods import METHODS, merge_method
    from .recipe import Recipe, load_recipe


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'forgetless' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
