"""Merging LoRA adapters of several tasks on the testbed, with seen and held-out (unseen) tasks — CoPA-Merging's
protocol (MM-MergeBench) in small, every step cached.

1. one LoRA adapter per **seen** task (:data:`forgetless.testbed.tasks.SEEN`: the four downstream tasks and
   ``largest_colour``, ``odd_colour``) with the fixed recipe :data:`ADAPTER`, cached by
   :func:`.experiment.finetune_key`; each checked on its validation split (:data:`LEARNED`);
2. one LoRA trained **jointly** on all seen training splits mixed (:func:`joint_data`), the same recipe with
   :data:`JOINT_STEPS_PER_TASK` steps per seen task — the multi-task reference;
3. task arithmetic's λ chosen on the seen tasks' **validation** splits (:data:`SWEEP`, the best mean seen
   accuracy), DARE taking the same λ, Iso-C's, Iso-CTS's and Breadcrumbs' α / λ swept the same way; TIES, CoPA,
   TSV-M and DELLA at their published defaults (:data:`MERGES`);
4. the merges, each through :func:`forgetless.merge` into a full model folder the harness loads (adapter-space
   methods with ``fold: true``, weight-space ones on each adapter folded: :func:`adapters_recipe`);
   each own adapter and the joint one folded alone by task arithmetic at λ = 1 (``BASE+ADAPTER``);
5. every model evaluated on the test splits (batch 16) by :func:`forgetless.eval.cache.cached_evaluate`: seen and
   unseen tasks and the general tasks (:data:`~forgetless.testbed.tasks.GENERAL_VISUAL` and the text probes); an
   own adapter only on its own task and the general tasks.

``results.json`` holds one row per model with per-task accuracy and per-item correctness (``correct_items``), from
which :mod:`.report` bootstraps the 95% intervals. The unseen tasks (:data:`~forgetless.testbed.tasks.UNSEEN`) have
no training split at all, so no adapter, the joint one included, can have trained on them.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ForgetlessError
from . import experiment as X
from . import tasks as T
from .context import Context, write_if_changed

# each seen task's adapter: the testbed's LoRA (experiment.LORA_OPTIONS) over the documented recipe's steps
ADAPTER = {**X.FINETUNE, **X.LORA_OPTIONS}
# the joint adapter: 60 steps per seen task (360 for six, three times one adapter's run), half the samples of each
# task that its own adapter sees — what one session's compute allowed (RESULTS.md's timings)
JOINT_STEPS_PER_TASK = ADAPTER["steps"] // 2
LEARNED = 10.0  # points over the base on the validation split: below it, an adapter "did not learn" (logged)

# (label, method, parameters): CoPA at the published defaults (λ = 2, keep the top 20% of each A and B); the
# baselines' density at their papers' values (TIES keeps 20%, DARE keeps 30%); λ fixed here or from SWEEP.
MERGES: list[tuple[str, str, dict]] = [
    ("TA", "lora_task_arithmetic", {}),
    ("TIES", "lora_ties", {"density": 0.2, "lambda": 1.0}),
    ("DARE", "lora_dare_linear", {"density": 0.3}),
    ("CoPA", "copa", {"lambda": 2.0, "density": 0.2, "variant": "paper"}),
    ("CoPA (reference)", "copa", {"lambda": 2.0, "density": 0.2, "variant": "reference"}),
    # the data-free weight-space merges FusionBench compares, on each adapter folded (BASE+ADAPTER): TSV-M at its
    # paper's α = 1; Iso-C and Iso-CTS with α swept (their papers tune it on validation); Breadcrumbs (mask
    # the top 1% and keep 90% of each task vector, its paper's region) with its λ swept as task arithmetic's;
    # DELLA at its paper's density 0.5, ε 0.15 with TIES's sign election and disjoint mean (λ = 1)
    ("TSV-M", "tsv_m", {"lambda": 1.0}),
    ("Iso-C", "iso_c", {}),
    ("Iso-CTS", "iso_cts", {}),
    ("Breadcrumbs", "breadcrumbs", {"density": 0.9, "gamma": 0.01}),
    ("DELLA", "della", {"density": 0.5, "epsilon": 0.15, "lambda": 1.0}),
]
# λ on the seen tasks' validation splits: a grid, or the label of a row whose chosen λ is taken. The sum of 6 task
# vectors wants λ well below 1 (task arithmetic's authors find 0.3–0.5 for 8 tasks). DARE's random drop is
# rescaled, so its sum equals task arithmetic's in expectation: it takes TA's λ. TIES averages the agreeing
# entries (a disjoint mean, not a sum): λ = 1 as its paper, fixed (no entry here).
SWEEP: dict[str, list[float] | str] = {
    "lora_task_arithmetic": [0.3, 0.5, 0.8],
    "lora_dare_linear": "TA",
    "iso_c": [0.5, 1.0, 1.5],
    "iso_cts": [0.5, 1.0, 1.5],
    "breadcrumbs": [0.3, 0.5, 0.8],
}


def _knob(params: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in params.items())


def joint_data(roots: dict[str, Path], seen: list[str], out: Path, seed: int = 0) -> Path:
    """A task folder whose ``train.jsonl`` mixes every seen task's training split (images by absolute path,
    shuffled with `seed`); its ``task.json`` names the tasks. Rewritten only when its content changes."""
    rows = []
    for name in seen:
        for line in (roots[name] / "train.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("image"):
                r["image"] = str((roots[name] / r["image"]).resolve())
            rows.append(r)
    random.Random(seed).shuffle(rows)
    write_if_changed(out / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_if_changed(
        out / "task.json",
        json.dumps({"name": "joint", "tasks": seen, "version": T.VERSION, "seed": seed}, indent=1) + "\n",
    )
    return out


def adapters_recipe(method: str, params: dict, base: Path, adapters: list[Path]) -> dict:
    """The adapters merged by `method` into a full model folder: in adapter space, folded (``fold: true``), by
    an adapter-space method; a weight-space method merges each adapter folded into the base (``BASE+ADAPTER``)."""
    from ..methods import get_method

    if get_method(method).space == "weight":
        models = [f"{base}+{a}" for a in adapters]
        return {"method": method, "base": str(base), "models": models, "parameters": dict(params), "seed": 0}
    return {
        "method": method,
        "base": str(base),
        "models": [str(a) for a in adapters],
        "parameters": dict(params),
        "seed": 0,
        "fold": True,
    }


def _row(label: str, role: str, knob: str, r: dict, cached: bool, **extra) -> dict:
    return {
        "method": label,
        "role": role,
        "knob": knob,
        **X.task_fields(r),
        **{k: r["scores"][k] for k in ("G_v", "G_t", "G")},
        "cached_eval": cached,
        **extra,
    }


def _available(method: str) -> bool:
    from ..methods import METHODS

    return method in METHODS


def run_multitask(
    workdir: str | Path,
    *,
    seen: list[str] | None = None,
    unseen: list[str] | None = None,
    merges: list[tuple[str, str, dict]] | None = None,
    sweep: dict[str, list[float] | str] | None = None,
    adapter_recipe: dict | None = None,
    tasks_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    limits: dict[str, int] | None = None,
    keep_models: bool = False,
    base: Path | None = None,
    merge: Callable | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The whole experiment (module docstring); writes and returns ``workdir/results.json``. Tasks are generated
    under `tasks_root` (default ``workdir/../tasks``, shared with :func:`.experiment.run_experiment`) and
    evaluations cached under `cache_dir` (default ``workdir/../eval-cache``), so the base model's scores are
    shared with the single-task experiments. A merge method not registered in :data:`forgetless.methods.METHODS`
    is skipped and listed under ``skipped``. `merge`: the merge function (default :func:`forgetless.merge`)."""
    seen, unseen = list(seen or T.SEEN), list(unseen or T.UNSEEN)
    if set(seen) & set(unseen):
        raise ForgetlessError(
            f"tasks {sorted(set(seen) & set(unseen))} are both seen and unseen",
            remedy="a held-out task must not be one an adapter trains on",
        )
    ctx = Context.open(
        workdir,
        [*seen, *unseen],
        timings=("finetune", "merge", "evaluate"),
        base=base,
        tasks_root=tasks_root,
        cache_dir=cache_dir,
        merge=merge,
        log=log,
    )
    _check_unseen(ctx, unseen)
    mt = Multitask(ctx, seen, unseen, {**ADAPTER, **(adapter_recipe or {})}, limits, keep_models)
    learned = mt.train_adapters()
    joint = mt.joint_adapter()
    chosen, sweeps, skipped = mt.choose(
        MERGES if merges is None else merges, SWEEP if sweep is None else sweep
    )
    rows = mt.test_rows(joint, chosen)
    return ctx.write(
        {
            "seen": seen,
            "unseen": unseen,
            "general": list(ctx.general),
            "split": "test",
            "limits": limits,
            "adapter": mt.recipe,
            "joint_steps": mt.joint_steps,
            "base": str(ctx.base),
            "adapters": {n: str(p) for n, p in mt.adapters.items()},
            "joint": str(joint),
            "validation": learned,
            "sweep": sweeps,
            "chosen": {k: _knob(v) for k, (_, v) in chosen.items()},
            "skipped": skipped,
            "rows": rows,
            **ctx.closing(),
        }
    )


