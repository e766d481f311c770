"""forgetless: adapt multimodal LLMs to a specialized task without losing what they knew.

The Python API is what the CLI wraps:

    import forgetless
    report = forgetless.merge("examples/ties.yaml", out="merged")   # or a dict recipe
    print(report.summary())
"""

__version__ = "0.1.0"

from .engine import MergeReport, build_plan, merge  # noqa: E402
from .errors import ForgetlessError  # noqa: E402
from .inspect import inspect_model  # noqa: E402
from .methods import METHODS, merge_method  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["METHODS", "ForgetlessError", "MergeReport", "Recipe", "build_plan", "inspect_model", "load_recipe",
           "merge", "merge_method", "__version__"]
