"""``forgetless learn``: a merge's coefficient learned on data, one per group of tensors, instead of one global value.

The merged weights are a differentiable function of one coefficient per group over the frozen base θ₀ and the
fine-tuned update: θ_t = θ₀_t + c_g·Δ_t for ``linear`` (WiSE-FT, Δ = θ̄ − θ₀) and ``task_arithmetic``
(Δ = Σₖ wₖτₖ), each c_g in [0, 1]; θ_t = θ₀_t + m(α_g)⊙Δ_t for ``cgm``, m = F_task / (F_task + α·F_gen + ε) as
:func:`~forgetless.methods.cgm.cgm_mix_ratio` computes it, α_g = exp(log α_g). Only the tensors the merge changes
are reparametrised (the engine's plan says which: its ``method`` route); the coefficients are the only trainable
parameters, moved by Adam (projected back onto the method's range after each step).

Groups (``by``): ``part`` — each part of the layout (language.embed, language.layers, projector, vision, lm_head…),
tensors of no part in the default group; ``layer`` — each decoder layer, and the other parts as with ``part``.

Objectives, on the validation splits (default split ``val``):

- ``labels``: the mean answer NLL of the task items + ``general_weight`` × that of the general items;
- ``entropy`` (label-free, AdaMerging-style): the mean entropy of the merged model's prediction on the task items +
  ``general_weight`` × the mean KL(base ‖ merged) of the same predictions on the general items. A prediction is
  the softmax over a multiple-choice item's options' answer log-likelihoods (as the harness scores options), or
  the next-token distribution at an open item's first answer position. No answer is read.

The result is a recipe ``forgetless merge`` re-runs (the method's parameter as a list of ``{scope, value}``, the
default last) and a JSON record beside it (the objective per step, the coefficients by group, the data's
fingerprints, the options).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ForgetlessError
from .harness import TaskSpec, resolve_task

METHODS = {"linear": "lambda", "task_arithmetic": "lambda", "cgm": "alpha"}  # method → the parameter learned
OBJECTIVES = ("labels", "entropy")
GROUPINGS = ("part", "layer")
CLAMP = (0.0, 1.0)  # λ of linear and task_arithmetic
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# groups


@dataclass(frozen=True)
class Group:
    """Tensors (checkpoint names) sharing one coefficient; ``scope`` the selector that names them in the recipe
    (``None``: the default entry)."""

    scope: str | None
    names: tuple[str, ...]


def make_groups(layout: Any, names: Sequence[str], by: str) -> list[Group]:
    """The groups of ``names`` (the merged tensors), in layout order, the default group (tensors of no part)
    last."""
    from ..checkpoint import layout as layouts

    keyed: dict[str | None, list[str]] = {}
    for n in names:
        part = layouts.part_of(layout, n)
        layer = layouts.layer_of(layout, n) if by == "layer" else None
        key = None if part == layouts.OTHER else part if layer is None else f"{part}[{layer}]"
        keyed.setdefault(key, []).append(n)

    def order(key: str | None) -> tuple:
        if key is None:
            return (len(layout.parts), 0)
        part, _, layer = key.partition("[")
        return (list(layout.parts).index(part), int(layer.rstrip("]") or -1))

    return [Group(k, tuple(keyed[k])) for k in sorted(keyed, key=order)]


def start_values(
    value: Any, groups: Sequence[Group], layout: Any, names: Sequence[str], where: str
) -> list[float]:
    """Each group's starting coefficient: the recipe's one value, or (a list of ``{scope, value}``, first match
    wins) the entry that selects the group's first tensor."""
    from ..checkpoint import layout as layouts

    if not isinstance(value, list):
        return [float(value)] * len(groups)
    chosen = [
        (
            None if e.get("scope") is None else layouts.select(layout, names, [e["scope"]], file=where),
            e["value"],
        )
        for e in value
    ]
    out = []
    for g in groups:
        hit = next((v for sel, v in chosen if sel is None or g.names[0] in sel), None)
        if hit is None:
            raise ForgetlessError(
                f"parameters: no entry covers {g.names[0]}",
                file=where,
                remedy="end the list with a {value: …}",
            )
        out.append(float(hit))
    return out


