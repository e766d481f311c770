"""One downstream experiment on the testbed, end to end, with every step cached: fine-tune the base on the task,
compute the Fisher statistics, merge with each method, evaluate everything, and report (table, JSON, plot).

``make demo`` runs it on one task with small evaluation sets; ``forgetless testbed report`` runs it on every
downstream task with the full test splits and writes RESULTS.md's tables and plot.

Caching (a second run redoes only what changed): the fine-tuned model by a hash of its recipe, the base weights'
digest and the training split (:func:`finetune_key`); the statistics by model weights fingerprint, data selection,
scope and Fisher variant (as ``forgetless cgm`` does); evaluations by weights digest, task files, split and limit
(:mod:`forgetless.eval.cache`). Merges always run (seconds each) and are removed after their evaluation unless
``keep_models``. Each row of ``results.json`` keeps every task's per-item correctness, from which the report
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
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..eval.cache import cached_evaluate, weights_digest
from ..eval.metrics import Bootstrap
from . import tasks as T

# The documented downstream recipe: full fine-tuning of the last 12 decoder layers (the scope CGM's published
# recipe merges) and the projector, long and hot enough that the model specializes and forgets.
FINETUNE = {"train": ["language.layers[18:30]", "projector"], "steps": 120, "batch_size": 8, "lr": 2e-4,
            "warmup": 10, "clip": 1.0, "seed": 0}
STATS_SAMPLES = 32
# fine-tunes with a keep rule (forgetless.train.spider), same recipe otherwise: rows beside the merges
KEEPS: list[tuple[str, str]] = [("SPIDER", "spider"), ("MagnitudeMask", "magnitude_mask")]
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
    None for the plain one, or a keep rule of :data:`KEEPS` (that rule's fine-tune: e.g. SPIDER, then a merge)."""

    label: str
    method: str
    params: dict
    task_fisher: tuple[str, str] | None = None
    model: str | None = None


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


def stable_hash(obj: Any) -> str:
    """16 hex digits of SHA-256 over `obj` as sorted JSON: the testbed's cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_fields(result: dict) -> dict:
    """What a ``results.json`` row keeps of an evaluation: per task its accuracy (%), kind and per-item correctness
    (what the report bootstraps)."""
    tasks = result["tasks"]
    return {"tasks": {n: round(100 * x["accuracy"], 2) for n, x in tasks.items()},
            "kinds": {n: x["kind"] for n, x in tasks.items()},
            "correct_items": {n: x["correct_items"] for n, x in tasks.items()}}


def row_name(r: Mapping[str, Any]) -> str:
    """A results.json row's name: its method label and knob."""
    return f"{r['method']} {r.get('knob', '')}".strip()


def row_result(r: Mapping[str, Any]) -> dict[str, Any]:
    """A results.json row as an evaluation result (kind, accuracy and per-item correctness per task)."""
    return {"tasks": {n: {"kind": r["kinds"][n], "accuracy": acc / 100, "correct_items": r["correct_items"][n]}
                      for n, acc in r["tasks"].items()}}


def row_draws(rows: list[dict], boot: Bootstrap) -> dict[str, dict[str, np.ndarray | None]]:
    """Each row's resampled scores, E, F and E + F paired with the ``base`` row (row name → key → draws)."""
    base = row_result(next(r for r in rows if r["method"] == "base"))
    return {row_name(r): boot.compare(row_result(r), base) for r in rows}


def finetune_key(base: Path, task_dir: Path, recipe: dict) -> str:
    """What a fine-tune depends on: the base weights, the recipe (with the weights of the adapter it continues,
    ``init_adapter``) and the training split's records (their images follow from the generator's version and
    seed) — not the validation or test splits, which may grow."""
    meta = json.loads((task_dir / "task.json").read_text())
    train = hashlib.sha256((task_dir / "train.jsonl").read_bytes()).hexdigest()
    if recipe.get("init_adapter"):
        weights = Path(recipe["init_adapter"]) / "adapter_model.safetensors"
        recipe = {**recipe, "init_adapter": hashlib.sha256(weights.read_bytes()).hexdigest()}
    return stable_hash({"base": weights_digest(base), "train_split": train,
                  "task": {k: meta.get(k) for k in ("name", "version", "seed")}, **recipe})