def _check_unseen(ctx: Context, unseen: list[str]) -> None:
    for name in unseen:
        if (ctx.roots[name] / "train.jsonl").read_text().strip():
            raise ForgetlessError(
                f"held-out task {name!r} has training records",
                file=ctx.roots[name] / "train.jsonl",
                remedy="an unseen task is generated without a training split (sizes train 0)",
            )


@dataclass
class Multitask:
    """The experiment between its steps: the seen and unseen tasks, the adapter recipe and the adapters made."""

    ctx: Context
    seen: list[str]
    unseen: list[str]
    recipe: dict
    limits: dict[str, int] | None
    keep_models: bool
    adapters: dict[str, Path] = field(default_factory=dict)

    @property
    def joint_steps(self) -> int:
        return JOINT_STEPS_PER_TASK * len(self.seen)

    @property
    def models(self) -> Path:
        return self.ctx.workdir / "models"

    def evaluate(self, model: Path, tasks: list[str], split: str = "test", general: bool = True):
        return self.ctx.evaluate(model, tasks, split=split, general=general, limit=self.limits)

    def in_order(self) -> list[Path]:
        """The adapters in the order of the seen tasks (what every merge takes)."""
        return [self.adapters[n] for n in self.seen]

    def train_adapters(self) -> dict[str, dict]:
        """Step 1: one adapter per seen task, each folded and checked on its validation split against the base."""
        ctx = self.ctx
        base_val, _ = self.evaluate(ctx.base, self.seen, "val", general=False)
        learned: dict[str, dict] = {}
        for name in self.seen:
            self.adapters[name] = ctx.finetuned(ctx.roots[name], ctx.workdir / "adapters" / name, self.recipe)
            ctx.merged(X.fold_recipe(ctx.base, self.adapters[name]), self.models / f"own-{name}")
            r, _ = self.evaluate(self.models / f"own-{name}", [name], "val", general=False)
            b, a = 100 * base_val["tasks"][name]["accuracy"], 100 * r["tasks"][name]["accuracy"]
            learned[name] = {"base_val": round(b, 2), "adapter_val": round(a, 2), "learned": a - b >= LEARNED}
            ctx.log(
                f"adapter {name}: validation {b:.1f} → {a:.1f}"
                + ("" if a - b >= LEARNED else "  (did not learn)")
            )
        return learned

    def joint_adapter(self) -> Path:
        """Step 2: one adapter on every seen training split mixed, :data:`JOINT_STEPS_PER_TASK` steps per task."""
        ctx = self.ctx
        data = joint_data(ctx.roots, self.seen, ctx.workdir / "joint-data")
        return ctx.finetuned(
            data, ctx.workdir / "adapters" / "joint", {**self.recipe, "steps": self.joint_steps}
        )

    def choose(
        self, merges: list[tuple[str, str, dict]], sweep: dict[str, list[float] | str]
    ) -> tuple[dict[str, tuple[str, dict]], list[dict], list[str]]:
        """Step 3: each merge's parameters — fixed, λ swept on the seen validation splits, or another row's λ —
        as ``label → (method, parameters)``; the sweep's points; the merges skipped (method not registered)."""
        chosen: dict[str, tuple[str, dict]] = {}
        sweeps: list[dict] = []
        skipped: list[str] = []
        for label, method, params in merges:
            grid = sweep.get(method)
            if not _available(method):
                skipped.append(f"{label} ({method})")
                self.ctx.log(f"{label}: method {method!r} is not registered yet, skipped")
            elif isinstance(grid, str):  # the λ chosen for another row
                if grid not in chosen:
                    raise ForgetlessError(
                        f"{label} takes the λ of {grid!r}, which is not chosen before it",
                        remedy="list that row earlier in merges, with a grid in sweep",
                    )
                chosen[label] = (method, {**params, "lambda": chosen[grid][1]["lambda"]})
            elif not grid or "lambda" in params:
                chosen[label] = (method, dict(params))
            else:
                chosen[label] = (method, self.sweep(label, method, params, grid, sweeps))
        return chosen, sweeps, skipped

    def sweep(self, label: str, method: str, params: dict, grid: list[float], sweeps: list[dict]) -> dict:
        """The parameters with the λ of `grid` that gives the best mean seen validation accuracy (ties: the
        first); each point is appended to `sweeps`."""
        best: tuple[float, dict] | None = None
        out = self.models / "sweep"
        for lam in grid:
            p = {**params, "lambda": lam}
            self.ctx.merged(adapters_recipe(method, p, self.ctx.base, self.in_order()), out)
            r, _ = self.evaluate(out, self.seen, "val", general=False)
            avg = 100 * sum(r["tasks"][n]["accuracy"] for n in self.seen) / len(self.seen)
            sweeps.append({"method": label, "knob": _knob(p), "seen_val": round(avg, 2)})
            self.ctx.log(f"sweep {label} {_knob(p)}: seen validation {avg:.1f}")
            if best is None or avg > best[0]:
                best = (avg, p)
        shutil.rmtree(out, ignore_errors=True)
        return best[1]

    def test_rows(self, joint: Path, chosen: dict[str, tuple[str, dict]]) -> list[dict]:
        """Steps 4–5: the base, each own adapter (on its task), the joint adapter and each merge on the test
        splits; merged and folded models are removed unless kept."""
        ctx = self.ctx
        everything = [*self.seen, *self.unseen]
        r, c = self.evaluate(ctx.base, everything)
        rows = [_row("base", "base", "", r, c)]
        for name in self.seen:
            folded = self.models / f"own-{name}"
            if not folded.is_dir():
                ctx.merged(X.fold_recipe(ctx.base, self.adapters[name]), folded)
            r, c = self.evaluate(folded, [name])
            rows.append(_row(f"own adapter: {name}", "own", "", r, c, task=name))
            self.drop(folded)
        folded = self.models / "joint"
        ctx.merged(X.fold_recipe(ctx.base, joint), folded)
        r, c = self.evaluate(folded, everything)
        rows.append(_row("joint LoRA", "joint", "", r, c))
        self.drop(folded)
        rows += [self.merge_row(label, method, params) for label, (method, params) in chosen.items()]
        return rows

    def merge_row(self, label: str, method: str, params: dict) -> dict:
        everything = [*self.seen, *self.unseen]
        out = self.models / "merged"
        report = self.ctx.merged(adapters_recipe(method, params, self.ctx.base, self.in_order()), out)
        r, c = self.evaluate(out, everything)
        summary = report.summary() if hasattr(report, "summary") else None
        row = _row(label, "merge", _knob(params), r, c, merge_method=method, summary=summary)
        self.drop(out)
        self.ctx.log(
            f"{label} ({_knob(params)}): "
            + "  ".join(f"{n} {row['tasks'][n]:.1f}" for n in everything)
            + f"  G {row['G']:.1f}"
        )
        return row

    def drop(self, model: Path) -> None:
        if not self.keep_models:
            shutil.rmtree(model, ignore_errors=True)
