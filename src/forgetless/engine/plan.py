"""The merge plan: every check before any output exists, and the one route each tensor of the base takes.

:func:`build_plan` loads the recipe, checks the method and its parameters, the inputs (the base's tensor names
and shapes), the statistics, the scope and the output folder, then makes one :class:`Job` per tensor of the
base: its :class:`Route` and output dtype. No tensor is dropped. :class:`Plan` says how the jobs run (whole, or
as :class:`Unit`s of rows when over the memory budget) and what they cost. Adapter-space methods are planned in
:mod:`.adapter`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import layout as layouts
from ..checkpoint.lora import AdaptedReader, open_model
from ..checkpoint.writer import Entry, human_bytes, parse_size, plan_shards
from ..errors import ForgetlessError
from ..methods import METHODS, MethodSpec
from ..recipe import EXAMPLES_HINT, Recipe, load_recipe
from . import budget
from .budget import Cost, block_rows, num_rows, resolve_memory
from .card import Count, route_table, tally
from .checks import (
    check_part_weights,
    check_paths,
    check_structure,
    open_stat,
    refuse_other_bases,
    resolve_method_device,
    resolve_params,
)
from .parts import bind_params, parts_table

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Route(StrEnum):
    """Where a tensor of the output comes from; the value is how the plan's table and the report name it."""

    METHOD = "method"  # in scope, every input present: the method's result
    NO_STATS = (
        "method (no stats)"  # in scope, no statistics: the method's own fallback (without_statistics="call")
    )
    BASE = "base"  # the base's tensor: out of scope, or (scope.no_statistics) lacking statistics
    FINETUNED = "finetuned"  # the one fine-tuned model's tensor, likewise
    NON_FLOAT = "base (non-float)"  # an integer or boolean buffer: never merged
    NON_LORA = "non_lora"  # a full tensor the adapters carry: their average or one model's (adapter space)

    @property
    def merged(self) -> bool:
        """Whether the method computes the tensor (else it is copied or cast)."""
        return self in (Route.METHOD, Route.NO_STATS)


@dataclass(frozen=True)
class Job:
    """One tensor of the output: its route, its part of the model, its shape and its dtypes in and out."""

    name: str
    route: Route
    part: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype

    @property
    def out_bytes(self) -> int:
        return Entry(self.name, self.shape, self.out_dtype).nbytes


