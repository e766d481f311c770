"""The merge engine: streams every tensor of the base through a method, a few tensors at a time.

    plan = build_plan(recipe)      # opens inputs lazily, checks everything, gives each tensor its route
    report = execute(plan)         # reads ahead, merges in float32 on a few threads, writes each result when done

Rooms, in the order a merge walks them: :mod:`.plan` (the recipe checked — :mod:`.checks` — and one job per
tensor), :mod:`.budget` (memory: which tensors go in blocks of rows), :mod:`.run` (the pipeline and the one
commit-or-abort path; :mod:`.runner` reads and computes one unit), :mod:`.adapter` (the same for adapter-space
methods), :mod:`.card` (the route table, the report and the model card).
"""

from .adapter import AdapterPlan, adapter_problems, open_adapter
from .budget import Cost, num_rows
from .card import Count, MergeReport, model_card
from .checks import resolve_params
from .plan import Job, Plan, Route, Unit, build_plan
from .run import execute, merge, merge_threads
from .runner import Runner, tensor_generators, tensor_seed

__all__ = [
    "AdapterPlan",
    "Cost",
    "Count",
    "Job",
    "MergeReport",
    "Plan",
    "Route",
    "Runner",
    "Unit",
    "adapter_problems",
    "build_plan",
    "execute",
    "merge",
    "merge_threads",
    "model_card",
    "num_rows",
    "open_adapter",
    "resolve_params",
    "tensor_generators",
    "tensor_seed",
]