def default_entry(value: Any, where: str) -> Any:
    """The value of the default entry (the one without a scope) of a list, or the one value."""
    if not isinstance(value, list):
        return value
    found = [e.get("value") for e in value if isinstance(e, dict) and e.get("scope") is None]
    if not found:
        raise ForgetlessError(
            "parameters: the list has no default entry", file=where, remedy="end the list with a {value: …}"
        )
    return found[0]


def recipe_entries(groups: Sequence[Group], values: Sequence[float], default: float) -> list[dict[str, Any]]:
    """The recipe's list: one ``{scope, value}`` per group, then the default ``{value}`` (the default group's
    value where there is one, else ``default``)."""
    entries = [{"scope": g.scope, "value": float(v)} for g, v in zip(groups, values) if g.scope is not None]
    rest = [float(v) for g, v in zip(groups, values) if g.scope is None]
    return [*entries, {"value": rest[0] if rest else float(default)}]


# ----------------------------------------------------------------------------------------------------------------
# the merged weights as a function of the coefficients


@dataclass
class _Tensor:
    """One reparametrised tensor: its parameter's module name, θ₀, the end point (θ at c = 1; CGM: θ_ft), its
    group, and CGM's Fishers."""

    name: str
    param: str
    theta0: Tensor
    end: Tensor
    group: int
    f_task: Tensor | None = None
    f_gen: Tensor | None = None


class MergedWeights:
    """θ(c) for the tensors the merge changes, over a model that holds θ₀ (and θ_ft where the scope says so)."""

    def __init__(self, plan: Any, model: nn.Module, groups: Sequence[Group], dtype: torch.dtype, device: Any):
        from ..engine.plan import Route
        from ..train.targets import stored_names

        self.method = plan.spec.name
        self.epsilon = float(plan.params.get("epsilon", 0.0))
        jobs = {j.name: j for j in plan.jobs}
        first: dict[str, str] = {}
        for pname, saved in stored_names(model, set(jobs)).items():
            first.setdefault(saved, pname)
        named = dict(model.named_parameters(remove_duplicate=False))
        group_of = {n: i for i, g in enumerate(groups) for n in g.names}
        self.tensors: list[_Tensor] = []
        for name, job in jobs.items():
            if job.route == Route.FINETUNED and name in first:
                named[first[name]].data.copy_(plan.models[0].get(name))
            if job.route != Route.METHOD or name not in first:
                continue
            theta0 = plan.base.get(name).to(device, dtype)
            end = self._end(plan, name, theta0, dtype, device)
            if torch.equal(end, theta0):
                continue  # θ = θ₀ at every coefficient
            t = _Tensor(name, first[name], theta0, end, group_of[name])
            if self.method == "cgm":
                t.f_task = plan.stats["fisher_task"].get(name).to(device, dtype)
                t.f_gen = plan.stats["fisher_general"].get(name).to(device, dtype)
            self.tensors.append(t)

    def _end(self, plan: Any, name: str, theta0: Tensor, dtype: torch.dtype, device: Any) -> Tensor:
        """θ at c = 1: θ_ft (one model; CGM's θ_ft), θ̄ (linear), θ₀ + Σₖ wₖτₖ (task arithmetic)."""
        thetas = [m.get(name).to(device, dtype) for m in plan.models]
        weights = plan.params.get("weight", [1.0] * len(thetas))
        if self.method == "linear" and len(thetas) > 1:
            total = float(sum(weights))
            return sum(w / total * t for w, t in zip(weights, thetas))
        if self.method == "task_arithmetic":
            return theta0 + sum(w * (t - theta0) for w, t in zip(weights, thetas))
        return thetas[0]

    def values(self, raw: Tensor) -> Tensor:
        """The method's coefficients (λ; CGM: α = exp(log α)) from the trained ones."""
        return raw.exp() if self.method == "cgm" else raw

    def mix(self, t: _Tensor, c: Tensor) -> Tensor:
        """The entries' interpolation weights between θ₀ and the end point: c (λ), or CGM's m(α)."""
        if self.method != "cgm":
            return c
        den = t.f_task.clamp(min=0) + c * t.f_gen.clamp(min=0) + self.epsilon
        return torch.where(den == 0, 0.0, t.f_task.clamp(min=0) / torch.where(den == 0, 1.0, den))

    def weights(self, raw: Tensor) -> dict[str, Tensor]:
        """Parameter module name → θ(c) (differentiable in ``raw``)."""
        c = self.values(raw)
        return {t.param: t.theta0.lerp(t.end, self.mix(t, c[t.group])) for t in self.tensors}

    def by_checkpoint_name(self, values: Sequence[float]) -> dict[str, Tensor]:
        """Checkpoint name → θ at the method's coefficients ``values`` (one per group)."""
        c = torch.tensor(list(values), dtype=torch.float64)
        raw = c.log() if self.method == "cgm" else c
        with torch.no_grad():
            w = self.weights(raw.to(self.tensors[0].theta0) if self.tensors else raw)
        return {t.name: w[t.param] for t in self.tensors}


