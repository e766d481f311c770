"""One downstream experiment on the testbed, end to end, with every step cached: fine-tune the base on the task,
compute the Fisher statistics, merge with each method, evaluate everything, and report (table, JSON, plot).

``make demo`` runs it on one task with small evaluation sets; ``forgetless testbed report`` runs it on every
downstream task with the full test splits and writes RESULTS.md's tables and plot.

Caching (a second run redoes only what changed; every step a :class:`forgetless.chains.steps.Step`): the
fine-tuned model keyed by its recipe, the base weights' digest and the training split (:func:`finetune_key`); the
statistics by model weights fingerprint, data selection, scope and Fisher variant (as ``forgetless cgm`` does);
evaluations by weights digest, task files, split and limit (:mod:`forgetless.eval.cache`). Merges always run (they
are cheap) and are removed after their evaluation unless ``keep_models``. Each row of ``results.json`` keeps every task's per-item correctness, from which the report
bootstraps its intervals.

The task Fisher is taken where each method's authors take it: at θ₀ for CGM and CGM† (their published scripts),
at θ_ft for Fisher merging (:data:`TASK_FISHER_CGM`, :data:`TASK_FISHER_OWN`).

General calibration data (for the general Fisher at θ₀): 8 training samples from each general visual task and
the text probes' *validation* split (questions with their answers); the probes' test split, which the general
score is measured on, is never used for anything else.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..chains.steps import Step, fingerprint
from ..eval.cache import weights_digest
from ..eval.metrics import Bootstrap
from ..safeload import read_json
from . import tasks as T
from .context import EVAL_BATCH, Context, write_if_changed

# The documented downstream recipe: full fine-tuning of the last 12 decoder layers (the scope CGM's published
# recipe merges) and the projector, long and hot enough that the model specializes and forgets.
FINETUNE = {
    "train": ["language.layers[18:30]", "projector"],
    "steps": 120,
    "batch_size": 8,
    "lr": 2e-4,
    "warmup": 10,
    "clip": 1.0,
    "seed": 0,
}
STATS_SAMPLES = 32
# LoRA on every Linear of the decoder layers (attention and MLP), rank 16 as in MM-MergeBench's LLaVA recipe,
# alpha 2r; the vision tower and projector stay frozen (the adapters differ only in language.layers). lr 5e-4:
# LoRA's usual 2–5× the full fine-tune's 2e-4 (FINETUNE) for the same short run of 120 steps of 8.
LORA = {
    "r": 16,
    "alpha": 32.0,
    "dropout": 0.05,
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LORA_OPTIONS = {"train": ["language.layers"], "lora": LORA, "lr": 5e-4}  # what a LoRA fine-tune changes
# Stand-ins in a variant's options for the files the experiment makes: the general tasks' training splits (replay
# data, never their validation or test items) and the general Fisher at θ₀ over the fine-tune's scope (EWC).
REPLAY_DATA = "<general training splits>"
GENERAL_FISHER = "<general Fisher at θ₀, fine-tune scope>"
# and for a second fine-tune of the same recipe (Model Stock merges two): the recipe's seed + RESEED, a seed no
# run of the documented seeds (0, 1, 2) uses, so each seed's pair is its own
OTHER_SEED = "<the recipe's seed + 1000>"
RESEED = 1000
# Penalty strengths of the single EWC and L2-SP fine-tunes (their curves sweep more). L2-SP's: where the penalty's
# gradient at the plain fine-tune's weights equals the fine-tune's last gradients (digits, seed 0:
# runs/testbed/digits/penalty-calibration.json, from benchmarks/calibrate_penalty.py), rounded. EWC's is 100×
# that: at 1× and 10× it kept the fine-tune's forgetting (F concentrates on few entries, and AdamW's per-entry
# steps ignore a penalty that is small beside the data's gradient there).
EWC_STRENGTH = 300.0
L2SP_STRENGTH = 0.2


class Tune(NamedTuple):
    """A fine-tune of the documented recipe with other options, evaluated as a row of its own: its row label, its
    folder (``finetuned-<name>``), the options it changes and its row's knob string ("" for a single fine-tune)."""

    label: str
    name: str
    options: dict
    knob: str = ""


