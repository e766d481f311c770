"""The merge engine: streams every tensor name of the base through a method, a few tensors at a time.

    plan = build_plan(recipe)      # opens inputs lazily, checks everything, decides each tensor's route
    report = execute(plan, out)    # reads ahead, merges in fp32 on a few threads, writes each result when done

Every check runs in :func:`build_plan`, before any output exists: the recipe (method, parameters, statistics
given), the inputs (same tensor names and shapes as the base, every mismatch listed), the statistics (computed on
a model of this structure, shapes), the scope and the output folder. Each tensor then takes exactly one route:

- ``method``: in scope, all inputs present → the method's result;
- ``base`` / ``finetuned``: out of scope (``scope.outside``), or lacking statistics (``scope.no_statistics``);
- ``base (non-float)``: integer or boolean buffers are never merged.

No tensor is dropped; the report counts tensors and bytes per route and per part.

Adapter-space methods (``spec.space == "adapter"``: CoPA, the SVD baselines) take the same path with a different
unit: :func:`build_plan` makes an :class:`AdapterPlan` (the adapters checked against each other and the base), and
:func:`execute` streams one adapted module at a time — every adapter's (A, B) of it, read from disk only then —
through the method into the same streaming writer, as a PEFT adapter folder or (``fold``) the full model.

Memory. Peak memory is the runtime plus the units in flight: those being computed (every input in fp32, the
method's temporaries, its result) and the look-ahead window (`PREFETCH` units within `PREFETCH_BYTES`, or one);
the estimate (:meth:`Plan.peak_memory_estimate`) allows the largest unit and the window, and units are read, and
merged side by side (:func:`merge_threads`), only while all in flight fit that allowance. A unit is a whole tensor, or — when a tensor would not fit the budget (``memory:`` / ``--memory``, default half of
the available memory) — a block of its rows (dim 0): read from the files by byte range, merged, and written at its
offset in the output. Methods declare that they run on row blocks (``rows="blocks"``) and give the same result as
on the whole tensor: what depends on the whole tensor (TIES's trim thresholds, CGM†'s tensor budget, Fisher's
means, RegMean's factorisation) is found first by their ``tensor_prepare`` in streamed passes over its blocks.
Adapter-space merges hold one module's factors at a time and do not use the budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import layout as layouts
from .checkpoint.guard import check_output
from .checkpoint.lora import AdaptedReader, open_model, parse_model_ref
from .checkpoint.reader import SAFE_SINGLE, CheckpointReader, row_bytes
from .checkpoint.space import available_memory
from .checkpoint.writer import Entry, StreamingWriter, human_bytes, parse_size, plan_shards
from .errors import ForgetlessError
from .methods import METHODS, MethodSpec
from .methods.registry import REQUIRED, RowBlock, Rows
from .recipe import EXAMPLES_HINT, Recipe, check_size, load_recipe
from .stats.store import Statistics

PREFETCH = 2  # tensors (or row blocks) read ahead of those being computed …
PREFETCH_BYTES = 256 * 2**20  # … while their inputs take at most this much (the next one is always read ahead)
RUNTIME_BYTES = 400 * 2**20  # python + torch + forgetless after import (255 MiB measured) + the threads' malloc arenas
TEMPORARIES = 4  # float32 copies of a tensor a method allocates besides its inputs (TIES: |Δ|, sign, num, den)
AUTO_MEMORY = 0.5  # memory: auto = this fraction of the memory available when the merge is planned
MERGERS = 2  # units merged at once, each on its own thread with few torch threads (see merge_threads)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_LISTED = 12
NO_STATS_ROUTE = "method (no stats)"  # in scope, no statistics, the method's own fallback (without_statistics="call")


@dataclass(frozen=True)
class Job:
    name: str
    route: str  # "method" | "base" | "finetuned" | "base (non-float)"
    part: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype

    @property
    def out_bytes(self) -> int:
        return Entry(self.name, self.shape, self.out_dtype).nbytes


def num_rows(shape: tuple[int, ...]) -> int:
    """Rows along dim 0 (a 1-D tensor's entries); a scalar is one row."""
    return shape[0] if shape else 1


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
        return 0 if self.rows is None else self.rows[0] * (math.prod(self.job.shape) // num_rows(self.job.shape))


@dataclass
class Plan:
    recipe: Recipe
    spec: MethodSpec
    params: dict[str, Any]  # python keyword -> value (per-model ones as lists)
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

    def totals(self) -> dict[str, list[int]]:
        """route -> [tensors, bytes]"""
        return tally(self.jobs, lambda j: j.route)

    def units(self) -> list[Unit]:
        """Every job as it is executed: whole, or (tensors in ``block_rows``) in blocks of rows, in order."""
        return [u for j in self.jobs for u in self.units_of(j)]

    def units_of(self, job: Job) -> list[Unit]:
        step = self.block_rows.get(job.name)
        if step is None:
            return [Unit(job)]
        n = num_rows(job.shape)
        return [Unit(job, (a, min(a + step, n)), a + step >= n) for a in range(0, n, step)]

    def cost(self, job: Job, rows: int | None = None) -> tuple[int, int, int]:
        """(inputs, temporaries, output) bytes of `job` computed whole, or `rows` of its rows at once: every input
        in fp32 for the method (statistics not shaped like the weight, RegMean's Gram, whole), the stored bytes
        for a copy; :data:`TEMPORARIES` fp32 copies for a method. (A method's pre-pass over a tensor's blocks holds
        two blocks' inputs at most, and runs before any block of that tensor is read ahead.)"""
        frac = 1.0 if rows is None else rows / num_rows(job.shape)
        if job.route not in ("method", NO_STATS_ROUTE):
            return int(Entry(job.name, job.shape, job.in_dtype).nbytes * frac), 0, int(job.out_bytes * frac)
        f32 = Entry(job.name, job.shape, torch.float32).nbytes
        inputs = (1 + len(self.models)) * f32 * frac
        if job.route == "method":
            for need in self.spec.needs:
                count = len(self.models) if need in self.spec.per_model_needs else 1
                whole = Entry(job.name, self.spec.stat_shape(need, job.shape) or job.shape, torch.float32).nbytes
                inputs += count * (whole * frac if self.spec.stat_in_rows(need, job.shape) else whole)
        return int(inputs), int(TEMPORARIES * f32 * frac), int(job.out_bytes * frac)

    def unit_cost(self, unit: Unit) -> tuple[int, int, int]:
        return self.cost(unit.job, None if unit.rows is None else unit.rows[1] - unit.rows[0])

    def input_bytes(self, unit: Unit) -> int:
        return self.unit_cost(unit)[0]

    def peak_memory_estimate(self) -> int:
        """Runtime + the unit being computed (its inputs, temporaries and result) + what is read ahead (up to
        PREFETCH_BYTES, or the largest unit's inputs)."""
        costs = [self.unit_cost(u) for u in self.units()] or [(0, 0, 0)]
        return RUNTIME_BYTES + max(map(sum, costs)) + max(PREFETCH_BYTES, max(c[0] for c in costs))

    def describe(self) -> str:
        r = self.recipe
        mapped = ([f"recipe      mapped from a {r.mapped_from} config ({r.source or 'a mapping'}):",
                   *(f"  {line}" for line in r.to_yaml(defaults=False).splitlines()), ""] if r.mapped_from else [])
        lines = [*mapped, f"method      {self.spec.name}  {self._params_text()}",
                 f"base        {r.base}",
                 *[f"model[{i}]    {m.model}" for i, m in enumerate(r.models)],
                 *[f"statistic   {k}: {v}" for k, v in r.statistics.items()],
                 *[f"statistic   models[{i}].{k}: {v}" for i, m in enumerate(r.models) for k, v in m.statistics.items()],
                 f"layout      {self.layout.family} ({self.layout.num_layers} decoder layers)",
                 f"output      {self.out or '(none)'}  dtype={r.dtype}  shards={self.num_shards()}",
                 "", self.table(), "",
                 f"peak memory estimate  {human_bytes(self.peak_memory_estimate())}  {self.memory_note()}"]
        return "\n".join(lines)

    def memory_note(self) -> str:
        if not self.memory:
            return ""
        split = [f"{n} ({math.ceil(num_rows(self.base.info(n).shape) / r)} blocks of {r} row{'s' * (r > 1)})"
                 for n, r in self.block_rows.items()]
        listed = ", ".join(split[:3]) + (f" and {len(split) - 3} more" if len(split) > 3 else "")
        return (f"(budget {human_bytes(self.memory)}, {self.memory_source}" +
                (f"; in row blocks: {listed})" if split else "; every tensor whole)"))

    def _params_text(self) -> str:
        return " ".join(f"{k.rstrip('_')}={v}" for k, v in self.params.items())

    def num_shards(self) -> int:
        return len(plan_shards(self.entries(), parse_size(self.recipe.shard_size)))

    def entries(self) -> list[Entry]:
        return [Entry(j.name, j.shape, j.out_dtype) for j in self.jobs]

    def table(self) -> str:
        return route_table(self.jobs)

    def card_note(self) -> str:
        """Extra lines for the model card (what an adapter merge did with the full tensors, …)."""
        return ""


def tally(jobs: list[Job], key: Callable[[Job], Any]) -> dict[Any, list[int]]:
    """key -> [tensors, output bytes]"""
    rows: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
    for j in jobs:
        rows[key(j)][0] += 1
        rows[key(j)][1] += j.out_bytes
    return dict(rows)


def route_table(jobs: list[Job]) -> str:
    """Tensors and bytes per route, and per part and route."""
    by_route = tally(jobs, lambda j: j.route)
    by_part = tally(jobs, lambda j: (j.part, j.route))
    out = [f"{'route':<18} {'tensors':>8} {'bytes':>12}"]
    out += [f"{r:<18} {c:>8} {human_bytes(b):>12}" for r, (c, b) in sorted(by_route.items())]
    out += [f"{'total':<18} {len(jobs):>8} {human_bytes(sum(j.out_bytes for j in jobs)):>12}", "",
            f"{'part':<18} {'route':<18} {'tensors':>8} {'bytes':>12}"]
    out += [f"{p:<18} {r:<18} {c:>8} {human_bytes(b):>12}" for (p, r), (c, b) in sorted(by_part.items())]
    return "\n".join(out)


@dataclass
class MergeReport:
    out: Path | None
    plan: Plan
    seconds: float = 0.0
    dry_run: bool = False
    counts: dict[str, Counter] = field(default_factory=dict)  # part -> element counts reported by the method

    @property
    def routes(self) -> dict[str, list[int]]:
        """route -> [tensors, bytes]"""
        return self.plan.totals()

    def summary(self) -> str:
        head = "dry run: nothing written" if self.dry_run else f"wrote {self.out} in {self.seconds:.1f} s"
        return "\n".join(filter(None, [head, self.plan.table(), counts_table(self.counts)]))


def counts_table(counts: dict[str, Counter]) -> str:
    """Elements per part and kind (kept / reverted / mixed …), as the method reported them; '' when none."""
    kinds = sorted({k for c in counts.values() for k in c})
    if not kinds:
        return ""
    lines = ["", f"{'part':<18} " + " ".join(f"{k:>21}" for k in kinds)]
    for part, c in sorted(counts.items()):
        total = sum(c.values()) or 1
        lines.append(f"{part:<18} " + " ".join(f"{c[k]:>12,} ({100 * c[k] / total:5.1f}%)" for k in kinds))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ planning
def _resolve_params(recipe: Recipe, spec: MethodSpec) -> dict[str, Any]:
    where = recipe.source or "recipe"
    unknown = sorted(set(recipe.parameters) - set(spec.params))
    if unknown:
        raise ForgetlessError(f"parameters.{unknown[0]}: method {spec.name!r} has no such parameter "
                              f"(it takes: {', '.join(spec.params) or 'none'})", file=where, remedy=EXAMPLES_HINT)
    params: dict[str, Any] = {}
    for p, default in spec.params.items():
        if p in spec.per_model:
            values = []
            for i, m in enumerate(recipe.models):
                v = m.params.get(p, recipe.parameters.get(p, default))
                if v is REQUIRED:
                    raise ForgetlessError(f"models[{i}].{p}: required by {spec.name!r}", file=where,
                                          remedy=f"set parameters.{p} or models[{i}].{p}")
                values.append(v)
            params[spec.arg(p)] = values
        else:
            v = recipe.parameters.get(p, default)
            if v is REQUIRED:
                raise ForgetlessError(f"parameters.{p}: required by {spec.name!r}", file=where, remedy=EXAMPLES_HINT)
            params[spec.arg(p)] = v
    for p in spec.params:
        values = params[spec.arg(p)] if p in spec.per_model else [params[spec.arg(p)]]
        for i, v in enumerate(values):
            problem = spec.problem(p, v)
            if problem is not None:
                key = f"models[{i}].{p}" if p in spec.per_model and p in recipe.models[i].params else f"parameters.{p}"
                raise ForgetlessError(f"{key}: {problem} (method {spec.name!r})", file=where, remedy=EXAMPLES_HINT)
    if spec.divides_by_weights and len(recipe.models) > 1 and sum(params["weight"]) == 0:  # Σ wθ / Σ w
        raise ForgetlessError(f"models[*].weight: the weights {params['weight']} sum to 0, and {spec.name} divides "
                              "by their sum", file=where, remedy="give weights with a non-zero sum")
    for i, m in enumerate(recipe.models):
        extra = sorted(set(m.params) - set(spec.per_model))
        if extra:
            raise ForgetlessError(f"models[{i}].{extra[0]}: not a per-model parameter of {spec.name!r} "
                                  f"(per-model: {', '.join(spec.per_model) or 'none'})", file=where,
                                  remedy=EXAMPLES_HINT)
    return params


def _check_structure(base, model, label: str) -> None:
    b, m = base.infos, model.infos
    problems = [f"{n} missing" for n in b if n not in m]
    problems += [f"{n} not in the base" for n in m if n not in b]
    problems += [f"{n} {list(m[n].shape)} vs base {list(b[n].shape)}" for n in b if n in m and m[n].shape != b[n].shape]
    if problems:
        listed = "; ".join(problems[:MAX_LISTED]) + (f"; and {len(problems) - MAX_LISTED} more"
                                                      if len(problems) > MAX_LISTED else "")
        raise ForgetlessError(f"{len(problems)} tensors differ from the base ({label}): {listed}",
                              file=model.path, remedy="merge checkpoints of one architecture "
                              "(a resized vocabulary must be resized in the base too)")


def _flat(v: str | list) -> list[str]:
    """The files named by a statistics entry: a file, a list of files, or (per model) a list of those."""
    return [p for x in (v if isinstance(v, list) else [v]) for p in (x if isinstance(x, list) else [x])]


def _check_paths(recipe: Recipe, out: Path | None, force: bool, stat_files: list[Path]) -> None:
    if out is None:
        return
    inputs = [p for ref in [recipe.base, *(m.model for m in recipe.models)] for p in parse_model_ref(ref)]
    check_output(out, [*inputs, *stat_files], force=force)


def _open_stat(path: str | list[str], base, key: str, where: str, spec: MethodSpec, need: str,
               weights: dict[str, str] | None = None) -> Statistics:
    """A statistic from one file or several that complete each other, checked against the model before any work:
    structure fingerprint, and (`weights`: the weights fingerprints of the base and of every merged model, by
    label; None skips it) that it was taken at one of those weights when the file records where it was taken."""
    paths = [Path(p) for p in (path if isinstance(path, list) else [path])]
    for p in paths:
        if not p.is_file():
            raise ForgetlessError("statistics file not found", file=p,
                                  remedy=f"compute it with `forgetless stats` or fix {key} in {where}")
    stats = Statistics(paths, strict=False)  # a plain safetensors file of statistics is accepted
    p, meta = paths[0], stats.meta
    fp = meta.get("model_fingerprint")
    if fp is not None and fp != base.fingerprint():
        raise ForgetlessError(f"computed on another model (fingerprint {fp}, this base is {base.fingerprint()})",
                              file=p, remedy="recompute the statistics on this model")
    wfp = meta.get("model_weights_fingerprint")
    if weights is not None and wfp is not None and wfp not in weights.values():
        known = ", ".join(f"{label} {v}" for label, v in weights.items())
        raise ForgetlessError(f"computed at other weights of this architecture (weights fingerprint {wfp}; {known})",
                              file=p, remedy="recompute the statistics at the base or the fine-tuned model, or "
                                             "pass --allow-other-model (recipe: allow_other_model: true)")
    for name, info in stats.infos.items():
        p = stats.file_of(name)
        if name not in base.infos:
            raise ForgetlessError("statistics for a tensor the model does not have", file=p, tensor=name,
                                  remedy="recompute the statistics on this model")
        want = spec.stat_shape(need, tuple(base.infos[name].shape))
        if want is None:
            raise ForgetlessError(f"{need!r} statistics for a tensor of shape {list(base.infos[name].shape)}, "
                                  "which cannot have them", file=p, tensor=name,
                                  remedy="recompute the statistics on this model")
        if tuple(info.shape) != want:
            raise ForgetlessError(f"shape {list(info.shape)} differs from the expected {list(want)} (the model's "
                                  f"tensor is {list(base.infos[name].shape)})",
                                  file=p, tensor=name, remedy="recompute the statistics on this model")
    return stats


def resolve_method_device(value: str, where: str) -> str:
    """The recipe's ``device:`` as the device a method gets (``cpu``, ``cuda:N``), refused before any work
    when it is malformed or this machine lacks it."""
    from .methods.linalg import resolve_device

    try:
        return str(resolve_device(value))
    except ValueError as e:
        raise ForgetlessError(f"device: {e}", file=where,
                              remedy="give device: cpu, cuda, cuda:N or auto (CUDA when present)") from None


def resolve_memory(value: str | int, where: str) -> tuple[int, str]:
    """The memory budget in bytes and how it was set: a size, or ``auto`` (:data:`AUTO_MEMORY` of the available
    memory). A budget the runtime and the read-ahead alone exceed is refused."""
    if value == "auto":
        avail = available_memory()
        n, how = int(avail * AUTO_MEMORY), f"auto: {AUTO_MEMORY:.0%} of the {human_bytes(avail)} available"
    else:
        try:
            n, how = check_size(value, "a memory budget"), "set"
        except ValueError as e:
            raise ForgetlessError(f"memory: {e}", file=where, remedy="give a size such as 8GiB or 500MB, or auto") \
                from None
    floor = RUNTIME_BYTES + PREFETCH_BYTES
    if n <= floor:
        raise ForgetlessError(f"memory: {value} ({human_bytes(n)}) is below what the merge needs before any tensor "
                              f"(runtime and read-ahead, {human_bytes(floor)})", file=where,
                              remedy="give a larger budget (e.g. memory: 2GiB, or --memory 2GiB)")
    return n, how


def unit_cap(memory: int) -> int:
    """The most one unit (inputs + temporaries + result) may take for :meth:`Plan.peak_memory_estimate` to stay
    within `memory`: the read-ahead is PREFETCH_BYTES or, when units are larger, one more unit's inputs."""
    free = memory - RUNTIME_BYTES
    return free // 2 if free // 2 > PREFETCH_BYTES else min(PREFETCH_BYTES, free - PREFETCH_BYTES)


def _block_rows(plan: Plan, where: str) -> dict[str, int]:
    """Rows per block for every job whole too large for the budget; an error naming the tensor when one cannot
    be split (the method merges whole tensors only) or one row already exceeds the budget."""
    cap = unit_cap(plan.memory)
    out: dict[str, int] = {}
    for j in plan.jobs:
        if sum(plan.cost(j)) <= cap:
            continue
        n = num_rows(j.shape)
        if j.route in ("method", NO_STATS_ROUTE) and plan.spec.rows != "blocks":
            raise ForgetlessError(f"{plan.spec.name!r} merges whole tensors, and this one needs "
                                  f"{human_bytes(sum(plan.cost(j)))} at once, more than the memory budget "
                                  f"{human_bytes(plan.memory)} allows one tensor ({human_bytes(cap)})", file=where,
                                  tensor=j.name, remedy="raise memory: (or --memory), or leave this tensor out "
                                                        "of the scope")
        fixed = sum(plan.cost(j, 0))
        per_row = (sum(plan.cost(j, n)) - fixed) / n
        rows = min(n, int((cap - fixed) // per_row)) if len(j.shape) and cap > fixed else 0
        if rows < 1:
            raise ForgetlessError(f"one row of this tensor needs {human_bytes(fixed + per_row)}, more than the "
                                  f"memory budget {human_bytes(plan.memory)} allows a block ({human_bytes(cap)})",
                                  file=where, tensor=j.name, remedy="raise memory: (or --memory)")
        if rows < n:
            out[j.name] = rows
    return out


def build_plan(recipe: Recipe | dict | str | Path, *, out: str | Path | None = None, force: bool = False,
               memory: str | int | None = None) -> Plan:
    """``memory`` (a size, or "auto") overrides the recipe's ``memory:``."""
    recipe = load_recipe(recipe)
    where = recipe.source or "recipe"
    spec = METHODS.get(recipe.method)
    if spec is None:
        raise ForgetlessError(f"method: unknown method {recipe.method!r} (known: {', '.join(sorted(METHODS))})",
                              file=where, remedy=EXAMPLES_HINT)
    if spec.models == "one" and len(recipe.models) != 1:
        raise ForgetlessError(f"models: {spec.name!r} merges exactly one fine-tuned model, got {len(recipe.models)}",
                              file=where, remedy="list one model")
    params = _resolve_params(recipe, spec)
    if spec.uses_device:
        params["device"] = resolve_method_device(recipe.device, where)
    if spec.space == "adapter":
        return _adapter_plan(recipe, spec, params, Path(out if out is not None else recipe.out)
                             if (out or recipe.out) else None, force)
    if recipe.fold or recipe.non_lora != "average":
        key = "fold" if recipe.fold else "non_lora"
        raise ForgetlessError(f"{key}: only for adapter-space methods ({', '.join(_adapter_methods())})",
                              file=where, remedy=f"remove `{key}:` or choose an adapter-space method")
    if recipe.scope.outside == "finetuned" and len(recipe.models) > 1:
        raise ForgetlessError("scope.outside: 'finetuned' is ambiguous with several models", file=where,
                              remedy="use outside: base")
    stat_paths: dict[str, Any] = {}
    for need in spec.needs:
        if need in spec.per_model_needs:
            paths = []
            for i, m in enumerate(recipe.models):
                p = m.statistics.get(need, recipe.statistics.get(need))
                if p is None:
                    raise ForgetlessError(f"models[{i}].statistics.{need}: required by {spec.name!r}", file=where,
                                          remedy="compute it with `forgetless stats` and name the file")
                paths.append(p)
            stat_paths[need] = paths
        elif need not in recipe.statistics:
            raise ForgetlessError(f"statistics.{need}: required by {spec.name!r}", file=where,
                                  remedy="compute it with `forgetless stats` and name the file")
        else:
            stat_paths[need] = recipe.statistics[need]
    out = Path(out if out is not None else recipe.out) if (out or recipe.out) else None
    flat_stats = [Path(p) for v in stat_paths.values() for p in _flat(v)]
    _check_paths(recipe, out, force, flat_stats)

    base = open_model(recipe.base)
    models = [open_model(m.model) for m in recipe.models]
    if not recipe.allow_other_model:  # MODEL+ADAPTER: the adapter is folded into MODEL
        readers = {"base": base, **{f"models[{i}]": m for i, m in enumerate(models)}}
        _refuse_other_bases([(label, r.adapter, r.base.path) for label, r in readers.items()
                             if isinstance(r, AdaptedReader)], where)
    for i, m in enumerate(models):
        _check_structure(base, m, f"models[{i}]")
    weights = None if recipe.allow_other_model or not stat_paths else {
        "base": base.weights_fingerprint(), **{f"models[{i}]": m.weights_fingerprint() for i, m in enumerate(models)}}
    stats = {need: ([_open_stat(p, base, f"models[{i}].statistics.{need}", where, spec, need, weights)
                     for i, p in enumerate(v)]
                    if need in spec.per_model_needs
                    else _open_stat(v, base, f"statistics.{need}", where, spec, need, weights))
             for need, v in stat_paths.items()}

    names = base.names()
    layout = layouts.detect_layout(base.config, names, None if recipe.layout == "auto" else recipe.layout)
    scope = set(names)
    if recipe.scope.include:
        scope = layouts.select(layout, names, recipe.scope.include, file=where)
    if recipe.scope.exclude:
        scope -= layouts.select(layout, names, recipe.scope.exclude, file=where)
    if len(scope) < len(names) and recipe.scope.outside is None:
        raise ForgetlessError(f"scope.outside: required, the scope leaves {len(names) - len(scope)} tensors out",
                              file=where, remedy="say where they come from: outside: base | finetuned")

    no_statistics = recipe.scope.no_statistics or ("method" if spec.without_statistics == "call" else "error")
    if no_statistics == "method" and spec.without_statistics != "call":
        raise ForgetlessError(f"scope.no_statistics: {spec.name!r} cannot merge a tensor without its statistics",
                              file=where, remedy="use no_statistics: error | base | finetuned")
    jobs = []
    stat_readers = [r for v in stats.values() for r in (v if isinstance(v, list) else [v])]
    missing_stats: list[str] = []
    for name in names:
        info = base.info(name)
        out_dtype = info.dtype if recipe.dtype == "base" else DTYPES[recipe.dtype]
        if not info.dtype.is_floating_point:
            route, out_dtype = "base (non-float)", info.dtype
        elif name not in scope:
            route = recipe.scope.outside or "base"
        elif any(name not in r for r in stat_readers):
            route = NO_STATS_ROUTE if no_statistics == "method" else no_statistics
            if route == "error":
                missing_stats.append(name)
        else:
            route = "method"
        jobs.append(Job(name, route, layouts.part_of(layout, name), info.shape, info.dtype, out_dtype))
    if missing_stats:
        raise ForgetlessError(f"{len(missing_stats)} tensors in scope have no statistics, e.g. "
                              f"{', '.join(missing_stats[:3])}", file=where,
                              remedy="narrow the scope, or set scope.no_statistics: base | finetuned")
    budget, how = resolve_memory(recipe.memory if memory is None else memory, where)
    plan = Plan(recipe, spec, params, base, models, stats, layout, jobs, out, force, budget, how)
    plan.block_rows = _block_rows(plan, where)
    return plan


# ------------------------------------------------------------------------------------------------ execution
def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def tensor_generators(seed: int, name: str, n: int) -> list[torch.Generator]:
    """One generator per merged model for a tensor: model 0's seeded from (seed, name) as a one-model method's
    generator is, model k's from (seed, name, k); so each model's random draws depend neither on the other
    models nor on how the tensor is split into row blocks."""
    return [torch.Generator().manual_seed(tensor_seed(seed, name if k == 0 else f"{name}#{k}")) for k in range(n)]


def _statistic(reader: Statistics, name: str, kind: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One statistics tensor (``rows``: its rows start:stop) in float32, checked as it is read: finite, and
    non-negative for a (diagonal) Fisher — a NaN would otherwise turn into a silent fallback or a traceback deep
    inside a method."""
    t = reader.get(name, rows).float()
    file = reader.file_of(name)
    bad = None
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        bad = f"{int((~torch.isfinite(t)).sum())} NaN/Inf entries"
    elif kind.startswith("fisher") and bool((t < 0).any()):
        bad = f"{int((t < 0).sum())} negative entries (a diagonal Fisher is a mean of squares)"
    if bad is not None:
        raise ForgetlessError(f"{kind} statistics with {bad}", file=file, tensor=name,
                              remedy="recompute the statistics (`forgetless stats`); check the model and data for "
                                     "NaN/Inf (a bf16 overflow, a diverged fine-tune)")
    return t


def _copyable(reader, name: str, job: Job) -> bool:
    """True when the stored bytes are the output bytes: stored in the output dtype by this reader (a bf16
    fine-tune beside an fp32 base is not), not changed by an adapter."""
    return reader.info(name).dtype == job.out_dtype and getattr(reader, "is_untouched", lambda n: True)(name)


class _Runner:
    """Reads and computes units. ``load`` runs on the reader threads; ``compute`` on the merge threads, whole
    tensors several at once, a tensor's row blocks one after the other and alone (its pre-pass result and its
    generators are kept from its first block to its last)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.method_kwargs = dict(plan.params)
        self.counts: dict[str, Counter] = defaultdict(Counter)  # part -> element counts the method reports
        self._tensor: tuple[str, dict[str, Any]] | None = None  # (name, state) of the tensor in row blocks
        self._lock = threading.Lock()

    def load(self, unit: Unit) -> Any:
        p, job, rows = self.plan, unit.job, unit.rows
        if job.route in ("base", "finetuned", "base (non-float)"):
            src = p.base if job.route != "finetuned" else p.models[0]
            if _copyable(src, job.name, job):
                return src.raw(job.name, rows)
            return src.get(job.name, rows)
        base = p.base.get(job.name, rows).float()
        # a method that only reads its fine-tuned tensors gets them mapped from the files: no copy
        fts = [(getattr(m, "view", m.get) if p.spec.reads_finetuned else m.get)(job.name, rows).float()
               for m in p.models]
        if job.route == NO_STATS_ROUTE:
            return base, fts, {}

        def read(r, k):  # statistics shaped like the weight come in the same rows; others (a Gram) whole
            return _statistic(r, job.name, k, rows if p.spec.stat_in_rows(k, job.shape) else None)
        stats = {k: ([read(r, k) for r in v] if isinstance(v, list) else read(v, k)) for k, v in p.stats.items()}
        return base, fts, stats

    def rows_of(self, unit: Unit, loaded: Any) -> Rows:
        base, fts, stats = loaded
        return Rows(unit.job.name, base, fts[0] if self.plan.spec.models == "one" else fts, stats, unit.offset)

    def _state(self, unit: Unit) -> dict[str, Any]:
        """Per-tensor state of a tensor merged in row blocks: its generators and its pre-pass result."""
        job = unit.job
        if self._tensor is None or self._tensor[0] != job.name:
            self._tensor = (job.name, {})
        return self._tensor[1]

    def _generator(self, job: Job) -> torch.Generator | list[torch.Generator]:
        gens = tensor_generators(self.plan.recipe.seed, job.name, len(self.plan.models))
        return gens[0] if self.plan.spec.models == "one" else gens

    def needs_prepare(self, unit: Unit) -> bool:
        """The first block of a tensor whose method has a pre-pass over its blocks, before that pass has run."""
        return (unit.rows is not None and unit.rows[0] == 0 and self.plan.spec.tensor_prepare is not None
                and unit.job.route in ("method", NO_STATS_ROUTE)
                and not (self._tensor is not None and self._tensor[0] == unit.job.name
                         and "prepared" in self._tensor[1]))

    def prepare(self, unit: Unit) -> None:
        """The method's pre-pass over every block of this tensor, at its first block (before any of its blocks is
        read ahead, so that the pass's reads are the only ones of this tensor in memory)."""
        job = unit.job

        def stream():
            for u in self.plan.units_of(job):
                yield self.rows_of(u, self.load(u))
        self._state(unit)["prepared"] = self.plan.spec.tensor_prepare(dict(self.method_kwargs), stream,
                                                                      job.shape) or {}

    def compute(self, unit: Unit, loaded: Any) -> torch.Tensor | bytes:
        job = unit.job
        if isinstance(loaded, bytes | bytearray):
            return loaded
        if isinstance(loaded, torch.Tensor):
            return loaded.to(job.out_dtype)
        base, fts, stats = loaded
        spec = self.plan.spec
        kwargs = {**self.method_kwargs, **stats}
        state = self._state(unit) if unit.rows is not None else {}
        if "name" in spec.context:
            kwargs["name"] = job.name
        counts: Counter = Counter()
        if "counts" in spec.context:
            kwargs["counts"] = counts  # this call's own: units are merged on several threads
        if "generator" in spec.context:
            kwargs["generator"] = state["generator"] if "generator" in state else self._generator(job)
            state.setdefault("generator", kwargs["generator"])
        if "block" in spec.context and unit.rows is not None:
            kwargs["block"] = RowBlock(unit.offset, job.shape, state.get("prepared", {}))
        if unit.last and unit.rows is not None:
            self._tensor = None
        result = spec.fn(base, fts[0] if spec.models == "one" else fts, **kwargs)
        if counts:
            with self._lock:
                self.counts[job.part].update(counts)
        if result.shape != base.shape:
            raise AssertionError(f"method {spec.name} returned shape {tuple(result.shape)} for {job.name}")
        if not torch.isfinite(result.sum()) and not torch.isfinite(result).all():  # a sum is NaN/Inf if any is
            raise ForgetlessError(f"method {spec.name!r} produced NaN or Inf", tensor=job.name,
                                  remedy="check the inputs (and statistics) of this tensor for NaN/Inf")
        return result.to(job.out_dtype)


def _release_freed_memory() -> None:
    """Make glibc return freed blocks of 4 MiB and more to the system at once (a fixed mmap threshold), when
    tensors are merged in row blocks. By default glibc raises that threshold up to 32 MiB as large blocks are
    freed, and then keeps freed blocks below it in its per-thread arenas: each row block's masks and temporaries
    are such blocks, and the process grew by about one block's worth per block (+200 MiB measured on a 545 M-entry
    embedding) instead of staying within the budget (``malloc_trim`` after each block kept 160 MiB of it).
    Process-wide and lasting; a no-op where glibc's ``mallopt`` is missing."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def execute(plan: Plan, *, progress: bool = True, log: Callable[[str], None] | None = None) -> MergeReport:
    if plan.out is None:
        raise ForgetlessError("no output folder", file=plan.recipe.source or "recipe",
                              remedy="set `out:` in the recipe or pass --out")
    if isinstance(plan, AdapterPlan):
        return _execute_adapter(plan, progress=progress, log=log)
    t0 = time.perf_counter()
    metadata = {"forgetless_version": __version__, "method": plan.spec.name}
    writer = StreamingWriter(plan.out, plan.entries(), shard_size=parse_size(plan.recipe.shard_size),
                             force=plan.force, metadata=metadata)
    runner = _Runner(plan)
    units = plan.units()
    if plan.block_rows:
        _release_freed_memory()
    bar = None
    try:  # from here on, any failure or signal removes the writer's temporary folder
        if plan.spec.prepare is not None:
            method_units = [u for u in units if u.job.route == "method"]

            def stream():
                for u in method_units:
                    yield runner.rows_of(u, runner.load(u))

            numel = sum(math.prod(j.shape) for j in plan.jobs if j.route == "method")
            extra = plan.spec.prepare(dict(plan.params), stream, numel)
            runner.method_kwargs.update(extra or {})
            if extra and log:
                log(f"{plan.spec.name} pre-pass: " + ", ".join(f"{k}={v:.6g}" if isinstance(v, float)
                                                                 else f"{k}={v}" for k, v in extra.items()))
        bar = _progress(plan, progress)
        _pipeline(plan, runner, writer, bar, units)
        card = model_card(plan, runner.counts)
        writer.commit(side_files_from=_side_dir(plan.recipe.base), config_updates=_config_updates(plan),
                      extra_files={"README.md": card})
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    report = MergeReport(plan.out, plan, time.perf_counter() - t0, counts=dict(runner.counts))
    if log:
        log(report.summary())
    return report


def merge_threads() -> tuple[int, int]:
    """(units merged at once, torch intra-op threads for each). Elementwise merges on a few cores gain more from
    merging :data:`MERGERS` units side by side, each on one thread, than from torch's OpenMP threads: those meet
    at a barrier after every operation, and on a machine whose cores are busy with the merge's own reads and writes
    (or anything else) a thread waiting there for a core spins — a TIES merge on 2 busy cores ran 10× slower with
    2 OpenMP threads than with 1. Cores beyond those go to torch's threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    mergers = max(1, min(MERGERS, cores))
    return mergers, max(1, cores // mergers - 1)


def _pipeline(plan: Plan, runner: _Runner, writer: StreamingWriter, bar: _progress, units: list[Unit]) -> None:
    """Read, merge and write every unit: reads on two threads, merges on :func:`merge_threads` threads (each writes
    its result at its offset as soon as it is done; the writer syncs shards in the background). A unit's read
    starts only while the units read or being merged, counted whole (inputs, temporaries, result), stay within
    what the peak-memory estimate allows them beyond the runtime — one unit, however large, always may. Row
    blocks of a tensor are merged one after the other, alone; a tensor's pre-pass runs with nothing else in
    flight, before any of its blocks is read ahead."""
    mergers, threads = merge_threads()
    allowance = plan.peak_memory_estimate() - RUNTIME_BYTES
    lock = threading.Lock()

    def merge(unit: Unit, read: Future) -> None:
        result = runner.compute(unit, read.result())
        at = 0 if unit.rows is None else unit.rows[0] * row_bytes(unit.job.shape, unit.job.out_dtype)
        writer.write(unit.job.name, result, at)
        with lock:
            bar.update(unit, plan.unit_cost(unit)[2])

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with ThreadPoolExecutor(2, thread_name_prefix="forgetless-read") as readers, \
                ThreadPoolExecutor(mergers, thread_name_prefix="forgetless-merge") as pool:
            reads: dict[int, Future] = {}
            running: dict[Future, int] = {}  # merge -> bytes it holds
            held, nxt = 0, 0  # bytes of the units read or being merged; the next unit to read

            def read_ahead() -> None:
                nonlocal held, nxt
                while nxt < len(units) and len(reads) < PREFETCH and not runner.needs_prepare(units[nxt]):
                    cost = sum(plan.unit_cost(units[nxt]))
                    if held and held + cost > allowance:
                        break
                    reads[nxt] = readers.submit(runner.load, units[nxt])
                    held += cost
                    nxt += 1

            def settle(every: bool = False) -> None:
                """Wait for one merge to finish (`every`: for all), free what it held, read ahead."""
                nonlocal held
                while running:
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for f in done:
                        held -= running.pop(f)
                        f.result()  # a merge's error stops the run here
                    read_ahead()
                    if not every:
                        return

            read_ahead()
            for i, unit in enumerate(units):
                alone = unit.rows is not None
                if runner.needs_prepare(unit):
                    settle(every=True)
                    runner.prepare(unit)
                    read_ahead()
                if alone:
                    settle(every=True)
                while i not in reads or len(running) >= mergers:
                    settle()
                    if not running:
                        read_ahead()  # nothing held by merges: this unit's read is admitted
                running[pool.submit(merge, unit, reads.pop(i))] = sum(plan.unit_cost(unit))
                if alone:
                    settle(every=True)
                read_ahead()
            settle(every=True)
    finally:
        torch.set_num_threads(previous)


def _side_dir(ref: str) -> Path:
    return parse_model_ref(ref)[0]


def _config_updates(plan: Plan) -> dict:
    if plan.recipe.dtype == "base":
        return {}
    cfg = plan.base.config
    return {k: plan.recipe.dtype for k in ("torch_dtype", "dtype") if k in cfg} or {"dtype": plan.recipe.dtype}


class _progress:
    """Tensors and bytes done, MB/s and ETA on stderr (tqdm)."""

    def __init__(self, plan: Plan, enabled: bool):
        from tqdm import tqdm

        self.n = len(plan.jobs)
        self.done = 0
        self.bar = tqdm(total=sum(j.out_bytes for j in plan.jobs), unit="B", unit_scale=True, unit_divisor=1024,
                        desc=f"merge {plan.spec.name}", disable=not enabled, file=sys.stderr, dynamic_ncols=True)

    def update(self, unit: Job | Unit, nbytes: int | None = None) -> None:
        """A job done, or a unit of one (`nbytes` its output bytes): the tensor counts when its last unit is."""
        if isinstance(unit, Job):
            unit, nbytes = Unit(unit), unit.out_bytes
        if unit.last:
            self.done += 1
            self.bar.set_postfix_str(f"{self.done}/{self.n} tensors", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def model_card(plan: Plan, counts: dict[str, Counter] | None = None) -> str:
    r = plan.recipe
    inputs = [("base", r.base, plan.base)] + [(f"models[{i}]", m.model, rd) for i, (m, rd) in
                                              enumerate(zip(r.models, plan.models))]
    rows = "\n".join(f"| {label} | `{ref}` | `{rd.fingerprint()}` | "
                     f"`{getattr(rd, 'weights_fingerprint', rd.fingerprint)()}` |" for label, ref, rd in inputs)
    stat_rows = []
    for need, v in plan.stats.items():
        for rd in v if isinstance(v, list) else [v]:
            meta = rd.meta
            files = ", ".join(f"`{p}`" for p in rd.paths)
            stat_rows.append(f"| {need} | {files} | {meta.get('kind', '?')} | N={meta.get('num_samples', '?')} |")
    stats = ("\n## Statistics\n\n| role | file | kind | samples |\n|---|---|---|---|\n" + "\n".join(stat_rows) + "\n"
             if stat_rows else "")
    return f"""---
tags: [forgetless, merge, {plan.spec.name}]
---
# Merged with forgetless {__version__}

Method **{plan.spec.name}**: {plan.spec.doc}
{plan.card_note()}
## Recipe

```yaml
{r.to_yaml().rstrip()}
```

## Inputs

| role | reference | structure fingerprint | weights fingerprint (sampled) |
|---|---|---|---|
{rows}
{stats}
## What each tensor took

```
{plan.table()}
{counts_table(counts or {})}
```
"""


def merge(recipe: Recipe | dict | str | Path, *, out: str | Path | None = None, force: bool = False,
          dry_run: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
          memory: str | int | None = None) -> MergeReport:
    """Plan, check and run a merge. The CLI's `forgetless merge` is this function. ``memory``: the peak memory
    budget (a size or "auto"), overriding the recipe's ``memory:``."""
    plan = build_plan(recipe, out=out, force=force, memory=memory)
    if dry_run:
        if log:
            log(plan.describe())
        return MergeReport(plan.out, plan, dry_run=True)
    try:
        return execute(plan, progress=progress, log=log)
    finally:
        for rd in [plan.base, *plan.models]:
            getattr(rd, "close", lambda: None)()


# ------------------------------------------------------------------------------------------------ adapter space
def _adapter_methods() -> list[str]:
    return sorted(n for n, s in METHODS.items() if s.space == "adapter" and n == s.name)


@dataclass(frozen=True)
class AdapterModule:
    """One adapted Linear: its base weight, its module path in the adapters, shapes, input and output ranks."""

    name: str  # base weight name
    module: str  # module path as models[0] stores it (the written keys derive from it)
    shape: tuple[int, int]  # (out, in)
    ranks: tuple[int, ...]
    rank: int  # output rank
    scale: float  # the written adapter's PEFT scale for this module


@dataclass
class AdapterPlan(Plan):
    """A merge of LoRA adapters in adapter space: ``models`` are :class:`LoraAdapter`s of ``base``."""

    modules: list[AdapterModule] = field(default_factory=list)
    replaced: dict[str, tuple[str, str, torch.dtype]] = field(default_factory=dict)  # base name -> key, file, dtype
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json of the output
    factor_dtype: torch.dtype = torch.float32

    def peak_memory_estimate(self) -> int:
        """Runtime + one module's factors of every adapter in fp32 (+ the dense deltas for SVD methods) + a tensor
        being written. The adapters stay on disk until each module is merged."""
        n = len(self.models)
        largest = 0
        for m in self.modules:
            out_, in_ = m.shape
            factors = sum(r * (out_ + in_) for r in m.ranks) * 4 * 2  # read + scaled copy
            # the n deltas, the trim's |Δ| and mask, sign/numerator/denominator, the SVD's factors and workspace
            dense = (n + 6) * out_ * in_ * 4 if self.spec.dense else 3 * out_ * in_ * 4 if self.recipe.fold else 0
            largest = max(largest, factors + dense)
        biggest_out = max((j.out_bytes for j in self.jobs), default=0)
        return RUNTIME_BYTES + largest + 3 * biggest_out

    def num_shards(self) -> int:
        return 1 if not self.recipe.fold else super().num_shards()

    def card_note(self) -> str:
        r = self.recipe
        took = ("averaged over the adapters (an adapter without one contributes the base tensor)"
                if r.non_lora == "average" else f"taken from models[{r.non_lora}] ({r.models[int(r.non_lora)].model})")
        out = "the full model with the merged update folded in" if r.fold else "a PEFT LoRA adapter"
        ranks = sorted({m.rank for m in self.modules})
        return (f"\nMerged in adapter space: {len(self.models)} LoRA adapters of `{r.base}` → {out} "
                f"(rank {', '.join(map(str, ranks))}). Full tensors the adapters carry (non_lora_trainables, "
                f"modules_to_save): {len(self.replaced)}, {took}.\n")


def _adapter_problems(adapters: list[Any], base: CheckpointReader, one_rank: str | None = None) -> list[str]:
    """Every reason these adapters cannot be merged in adapter space, each naming the adapter and module.
    `one_rank`: the name of a method that needs every adapter at one rank (ranks are then compared)."""
    problems: list[str] = []
    bases = {str(a.config.get("base_model_name_or_path")) for a in adapters if a.config.get("base_model_name_or_path")}
    if len(bases) > 1:
        problems.append("adapter_config.json base_model_name_or_path differs: " + ", ".join(
            f"{a.path}: {a.config.get('base_model_name_or_path')!r}" for a in adapters))
    first = adapters[0].loras()
    for i, a in enumerate(adapters):
        loras = a.loras()
        if not loras:
            problems.append(f"models[{i}] {a.path}: no LoRA module (only full tensors)")
        if i and set(loras) != set(first):
            diff = sorted(set(loras) ^ set(first))
            problems.append(f"models[{i}] {a.path}: adapts other modules than models[0] ({len(diff)} differ, e.g. "
                            f"{', '.join(diff[:3])}; target_modules {a.config.get('target_modules')!r} vs "
                            f"{adapters[0].config.get('target_modules')!r})")
        for name, lora in sorted(loras.items()):
            if lora.kind != "linear" or lora.fan_in_fan_out:
                what = "fan_in_fan_out Linear" if lora.kind == "linear" else lora.kind
                problems.append(f"models[{i}] {a.path}: {lora.module} is a {what} LoRA (adapter-space merging "
                                "takes Linear layers)")
            elif lora.shape() != tuple(base.info(name).shape):
                problems.append(f"models[{i}] {a.path}: {lora.module} implies shape {list(lora.shape())}, the base "
                                f"has {list(base.info(name).shape)}")
            elif one_rank and name in first and lora.A.shape[0] != first[name].A.shape[0]:
                problems.append(f"models[{i}] {a.path}: {lora.module} has rank {lora.A.shape[0]}, models[0] has "
                                f"{first[name].A.shape[0]} ({one_rank} merges adapters of one rank)")
        for b in sorted(a.lora_biases()):
            problems.append(f"models[{i}] {a.path}: {b} has a lora_B bias (lora_bias=True), which adapter-space "
                            "merging does not take")
    return problems


def _refuse_other_bases(folds: list[tuple[str, Any, Path]], where: str) -> None:
    """Folding an adapter into another model than the one it was trained on writes a model nobody trained:
    refused, naming them. ``folds``: (label, adapter, the model it is folded into)."""
    others = [f"{label} {a.path}: {name[:100]!r} is not {base}" for label, a, base in folds
              if (name := a.other_base(base))]
    if others:
        raise ForgetlessError(f"fold: {len(others)} adapter(s) name another base model in "
                              f"base_model_name_or_path ({'; '.join(others[:MAX_LISTED])})", file=where,
                              remedy="fold adapters into the model they were trained on; if base is that model "
                                     "under another name, pass --allow-other-model (recipe: allow_other_model: true)")


def _open_adapter(ref: str, base: CheckpointReader, label: str, where: str) -> Any:
    from .checkpoint.lora import ADAPTER_CONFIG, NON_LORA, LoraAdapter

    path = Path(ref).expanduser()
    if not path.is_dir():
        if "+" in ref:
            raise ForgetlessError(f"{label}: adapter-space methods take the adapter folder alone ({ref!r})",
                                  file=where, remedy="write the adapter folder under models and its base under base")
        raise ForgetlessError(f"{label}: adapter folder not found", file=path, remedy="check the path")
    if not (path / ADAPTER_CONFIG).is_file() and not (path / NON_LORA).is_file():
        what = "a full model folder" if (path / "config.json").is_file() else "not a PEFT adapter folder"
        raise ForgetlessError(f"{label}: {what}, where a LoRA adapter is expected (no {ADAPTER_CONFIG})", file=path,
                              remedy="give PEFT adapter folders (save_pretrained), or merge full models with a "
                                     "weight-space method (task_arithmetic, ties, …)")
    return LoraAdapter(path, base.names())


def _output_config(adapters: list[Any], ranks: list[int]) -> dict[str, Any]:
    """models[0]'s adapter_config.json with the output ranks: ``r`` the commonest, ``rank_pattern`` for the others;
    ``lora_alpha`` kept when ``r`` is models[0]'s, else ``r`` (PEFT's add_weighted_adapter does the same);
    ``modules_to_save`` the union over the adapters (their full tensors are merged)."""
    cfg = dict(adapters[0].config)
    saved = [m for a in adapters for m in (a.config.get("modules_to_save") or [])]
    if saved:
        cfg["modules_to_save"] = list(dict.fromkeys(saved))
    r = Counter(ranks).most_common(1)[0][0]
    if r != cfg.get("r", 8):
        cfg["lora_alpha"] = r
    cfg.update(r=r, alpha_pattern={}, inference_mode=True)
    cfg.setdefault("lora_alpha", 8)
    cfg.setdefault("peft_type", "LORA")
    return cfg


def _peft_scale(cfg: dict[str, Any], rank: int) -> float:
    alpha = float(cfg["lora_alpha"])
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _adapter_plan(recipe: Recipe, spec: MethodSpec, params: dict[str, Any], out: Path | None,
                  force: bool) -> AdapterPlan:
    from .checkpoint.lora import ADAPTER_SAFE, PEFT_PREFIX

    where = recipe.source or "recipe"
    if recipe.statistics or any(m.statistics for m in recipe.models):
        raise ForgetlessError(f"statistics: {spec.name!r} takes none", file=where, remedy="remove `statistics:`")
    if recipe.scope.include or recipe.scope.exclude:
        raise ForgetlessError(f"scope: {spec.name!r} merges every module the adapters adapt", file=where,
                              remedy="remove `scope:` (train the adapters on the modules you want merged)")
    if isinstance(recipe.non_lora, int) and not 0 <= recipe.non_lora < len(recipe.models):
        raise ForgetlessError(f"non_lora: {recipe.non_lora} is not an index into models (0–{len(recipe.models) - 1})",
                              file=where, remedy="give average or the index of one model")
    base_ref, base_adapter = parse_model_ref(recipe.base)
    if base_adapter is not None:
        raise ForgetlessError("base: the base model folder alone, without +ADAPTER", file=where,
                              remedy="list the adapter under models")
    _check_paths(recipe, out, force, [])
    base = CheckpointReader(base_ref)
    adapters = [_open_adapter(m.model, base, f"models[{i}]", where) for i, m in enumerate(recipe.models)]
    problems = _adapter_problems(adapters, base, spec.name if spec.equal_ranks else None)
    if problems:
        listed = "; ".join(problems[:MAX_LISTED]) + (f"; and {len(problems) - MAX_LISTED} more"
                                                      if len(problems) > MAX_LISTED else "")
        raise ForgetlessError(f"{len(problems)} problem(s) with the adapters: {listed}", file=where,
                              remedy="merge adapters trained on one base, with the same target modules"
                                     + (" and rank" if spec.equal_ranks else ""))
    if recipe.fold and not recipe.allow_other_model:
        _refuse_other_bases([(f"models[{i}]", a, base_ref) for i, a in enumerate(adapters)], where)
    names = base.names()
    layout = layouts.detect_layout(base.config, names, None if recipe.layout == "auto" else recipe.layout)
    first = adapters[0].loras()
    order = {n: i for i, n in enumerate(names)}
    rank_of = {name: spec.out_rank([a.loras()[name].A.shape[0] for a in adapters],  # type: ignore[misc]
                                   {k.rstrip("_"): v for k, v in params.items()})
               for name in first}
    too_big = [f"{first[n].module} {list(base.info(n).shape)}" for n, r in rank_of.items()
               if not 1 <= r <= min(base.info(n).shape)]
    if too_big:
        raise ForgetlessError(f"output rank {sorted(set(rank_of.values()))} does not fit {len(too_big)} module(s), "
                              f"e.g. {too_big[0]}", file=where, remedy="set parameters.rank between 1 and the "
                              "smaller side of every adapted weight")
    cfg = _output_config(adapters, list(rank_of.values()))
    pattern = {first[n].module: r for n, r in rank_of.items() if r != cfg["r"]}
    cfg["rank_pattern"] = pattern
    modules = [AdapterModule(n, first[n].module, tuple(base.info(n).shape),  # type: ignore[arg-type]
                             tuple(a.loras()[n].A.shape[0] for a in adapters), rank_of[n],
                             _peft_scale(cfg, rank_of[n]))
               for n in sorted(first, key=order.__getitem__)]
    replaced: dict[str, tuple[str, str, torch.dtype]] = {}
    for a in adapters:
        for n, (key, src, dt) in a.replacements().items():
            replaced.setdefault(n, (key, src, DTYPES.get(recipe.dtype, dt)))
    factor_dtype = DTYPES.get(recipe.dtype) or next(iter(first.values())).A.dtype

    jobs: list[Job] = []
    route_full = "non_lora average" if recipe.non_lora == "average" else f"non_lora models[{recipe.non_lora}]"
    if recipe.fold:
        adapted = {m.name for m in modules}
        for n in names:
            info = base.info(n)
            dt = info.dtype if recipe.dtype == "base" or not info.dtype.is_floating_point else DTYPES[recipe.dtype]
            route = ("method" if n in adapted else route_full if n in replaced else
                     "base" if info.dtype.is_floating_point else "base (non-float)")
            jobs.append(Job(n, route, layouts.part_of(layout, n), info.shape, info.dtype, dt))
    else:
        for m in modules:
            part = layouts.part_of(layout, m.name)
            for kind, shape in (("lora_A", (m.rank, m.shape[1])), ("lora_B", (m.shape[0], m.rank))):
                jobs.append(Job(f"{PEFT_PREFIX}{m.module}.{kind}.weight", "method", part, shape, factor_dtype,
                                factor_dtype))
        for n, (key, src, dt) in sorted(replaced.items(), key=lambda kv: order[kv[0]]):
            if src == ADAPTER_SAFE:
                jobs.append(Job(key, route_full, layouts.part_of(layout, n), tuple(base.info(n).shape), dt, dt))
        # tensors from non_lora_trainables.bin are written back to that file beside the adapter, not planned here
    return AdapterPlan(recipe, spec, params, base, adapters, {}, layout, jobs, out, force, modules=modules,
                       replaced=replaced, config=cfg, factor_dtype=factor_dtype)


class _AdapterRunner:
    """Merges one module (or full tensor) at a time across the adapters."""

    def __init__(self, plan: AdapterPlan):
        self.plan = plan
        self.kwargs = dict(plan.params)

    def pair(self, m: AdapterModule) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged ``(A, B)`` of module `m`, scaled for the written adapter (``B @ A · scale`` is the update)."""
        p = self.plan
        pairs = []
        for a in p.models:
            A, B, s = a.loras()[m.name].factors()
            root = math.sqrt(s)
            pairs.append((A * root, B * root))
        kwargs = dict(self.kwargs)
        if "name" in p.spec.context:
            kwargs["name"] = m.name
        if "generator" in p.spec.context:
            kwargs["generator"] = tensor_generators(p.recipe.seed, m.name, 1)[0]
        A, B = p.spec.fn(pairs, **kwargs)
        if tuple(A.shape) != (m.rank, m.shape[1]) or tuple(B.shape) != (m.shape[0], m.rank):
            raise AssertionError(f"method {p.spec.name} returned factors {tuple(A.shape)}, {tuple(B.shape)} for "
                                 f"{m.name}; planned rank {m.rank}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ForgetlessError(f"method {p.spec.name!r} produced NaN or Inf", tensor=m.name,
                                  remedy="check the adapters' factors of this module for NaN/Inf")
        inv = 1.0 / math.sqrt(m.scale)
        return A * inv, B * inv

    def full(self, name: str) -> torch.Tensor:
        """A full tensor the adapters replace: their average (the base standing in for an adapter without it), or
        the chosen adapter's."""
        p = self.plan
        if p.recipe.non_lora != "average":
            a = p.models[int(p.recipe.non_lora)]
            t = a.replacement(name)
            return p.base.get(name).float() if t is None else t.clone()
        parts = [a.replacement(name) for a in p.models]
        base = p.base.get(name).float() if any(t is None for t in parts) else None
        return torch.stack([base if t is None else t for t in parts]).mean(dim=0)


def _execute_adapter(plan: AdapterPlan, *, progress: bool, log: Callable[[str], None] | None) -> MergeReport:
    from .checkpoint.lora import ADAPTER_CONFIG, ADAPTER_SAFE, NON_LORA, PEFT_PREFIX

    t0 = time.perf_counter()
    r = plan.recipe
    metadata = {"forgetless_version": __version__, "method": plan.spec.name}
    entries = plan.entries()
    shard = parse_size(r.shard_size) if r.fold else sum(e.nbytes for e in entries) + 1
    writer = StreamingWriter(plan.out, entries, shard_size=shard, force=plan.force,  # type: ignore[arg-type]
                             metadata=metadata, single_name=SAFE_SINGLE if r.fold else ADAPTER_SAFE)
    bar = None
    try:  # from here on, any failure or signal removes the writer's temporary folder
        runner = _AdapterRunner(plan)
        bar = _progress(plan, progress)
        by_name = {m.name: m for m in plan.modules}
        if r.fold:
            for job in plan.jobs:
                if job.route == "method":
                    A, B = runner.pair(by_name[job.name])
                    w = runner.full(job.name) if job.name in plan.replaced else plan.base.get(job.name).float()
                    out = w.addmm_(B, A, alpha=by_name[job.name].scale).to(job.out_dtype)
                elif job.name in plan.replaced:
                    out = runner.full(job.name).to(job.out_dtype)
                elif _copyable(plan.base, job.name, job):
                    out = plan.base.raw(job.name)
                else:
                    out = plan.base.get(job.name).to(job.out_dtype)
                writer.write(job.name, out)
                bar.update(job)
            extra = {"README.md": model_card(plan)}
            side = _side_dir(r.base)
        else:
            jobs = {j.name: j for j in plan.jobs}
            for m in plan.modules:
                A, B = runner.pair(m)
                for kind, t in (("lora_A", A), ("lora_B", B)):
                    job = jobs[f"{PEFT_PREFIX}{m.module}.{kind}.weight"]
                    writer.write(job.name, t.to(job.out_dtype).contiguous())
                    bar.update(job)
            bin_out: dict[str, torch.Tensor] = {}
            for name, (key, src, dt) in plan.replaced.items():
                t = runner.full(name).to(dt)
                if src == NON_LORA:
                    bin_out[key] = t
                else:
                    writer.write(key, t)
                    bar.update(jobs[key])
            if bin_out:
                torch.save(bin_out, writer.tmp / NON_LORA)
            extra = {"README.md": model_card(plan), ADAPTER_CONFIG: json.dumps(plan.config, indent=2) + "\n"}
            side = None
        writer.commit(side_files_from=side, config_updates=_config_updates(plan) if r.fold else None,
                      extra_files=extra)
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    report = MergeReport(plan.out, plan, time.perf_counter() - t0)
    if log:
        log(report.summary())
    return report