# ----------------------------------------------------------------------------------------------------------------
# data and objectives


@dataclass
class Item:
    """One encoded item: ``rows`` — the labelled encoding (labels), each option's encoding labelled on its answer
    tokens (entropy, multiple choice), or the prompt (entropy, open answer); ``counts``: each option's answer
    tokens."""

    rows: list[dict[str, Tensor]]
    counts: list[int] | None = None
    options: Any = None  # multiple choice (entropy): the harness's encoding, the prompt once and each option


def encode_items(encoder: Any, samples: Sequence[Any], objective: str) -> list[Item]:
    """Every sample encoded for the objective; ``entropy`` reads the questions and options only."""
    from .harness import _encode, _encode_options, encode_prompt

    out = []
    for s in samples:
        if objective == "labels":
            out.append(Item([_encode(encoder, s)]))
        elif s.options:
            mc = _encode_options(encoder, s, tail=False)
            out.append(Item(mc.full, [len(a) for a in mc.answers], mc))
        else:
            out.append(Item([encode_prompt(encoder, s)]))
    return out


def _batch(rows: list[dict[str, Tensor]], pad: int, device: Any) -> dict[str, Tensor]:
    from ..stats.data import collate

    b = collate(rows, pad)
    b.pop("sample_index")
    return {k: v.to(device) for k, v in b.items()}


def answer_nll(model: nn.Module, items: Sequence[Item], pad: int, device: Any) -> Tensor:
    """Each item's mean answer NLL (:func:`~forgetless.train.loop.answer_losses`)."""
    from ..train.loop import answer_losses

    return answer_losses(model, _batch([it.rows[0] for it in items], pad, device))


def option_logliks(model: nn.Module, items: Sequence[Item], pad: int, device: Any) -> Tensor:
    """Each option's summed answer log-likelihood (the items' options in order): the harness's fast path where the
    model allows it (each prompt runs once, its keys and values reused by every option), else each (question,
    option) sequence whole."""
    from ..train.loop import answer_losses
    from .harness import _fast_parts, option_sums

    parts = _fast_parts(model)
    if parts is not None:
        return option_sums([it.options for it in items], pad, parts)[0]
    rows = [r for it in items for r in it.rows]
    counts = torch.tensor([n for it in items for n in it.counts], device=device)
    return -answer_losses(model, _batch(rows, pad, device)) * counts


def predictions(model: nn.Module, items: Sequence[Item], pad: int, device: Any) -> list[Tensor]:
    """Each item's log-distribution: over its options (softmax of the options' summed answer log-likelihoods), or
    over the vocabulary at the first answer position."""
    mc = [it for it in items if it.counts is not None]
    out: dict[int, Tensor] = {}
    if mc:
        loglik = option_logliks(model, mc, pad, device)
        k0 = 0
        for it in mc:
            out[id(it)] = torch.log_softmax(loglik[k0 : k0 + len(it.counts)], -1)
            k0 += len(it.counts)
    free = [it for it in items if it.counts is None]
    if free:
        batch = _batch([it.rows[0] for it in free], pad, device)
        hidden = model.base_model(**batch, use_cache=False).last_hidden_state
        last = batch["attention_mask"].sum(1) - 1  # right-padded: each row's last prompt position
        h = hidden[torch.arange(len(free), device=device), last]
        logp = torch.log_softmax(model.get_output_embeddings()(h).float(), -1)
        for it, lp in zip(free, logp):
            out[id(it)] = lp
    return [out[id(it)] for it in items]


def entropy(logp: Tensor) -> Tensor:
    return -(logp.exp() * logp).sum()


def kl(logp_ref: Tensor, logp: Tensor) -> Tensor:
    """KL(ref ‖ p)."""
    return (logp_ref.exp() * (logp_ref - logp)).sum()