# The remedies while fine-tuning: keep rules (forgetless.train.spider), replay, penalties (forgetless.train.penalty)
VARIANTS: dict[str, Tune] = {
    t.name: t
    for t in (
        Tune("SPIDER", "spider", {"keep": "spider"}),
        Tune("MagnitudeMask", "magnitude_mask", {"keep": "magnitude_mask"}),
        Tune("Replay 1:1", "replay", {"replay": REPLAY_DATA, "replay_ratio": 1.0}),
        Tune(
            f"EWC λ={EWC_STRENGTH:g}",
            "ewc",
            {"keep": "ewc", "fisher": GENERAL_FISHER, "strength": EWC_STRENGTH},
        ),
        Tune(f"L2-SP λ={L2SP_STRENGTH:g}", "l2sp", {"keep": "l2sp", "strength": L2SP_STRENGTH}),
        Tune("fine-tune, another seed", "reseeded", {"seed": OTHER_SEED}),
        # one task with LoRA (LORA_OPTIONS): plain, and with the remedies while training (EWC on the folded update)
        Tune("LoRA", "lora", LORA_OPTIONS),
        Tune(
            "LoRA + replay 1:1", "lora_replay", {**LORA_OPTIONS, "replay": REPLAY_DATA, "replay_ratio": 1.0}
        ),
        Tune(
            f"LoRA + EWC λ={EWC_STRENGTH:g}",
            "lora_ewc",
            {**LORA_OPTIONS, "keep": "ewc", "fisher": GENERAL_FISHER, "strength": EWC_STRENGTH},
        ),
    )
}
KEEPS: list[Tune] = [
    VARIANTS["spider"],
    VARIANTS["magnitude_mask"],
]  # rows beside the merges of the test split
# Where the task Fisher is taken, and how: (model, variant). CGM's published scripts take both Fishers at the
# pre-trained model θ₀ ("base", empirical); Fisher merging (Matena & Raffel) takes each model's Fisher at that
# model, so its task Fisher is at θ_ft ("finetuned").
TASK_FISHER_CGM = ("base", "empirical")
TASK_FISHER_OWN = ("finetuned", "empirical")
# AdamW's squared gradients averaged over the fine-tune (forgetless.train.moments): along the path θ₀ → θ_ft
TASK_FISHER_PATH = ("path", "optimizer")


class Merge(NamedTuple):
    """One merge of an experiment: its row label, the registered method and its parameters, the task Fisher it
    needs ((at, variant), None when the method needs no statistics) and which fine-tune it merges with the base:
    None for the plain one, or a name of :data:`VARIANTS` (that fine-tune: e.g. SPIDER, then a merge)."""

    label: str
    method: str
    params: dict
    task_fisher: tuple[str, str] | None = None
    model: str | None = None
    # an objective of forgetless.eval.learn: the coefficients learned per layer first
    learn: str | None = None
    # the fine-tune first as its extracted LoRA of rank params["rank"] (forgetless extract-lora)
    extract: bool = False
    # a second fine-tune merged with the first (a name of VARIANTS: Model Stock's two)
    pair: str | None = None


