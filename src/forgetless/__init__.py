"""forgetless: adapt multimodal LLMs to a specialized task without losing what they knew.

The Python API is what the CLI wraps:

    import forgetless
    report = forgetless.merge("examples/ties.yaml", out="merged")   # or a dict recipe
    print(report.summary())
    model = forgetless.load_model("merged")                          # any model folder, CPM routing included
"""

__version__ = "0.1.0"

from .cpm import load_model
from .engine import MergeReport, build_plan, merge
from .errors import ForgetlessError
from .inspect import inspect_model
from .methods import METHODS, merge_method
from .recipe import Recipe, load_recipe

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