@dataclass
class Objective:
    """The objective on given task and general items (module docstring); ``reference``: the base's log-
    distributions of the general items (entropy mode), by index."""

    objective: str
    task: list[Item]
    general: list[Item]
    general_weight: float
    pad: int
    device: Any
    reference: list[Tensor] | None = None

    def set_reference(self, model: nn.Module, batch_size: int) -> None:
        with torch.no_grad():
            ref: list[Tensor] = []
            for i in range(0, len(self.general), batch_size):
                ref += predictions(model, self.general[i : i + batch_size], self.pad, self.device)
        self.reference = [r.detach() for r in ref]

    def parts(
        self, model: nn.Module, task_idx: Sequence[int], general_idx: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """(task term, general term) on the items of the given indices."""
        zero = torch.zeros((), device=self.device)
        task = [self.task[i] for i in task_idx]
        general = [self.general[i] for i in general_idx]
        if self.objective == "labels":
            t = answer_nll(model, task, self.pad, self.device).mean() if task else zero
            g = answer_nll(model, general, self.pad, self.device).mean() if general else zero
            return t, g
        t = torch.stack([entropy(lp) for lp in predictions(model, task, self.pad, self.device)]).mean()
        if not general or self.general_weight == 0:
            return t, zero
        assert self.reference is not None
        got = predictions(model, general, self.pad, self.device)
        return t, torch.stack([kl(self.reference[i], lp) for i, lp in zip(general_idx, got)]).mean()

    def value(self, model: nn.Module, task_idx: Sequence[int], general_idx: Sequence[int]) -> Tensor:
        t, g = self.parts(model, task_idx, general_idx)
        return t + self.general_weight * g


class _Call(nn.Module):
    """``fn(model, *args)`` as a module's forward, so that ``functional_call`` swaps the model's weights."""

    def __init__(self, model: nn.Module, fn: Callable[..., Tensor]):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args: Any) -> Tensor:
        return self.fn(self.model, *args)


# ----------------------------------------------------------------------------------------------------------------
# the learner