def finetuned_model(base: Path, task_dir: Path, out: Path, recipe: dict, log) -> Path:
    """The fine-tuned model for (base, task, recipe), reused when its :func:`finetune_key` matches. A recipe with
    ``lora`` (a :class:`forgetless.train.LoraSpec` as a dict) writes a PEFT adapter folder instead."""
    from ..train import LoraSpec, finetune

    key = finetune_key(base, task_dir, recipe)
    stamp = out / "recipe.hash"
    written = (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
    if stamp.is_file() and stamp.read_text().strip() == key and written:
        log(f"fine-tuned model: reusing {out}")
        return out
    kwargs = {**recipe, "lora": LoraSpec(**recipe["lora"])} if recipe.get("lora") else recipe
    finetune(base, task_dir / "train.jsonl", out, log=log, force=True, **kwargs)
    stamp.write_text(key + "\n")
    return out


def general_calibration(task_root: Path, out: Path, per_task: int = 8) -> Path:
    """The general calibration set (module docstring), images by absolute path."""
    from ..stats.data import load_samples

    rows = []
    for name in T.GENERAL_VISUAL:
        for s in load_samples(task_root / name / "train.jsonl", n=per_task, seed=0):
            rows.append({"id": f"{name}-{s.id}", "image": str(Path(s.image).resolve()),
                         "question": s.turns[0][1], "answer": s.turns[1][1]})
    for line in (task_root / "probes" / "val.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.append({"id": f"probes-{r['id']}", "question": r["question"], "answer": r["answer"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not out.is_file() or out.read_text() != text:
        out.write_text(text)
    return out


def fisher_files(base: Path, ft: Path, general: Path, task_data: Path, stats_dir: Path, log, *,
                 task_fishers: Sequence[tuple[str, str]] = (TASK_FISHER_CGM,), recipe: dict | None = None
                 ) -> dict[tuple[str, str], dict[str, Path]]:
    """The general Fisher at θ₀ on the general data (once) and, for each ``(at, variant)`` in `task_fishers`, the
    task Fisher on the task's training data at θ₀ (``at == "base"``) or θ_ft (``"finetuned"``), ``empirical`` or
    ``sampled``; all over CGM†'s published scope (which contains CGM's), reused when model, data selection, scope
    and variant match. :data:`TASK_FISHER_PATH` is the fine-tune's own optimizer state (:func:`optimizer_fisher`,
    needs the fine-tuning `recipe`). Returns, per task Fisher, the ``fisher_general`` and ``fisher_task`` files a
    recipe needs."""
    from ..chains.cgm import published_scope
    from ..chains.steps import statistics_step

    scope = published_scope(base, "cgm_dagger")

    def one(role: str, model: Path, data: Path, variant: str, path: Path) -> Path:
        return statistics_step("fisher", model, data, path, scope=scope, n=STATS_SAMPLES, seed=0, variant=variant,
                               role=role, log=log, batch_size=8)

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
    (then the moments are exactly those of `ft`'s run) is logged and kept beside the file."""
    from ..train import finetune
    from ..train.moments import OptimizerFisher

    key = finetune_key(base, task_dir, recipe)
    stamp = path.with_name(path.name + ".json")
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        log(f"optimizer Fisher: reusing {path}")
        return path
    scratch = path.parent / f".{path.stem}-finetune"
    hook = OptimizerFisher()
    finetune(base, task_dir / "train.jsonl", scratch, log=log, force=True, hook=hook, **recipe)
    same = weights_digest(scratch) == weights_digest(ft)
    log(f"optimizer Fisher: the re-run's weights {'equal' if same else 'DIFFER from'} {ft}'s")
    hook.save(path, scratch)
    stamp.write_text(json.dumps({"key": key, "same_weights_as_finetuned": same}) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    return path


def merge_recipe(method: str, params: dict, base: Path, ft: Path, stats: dict[str, Path] | None) -> dict:
    from ..chains.cgm import published_scope

    recipe: dict[str, Any] = {"method": method, "base": str(base), "parameters": dict(params), "seed": 0}
    if method == "fisher_with_base":
        recipe["models"] = [{"model": str(ft), "statistics": {"fisher": str(stats["fisher_task"])}}]
        recipe["statistics"] = {"fisher_base": str(stats["fisher_general"])}
        recipe["scope"] = {"include": published_scope(base, "cgm_dagger"), "outside": "finetuned",
                           "no_statistics": "finetuned"}
    elif method in ("cgm", "cgm_dagger"):
        recipe["models"] = [str(ft)]
        recipe["statistics"] = {k: str(v) for k, v in stats.items()}
        recipe["scope"] = {"include": published_scope(base, method), "outside": "finetuned",
                           "no_statistics": "finetuned"}
    else:
        recipe["models"] = [str(ft)]
    return recipe


def run_experiment(task: str, workdir: str | Path, *, merges=None, keeps: list[tuple[str, str]] | None = None,
                   finetune_recipe: dict | None = None, limits: dict[str, int] | None = None,
                   task_limit: int | None = None, split: str = "test", keep_models: bool = False,
                   eval_batch_size: int = 16, results_name: str = "results.json",
                   log: Callable[[str], None] = print) -> dict:
    """Fine-tune on `task`, merge with each method, evaluate; returns (and writes to workdir/`results_name`) rows
    with T, G_v, G_t, G, E, F, E+F per model. `keeps`: (label, rule) pairs, each a further fine-tune of the same
    recipe with that keep rule (e.g. :data:`KEEPS`), evaluated as a row of its own."""
    import forgetless

    from ..eval.metrics import compare
    from .build import testbed_model

    merges = MERGES if merges is None else merges
    for m in merges:
        if m.model is not None and (m.task_fisher is not None or m.model not in dict(map(reversed, KEEPS))):
            raise ValueError(f"merge {m.label!r}: model must be a keep rule of KEEPS ({[r for _, r in KEEPS]}), "
                             "and a merge of a keep rule's fine-tune takes no statistics (they are the plain "
                             "fine-tune's)")
    t_start = time.perf_counter()
    workdir = Path(workdir)
    timings = {"setup": 0.0, "finetune": 0.0, "statistics": 0.0, "merge": 0.0, "evaluate": 0.0}
    t = time.perf_counter()
    base = testbed_model()
    roots = T.write_tasks(workdir.parent / "tasks" if workdir.name != "tasks" else workdir,
                          [task, *T.GENERAL_VISUAL, "probes"])
    task_root = roots[task].parent
    timings["setup"] = time.perf_counter() - t
    recipe = {**FINETUNE, **(finetune_recipe or {})}
    t = time.perf_counter()
    ft = finetuned_model(base, roots[task], workdir / "finetuned", recipe, log)
    timings["finetune"] = time.perf_counter() - t

    general = {n: roots[n] for n in [*T.GENERAL_VISUAL, "probes"]}
    lim = {**(limits or {}), task: task_limit} if (limits or task_limit) else None
    cache = workdir.parent / "eval-cache"

    def evaluate(model: Path) -> tuple[dict, bool]:
        t0 = time.perf_counter()
        r = cached_evaluate(model, {task: roots[task]}, general, cache_dir=cache, split=split, limit=lim,
                            batch_size=eval_batch_size, log=None)
        timings["evaluate"] += time.perf_counter() - t0
        return r

    rows: list[dict] = []
    base_r, c0 = evaluate(base)
    ft_r, c1 = evaluate(ft)
    for label, r, cached in (("base", base_r, c0), ("fine-tuned", ft_r, c1)):
        rows.append({"method": label, "knob": "", "result": r, **compare(r, base_r, ft_r), "cached_eval": cached})
        log(f"{label}: T {rows[-1]['T']:.1f}  G_v {rows[-1]['G_v']:.1f}  G_t {rows[-1]['G_t']:.1f}"
            f"{'  (cached)' if cached else ''}")

    for label, keep in keeps or []:
        t = time.perf_counter()
        model = finetuned_model(base, roots[task], workdir / f"finetuned-{keep}", {**recipe, "keep": keep}, log)
        timings["finetune"] += time.perf_counter() - t
        r, cached = evaluate(model)
        seconds = json.loads((model / "finetune.json").read_text())["seconds"]
        rows.append({"method": label, "knob": "", "result": r, **compare(r, base_r, ft_r), "cached_eval": cached,
                     "finetune_seconds": seconds})
        log(f"{label}: T {rows[-1]['T']:.1f}  G {rows[-1]['G']:.1f}  E {rows[-1]['E']:+.1f}  "
            f"F {rows[-1]['F']:+.1f}{'  (cached)' if cached else ''}")

    needed = list(dict.fromkeys(m.task_fisher for m in merges if m.task_fisher is not None))
    stats_by: dict[tuple[str, str], dict[str, Path]] = {}
    if needed:
        t = time.perf_counter()
        gen = general_calibration(task_root, workdir / "calibration" / "general.jsonl")
        stats_by = fisher_files(base, ft, gen, roots[task] / "train.jsonl", workdir / "statistics", log,
                                task_fishers=needed, recipe=recipe)
        timings["statistics"] += time.perf_counter() - t
    for label, method, params, task_fisher, model in merges:
        stats = stats_by.get(task_fisher) if task_fisher is not None else None
        out = workdir / "merged" / f"{method}-{stable_hash([params, task_fisher, model])[:6]}"
        source = ft if model is None else finetuned_model(base, roots[task], workdir / f"finetuned-{model}",
                                                          {**recipe, "keep": model}, log)
        t = time.perf_counter()
        report = forgetless.merge(merge_recipe(method, params, base, source, stats), out=out, force=True,
                                  progress=False, log=None)
        timings["merge"] += time.perf_counter() - t
        r, cached = evaluate(out)
        knob = " ".join(f"{k}={v:g}" for k, v in params.items())
        rows.append({"method": label, "knob": knob, "result": r, **compare(r, base_r, ft_r), "cached_eval": cached,
                     "summary": report.summary()})
        log(f"{label} ({knob}): T {rows[-1]['T']:.1f}  G {rows[-1]['G']:.1f}  E {rows[-1]['E']:+.1f}  "
            f"F {rows[-1]['F']:+.1f}{'  (cached)' if cached else ''}")
        if not keep_models:
            shutil.rmtree(out, ignore_errors=True)
    timings["total"] = time.perf_counter() - t_start
    results = {"task": task, "split": split, "limits": lim, "finetune": recipe, "base": str(base),
               "finetuned": str(ft), "rows": [{k: v for k, v in r.items() if k != "result"} | task_fields(r["result"])
                                              for r in rows],
               "timings": {k: round(v, 1) for k, v in timings.items()},
               "threads": torch.get_num_threads()}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / results_name).write_text(json.dumps(results, indent=1) + "\n")
    return results
