"""Merges in adapter space (CoPA, the SVD baselines): LoRA adapters merged module by module into one adapter.

:func:`adapter_plan` checks the adapters against each other and the base and plans the output, a PEFT adapter
folder or (``fold``) the full model; :func:`execute_adapter` then merges one adapted module at a time — every
adapter's (A, B) of it, read from disk only then — into the same streaming writer as a full-tensor merge. The
adapters' full tensors (``modules_to_save``, ``non_lora_trainables``) are averaged or taken from one model.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import layout as layouts
from ..checkpoint.lora import (
    ADAPTER_CONFIG,
    ADAPTER_SAFE,
    NON_LORA,
    PEFT_PREFIX,
    LoraAdapter,
    parse_model_ref,
)
from ..checkpoint.reader import SAFE_SINGLE, CheckpointReader
from ..checkpoint.writer import StreamingWriter, parse_size
from ..errors import ForgetlessError
from ..methods import MethodSpec
from ..recipe import Recipe
from . import budget
from .card import MergeReport, model_card
from .checks import check_part_weights, check_paths, listed, refuse_other_bases
from .parts import bind_params, tensor_params
from .plan import DTYPES, Job, Plan, Route
from .run import Progress, Written, commit_or_abort, config_updates, side_dir, writer_metadata
from .runner import copyable, tensor_generators


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
    replaced: dict[str, tuple[str, str, torch.dtype]] = field(
        default_factory=dict
    )  # base name -> key, file, dtype
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json of the output
    factor_dtype: torch.dtype = torch.float32

    def label(self, job: Job) -> str:
        """A full tensor's route says where it comes from: the adapters' average, or one model's."""
        if job.route != Route.NON_LORA:
            return super().label(job)
        choice = self.recipe.non_lora
        return f"non_lora {'average' if choice == 'average' else f'models[{choice}]'}"

    def peak_memory_estimate(self) -> int:
        """Runtime + one module's factors of every adapter in fp32 (+ the dense deltas for SVD methods) + a tensor
        being written. The adapters stay on disk until each module is merged."""
        n = len(self.models)
        largest = 0
        for m in self.modules:
            out_, in_ = m.shape
            factors = sum(r * (out_ + in_) for r in m.ranks) * 4 * 2  # read + scaled copy
            # the n deltas, the trim's |Δ| and mask, sign/numerator/denominator, the SVD's factors and workspace
            dense = (
                (n + 6) * out_ * in_ * 4 if self.spec.dense else 3 * out_ * in_ * 4 if self.recipe.fold else 0
            )
            largest = max(largest, factors + dense)
        biggest_out = max((j.out_bytes for j in self.jobs), default=0)
        return budget.RUNTIME_BYTES + largest + 3 * biggest_out

    def num_shards(self) -> int:
        return 1 if not self.recipe.fold else super().num_shards()

    def merged_names(self) -> list[str]:
        """The base weights whose adapted modules the method merges."""
        return [m.name for m in self.modules]

    def card_note(self) -> str:
        r = self.recipe
        took = (
            "averaged over the adapters (an adapter without one contributes the base tensor)"
            if r.non_lora == "average"
            else f"taken from models[{r.non_lora}] ({r.models[int(r.non_lora)].model})"
        )
        out = "the full model with the merged update folded in" if r.fold else "a PEFT LoRA adapter"
        ranks = sorted({m.rank for m in self.modules})
        return (
            f"\nMerged in adapter space: {len(self.models)} LoRA adapters of `{r.base}` → {out} "
            f"(rank {', '.join(map(str, ranks))}). Full tensors the adapters carry (non_lora_trainables, "
            f"modules_to_save): {len(self.replaced)}, {took}.\n"
        )