@dataclass(frozen=True)
class LearnOptions:
    """How the coefficients are learned (module docstring)."""

    objective: str = "labels"
    by: str = "part"
    steps: int = 40
    lr: float = 0.05
    general_weight: float = 1.0
    batch_size: int = 8
    seed: int = 0
    split: str = "val"
    limit: int | None = None
    task_root: str | None = None
    dtype: str = "float32"
    device: str = "auto"

    def check(self) -> None:
        def bad(what: str, remedy: str) -> ForgetlessError:
            return ForgetlessError(what, remedy=remedy)

        if self.objective not in OBJECTIVES:
            raise bad(f"unknown objective {self.objective!r}", f"use one of {', '.join(OBJECTIVES)}")
        if self.by not in GROUPINGS:
            raise bad(f"unknown group kind {self.by!r}", f"use one of {', '.join(GROUPINGS)}")
        if self.dtype not in DTYPES:
            raise bad(f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if self.steps < 1 or self.batch_size < 1:
            raise bad("--steps and --batch-size must be ≥ 1", "pass positive numbers")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad(f"--lr must be a positive number, got {self.lr}", "e.g. --lr 0.05")
        if not (self.general_weight >= 0 and math.isfinite(self.general_weight)):
            raise bad(f"--general-weight must be ≥ 0, got {self.general_weight}", "e.g. --general-weight 1")


def task_specs(tasks: Any, split: str, task_root: str | None) -> dict[str, TaskSpec]:
    """Tasks given as comma-separated names/paths, a list of them, or a mapping name → spec."""
    if tasks is None:
        return {}
    if isinstance(tasks, (str, Path)):
        tasks = [s.strip() for s in str(tasks).split(",") if s.strip()]
    if isinstance(tasks, Mapping):
        found = [
            (t if isinstance(t, TaskSpec) else resolve_task(t, split=split, task_root=task_root))
            for t in tasks.values()
        ]
        return {name: TaskSpec(name, s.path, s.kind, s.metric) for name, s in zip(tasks, found)}
    found = [resolve_task(t, split=split, task_root=task_root) for t in tasks]
    return {s.name: s for s in found}


def _load(specs: dict[str, TaskSpec], limit: int | None, role: str) -> dict[str, list[Any]]:
    from .harness import _load_task

    out = {}
    for name, spec in specs.items():
        samples = _load_task(spec, limit)
        if not samples:
            raise ForgetlessError(
                f"{role} task {name!r} has no items", file=spec.path, remedy="give it items"
            )
        out[name] = samples
    return out


def fingerprint(samples: Sequence[Any], objective: str) -> str:
    """16 hex digits over what the objective reads of each item: the question turns, options and image name
    (``labels``: the answers too)."""
    h = hashlib.sha256()
    for s in samples:
        turns = list(s.turns)
        while objective == "entropy" and turns and turns[-1][0] == "assistant":
            turns.pop()
        what = [turns, s.options, None if s.image is None else Path(s.image).name]
        h.update(json.dumps(what, ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def _read_recipe(recipe: Any) -> tuple[dict[str, Any], str]:
    """The recipe as a dict (validated) and where it came from."""
    from ..recipe import load_recipe

    r = load_recipe(copy.deepcopy(recipe) if isinstance(recipe, dict) else recipe)
    where = r.source or "recipe"
    if r.method not in METHODS:
        raise ForgetlessError(
            f"method {r.method!r}: learn takes a linear, task_arithmetic or cgm recipe",
            file=where,
            remedy="give a recipe of one of those methods; its parameters are the starting point",
        )
    return r.model_dump(exclude_none=True, exclude_defaults=True, exclude={"source", "out"}), where


class Learner:
    """The merge of a recipe as a function of one coefficient per group, and the objective on the data."""

    def __init__(self, recipe: Any, tasks: Any, general: Any = None, options: LearnOptions | None = None):
        from ..engine.plan import Route, build_plan
        from ..stats.data import Encoder
        from ..stats.run import load_model, resolve_device

        o = self.options = options or LearnOptions()
        o.check()
        self.recipe, self.where = _read_recipe(recipe)
        self.param = METHODS[self.recipe["method"]]
        tspecs = task_specs(tasks, o.split, o.task_root)
        gspecs = task_specs(general, o.split, o.task_root)
        if not tspecs:
            raise ForgetlessError("no task data", file=self.where, remedy="pass --task with the task's data")
        if not gspecs and o.general_weight > 0:
            raise ForgetlessError(
                "no general data", file=self.where, remedy="pass --general, or --general-weight 0"
            )
        self.task_samples = _load(tspecs, o.limit, "task")
        self.general_samples = _load(gspecs, o.limit, "general")
        self.specs = {**tspecs, **gspecs}
        given = self.recipe.get("parameters", {}).get(self.param, self.plan_default())
        self.default = float(default_entry(given, self.where))
        planned = copy.deepcopy(self.recipe)
        planned.setdefault("parameters", {})[self.param] = (
            self.default
        )  # a learned recipe: planned at its default
        self.plan = build_plan(planned)
        merged = [j.name for j in self.plan.jobs if j.route == Route.METHOD]
        if not merged:
            raise ForgetlessError("the recipe merges no tensor", file=self.where, remedy="widen its scope")
        self.groups = make_groups(self.plan.layout, merged, o.by)
        self.start = start_values(given, self.groups, self.plan.layout, self.plan.base.names(), self.where)
        self.device = torch.device(resolve_device(o.device))
        self.dtype = DTYPES[o.dtype]
        load_dtype = o.dtype if o.dtype != "float64" else "float32"
        self.model, _ = load_model(Path(self.plan.recipe.base), str(self.device), load_dtype)
        self.model.to(self.dtype).requires_grad_(False)
        self.merged = MergedWeights(self.plan, self.model, self.groups, self.dtype, self.device)
        encoder = Encoder(Path(self.plan.recipe.base))
        flat_task = [s for v in self.task_samples.values() for s in v]
        flat_general = [s for v in self.general_samples.values() for s in v]
        self.objective = Objective(
            o.objective,
            encode_items(encoder, flat_task, o.objective),
            encode_items(encoder, flat_general, o.objective),
            o.general_weight,
            encoder.pad_token_id,
            self.device,
        )
        if o.objective == "entropy" and self.objective.general and o.general_weight > 0:
            self.objective.set_reference(self.model, o.batch_size)  # the base: θ₀ (the model as loaded)
        self._call = _Call(self.model, self.objective.value)

    def plan_default(self) -> Any:
        from ..methods.registry import METHODS as REGISTERED

        return REGISTERED[self.recipe["method"]].params[self.param]

    def raw_start(self) -> Tensor:
        c = torch.tensor(self.start, dtype=self.dtype, device=self.device)
        if self.merged.method == "cgm":
            return c.clamp_min(torch.finfo(self.dtype).tiny).log()
        return c.clamp(*CLAMP)

    def value(self, raw: Tensor, task_idx: Sequence[int], general_idx: Sequence[int]) -> Tensor:
        """The objective at the trained coefficients ``raw`` on the given items (differentiable in ``raw``)."""
        from torch.func import functional_call

        weights = {f"model.{k}": v for k, v in self.merged.weights(raw).items()}
        return functional_call(self._call, weights, (task_idx, general_idx))

    def clamp_(self, raw: Tensor) -> None:
        if self.merged.method != "cgm":
            with torch.no_grad():
                raw.clamp_(*CLAMP)


def _draws(n: int, size: int, seed: int) -> Callable[[], list[int]]:
    """Indices of the next mini-batch: all items when ``size`` ≥ n, else seeded permutations in turn."""
    if size >= n:
        return lambda: list(range(n))
    gen = torch.Generator().manual_seed(seed)
    queue: list[int] = []

    def nxt() -> list[int]:
        while len(queue) < size:
            queue.extend(torch.randperm(n, generator=gen).tolist())
        out = queue[:size]
        del queue[:size]
        return out

    return nxt


def fit(learner: Learner, log: Callable[[str], None] | None = print) -> list[dict[str, float]]:
    """Adam on the coefficients for the options' steps (projected onto the method's range after each); the
    objective per step (at the coefficients before it) and the coefficients' range after it. Sets
    ``learner.final`` (the method's values, one per group)."""
    o, say = learner.options, log or (lambda _s: None)
    raw = learner.raw_start().requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=o.lr)
    task_draw = _draws(len(learner.objective.task), o.batch_size, o.seed)
    general_draw = _draws(len(learner.objective.general), o.batch_size, o.seed + 1)
    say(
        f"learning {learner.param} of {learner.recipe['method']} for {len(learner.groups)} group(s) by {o.by} "
        f"({o.objective}, {o.steps} steps, {learner.device})"
    )
    history = []
    for step in range(1, o.steps + 1):
        opt.zero_grad()
        value = learner.value(raw, task_draw(), general_draw() if learner.objective.general else [])
        value.backward()
        value = value.detach()
        opt.step()
        learner.clamp_(raw)
        c = learner.merged.values(raw.detach())
        lo, hi = float(c.min()), float(c.max())
        history.append({"step": step, "objective": float(value), "min": lo, "max": hi})
        say(f"step {step}/{o.steps}: objective {float(value):.4f} · {learner.param} {lo:.3f}–{hi:.3f}")
    learner.final = [float(v) for v in learner.merged.values(raw.detach()).double()]
    return history


def learn(
    recipe: Any,
    *,
    task: Any,
    general: Any = None,
    out: str | Path,
    options: LearnOptions | None = None,
    held_out: str | None = None,
    workdir: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    **fields: Any,
) -> dict[str, Any]:
    """Learn the recipe's coefficients (module docstring) and write the learned recipe to ``out`` (YAML) and its
    record beside it (``.json``); returns the record. ``options`` (:class:`LearnOptions`) or its fields as
    keywords (``objective="entropy", by="layer", steps=40``). ``held_out`` (a split, e.g. "test"): the learned
    recipe merged in ``workdir`` and evaluated there with the base and the fine-tuned model, as ``sweep`` does."""
    import dataclasses

    o = dataclasses.replace(options or LearnOptions(), **fields)
    t0 = time.perf_counter()
    check_outputs(out, [None if isinstance(recipe, dict) else recipe])
    learner = Learner(recipe, task, general, o)
    check_outputs(out, [s.path for s in learner.specs.values()])  # before the coefficients are trained
    if held_out and len(learner.recipe["models"]) != 1:
        raise ForgetlessError(
            "--held-out compares the learned merge with one fine-tuned model",
            file=learner.where,
            remedy="give one",
        )
    history = fit(learner, log)
    record = _record(learner, history, out, time.perf_counter() - t0)
    write_learned(learner, out, record)
    if held_out:
        record["held_out"] = _held_out(
            learner, held_out, Path(workdir or Path(out).parent / "learn-work"), log
        )
        write_learned(learner, out, record)
    if log:
        log(f"wrote {out} and {Path(out).with_suffix('.json')}")
    return record


def _held_out(
    learner: Learner, split: str, workdir: Path, log: Callable[[str], None] | None
) -> dict[str, Any]:
    """The learned recipe merged and evaluated on ``split`` with the base and the fine-tuned model (sweep's
    report: scores with 95% intervals, and whether its default target holds there)."""
    from .harness import EvalOptions
    from .sweep import Rule, _Grid
    from .sweep import _held_out as report

    o = learner.options
    say = log or (lambda _s: None)
    specs = (
        {n: learner.specs[n] for n in learner.task_samples},
        {n: learner.specs[n] for n in learner.general_samples},
    )
    where = {
        "split": split,
        "tasks": task_specs({n: s.path.parent for n, s in specs[0].items()}, split, o.task_root),
        "general": task_specs({n: s.path.parent for n, s in specs[1].items()}, split, o.task_root),
    }
    options = EvalOptions(split=split, limit=o.limit, batch_size=o.batch_size, device=o.device)
    grid = _Grid(where["tasks"], where["general"], workdir, options, say, 0)
    rec = learned_recipe(learner)
    base, ft = Path(learner.plan.recipe.base), Path(learner.plan.recipe.models[0].model)
    return report(rec, base, ft, where, Rule(), workdir, grid.merged, grid.evaluate, say)


def _record(learner: Learner, history: list[dict], out: str | Path, seconds: float) -> dict[str, Any]:
    o = learner.options
    roles = {**{n: "task" for n in learner.task_samples}, **{n: "general" for n in learner.general_samples}}
    samples = {**learner.task_samples, **learner.general_samples}
    return {
        "recipe": learner.where,
        "method": learner.recipe["method"],
        "parameter": learner.param,
        "options": {
            k: getattr(o, k)
            for k in (
                "objective",
                "by",
                "steps",
                "lr",
                "general_weight",
                "batch_size",
                "seed",
                "split",
                "limit",
            )
        }
        | {"dtype": o.dtype},
        "groups": [
            {"scope": g.scope, "tensors": len(g.names), "changed": k, "start": s, "value": v}
            for g, k, s, v in zip(learner.groups, _changed(learner), learner.start, learner.final)
        ],
        "history": history,
        "data": {
            n: {
                "role": roles[n],
                "path": str(learner.specs[n].path),
                "n": len(s),
                "fingerprint": fingerprint(s, o.objective),
            }
            for n, s in samples.items()
        },
        "out": str(out),
        "seconds": round(seconds, 3),
    }


def _changed(learner: Learner) -> list[int]:
    """How many tensors of each group the merge changes (θ ≠ θ₀ at some value)."""
    counts = [0] * len(learner.groups)
    for t in learner.merged.tensors:
        counts[t.group] += 1
    return counts


def check_outputs(out: str | Path, inputs: Sequence[Any]) -> None:
    """Refuse a recipe ``out`` or its ``.json`` record that is, or lies in, one of `inputs` (an existing output
    is replaced, as before)."""
    from ..checkpoint.guard import check_output

    for target in (Path(out), Path(out).with_suffix(".json")):
        check_output(target, inputs, force=True)


def learned_recipe(learner: Learner) -> dict[str, Any]:
    """The input recipe with the learned coefficients as its parameter's list: an entry per group the merge
    changes (a group whose tensors the fine-tunes left as θ₀ is θ₀ at any value, and takes the default)."""
    kept = [i for i, k in enumerate(_changed(learner)) if k]
    rec = copy.deepcopy(learner.recipe)
    rec.setdefault("parameters", {})[learner.param] = recipe_entries(
        [learner.groups[i] for i in kept], [learner.final[i] for i in kept], learner.default
    )
    return rec


def write_learned(learner: Learner, out: str | Path, record: dict[str, Any]) -> None:
    """The learned recipe (YAML) at ``out`` and the record beside it (``.json``), each written atomically."""
    import yaml

    from ..checkpoint.writer import atomic_write
    from .report import write_json

    atomic_write(out, yaml.safe_dump(learned_recipe(learner), sort_keys=False))
    write_json(Path(out).with_suffix(".json"), record)