LEARN = {"by": "layer", "steps": 40, "batch_size": 8, "split": "val"}  # the testbed's learned coefficients
MERGES: list[Merge] = [
    Merge("WiSE-FT", "linear", {"lambda": 0.5}),
    Merge("task arithmetic", "task_arithmetic", {"lambda": 0.7}),
    Merge("TIES", "ties", {"density": 0.2, "lambda": 1.0}),
    Merge("DARE", "dare_linear", {"density": 0.3, "lambda": 0.7}),
    Merge("Fisher merging", "fisher_with_base", {"base_weight": 1.0}, TASK_FISHER_OWN),
    Merge("CGM", "cgm", {"alpha": 0.2}, TASK_FISHER_CGM),
    Merge("CGM†", "cgm_dagger", {"keep": 0.95, "alpha": 1.0}, TASK_FISHER_CGM),
]
DEMO_LIMITS = {"probes": 120, **{n: 30 for n in T.GENERAL_VISUAL}}
DEMO_TASK_LIMIT = 80
FINETUNE_RECORD = (
    "recipe.hash"  # a fine-tune's step record, in its folder (the name earlier versions gave it)
)


def task_fields(result: dict) -> dict:
    """What a ``results.json`` row keeps of an evaluation: per task its accuracy (%), kind and per-item correctness
    (what the report bootstraps)."""
    tasks = result["tasks"]
    return {
        "tasks": {n: round(100 * x["accuracy"], 2) for n, x in tasks.items()},
        "kinds": {n: x["kind"] for n, x in tasks.items()},
        "correct_items": {n: x["correct_items"] for n, x in tasks.items()},
    }


def row_name(r: Mapping[str, Any]) -> str:
    """A results.json row's name: its method label and knob."""
    return f"{r['method']} {r.get('knob', '')}".strip()


def row_result(r: Mapping[str, Any]) -> dict[str, Any]:
    """A results.json row as an evaluation result (kind, accuracy and per-item correctness per task)."""
    return {
        "tasks": {
            n: {"kind": r["kinds"][n], "accuracy": acc / 100, "correct_items": r["correct_items"][n]}
            for n, acc in r["tasks"].items()
        }
    }


def row_draws(rows: list[dict], boot: Bootstrap) -> dict[str, dict[str, np.ndarray | None]]:
    """Each row's resampled scores, E, F and E + F paired with the ``base`` row (row name → key → draws)."""
    base = row_result(next(r for r in rows if r["method"] == "base"))
    return {row_name(r): boot.compare(row_result(r), base) for r in rows}


def finetune_key(base: Path, task_dir: Path, recipe: dict) -> str:
    """What a fine-tune depends on: the base weights, the recipe (with the contents of the files it names: the
    adapter it continues, the replay data, EWC's Fisher) and the training split's records (their images follow
    from the generator's version and seed) — not the validation or test splits, which may grow."""
    meta = read_json(
        task_dir / "task.json", remedy="generate the task again (forgetless testbed tasks)", expect=dict
    )
    train = _digest(task_dir / "train.jsonl")
    if recipe.get("init_adapter"):
        recipe = {
            **recipe,
            "init_adapter": _digest(Path(recipe["init_adapter"]) / "adapter_model.safetensors"),
        }
    for key in ("replay", "fisher"):  # the files' contents, not their paths
        if recipe.get(key):
            recipe = {**recipe, key: _digest(Path(recipe[key]))}
    return fingerprint(
        {
            "base": weights_digest(base),
            "train_split": train,
            "task": {k: meta.get(k) for k in ("name", "version", "seed")},
            **recipe,
        }
    )