# ------------------------------------------------------------------------------------------------ checks
def open_adapter(ref: str, base: CheckpointReader, label: str, where: str) -> LoraAdapter:
    """The PEFT adapter folder `ref` (keyed by the base's names), refused when it is missing, a full model, or
    written as BASE+ADAPTER."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        if "+" in ref:
            raise ForgetlessError(
                f"{label}: adapter-space methods take the adapter folder alone ({ref!r})",
                file=where,
                remedy="write the adapter folder under models and its base under base",
            )
        raise ForgetlessError(f"{label}: adapter folder not found", file=path, remedy="check the path")
    if not (path / ADAPTER_CONFIG).is_file() and not (path / NON_LORA).is_file():
        what = "a full model folder" if (path / "config.json").is_file() else "not a PEFT adapter folder"
        raise ForgetlessError(
            f"{label}: {what}, where a LoRA adapter is expected (no {ADAPTER_CONFIG})",
            file=path,
            remedy="give PEFT adapter folders (save_pretrained), or merge full models with a "
            "weight-space method (task_arithmetic, ties, …)",
        )
    return LoraAdapter(path, base.names())


def adapter_problems(
    adapters: list[LoraAdapter], base: CheckpointReader, one_rank: str | None = None
) -> list[str]:
    """Every reason these adapters cannot be merged in adapter space, each naming the adapter and module.
    `one_rank`: the name of a method that needs every adapter at one rank (ranks are then compared)."""
    problems: list[str] = []
    bases = {
        str(a.config.get("base_model_name_or_path"))
        for a in adapters
        if a.config.get("base_model_name_or_path")
    }
    if len(bases) > 1:
        problems.append(
            "adapter_config.json base_model_name_or_path differs: "
            + ", ".join(f"{a.path}: {a.config.get('base_model_name_or_path')!r}" for a in adapters)
        )
    for i, a in enumerate(adapters):
        problems += _problems_of(i, a, adapters[0], base, one_rank)
    return problems


def _brief(targets: Any, shown: int = 3) -> str:
    """An adapter's target_modules for an error line: a long list (full module paths) cut to its first few."""
    if isinstance(targets, list) and len(targets) > shown:
        return repr(targets[:shown])[:-1] + f", … {len(targets) - shown} more]"
    return repr(targets)


def _problems_of(
    i: int, a: LoraAdapter, first_adapter: LoraAdapter, base: CheckpointReader, one_rank: str | None
) -> list[str]:
    """What keeps adapter models[i] from being merged with models[0] (`first_adapter`) in adapter space."""
    problems: list[str] = []
    first, loras = first_adapter.loras(), a.loras()
    if not loras:
        problems.append(f"models[{i}] {a.path}: no LoRA module (only full tensors)")
    if i and set(loras) != set(first):
        diff = sorted(set(loras) ^ set(first))
        problems.append(
            f"models[{i}] {a.path}: adapts other modules than models[0] ({len(diff)} differ, e.g. "
            f"{', '.join(diff[:3])}; target_modules {_brief(a.config.get('target_modules'))} vs "
            f"{_brief(first_adapter.config.get('target_modules'))})"
        )
    for name, lora in sorted(loras.items()):
        if lora.kind != "linear" or lora.fan_in_fan_out:
            what = "fan_in_fan_out Linear" if lora.kind == "linear" else lora.kind
            problems.append(
                f"models[{i}] {a.path}: {lora.module} is a {what} LoRA (adapter-space merging "
                "takes Linear layers)"
            )
        elif lora.shape() != tuple(base.info(name).shape):
            problems.append(
                f"models[{i}] {a.path}: {lora.module} implies shape {list(lora.shape())}, the base "
                f"has {list(base.info(name).shape)}"
            )
        elif one_rank and name in first and lora.A.shape[0] != first[name].A.shape[0]:
            problems.append(
                f"models[{i}] {a.path}: {lora.module} has rank {lora.A.shape[0]}, models[0] has "
                f"{first[name].A.shape[0]} ({one_rank} merges adapters of one rank)"
            )
    for b in sorted(a.lora_biases()):
        problems.append(
            f"models[{i}] {a.path}: {b} has a lora_B bias (lora_bias=True), which adapter-space "
            "merging does not take"
        )
    return problems


def _refuse_weight_options(recipe: Recipe, spec: MethodSpec, where: str) -> str:
    """The base model folder; what only full-tensor merges take (statistics, a scope, BASE+ADAPTER) and a bad
    ``non_lora`` index are refused."""
    if recipe.statistics or any(m.statistics for m in recipe.models):
        raise ForgetlessError(
            f"statistics: {spec.name!r} takes none", file=where, remedy="remove `statistics:`"
        )
    if recipe.scope.include or recipe.scope.exclude:
        raise ForgetlessError(
            f"scope: {spec.name!r} merges every module the adapters adapt",
            file=where,
            remedy="remove `scope:` (train the adapters on the modules you want merged)",
        )
    if isinstance(recipe.non_lora, int) and not 0 <= recipe.non_lora < len(recipe.models):
        raise ForgetlessError(
            f"non_lora: {recipe.non_lora} is not an index into models (0–{len(recipe.models) - 1})",
            file=where,
            remedy="give average or the index of one model",
        )
    base_ref, base_adapter = parse_model_ref(recipe.base)
    if base_adapter is not None:
        raise ForgetlessError(
            "base: the base model folder alone, without +ADAPTER",
            file=where,
            remedy="list the adapter under models",
        )
    return base_ref


