"""Continual merging on the testbed — MAny's protocol in small: tasks arrive one after another, each brings a LoRA
adapter trained from the base on that task alone, and after every task one model must do all the tasks so far.

1. one LoRA adapter per task of :data:`SEQUENCE` with :data:`ADAPTER` (multitask's recipe, plus LoRA on the
   projector), cached by :func:`.experiment.finetune_key`; and the joint adapter on all five training splits mixed
   (:data:`~.multitask.JOINT_STEPS_PER_TASK` steps per task) — the upper reference, scored after the last task;
2. after each task t, one model per method (:data:`METHODS`), built only from what the method may keep:

   * **sequential FT** — one adapter trained on task 1, then trained on (``init_adapter``) task 2, …: the
     forgetting reference, no merge at all;
   * **TA** — task arithmetic of the t adapters, λ chosen on the validation splits of tasks 1..t (:data:`TA_GRID`);
   * **TIES** — TIES of the t adapters at its paper's density 0.2, λ = 1 (as :mod:`.multitask`);
   * **RegMean** — classic batch RegMean (α = 0.9) of the t folded models, each with the Gram of its inputs
     taken at itself on its task's data: it needs every earlier model and Gram at every step;
   * **LPM** — :func:`forgetless.chains.continual.add_task` on one state folder (Grams at the base);
   * **LPM (diagonal)** — the same with ``approx="diagonal"``: the bounded-memory form, its accuracy cost;
   * **LPM + CPM** — LPM with a projector and a visual prototype per task, images routed (τ = 0.1);
   * **MagMax** — :func:`forgetless.chains.continual_merge.merge_step` (MagMax, λ = 0.5) on the sequential chain's
     models, as its paper (sequential fine-tuning): it keeps τ_max;
   * **OPCM** — the same with OPCM (α = 0.5) on each task's own model, as its paper (models fine-tuned apart and
     arriving one at a time): it keeps the running sum and the task-vector norms;

3. every model evaluated on the test splits of tasks 1..t (:data:`TASK_LIMIT` items each); after the last task
   also on the general tasks (G). The task's own adapter, folded alone, gives "just after learning" for the
   individual reference row.

``results.json`` keeps, per method, the accuracy matrix (row t: after task t) with each cell's per-item
correctness, from which :mod:`.report` bootstraps final average accuracy, average forgetting and G. Every cell is
a step (:class:`forgetless.chains.steps.Step`) recorded in ``cells/`` (its key: the method, its options, the
adapters so far, split and limit), so a rerun redoes only what changed; LPM's state folders step on only as far as
they have not (as MagMax's and OPCM's).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chains.steps import Step, fingerprint, read_record
from ..errors import ForgetlessError
from . import experiment as X
from . import multitask as MT
from .context import Context

# the task sequence: the five downstream tasks whose adapters learn (multitask.LEARNED; odd_colour does not)
SEQUENCE = ["digits", "spatial", "count_many", "tag", "largest_colour"]
# multitask's adapter recipe, with LoRA on the projector's two Linear layers too: MAny's setting trains the
# projector with each task, and CPM keeps one projector per task (without it, CPM would route between copies)
LORA = {**X.LORA, "targets": [*X.LORA["targets"], "projector"]}
ADAPTER = {**MT.ADAPTER, "train": ["language.layers", "projector"], "lora": LORA}
TASK_LIMIT = 300  # test items per task and cell: 15 cells per method (5 + 4 + … + 1); their cost: RESULTS.md
TA_GRID = [
    0.4,
    0.7,
    1.0,
]  # task arithmetic's λ, chosen after every task on the validation splits of tasks so far
# the Linear layers the adapters adapt (every one of the decoder layers and the projector's two): RegMean's scope
ADAPTED_SCOPE = ["language.layers", "projector"]
GRAM_SAMPLES = (
    64  # training samples per task for the Grams (LPM's at the base, RegMean's at each folded model)
)
METHODS = ["sequential FT", "TA", "TIES", "RegMean", "LPM", "LPM (diagonal)", "LPM + CPM", "MagMax", "OPCM"]
LPM_STATES = {"LPM": {}, "LPM (diagonal)": {"approx": "diagonal"}, "LPM + CPM": {"cpm": True}}
# the continual-merging baselines: (method of `forgetless continual merge`, the models it takes) — MagMax the
# sequential chain's (its paper fine-tunes each task from the previous model), OPCM each task's own (its paper
# merges models fine-tuned apart as they arrive); each at its default (MagMax λ = 0.5, OPCM α = 0.5)
MERGE_STATES = {"MagMax": ("magmax", "sequential"), "OPCM": ("opcm", "own")}
REGMEAN = {"alpha": 0.9}
TIES = {"density": 0.2, "lambda": 1.0}


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def _adapter_fp(adapter: Path) -> str:
    """The fingerprint an adapter was trained from (its fine-tune's step key): what identifies it in a cell's key."""
    record = read_record(adapter / X.FINETUNE_RECORD)
    if record is None:
        raise ForgetlessError(
            "no record of the fine-tune that made this adapter",
            file=adapter,
            remedy="remove the folder: the next run trains it again",
        )
    return record["key"]


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*.safetensors")) if p.is_dir() else p.stat().st_size


def run_continual(
    workdir: str | Path,
    *,
    sequence: list[str] | None = None,
    methods: list[str] | None = None,
    adapter_recipe: dict | None = None,
    tasks_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    task_limit: int | None = TASK_LIMIT,
    general_limits: dict[str, int] | None = None,
    gram_samples: int = GRAM_SAMPLES,
    ta_grid: list[float] | None = None,
    joint: bool = True,
    base: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The whole protocol (module docstring); writes and returns ``workdir/results.json``. Tasks are generated under
    `tasks_root` (default ``workdir/../tasks``) and evaluations cached under `cache_dir` (default
    ``workdir/../eval-cache``), shared with the other testbed experiments."""
    sequence = list(sequence or SEQUENCE)
    methods = list(METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(sequence) < 2:
        raise ForgetlessError(
            f"unknown methods {unknown}" if unknown else "a sequence needs two tasks or more",
            remedy=f"methods from {METHODS}; a sequence of testbed task names",
        )
    ctx = Context.open(
        workdir,
        sequence,
        timings=("finetune", "statistics", "evaluate"),
        base=base,
        tasks_root=tasks_root,
        cache_dir=cache_dir,
        log=log,
    )
    run = Continual(
        ctx,
        sequence,
        methods,
        {**ADAPTER, **(adapter_recipe or {})},
        task_limit,
        general_limits,
        gram_samples,
        list(ta_grid or TA_GRID),
    )
    joint_adapter = run.train_adapters(joint)
    for t in range(1, len(sequence) + 1):
        run.after_task(t)
    joint_row = run.joint_row(joint_adapter) if joint_adapter is not None else None
    base_r, _ = run.evaluate(ctx.base, sequence, general=True)
    results = ctx.write(run.results(base_r, joint_row, joint))
    shutil.rmtree(run.models / "current", ignore_errors=True)
    return results


@dataclass
class Continual:
    """The protocol between its steps: the options, the adapters trained (each task's own, the sequential chain),
    their folded models and Grams as far as made, and the cells of every method so far."""

    ctx: Context
    sequence: list[str]
    methods: list[str]
    recipe: dict
    task_limit: int | None
    general_limits: dict[str, int] | None
    gram_samples: int
    ta_grid: list[float]
    own: dict[str, Path] = field(default_factory=dict)
    chain: list[Path] = field(default_factory=list)
    folded: dict[str, Path] = field(default_factory=dict)
    grams: dict[str, Path] = field(default_factory=dict)
    cells: dict[str, list[dict]] = field(default_factory=dict)
    individual: list[dict] = field(default_factory=list)
    chosen_ta: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.cells = {m: [] for m in self.methods}

    @property
    def models(self) -> Path:
        return self.ctx.workdir / "models"

    @property
    def joint_steps(self) -> int:
        return MT.JOINT_STEPS_PER_TASK * len(self.sequence)

    def train(self, name: str) -> Path:
        return self.ctx.roots[name] / "train.jsonl"

    def evaluate(self, model: Path, names: list[str], split: str = "test", general: bool = False):
        lim = {n: self.task_limit for n in names} if self.task_limit else {}
        return self.ctx.evaluate(
            model, names, split=split, general=general, limit={**lim, **(self.general_limits or {})} or None
        )

    def train_adapters(self, joint: bool) -> Path | None:
        """Step 1: each task's own adapter, the sequential chain (each continuing the previous one) and, with
        `joint`, the joint adapter (returned)."""
        ctx, seq = self.ctx, self.sequence
        self.own = {n: ctx.finetuned(ctx.roots[n], ctx.workdir / "adapters" / n, self.recipe) for n in seq}
        self.chain = [self.own[seq[0]]]
        for t, name in enumerate(seq[1:], 2):
            self.chain.append(
                ctx.finetuned(
                    ctx.roots[name],
                    ctx.workdir / "sequential" / f"{t}-{name}",
                    {**self.recipe, "init_adapter": str(self.chain[-1])},
                )
            )
        if not joint:
            return None
        data = MT.joint_data(ctx.roots, seq, ctx.workdir / "joint-data")
        return ctx.finetuned(
            data, ctx.workdir / "adapters" / "joint", {**self.recipe, "steps": self.joint_steps}
        )

    def own_model(self, name: str) -> Path:
        """Task `name`'s own adapter folded into the base: the individual reference and RegMean's model; a step
        keyed by the adapter's fingerprint."""
        if name not in self.folded:
            out = self.models / f"own-{name}"

            def make() -> None:
                self.ctx.merged(X.fold_recipe(self.ctx.base, self.own[name]), out)

            Step(out / "adapter.hash", _adapter_fp(self.own[name])).run(make)
            self.folded[name] = out
        return self.folded[name]

    def own_gram(self, name: str) -> Path:
        """The Gram of RegMean's model of task `name`, taken at itself on its training data."""
        from ..chains import steps

        if name not in self.grams:
            with self.ctx.timed("statistics"):
                self.grams[name] = steps.statistics_step(
                    "gram",
                    self.own_model(name),
                    self.train(name),
                    self.ctx.workdir / "statistics" / f"regmean-gram-{name}.safetensors",
                    scope=ADAPTED_SCOPE,
                    n=self.gram_samples,
                    seed=0,
                    role=f"RegMean Gram ({name})",
                    log=self.ctx.log,
                    batch_size=8,
                    progress=False,
                )
        return self.grams[name]

    def after_task(self, t: int) -> None:
        """Steps 2–3 after task `t`: the individual reference's cell and every method's."""
        so_far = self.sequence[:t]
        fp = _adapter_fp(self.own[so_far[-1]])
        self.individual.append(
            self.cell(
                t, "own adapter", {"adapter": fp}, lambda out: self.own_model(so_far[-1]), names=so_far[-1:]
            )
        )
        for label in self.methods:
            self.cells[label].append(self.method_cell(t, label))

    def method_cell(self, t: int, label: str) -> dict:
        """Method `label`'s cell after task `t`, its model built from what the method may keep."""
        ctx, so_far = self.ctx, self.sequence[:t]
        adapters = [self.own[n] for n in so_far]
        fps = [_adapter_fp(a) for a in adapters]
        if label == "sequential FT":
            return self.cell(
                t,
                label,
                {"adapter": _adapter_fp(self.chain[t - 1])},
                lambda out: ctx.merged(X.fold_recipe(ctx.base, self.chain[t - 1]), out),
            )
        if label == "TA":
            lam = self.choose_ta(so_far)
            self.chosen_ta.append(lam)
            return self.cell(
                t,
                label,
                {"adapters": fps, "lambda": lam},
                lambda out: ctx.merged(
                    MT.adapters_recipe("lora_task_arithmetic", {"lambda": lam}, ctx.base, adapters), out
                ),
            )
        if label == "TIES":
            return self.cell(
                t,
                label,
                {"adapters": fps, **TIES},
                lambda out: ctx.merged(MT.adapters_recipe("lora_ties", TIES, ctx.base, adapters), out),
            )
        if label == "RegMean":
            models = [
                {"model": str(self.own_model(n)), "statistics": {"gram": str(self.own_gram(n))}}
                for n in so_far
            ]
            recipe = {
                "method": "regmean",
                "base": str(ctx.base),
                "parameters": dict(REGMEAN),
                "seed": 0,
                "models": models,
            }
            return self.cell(
                t,
                label,
                {"adapters": fps, **REGMEAN, "gram_samples": self.gram_samples},
                lambda out: ctx.merged(recipe, out),
            )
        from ..chains.continual import state_bytes

        if label in MERGE_STATES:
            method, source = MERGE_STATES[label]
            chain = [_adapter_fp(a) for a in self.chain[:t]] if source == "sequential" else fps
            state = ctx.workdir / "states" / f"{_slug(label)}-{fingerprint([self.recipe, method])[:8]}"
            return self.cell(
                t,
                label,
                {"adapters": chain, "method": method},
                lambda out: self.merge_state_step(t, out, state, label),
                measure=lambda: {"state_bytes": state_bytes(state)},
            )
        opts = LPM_STATES[label]
        state = (
            ctx.workdir
            / "states"
            / f"{_slug(label)}-{fingerprint([self.recipe, self.gram_samples, opts])[:8]}"
        )
        return self.cell(
            t,
            label,
            {"adapters": fps, "gram_samples": self.gram_samples, **opts},
            lambda out: self.lpm_step(so_far, out, state, opts),
            measure=lambda: {"state_bytes": state_bytes(state)},
        )

    def cell(
        self,
        t: int,
        label: str,
        extra: dict,
        build: Callable[[Path], Any],
        names: list[str] | None = None,
        measure: Callable[[], dict] | None = None,
    ) -> dict:
        """The row of (`label`, task `t`): a step keyed by the method, its options (`extra`), the tasks so far and
        the limits. Made by building the model (`build`), evaluating it on `names` (default: the tasks so far; the
        general tasks too after the last task) and adding `measure()` (what the build left behind, taken now)."""
        so_far = self.sequence[:t]
        names = names or so_far
        general = t == len(self.sequence) and names == so_far
        key = fingerprint(
            {
                "tasks": so_far,
                "limit": self.task_limit,
                "general": self.general_limits if general else None,
                "method": label,
                **extra,
                "names": names,
            }
        )

        def make() -> dict:
            out = self.models / "current"
            t0 = time.perf_counter()
            built = build(out)
            seconds = time.perf_counter() - t0
            model = built if isinstance(built, Path) else out
            r, _ = self.evaluate(model, names, general=general)
            row = {
                "method": label,
                "step": t,
                "merge_seconds": round(seconds, 2),
                **X.task_fields(r),
                **{k: r["scores"][k] for k in ("G_v", "G_t", "G")},
            }
            if label == "LPM + CPM" and general:
                row["routing"] = routing_accuracy(model, {n: self.ctx.roots[n] for n in self.sequence})
            row.update(measure() if measure is not None else {})
            if model == out:
                shutil.rmtree(out, ignore_errors=True)
            self.ctx.log(
                f"after task {t} ({so_far[-1]}), {label}: "
                + "  ".join(f"{n} {row['tasks'][n]:.1f}" for n in names)
                + (f"  G {row['G']:.1f}" if general else "")
                + f"  [{seconds:.0f} s to build]"
            )
            return row

        return Step(self.ctx.workdir / "cells" / f"{_slug(label)}-{t}.json", key).run(make)[0]

    def lpm_step(self, so_far: list[str], out: Path, state: Path, opts: dict) -> Path:
        """The LPM state stepped to the tasks so far (only the last task's step when it holds the ones before,
        else replayed from the first) and its model written to `out`."""
        from ..chains.continual import add_task, load_state

        paths = [str(self.own[n].resolve()) for n in so_far]
        have = [x["adapter"] for x in load_state(state)["tasks"]] if state.exists() else []
        todo = _todo(state, have, paths, out)
        for n in [so_far[i] for i in todo]:
            add_task(
                state,
                adapter=self.own[n],
                data=self.train(n),
                n=self.gram_samples,
                base=self.ctx.base,
                name=n,
                approx=opts.get("approx"),
                stats_dir=self.ctx.workdir / "statistics",
                cpm_n=self.gram_samples,
                cpm_data=self.train(n) if opts.get("cpm") else None,
                out=out if n == so_far[-1] else None,
                force=True,
                log=None,
            )
        return out

    def merge_state_step(self, t: int, out: Path, state: Path, label: str) -> Path:
        """MagMax's or OPCM's state (:data:`MERGE_STATES`) stepped to task `t` as :meth:`lpm_step` steps LPM's, each
        task named by its adapter's fingerprint (a retrained adapter is another history), and its model written
        to `out`. A sequential adapter is folded into a temporary model for its step."""
        from ..chains.continual_merge import load_merge_state, merge_step

        method, source = MERGE_STATES[label]
        adapters = self.chain[:t] if source == "sequential" else [self.own[n] for n in self.sequence[:t]]
        names = [f"{n}-{_adapter_fp(a)[:8]}" for n, a in zip(self.sequence, adapters)]
        have = [x["name"] for x in load_merge_state(state)["tasks"]] if state.exists() else []
        for i in _todo(state, have, names, out):
            model = self.models / "fold"
            if source == "own":
                model = self.own_model(self.sequence[i])
            else:
                self.ctx.merged(X.fold_recipe(self.ctx.base, adapters[i]), model)
            merge_step(
                state,
                model=model,
                method=method,
                base=self.ctx.base,
                out=out if i == t - 1 else None,
                name=names[i],
                force=True,
                log=None,
            )
        shutil.rmtree(self.models / "fold", ignore_errors=True)
        return out

    def choose_ta(self, so_far: list[str]) -> float:
        """Task arithmetic's λ after task t: the best mean validation accuracy over tasks 1..t (ties: the first)."""
        ctx = self.ctx
        adapters = [self.own[n] for n in so_far]
        best: tuple[float, float] | None = None
        out = self.models / "sweep"
        for lam in self.ta_grid:
            ctx.merged(MT.adapters_recipe("lora_task_arithmetic", {"lambda": lam}, ctx.base, adapters), out)
            r, _ = self.evaluate(out, so_far, "val")
            avg = 100 * sum(r["tasks"][n]["accuracy"] for n in so_far) / len(so_far)
            if best is None or avg > best[0]:
                best = (avg, lam)
        shutil.rmtree(out, ignore_errors=True)
        ctx.log(f"TA after {len(so_far)} tasks: λ = {best[1]:g} (validation {best[0]:.1f})")
        return best[1]

    def joint_row(self, adapter: Path) -> dict:
        """The joint adapter's row after the last task, a step keyed by its fingerprint, the tasks and limits."""
        key = fingerprint(
            {
                "joint": _adapter_fp(adapter),
                "tasks": self.sequence,
                "limit": self.task_limit,
                "general": self.general_limits,
            }
        )

        def make() -> dict:
            out = self.models / "current"
            self.ctx.merged(X.fold_recipe(self.ctx.base, adapter), out)
            r, _ = self.evaluate(out, self.sequence, general=True)
            shutil.rmtree(out, ignore_errors=True)
            return {
                "method": "joint LoRA",
                "step": len(self.sequence),
                **X.task_fields(r),
                **{k: r["scores"][k] for k in ("G_v", "G_t", "G")},
            }

        return Step(self.ctx.workdir / "cells" / "joint.json", key).run(make)[0]

    def kept_bytes(self) -> dict[str, int | None]:
        """What each method keeps between tasks to make its next model (after the last task)."""
        kept: dict[str, int | None] = {}
        for label in self.methods:
            if label == "sequential FT":
                kept[label] = _size(self.chain[-1])
            elif label in ("TA", "TIES"):
                kept[label] = sum(_size(self.own[n]) for n in self.sequence)
            elif label == "RegMean":
                kept[label] = sum(_size(self.own_model(n)) + _size(self.own_gram(n)) for n in self.sequence)
            else:
                kept[label] = self.cells[label][-1].get("state_bytes")
        return kept

    def results(self, base_r: dict, joint_row: dict | None, joint: bool) -> dict:
        return {
            "sequence": self.sequence,
            "methods": self.methods,
            "split": "test",
            "task_limit": self.task_limit,
            "general_limits": self.general_limits,
            "adapter": self.recipe,
            "gram_samples": self.gram_samples,
            "ta_grid": self.ta_grid,
            "joint_steps": self.joint_steps if joint else None,
            "ta_lambda": self.chosen_ta,
            "base": str(self.ctx.base),
            "adapters": {n: str(p) for n, p in self.own.items()},
            "sequential": [str(p) for p in self.chain],
            "base_row": {
                "method": "base",
                **X.task_fields(base_r),
                **{k: base_r["scores"][k] for k in ("G_v", "G_t", "G")},
            },
            "individual": self.individual,
            "matrices": self.cells,
            "joint": joint_row,
            "kept_bytes": self.kept_bytes(),
            "merge_seconds": {k: [round(r["merge_seconds"], 2) for r in v] for k, v in self.cells.items()},
            **self.ctx.closing(),
        }


def _todo(state: Path, have: list[str], want: list[str], out: Path) -> list[int]:
    """The steps (indices into `want`) a state holding the tasks `have` takes to hold `want` and write `out`:
    none when it holds them and `out` was written before an interruption, the last when it holds the ones
    before, else every one — the state removed first (another history: replayed from the first task)."""
    if have == want and (out / "config.json").is_file():
        return []
    if have == want[:-1]:
        return [len(want) - 1]
    shutil.rmtree(state, ignore_errors=True)
    return list(range(len(want)))


def routing_accuracy(model_dir: Path, roots: dict[str, Path], n: int = 64) -> dict[str, float]:
    """CPM's routing accuracy on the first `n` test images of each task: does an image go to its own projector?"""
    from PIL import Image
    from transformers import AutoImageProcessor

    from ..cpm import load_model
    from ..cpm import routing_accuracy as route
    from ..stats.data import load_samples

    model = load_model(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    pixels = {}
    for name, root in roots.items():
        imgs = []
        for s in load_samples(root / "test.jsonl")[:n]:
            with Image.open(s.image) as im:
                imgs.append(im.convert("RGB"))
        pixels[name] = processor(images=imgs, return_tensors="pt")["pixel_values"]
    return {k: round(100 * v, 1) for k, v in route(model, pixels).items()}