def _digest(path: Path) -> str:
    """The sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def finetune_step(base: Path, task_dir: Path, out: Path, recipe: dict) -> Step:
    """The fine-tune of (base, task, recipe) into the folder `out` as a step: keyed by :func:`finetune_key`,
    recorded in the folder, done when its config (a LoRA recipe's adapter config) is there."""
    made = out / ("adapter_config.json" if recipe.get("lora") else "config.json")
    return Step(out / FINETUNE_RECORD, finetune_key(base, task_dir, recipe), made)


def fold_recipe(base: Path, adapter: Path) -> dict:
    """The full model ``base + adapter`` (task arithmetic of ``BASE+ADAPTER`` at λ = 1), for the harness."""
    return {
        "method": "task_arithmetic",
        "base": str(base),
        "models": [f"{base}+{adapter}"],
        "parameters": {"lambda": 1.0},
    }


def finetuned_model(base: Path, task_dir: Path, out: Path, recipe: dict, log) -> Path:
    """The fine-tuned model for (base, task, recipe), reused when its :func:`finetune_step` is done. A recipe with
    ``lora`` (a :class:`forgetless.train.LoraSpec` as a dict) writes a PEFT adapter folder instead."""
    from ..train import LoraSpec, finetune

    def make() -> None:
        kwargs = {**recipe, "lora": LoraSpec(**recipe["lora"])} if recipe.get("lora") else recipe
        finetune(base, task_dir / "train.jsonl", out, log=log, force=True, **kwargs)

    finetune_step(base, task_dir, out, recipe).run(make, log=log, reusing=f"fine-tuned model: reusing {out}")
    return out


def general_calibration(task_root: Path, out: Path, per_task: int = 8) -> Path:
    """The general calibration set (module docstring), images by absolute path."""
    from ..stats.data import load_samples

    rows = []
    for name in T.GENERAL_VISUAL:
        for s in load_samples(task_root / name / "train.jsonl", n=per_task, seed=0):
            rows.append(
                {
                    "id": f"{name}-{s.id}",
                    "image": str(Path(s.image).resolve()),
                    "question": s.turns[0][1],
                    "answer": s.turns[1][1],
                }
            )
    for line in (task_root / "probes" / "val.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.append({"id": f"probes-{r['id']}", "question": r["question"], "answer": r["answer"]})
    write_if_changed(out, "".join(json.dumps(r) + "\n" for r in rows))
    return out


def general_replay(task_root: Path, out: Path) -> Path:
    """The replay data: every training item of the general visual tasks, images by absolute path (the text probes
    have no training split)."""
    rows = []
    for name in T.GENERAL_VISUAL:
        for line in (task_root / name / "train.jsonl").read_text().splitlines():
            r = json.loads(line)
            image = (task_root / name / r["image"]).resolve()
            rows.append({**r, "id": f"{name}-{r['id']}", "image": str(image)})
    write_if_changed(out, "".join(json.dumps(r) + "\n" for r in rows))
    return out


def fisher_files(
    base: Path,
    ft: Path,
    general: Path,
    task_data: Path,
    stats_dir: Path,
    log,
    *,
    task_fishers: Sequence[tuple[str, str]] = (TASK_FISHER_CGM,),
    recipe: dict | None = None,
) -> dict[tuple[str, str], dict[str, Path]]:
    """The general Fisher at θ₀ on the general data (once) and, for each ``(at, variant)`` in `task_fishers`, the
    task Fisher on the task's training data at θ₀ (``at == "base"``) or θ_ft (``"finetuned"``), ``empirical`` or
    ``sampled``; all over CGM†'s published scope (which contains CGM's), reused when model, data selection, scope
    and variant match. :data:`TASK_FISHER_PATH` is the fine-tune's own optimizer state (:func:`optimizer_fisher`,
    needs the fine-tuning `recipe`). Returns, per task Fisher, the ``fisher_general`` and ``fisher_task`` files a
    recipe needs."""
    from ..chains import steps
    from ..chains.cgm import published_scope

    scope = published_scope(base, "cgm_dagger")

    def one(role: str, model: Path, data: Path, variant: str, path: Path) -> Path:
        return steps.statistics_step(
            "fisher",
            model,
            data,
            path,
            scope=scope,
            n=STATS_SAMPLES,
            seed=0,
            variant=variant,
            role=role,
            log=log,
            batch_size=8,
        )

    def task_file(at: str, variant: str) -> Path:
        path = stats_dir / f"fisher_task-{at}-{variant}.safetensors"
        if (at, variant) == TASK_FISHER_PATH:
            if recipe is None:
                raise ValueError("the optimizer's task Fisher needs the fine-tuning recipe")
            return optimizer_fisher(base, task_data.parent, recipe, ft, path, log)
        return one("fisher_task", base if at == "base" else ft, task_data, variant, path)

    general_file = one("fisher_general", base, general, "empirical", stats_dir / "fisher_general.safetensors")
    return {tf: {"fisher_general": general_file, "fisher_task": task_file(*tf)} for tf in task_fishers}


def optimizer_fisher(base: Path, task_dir: Path, recipe: dict, ft: Path, path: Path, log) -> Path:
    """AdamW's squared gradients of the fine-tune `recipe` as a task Fisher (:mod:`forgetless.train.moments`),
    reused while its :func:`finetune_key` matches: the fine-tune is run again with the hook into a scratch folder
    (the cached fine-tune `ft` keeps no optimizer state), and whether the re-run's weights equal `ft`'s bit for bit
    (then the moments are exactly those of `ft`'s run) is logged and recorded beside the file."""
    from ..train import finetune
    from ..train.moments import OptimizerFisher

    def make() -> dict:
        scratch = path.parent / f".{path.stem}-finetune"
        hook = OptimizerFisher()
        finetune(base, task_dir / "train.jsonl", scratch, log=log, force=True, hook=hook, **recipe)
        same = weights_digest(scratch) == weights_digest(ft)
        log(f"optimizer Fisher: the re-run's weights {'equal' if same else 'DIFFER from'} {ft}'s")
        hook.save(path, scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        return {"same_weights_as_finetuned": same}

    step = Step(path.with_name(path.name + ".json"), finetune_key(base, task_dir, recipe), path)
    step.run(make, log=log, reusing=f"optimizer Fisher: reusing {path}")
    return path


def merge_recipe(method: str, params: dict, base: Path, ft: Path, stats: dict[str, Path] | None) -> dict:
    from ..chains.cgm import published_scope

    recipe: dict[str, Any] = {"method": method, "base": str(base), "parameters": dict(params), "seed": 0}
    if method == "fisher_with_base":
        recipe["models"] = [{"model": str(ft), "statistics": {"fisher": str(stats["fisher_task"])}}]
        recipe["statistics"] = {"fisher_base": str(stats["fisher_general"])}
        recipe["scope"] = {
            "include": published_scope(base, "cgm_dagger"),
            "outside": "finetuned",
            "no_statistics": "finetuned",
        }
    elif method in ("cgm", "cgm_dagger"):
        recipe["models"] = [str(ft)]
        recipe["statistics"] = {k: str(v) for k, v in stats.items()}
        recipe["scope"] = {
            "include": published_scope(base, method),
            "outside": "finetuned",
            "no_statistics": "finetuned",
        }
    else:
        recipe["models"] = [str(ft)]
    return recipe


def run_experiment(
    task: str,
    workdir: str | Path,
    *,
    merges=None,
    keeps: Sequence[Tune] | None = None,
    finetune_recipe: dict | None = None,
    limits: dict[str, int] | None = None,
    task_limit: int | None = None,
    split: str = "test",
    keep_models: bool = False,
    eval_batch_size: int = EVAL_BATCH,
    results_name: str = "results.json",
    root: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune on `task`, merge with each method, evaluate; returns (and writes to workdir/`results_name`) rows
    with T, G_v, G_t, G, E, F, E+F per model. `keeps`: further fine-tunes of the same recipe with other options
    (:class:`Tune`, e.g. :data:`KEEPS`), each evaluated as a row of its own. `root`: where the generated tasks and
    the evaluation cache are (default: `workdir`'s parent)."""
    merges = MERGES if merges is None else merges
    check_merges(merges)
    workdir = Path(workdir)
    root = workdir.parent if root is None else Path(root)
    ctx = Context.open(
        workdir,
        [task],
        tasks_root=root / "tasks" if workdir.name != "tasks" else workdir,
        cache_dir=root / "eval-cache",
        timings=("setup", "finetune", "statistics", "merge", "evaluate"),
        eval_batch=eval_batch_size,
        log=log,
    )
    lim = {**(limits or {}), task: task_limit} if (limits or task_limit) else None
    run = Experiment.start(ctx, task, {**FINETUNE, **(finetune_recipe or {})}, split, lim)
    rows = [*run.reference_rows(), *(run.tune_row(t) for t in keeps or [])]
    stats = run.statistics(merges)
    rows += [run.merge_row(m, stats.get(m.task_fisher), keep_models) for m in merges]
    return ctx.write(
        {
            "task": task,
            "split": split,
            "limits": lim,
            "finetune": run.recipe,
            "base": str(ctx.base),
            "finetuned": str(run.ft),
            "rows": [{k: v for k, v in r.items() if k != "result"} | task_fields(r["result"]) for r in rows],
            **ctx.closing(),
        },
        results_name,
    )


def check_merges(merges: Sequence[Merge]) -> None:
    """Refuse, before any work, a merge of a fine-tune that is not one of :data:`VARIANTS`, or one that asks for a
    task Fisher at the plain fine-tune's weights (only those at θ₀ hold for every fine-tune)."""
    for m in merges:
        if m.model is None:
            continue
        if m.model not in VARIANTS or (m.task_fisher is not None and m.task_fisher[0] != "base"):
            raise ValueError(
                f"merge {m.label!r}: model must be a fine-tune of VARIANTS ({list(VARIANTS)}), and a merge of "
                "it takes only statistics at θ₀ (the others are the plain fine-tune's)"
            )


@dataclass
class Experiment:
    """One experiment between its steps: the task, the fine-tuning recipe, the plain fine-tune `ft`, and the
    base's and the fine-tune's results that every row is compared with."""

    ctx: Context
    task: str
    recipe: dict
    split: str
    limit: dict[str, int] | None
    ft: Path
    base_r: dict = field(default_factory=dict)
    ft_r: dict = field(default_factory=dict)

    @classmethod
    def start(
        cls, ctx: Context, task: str, recipe: dict, split: str, limit: dict[str, int] | None
    ) -> Experiment:
        """The experiment, its plain fine-tune made (or reused) first."""
        return cls(
            ctx, task, recipe, split, limit, ctx.finetuned(ctx.roots[task], ctx.workdir / "finetuned", recipe)
        )

    def evaluate(self, model: Path) -> tuple[dict, bool]:
        return self.ctx.evaluate(model, [self.task], split=self.split, limit=self.limit)

    def row(self, label: str, r: dict, cached: bool, knob: str = "", **extra: Any) -> dict:
        from ..eval.metrics import compare

        return {
            "method": label,
            "knob": knob,
            "result": r,
            **compare(r, self.base_r, self.ft_r),
            "cached_eval": cached,
            **extra,
        }

    def reference_rows(self) -> list[dict]:
        """The base's and the plain fine-tune's rows."""
        self.base_r, c0 = self.evaluate(self.ctx.base)
        self.ft_r, c1 = self.evaluate(self.ft)
        rows = [self.row("base", self.base_r, c0), self.row("fine-tuned", self.ft_r, c1)]
        for r in rows:
            self.ctx.log(
                f"{r['method']}: T {r['T']:.1f}  G_v {r['G_v']:.1f}  G_t {r['G_t']:.1f}"
                f"{'  (cached)' if r['cached_eval'] else ''}"
            )
        return rows

    def tune_recipe(self, options: Mapping[str, Any]) -> dict:
        """The recipe with `options`, the stand-ins for the replay data and the general Fisher made (cached)."""
        scope = list(options.get("train", self.recipe["train"]))
        made = {
            REPLAY_DATA: lambda: str(self.replay_data()),
            GENERAL_FISHER: lambda: str(self.scope_fisher(scope)),
            OTHER_SEED: lambda: self.recipe["seed"] + RESEED,
        }
        return {
            **self.recipe,
            **{k: made[v]() if isinstance(v, str) and v in made else v for k, v in options.items()},
        }

    def tune_trained(self, tune: Tune) -> Path:
        """The fine-tune `tune` as trained (a model folder, or a PEFT adapter for LoRA), cached as every fine-tune."""
        ctx = self.ctx
        out = ctx.workdir / f"finetuned-{tune.name}"
        return ctx.finetuned(ctx.roots[self.task], out, self.tune_recipe(tune.options))

    def tune_model(self, tune: Tune) -> Path:
        """The fine-tune `tune` as a model folder: a LoRA adapter folded into the base (cached by both weights)."""
        return self.as_model(tune, self.tune_trained(tune))

    def as_model(self, tune: Tune, trained: Path) -> Path:
        """`tune`'s trained folder as a model folder: a LoRA adapter folded into the base, else itself."""
        return self.folded(trained) if "lora" in tune.options else trained

    def folded(self, adapter: Path) -> Path:
        """The base with `adapter` folded in (:func:`fold_recipe`), cached by the base's and the adapter's weights."""
        ctx = self.ctx
        key = fingerprint([weights_digest(ctx.base), weights_digest(adapter)])
        out = ctx.workdir / "folded" / f"{adapter.name}-{key[:8]}"

        def make() -> None:
            ctx.merged(fold_recipe(ctx.base, adapter), out)

        with ctx.timed("merge"):
            Step(out.with_suffix(".step"), key, out).run(make, log=ctx.log, reusing=f"folded: reusing {out}")
        return out

    def tune_row(self, tune: Tune) -> dict:
        """The row of the fine-tune `tune`, with the seconds that fine-tune took."""
        trained = self.tune_trained(tune)
        r, cached = self.evaluate(self.as_model(tune, trained))
        record = trained / "finetune.json"
        seconds = read_json(record, remedy="fine-tune it again (remove the folder)")["seconds"]
        row = self.row(tune.label, r, cached, tune.knob, finetune_seconds=seconds)
        self.log_row(f"{tune.label} {tune.knob}".strip(), row)
        return row

    def general_data(self) -> Path:
        """The general calibration set (:func:`general_calibration`)."""
        return general_calibration(
            self.ctx.roots[self.task].parent, self.ctx.workdir / "calibration" / "general.jsonl"
        )

    def replay_data(self) -> Path:
        """The replay data: the general visual tasks' training splits (:func:`general_replay`)."""
        return general_replay(
            self.ctx.roots[self.task].parent, self.ctx.workdir / "calibration" / "replay.jsonl"
        )

    def scope_fisher(self, scope: list[str]) -> Path:
        """The general Fisher at θ₀ of every tensor a fine-tune trains (EWC's F): the general calibration set,
        :data:`STATS_SAMPLES` samples, every parameter of `scope` (each scope its own file)."""
        from ..chains import steps

        name = "train-scope" if scope == list(self.recipe["train"]) else f"scope-{fingerprint(scope)[:8]}"

        with self.ctx.timed("statistics"):
            return steps.statistics_step(
                "fisher",
                self.ctx.base,
                self.general_data(),
                self.ctx.workdir / "statistics" / f"fisher_general-{name}.safetensors",
                scope=scope,
                n=STATS_SAMPLES,
                seed=0,
                variant="empirical",
                role="fisher_general (EWC)",
                log=self.ctx.log,
                batch_size=8,
                all_params=True,
            )

    def statistics(self, merges: Sequence[Merge]) -> dict[tuple[str, str], dict[str, Path]]:
        """The Fisher files of every task Fisher the `merges` need (:func:`fisher_files`)."""
        needed = list(dict.fromkeys(m.task_fisher for m in merges if m.task_fisher is not None))
        if not needed:
            return {}
        ctx = self.ctx
        with ctx.timed("statistics"):
            return fisher_files(
                ctx.base,
                self.ft,
                self.general_data(),
                ctx.roots[self.task] / "train.jsonl",
                ctx.workdir / "statistics",
                ctx.log,
                task_fishers=needed,
                recipe=self.recipe,
            )

    def merge_row(self, m: Merge, stats: dict[str, Path] | None, keep_model: bool) -> dict:
        """The row of the merge `m` of the base with its fine-tune; the merged model is removed unless kept."""
        ctx = self.ctx
        extras = [m.learn or "", "extract" if m.extract else "", m.pair or ""]
        key = [m.params, m.task_fisher, m.model, *filter(None, extras)]
        out = ctx.workdir / "merged" / f"{m.method}-{fingerprint(key)[:6]}"
        source = self.ft if m.model is None else self.tune_model(VARIANTS[m.model])
        params = dict(m.params)
        if m.extract:
            source = f"{ctx.base}+{self.extracted(source, int(params.pop('rank')))}"
        recipe = merge_recipe(m.method, params, ctx.base, source, stats)
        if m.pair is not None:
            recipe["models"].append(str(self.tune_model(VARIANTS[m.pair])))
        report = ctx.merged(recipe if m.learn is None else self.learned(recipe, m), out)
        r, cached = self.evaluate(out)
        knob = " ".join(f"{k}={v:g}" for k, v in m.params.items())
        row = self.row(m.label, r, cached, knob, summary=report.summary())
        self.log_row(f"{m.label} ({knob})" if knob else m.label, row)
        if not keep_model:
            shutil.rmtree(out, ignore_errors=True)
        return row

    def extracted(self, model: Path, rank: int) -> Path:
        """`model`'s update as the rank-`rank` PEFT adapter ``forgetless extract-lora`` writes (exact SVD of each
        Linear's Δ; changed norms saved whole), cached by the weights and the rank."""
        from ..chains.extract_lora import extract_lora

        ctx = self.ctx
        key = fingerprint([weights_digest(ctx.base), weights_digest(model), rank])
        out = ctx.workdir / "extracted" / f"rank{rank}-{key[:8]}"

        def make() -> None:
            extract_lora(ctx.base, model, rank=rank, out=out, force=True, log=None)

        with ctx.timed("merge"):
            Step(out.with_suffix(".step"), key, out).run(
                make, log=ctx.log, reusing=f"extracted: reusing {out}"
            )
        return out

    def learned(self, recipe: dict, m: Merge) -> Path:
        """The recipe's coefficients learned per layer on the validation splits (:data:`LEARN`, objective
        ``m.learn``, ``general_weight`` from ``m.params``, the other parameters the start), cached: the learned
        recipe, the record beside it."""
        from ..eval.learn import learn

        ctx = self.ctx
        weight = recipe["parameters"].pop("general_weight")
        options = {**LEARN, "objective": m.learn, "general_weight": weight}
        digests = [weights_digest(Path(p)) for p in (ctx.base, *recipe["models"])]
        key = fingerprint([recipe["parameters"], recipe["method"], options, digests, self.task])
        out = ctx.workdir / "learned" / f"{m.learn}-{key[:8]}.yaml"

        def make() -> None:
            task = {self.task: str(ctx.roots[self.task])}
            general = {n: str(p) for n, p in ctx.general.items()}
            learn(recipe, task=task, general=general, out=out, log=ctx.log, **options)

        with ctx.timed("merge"):
            Step(out.with_suffix(".step"), key, out).run(make, log=ctx.log, reusing=f"learned: reusing {out}")
        return out

    def log_row(self, name: str, row: dict) -> None:
        self.ctx.log(
            f"{name}: T {row['T']:.1f}  G {row['G']:.1f}  E {row['E']:+.1f}  F {row['F']:+.1f}"
            f"{'  (cached)' if row['cached_eval'] else ''}"
        )