def _open_adapters(
    recipe: Recipe, spec: MethodSpec, base: CheckpointReader, base_ref: str, where: str
) -> list[LoraAdapter]:
    """The recipe's adapters, refused together with every problem listed, and (``fold``) when trained on
    another base."""
    adapters = [open_adapter(m.model, base, f"models[{i}]", where) for i, m in enumerate(recipe.models)]
    problems = adapter_problems(adapters, base, spec.name if spec.equal_ranks else None)
    if problems:
        raise ForgetlessError(
            f"{len(problems)} problem(s) with the adapters: {listed(problems)}",
            file=where,
            remedy="merge adapters trained on one base, with the same target modules"
            + (" and rank" if spec.equal_ranks else ""),
        )
    if recipe.fold and not recipe.allow_other_model:
        refuse_other_bases([(f"models[{i}]", a, base_ref) for i, a in enumerate(adapters)], where)
    return adapters


# ------------------------------------------------------------------------------------------------ planning
def adapter_plan(
    recipe: Recipe, spec: MethodSpec, params: dict[str, Any], out: Path | None, force: bool
) -> AdapterPlan:
    """The plan of an adapter-space merge (:func:`.plan.build_plan` for a method with ``space="adapter"``)."""
    where = recipe.source or "recipe"
    base_ref = _refuse_weight_options(recipe, spec, where)
    check_paths(recipe, out, force, [])
    base = CheckpointReader(base_ref)
    adapters = _open_adapters(recipe, spec, base, base_ref, where)
    names = base.names()
    layout = layouts.detect_layout(base.config, names, None if recipe.layout == "auto" else recipe.layout)
    params = bind_params(params, layout, names, where)
    check_part_weights(spec, params, list(adapters[0].loras()), where)
    rank_of = _output_ranks(spec, params, adapters, base, where)
    cfg = output_config(adapters, list(rank_of.values()))
    first = adapters[0].loras()
    cfg["rank_pattern"] = {first[n].module: r for n, r in rank_of.items() if r != cfg["r"]}
    order = {n: i for i, n in enumerate(names)}
    modules = [
        AdapterModule(
            n,
            first[n].module,
            tuple(base.info(n).shape),
            tuple(a.loras()[n].A.shape[0] for a in adapters),
            rank_of[n],
            peft_scale(cfg, rank_of[n]),
        )
        for n in sorted(first, key=order.__getitem__)
    ]
    replaced: dict[str, tuple[str, str, torch.dtype]] = {}
    for a in adapters:
        for n, (key, src, dt) in a.replacements().items():
            replaced.setdefault(n, (key, src, DTYPES.get(recipe.dtype, dt)))
    factor_dtype = DTYPES.get(recipe.dtype) or next(iter(first.values())).A.dtype
    jobs = (
        _folded_jobs(recipe, base, layout, modules, replaced)
        if recipe.fold
        else _adapter_jobs(base, layout, modules, replaced, order, factor_dtype)
    )
    return AdapterPlan(
        recipe,
        spec,
        params,
        base,
        adapters,
        {},
        layout,
        jobs,
        out,
        force,
        modules=modules,
        replaced=replaced,
        config=cfg,
        factor_dtype=factor_dtype,
    )


def _output_ranks(
    spec: MethodSpec, params: dict[str, Any], adapters: list[LoraAdapter], base: CheckpointReader, where: str
) -> dict[str, int]:
    """Base weight -> the merged module's rank, refused where it does not fit the weight."""
    first = adapters[0].loras()
    rank_of = {
        name: spec.out_rank(
            [a.loras()[name].A.shape[0] for a in adapters],
            {k.rstrip("_"): v for k, v in tensor_params(params, name).items()},
        )
        for name in first
    }
    too_big = [
        f"{first[n].module} {list(base.info(n).shape)}"
        for n, r in rank_of.items()
        if not 1 <= r <= min(base.info(n).shape)
    ]
    if too_big:
        raise ForgetlessError(
            f"output rank {sorted(set(rank_of.values()))} does not fit {len(too_big)} module(s), "
            f"e.g. {too_big[0]}",
            file=where,
            remedy="set parameters.rank between 1 and the smaller side of every adapted weight",
        )
    return rank_of


def output_config(adapters: list[LoraAdapter], ranks: list[int]) -> dict[str, Any]:
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


def peft_scale(cfg: dict[str, Any], rank: int) -> float:
    """PEFT's scale of a module of `rank`: alpha / r, or alpha / √r with rsLoRA."""
    alpha = float(cfg["lora_alpha"])
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _folded_jobs(
    recipe: Recipe,
    base: CheckpointReader,
    layout: layouts.Layout,
    modules: list[AdapterModule],
    replaced: dict[str, Any],
) -> list[Job]:
    """``fold``: every tensor of the base — adapted ones merged, full ones the adapters carry replaced."""
    adapted = {m.name for m in modules}
    jobs = []
    for n in base.names():
        info = base.info(n)
        dt = (
            info.dtype if recipe.dtype == "base" or not info.dtype.is_floating_point else DTYPES[recipe.dtype]
        )
        route = (
            Route.METHOD
            if n in adapted
            else Route.NON_LORA
            if n in replaced
            else Route.BASE
            if info.dtype.is_floating_point
            else Route.NON_FLOAT
        )
        jobs.append(Job(n, route, layouts.part_of(layout, n), info.shape, info.dtype, dt))
    return jobs