@dataclass(frozen=True)
class Unit:
    """What the engine reads, computes and writes at once: a whole tensor (``rows`` None), or the block of its
    rows ``start:stop`` (dim 0) when the tensor does not fit the memory budget."""

    job: Job
    rows: tuple[int, int] | None = None
    last: bool = True  # the job's last unit

    @property
    def offset(self) -> int:
        """Flat index of the unit's first entry in the whole tensor."""
        return (
            0 if self.rows is None else self.rows[0] * (math.prod(self.job.shape) // num_rows(self.job.shape))
        )


@dataclass
class Plan:
    """A checked merge: the recipe resolved, its inputs open, every tensor's job, and how the jobs are split."""

    recipe: Recipe
    spec: MethodSpec
    params: dict[str, Any]  # python keyword -> value (per-model ones as lists; per part a PartValues)
    base: Any  # CheckpointReader | AdaptedReader
    models: list[Any]
    stats: dict[str, Any]  # need -> reader, or list of readers for per-model needs
    layout: layouts.Layout
    jobs: list[Job]
    out: Path | None
    force: bool = False
    memory: int = 0  # the budget for the peak (0: none)
    memory_source: str = ""  # how the budget was set, for the plan's description
    block_rows: dict[str, int] = field(default_factory=dict)  # tensor -> rows per block, for those split

    def label(self, job: Job) -> str:
        """The job's route as the table and the report name it."""
        return str(job.route)

    def totals(self) -> dict[str, Count]:
        """Route -> tensors and output bytes."""
        return tally(self.jobs, self.label)

    def units(self) -> list[Unit]:
        """Every job as it is executed: whole, or (tensors in ``block_rows``) in blocks of rows, in order."""
        return [u for j in self.jobs for u in self.units_of(j)]

    def units_of(self, job: Job) -> list[Unit]:
        step = self.block_rows.get(job.name)
        if step is None:
            return [Unit(job)]
        n = num_rows(job.shape)
        return [Unit(job, (a, min(a + step, n)), a + step >= n) for a in range(0, n, step)]

    def cost(self, job: Job, rows: int | None = None) -> Cost:
        """What `job` holds computed whole, or `rows` of its rows at once: every input in float32 for the method
        (statistics not shaped like the weight, RegMean's Gram, whole), the stored bytes for a copy;
        the method's ``temporaries`` float32 copies. (A method's pre-pass over a tensor's blocks holds
        two blocks' inputs at most, and runs before any block of that tensor is read ahead.)"""
        frac = 1.0 if rows is None else rows / num_rows(job.shape)
        if not job.route.merged:
            return Cost(
                int(Entry(job.name, job.shape, job.in_dtype).nbytes * frac), 0, int(job.out_bytes * frac)
            )
        f32 = Entry(job.name, job.shape, torch.float32).nbytes
        inputs = (1 + len(self.models)) * f32 * frac
        if job.route == Route.METHOD:
            for need in self.spec.needs:
                count = len(self.models) if need in self.spec.per_model_needs else 1
                whole = Entry(
                    job.name, self.spec.stat_shape(need, job.shape) or job.shape, torch.float32
                ).nbytes
                inputs += count * (whole * frac if self.spec.stat_in_rows(need, job.shape) else whole)
        return Cost(int(inputs), int(self.spec.temporaries * f32 * frac), int(job.out_bytes * frac))

    def unit_cost(self, unit: Unit) -> Cost:
        return self.cost(unit.job, None if unit.rows is None else unit.rows[1] - unit.rows[0])

    def peak_memory_estimate(self) -> int:
        """Runtime + the unit being computed (its inputs, temporaries and result) + what is read ahead."""
        return budget.peak([self.unit_cost(u) for u in self.units()])

    def describe(self) -> str:
        """What ``--dry-run`` prints: the recipe's inputs, the route table and the peak-memory estimate."""
        r = self.recipe
        mapped = (
            [
                f"recipe      mapped from a {r.mapped_from} config ({r.source or 'a mapping'}):",
                *(f"  {line}" for line in r.to_yaml(defaults=False).splitlines()),
                "",
            ]
            if r.mapped_from
            else []
        )
        lines = [
            *mapped,
            f"method      {self.spec.name}  {self._params_text()}",
            f"base        {r.base}",
            *[f"model[{i}]    {m.model}" for i, m in enumerate(r.models)],
            *[f"statistic   {k}: {v}" for k, v in r.statistics.items()],
            *[
                f"statistic   models[{i}].{k}: {v}"
                for i, m in enumerate(r.models)
                for k, v in m.statistics.items()
            ],
            f"layout      {self.layout.family} ({self.layout.num_layers} decoder layers)",
            f"output      {self.out or '(none)'}  dtype={r.dtype}  shards={self.num_shards()}",
            *self._parts_lines(),
            "",
            self.table(),
            "",
            f"peak memory estimate  {human_bytes(self.peak_memory_estimate())}  {self.memory_note()}",
        ]
        return "\n".join(lines)

    def memory_note(self) -> str:
        """The budget, how it was set, and the tensors merged in row blocks."""
        if not self.memory:
            return ""
        split = [
            f"{n} ({math.ceil(num_rows(self.base.info(n).shape) / r)} blocks of {r} row{'s' * (r > 1)})"
            for n, r in self.block_rows.items()
        ]
        listed = ", ".join(split[:3]) + (f" and {len(split) - 3} more" if len(split) > 3 else "")
        return f"(budget {human_bytes(self.memory)}, {self.memory_source}" + (
            f"; in row blocks: {listed})" if split else "; every tensor whole)"
        )

    def merged_names(self) -> list[str]:
        """The tensors the method computes, for the table of values given per part."""
        return [j.name for j in self.jobs if j.route.merged]

    def parts(self) -> str:
        """Per entry of every parameter given per part: its value and the merged tensors that took it."""
        return parts_table(self.params, self.merged_names())

    def _parts_lines(self) -> list[str]:
        table = self.parts()
        return ["", table] if table else []

    def _params_text(self) -> str:
        return " ".join(f"{k.rstrip('_')}={v}" for k, v in self.params.items())

    def num_shards(self) -> int:
        return len(plan_shards(self.entries(), parse_size(self.recipe.shard_size)))

    def entries(self) -> list[Entry]:
        return [Entry(j.name, j.shape, j.out_dtype) for j in self.jobs]

    def table(self) -> str:
        return route_table(self.jobs, self.label)

    def card_note(self) -> str:
        """Extra lines for the model card (what an adapter merge did with the full tensors, …)."""
        return ""


def build_plan(
    recipe: Recipe | dict | str | Path,
    *,
    out: str | Path | None = None,
    force: bool = False,
    memory: str | int | None = None,
) -> Plan:
    """Load and check `recipe`, open its inputs and give every tensor its route, writing nothing. ``out`` and
    ``memory`` (a size, or "auto") override the recipe's ``out:`` and ``memory:``."""
    recipe = load_recipe(recipe)
    where = recipe.source or "recipe"
    spec = _method(recipe, where)
    params = resolve_params(recipe, spec)
    if spec.uses_device:
        params["device"] = resolve_method_device(recipe.device, where)
    out_dir = Path(out if out is not None else recipe.out) if (out or recipe.out) else None
    if spec.space == "adapter":
        from .adapter import adapter_plan  # it builds on this module

        return adapter_plan(recipe, spec, params, out_dir, force)
    _refuse_adapter_options(recipe, where)
    stat_paths = _stat_paths(recipe, spec, where)
    check_paths(recipe, out_dir, force, [Path(p) for v in stat_paths.values() for p in _flat(v)])
    base, models = _open_models(recipe, where)
    stats = _open_stats(recipe, spec, stat_paths, base, models, where)
    names = base.names()
    layout = layouts.detect_layout(base.config, names, None if recipe.layout == "auto" else recipe.layout)
    params = bind_params(params, layout, names, where)
    jobs = _jobs(recipe, spec, base, stats, layout, where)
    check_part_weights(spec, params, [j.name for j in jobs if j.route.merged], where)
    limit, how = resolve_memory(recipe.memory if memory is None else memory, where)
    plan = Plan(recipe, spec, params, base, models, stats, layout, jobs, out_dir, force, limit, how)
    plan.block_rows = block_rows(plan, where)
    return plan


def _method(recipe: Recipe, where: str) -> MethodSpec:
    """The recipe's method, refused when unknown or given a number of models it does not merge."""
    spec = METHODS.get(recipe.method)
    if spec is None:
        raise ForgetlessError(
            f"method: unknown method {recipe.method!r} (known: {', '.join(sorted(METHODS))})",
            file=where,
            remedy=EXAMPLES_HINT,
        )
    if spec.models == "one" and len(recipe.models) != 1:
        raise ForgetlessError(
            f"models: {spec.name!r} merges exactly one fine-tuned model, got {len(recipe.models)}",
            file=where,
            remedy="list one model",
        )
    if len(recipe.models) < spec.min_models:
        raise ForgetlessError(
            f"models: {spec.name!r} merges at least {spec.min_models} fine-tuned models, got {len(recipe.models)}",
            file=where,
            remedy=f"list {spec.min_models} or more models",
        )
    return spec


def adapter_methods() -> list[str]:
    """The adapter-space methods by name, without aliases."""
    return sorted(n for n, s in METHODS.items() if s.space == "adapter" and n == s.name)


def _refuse_adapter_options(recipe: Recipe, where: str) -> None:
    """Refuse the options of adapter-space merges, and ``outside: finetuned`` with several models."""
    if recipe.fold or recipe.non_lora != "average":
        key = "fold" if recipe.fold else "non_lora"
        raise ForgetlessError(
            f"{key}: only for adapter-space methods ({', '.join(adapter_methods())})",
            file=where,
            remedy=f"remove `{key}:` or choose an adapter-space method",
        )
    if recipe.scope.outside == "finetuned" and len(recipe.models) > 1:
        raise ForgetlessError(
            "scope.outside: 'finetuned' is ambiguous with several models",
            file=where,
            remedy="use outside: base",
        )


def _stat_paths(recipe: Recipe, spec: MethodSpec, where: str) -> dict[str, Any]:
    """Need -> the statistics file(s) the recipe names for it (a list with one per model for per-model needs)."""
    paths: dict[str, Any] = {}
    for need in spec.needs:
        if need in spec.per_model_needs:
            paths[need] = []
            for i, m in enumerate(recipe.models):
                p = m.statistics.get(need, recipe.statistics.get(need))
                if p is None:
                    raise ForgetlessError(
                        f"models[{i}].statistics.{need}: required by {spec.name!r}",
                        file=where,
                        remedy="compute it with `forgetless stats` and name the file",
                    )
                paths[need].append(p)
        elif need not in recipe.statistics:
            raise ForgetlessError(
                f"statistics.{need}: required by {spec.name!r}",
                file=where,
                remedy="compute it with `forgetless stats` and name the file",
            )
        else:
            paths[need] = recipe.statistics[need]
    return paths


def _flat(v: str | list) -> list[str]:
    """The files named by a statistics entry: a file, a list of files, or (per model) a list of those."""
    return [p for x in (v if isinstance(v, list) else [v]) for p in (x if isinstance(x, list) else [x])]


def _open_models(recipe: Recipe, where: str) -> tuple[Any, list[Any]]:
    """The base and the fine-tuned models, opened lazily; each of the same structure as the base, and each adapter
    folded into the model it was trained on (unless allow_other_model)."""
    base = open_model(recipe.base)
    models = [open_model(m.model) for m in recipe.models]
    if not recipe.allow_other_model:  # MODEL+ADAPTER: the adapter is folded into MODEL
        readers = {"base": base, **{f"models[{i}]": m for i, m in enumerate(models)}}
        refuse_other_bases(
            [(label, r.adapter, r.base.path) for label, r in readers.items() if isinstance(r, AdaptedReader)],
            where,
        )
    for i, m in enumerate(models):
        check_structure(base, m, f"models[{i}]")
    return base, models


def _open_stats(
    recipe: Recipe, spec: MethodSpec, paths: dict[str, Any], base, models: list[Any], where: str
) -> dict[str, Any]:
    """Need -> its statistics (a list with one per model for per-model needs), each checked against the models."""
    weights = (
        None
        if recipe.allow_other_model or not paths
        else {
            "base": base.weights_fingerprint(),
            **{f"models[{i}]": m.weights_fingerprint() for i, m in enumerate(models)},
        }
    )

    def one(p, key: str, need: str):
        return open_stat(p, base, key, where, spec, need, weights)

    return {
        need: (
            [one(p, f"models[{i}].statistics.{need}", need) for i, p in enumerate(v)]
            if need in spec.per_model_needs
            else one(v, f"statistics.{need}", need)
        )
        for need, v in paths.items()
    }


def _scope(recipe: Recipe, layout: layouts.Layout, names: list[str], where: str) -> set[str]:
    """The tensors the method merges; those left out need ``scope.outside`` to say where they come from."""
    scope = set(names)
    if recipe.scope.include:
        scope = layouts.select(layout, names, recipe.scope.include, file=where)
    if recipe.scope.exclude:
        scope -= layouts.select(layout, names, recipe.scope.exclude, file=where)
    if len(scope) < len(names) and recipe.scope.outside is None:
        raise ForgetlessError(
            f"scope.outside: required, the scope leaves {len(names) - len(scope)} tensors out",
            file=where,
            remedy="say where they come from: outside: base | finetuned",
        )
    return scope


def _no_statistics(recipe: Recipe, spec: MethodSpec, where: str) -> str:
    """What happens to a tensor in scope without statistics: "error", "base", "finetuned" or "method"."""
    choice = recipe.scope.no_statistics or ("method" if spec.without_statistics == "call" else "error")
    if choice == "method" and spec.without_statistics != "call":
        raise ForgetlessError(
            f"scope.no_statistics: {spec.name!r} cannot merge a tensor without its statistics",
            file=where,
            remedy="use no_statistics: error | base | finetuned",
        )
    return choice


def _jobs(
    recipe: Recipe, spec: MethodSpec, base, stats: dict[str, Any], layout: layouts.Layout, where: str
) -> list[Job]:
    """One job per tensor of the base, in its order; an error listing tensors in scope without statistics."""
    names = base.names()
    scope = _scope(recipe, layout, names, where)
    no_statistics = _no_statistics(recipe, spec, where)
    readers = [r for v in stats.values() for r in (v if isinstance(v, list) else [v])]
    jobs, missing = [], []
    for name in names:
        info = base.info(name)
        out_dtype = info.dtype if recipe.dtype == "base" else DTYPES[recipe.dtype]
        if not info.dtype.is_floating_point:
            route, out_dtype = Route.NON_FLOAT, info.dtype
        elif name not in scope:
            route = Route(recipe.scope.outside or "base")
        elif any(name not in r for r in readers):
            if no_statistics == "error":
                missing.append(name)
                continue
            route = Route.NO_STATS if no_statistics == "method" else Route(no_statistics)
        else:
            route = Route.METHOD
        jobs.append(Job(name, route, layouts.part_of(layout, name), info.shape, info.dtype, out_dtype))
    if missing:
        raise ForgetlessError(
            f"{len(missing)} tensors in scope have no statistics, e.g. {', '.join(missing[:3])}",
            file=where,
            remedy="narrow the scope, or set scope.no_statistics: base | finetuned",
        )
    return jobs