def _adapter_jobs(
    base: CheckpointReader,
    layout: layouts.Layout,
    modules: list[AdapterModule],
    replaced: dict[str, tuple[str, str, torch.dtype]],
    order: dict[str, int],
    factor_dtype: torch.dtype,
) -> list[Job]:
    """An adapter folder: every module's lora_A and lora_B, then the full tensors of adapter_model.safetensors
    (those from non_lora_trainables.bin are written back to that file beside it, not planned here)."""
    jobs = []
    for m in modules:
        part = layouts.part_of(layout, m.name)
        for kind, shape in (("lora_A", (m.rank, m.shape[1])), ("lora_B", (m.shape[0], m.rank))):
            jobs.append(
                Job(
                    f"{PEFT_PREFIX}{m.module}.{kind}.weight",
                    Route.METHOD,
                    part,
                    shape,
                    factor_dtype,
                    factor_dtype,
                )
            )
    for n, (key, src, dt) in sorted(replaced.items(), key=lambda kv: order[kv[0]]):
        if src == ADAPTER_SAFE:
            jobs.append(
                Job(key, Route.NON_LORA, layouts.part_of(layout, n), tuple(base.info(n).shape), dt, dt)
            )
    return jobs


# ------------------------------------------------------------------------------------------------ execution
class AdapterRunner:
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
        kwargs = tensor_params(self.kwargs, m.name)
        if "name" in p.spec.context:
            kwargs["name"] = m.name
        if "generator" in p.spec.context:
            kwargs["generator"] = tensor_generators(p.recipe.seed, m.name, 1)[0]
        A, B = p.spec.fn(pairs, **kwargs)
        if tuple(A.shape) != (m.rank, m.shape[1]) or tuple(B.shape) != (m.shape[0], m.rank):
            raise AssertionError(
                f"method {p.spec.name} returned factors {tuple(A.shape)}, {tuple(B.shape)} for "
                f"{m.name}; planned rank {m.rank}"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ForgetlessError(
                f"method {p.spec.name!r} produced NaN or Inf",
                tensor=m.name,
                remedy="check the adapters' factors of this module for NaN/Inf",
            )
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


def execute_adapter(plan: AdapterPlan, *, progress: bool, log: Callable[[str], None] | None) -> MergeReport:
    """Write an adapter-space merge: the full model (``fold``) or a PEFT adapter folder."""
    started = time.perf_counter()
    r = plan.recipe
    entries = plan.entries()
    shard = parse_size(r.shard_size) if r.fold else sum(e.nbytes for e in entries) + 1
    writer = StreamingWriter(
        plan.out,
        entries,
        shard_size=shard,
        force=plan.force,
        metadata=writer_metadata(plan),
        single_name=SAFE_SINGLE if r.fold else ADAPTER_SAFE,
    )

    def write() -> Written:
        runner = AdapterRunner(plan)
        with Progress(plan, progress) as bar:
            return (_write_folded if r.fold else _write_adapter)(plan, runner, writer, bar)

    return commit_or_abort(plan, writer, write, started=started, log=log)


def _write_folded(
    plan: AdapterPlan, runner: AdapterRunner, writer: StreamingWriter, bar: Progress
) -> Written:
    """Every tensor of the base, each adapted weight with the merged update added (W + scale · B @ A)."""
    by_name = {m.name: m for m in plan.modules}
    for job in plan.jobs:
        if job.route == Route.METHOD:
            A, B = runner.pair(by_name[job.name])
            w = runner.full(job.name) if job.name in plan.replaced else plan.base.get(job.name).float()
            out = w.addmm_(B, A, alpha=by_name[job.name].scale).to(job.out_dtype)
        elif job.name in plan.replaced:
            out = runner.full(job.name).to(job.out_dtype)
        elif copyable(plan.base, job.name, job):
            out = plan.base.raw(job.name)
        else:
            out = plan.base.get(job.name).to(job.out_dtype)
        writer.write(job.name, out)
        bar.update(job)
    return Written({"README.md": model_card(plan)}, side_dir(plan.recipe.base), config_updates(plan), {})


def _write_adapter(
    plan: AdapterPlan, runner: AdapterRunner, writer: StreamingWriter, bar: Progress
) -> Written:
    """A PEFT adapter folder: the merged factors, the full tensors, adapter_config.json."""
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
    files = {"README.md": model_card(plan), ADAPTER_CONFIG: json.dumps(plan.config, indent=2) + "\n"}
    return Written(files, None, None, {})
