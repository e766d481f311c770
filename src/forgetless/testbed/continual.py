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

3. every model evaluated on the test splits of tasks 1..t (:data:`TASK_LIMIT` items each); after the last task
   also on the general tasks (G). The task's own adapter, folded alone, gives "just after learning" for the
   individual reference row.

``results.json`` keeps, per method, the accuracy matrix (row t: after task t) with each cell's per-item
correctness, from which :mod:`.report` bootstraps final average accuracy, average forgetting and G. Every cell is
cached in ``cells/`` (its key: the method, its options, the adapters so far, split and limit), so a rerun redoes
only what changed; LPM's state folders step on only as far as they have not.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ForgetlessError
from ..eval.cache import cached_evaluate
from . import experiment as X
from . import multitask as MT
from . import tasks as T

# the task sequence: the five downstream tasks whose adapters learn (multitask.LEARNED; odd_colour does not)
SEQUENCE = ["digits", "spatial", "count_many", "tag", "largest_colour"]
# multitask's adapter recipe, with LoRA on the projector's two Linear layers too: MAny's setting trains the
# projector with each task, and CPM keeps one projector per task (without it, CPM would route between copies)
LORA = {**MT.LORA, "targets": [*MT.LORA["targets"], "projector"]}
ADAPTER = {**MT.ADAPTER, "train": ["language.layers", "projector"], "lora": LORA}
TASK_LIMIT = 300  # test items per task and cell: 15 cells per method (5 + 4 + … + 1), ~5 min of evaluation each
TA_GRID = [0.4, 0.7, 1.0]  # task arithmetic's λ, chosen after every task on the validation splits of tasks so far
# the Linear layers the adapters adapt (every one of the decoder layers and the projector's two): RegMean's scope
ADAPTED_SCOPE = ["language.layers", "projector"]
GRAM_SAMPLES = 64  # training samples per task for the Grams (LPM's at the base, RegMean's at each folded model)
METHODS = ["sequential FT", "TA", "TIES", "RegMean", "LPM", "LPM (diagonal)", "LPM + CPM"]
LPM_STATES = {"LPM": {}, "LPM (diagonal)": {"approx": "diagonal"}, "LPM + CPM": {"cpm": True}}
REGMEAN = {"alpha": 0.9}
TIES = {"density": 0.2, "lambda": 1.0}
EVAL_BATCH = MT.EVAL_BATCH


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def _adapter_fp(adapter: Path) -> str:
    return (adapter / "recipe.hash").read_text().strip()


def run_continual(workdir: str | Path, *, sequence: list[str] | None = None, methods: list[str] | None = None,
                  adapter_recipe: dict | None = None, tasks_root: str | Path | None = None,
                  cache_dir: str | Path | None = None, task_limit: int | None = TASK_LIMIT,
                  general_limits: dict[str, int] | None = None, gram_samples: int = GRAM_SAMPLES,
                  ta_grid: list[float] | None = None, joint: bool = True, base: Path | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """The whole protocol (module docstring); writes and returns ``workdir/results.json``. Tasks are generated under
    `tasks_root` (default ``workdir/../tasks``) and evaluations cached under `cache_dir` (default
    ``workdir/../eval-cache``), shared with the other testbed experiments."""
    import forgetless

    from ..chains.continual import add_task, load_state, state_bytes
    from ..chains.steps import statistics_step
    from .build import testbed_model

    t_start = time.perf_counter()
    workdir = Path(workdir)
    sequence = list(sequence or SEQUENCE)
    methods = list(METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(sequence) < 2:
        raise ForgetlessError(f"unknown methods {unknown}" if unknown else "a sequence needs two tasks or more",
                              remedy=f"methods from {METHODS}; a sequence of testbed task names")
    recipe = {**ADAPTER, **(adapter_recipe or {})}
    ta_grid = list(ta_grid or TA_GRID)
    base = Path(base) if base is not None else testbed_model()
    tasks_root = Path(tasks_root) if tasks_root else workdir.parent / "tasks"
    cache = Path(cache_dir) if cache_dir else workdir.parent / "eval-cache"
    roots = T.write_tasks(tasks_root, [*sequence, *T.GENERAL_VISUAL, "probes"])
    general = {n: roots[n] for n in [*T.GENERAL_VISUAL, "probes"]}
    models_dir, cells_dir, stats_dir = workdir / "models", workdir / "cells", workdir / "statistics"
    cells_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {"finetune": 0.0, "statistics": 0.0, "evaluate": 0.0}
    merge_seconds: dict[str, list[float]] = {m: [] for m in methods}

    def evaluate(model: Path, names: list[str], split: str = "test", with_general: bool = False):
        t0 = time.perf_counter()
        lim = {n: task_limit for n in names} if task_limit else {}
        out = cached_evaluate(model, {n: roots[n] for n in names}, general if with_general else None,
                              cache_dir=cache, split=split, limit={**lim, **(general_limits or {})} or None,
                              batch_size=EVAL_BATCH, log=None)
        timings["evaluate"] += time.perf_counter() - t0
        return out

    def finetuned(task_dir: Path, out: Path, r: dict) -> Path:
        t0 = time.perf_counter()
        p = X.finetuned_model(base, task_dir, out, r, log)
        timings["finetune"] += time.perf_counter() - t0
        return p

    def merge_adapters(method: str, params: dict, adapters: list[Path], out: Path) -> Any:
        return MT.merge_adapters(method, params, base, adapters, out, forgetless.merge)

    # 1: the adapters, the sequential chain, the joint adapter
    own = {n: finetuned(roots[n], workdir / "adapters" / n, recipe) for n in sequence}
    chain = [own[sequence[0]]]
    for t, name in enumerate(sequence[1:], 2):
        chain.append(finetuned(roots[name], workdir / "sequential" / f"{t}-{name}",
                               {**recipe, "init_adapter": str(chain[-1])}))
    joint_steps = MT.JOINT_STEPS_PER_TASK * len(sequence)
    joint_adapter = finetuned(MT.joint_data(roots, sequence, workdir / "joint-data"), workdir / "adapters" / "joint",
                              {**recipe, "steps": joint_steps}) if joint else None
    train = {n: roots[n] / "train.jsonl" for n in sequence}

    # the own adapters folded: the individual reference, and RegMean's models (with their Grams at themselves)
    folded: dict[str, Path] = {}

    def own_model(name: str) -> Path:
        if name not in folded:
            out = models_dir / f"own-{name}"
            stamp = out / "adapter.hash"
            if not (stamp.is_file() and stamp.read_text() == _adapter_fp(own[name])):
                MT.fold(base, own[name], out, forgetless.merge)
                stamp.write_text(_adapter_fp(own[name]))
            folded[name] = out
        return folded[name]

    grams: dict[str, Path] = {}

    def own_gram(name: str) -> Path:
        if name not in grams:
            t0 = time.perf_counter()
            grams[name] = statistics_step("gram", own_model(name), train[name],
                                          stats_dir / f"regmean-gram-{name}.safetensors", scope=ADAPTED_SCOPE,
                                          n=gram_samples, seed=0, role=f"RegMean Gram ({name})", log=log,
                                          batch_size=8, progress=False)
            timings["statistics"] += time.perf_counter() - t0
        return grams[name]

    def save_cell(f: Path, row: dict) -> None:
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(row) + "\n")
        tmp.replace(f)

    # 2–3: the accuracy matrices, one cell (method, after task t) at a time
    cells: dict[str, list[dict]] = {m: [] for m in methods}
    individual: list[dict] = []
    chosen_ta: list[float] = []

    def after_task(t: int) -> None:
        so_far = sequence[:t]
        last = t == len(sequence)
        fps = [_adapter_fp(own[n]) for n in so_far]
        adapters = [own[n] for n in so_far]

        def cell(label: str, extra: dict, build: Callable[[Path], Any], names: list[str] | None = None,
                 measure: Callable[[], dict] | None = None) -> dict:
            """The cached row of (label, task t), or: build the model, evaluate it, add `measure()` (what the
            build left behind, taken now), save the row."""
            names = names or so_far
            general_too = last and names == so_far
            key = X.stable_hash({"tasks": so_far, "limit": task_limit,
                                 "general": general_limits if general_too else None, "method": label, **extra,
                                 "names": names})
            f = cells_dir / f"{_slug(label)}-{t}.json"
            if f.is_file():
                row = json.loads(f.read_text())
                if row.get("key") == key:
                    return row
            out = models_dir / "current"
            t0 = time.perf_counter()
            built = build(out)
            seconds = time.perf_counter() - t0
            model = built if isinstance(built, Path) else out
            r, _ = evaluate(model, names, with_general=general_too)
            row = {"key": key, "method": label, "step": t, "merge_seconds": round(seconds, 2),
                   **X.task_fields(r), **{k: r["scores"][k] for k in ("G_v", "G_t", "G")}}
            if label == "LPM + CPM" and general_too:
                row["routing"] = routing_accuracy(model, {n: roots[n] for n in sequence})
            row.update(measure() if measure is not None else {})
            save_cell(f, row)
            if model == out:
                shutil.rmtree(out, ignore_errors=True)
            log(f"after task {t} ({so_far[-1]}), {label}: " + "  ".join(f"{n} {row['tasks'][n]:.1f}" for n in names)
                + (f"  G {row['G']:.1f}" if general_too else "") + f"  [{seconds:.0f} s to build]")
            return row

        def lpm_step(out: Path, state: Path, opts: dict) -> Path:
            paths = [str(own[n].resolve()) for n in so_far]
            have = [x["adapter"] for x in load_state(state)["tasks"]] if state.exists() else []
            if have == paths and (out / "config.json").is_file():
                return out  # stepped, and its output written, before an interruption
            todo = so_far
            if have == paths[:-1]:
                todo = so_far[-1:]
            else:  # another history: replay the tasks before this one
                shutil.rmtree(state, ignore_errors=True)
            for n in todo:
                add_task(state, adapter=own[n], data=train[n], n=gram_samples, base=base, name=n,
                         approx=opts.get("approx"), stats_dir=stats_dir, cpm_n=gram_samples,
                         cpm_data=train[n] if opts.get("cpm") else None,
                         out=out if n == so_far[-1] else None, force=True, log=None)
            return out

        # the individual reference: task t by its own adapter, just after learning it
        individual.append(cell("own adapter", {"adapter": fps[-1]}, lambda out: own_model(so_far[-1]),
                               names=so_far[-1:]))
        for label in methods:
            if label == "sequential FT":
                row = cell(label, {"adapter": _adapter_fp(chain[t - 1])},
                           lambda out: MT.fold(base, chain[t - 1], out, forgetless.merge))
            elif label == "TA":
                lam = _choose_ta(adapters, so_far, ta_grid, models_dir, evaluate, merge_adapters, log)
                chosen_ta.append(lam)
                row = cell(label, {"adapters": fps, "lambda": lam}, lambda out, lam=lam: merge_adapters(
                    "lora_task_arithmetic", {"lambda": lam}, adapters, out))
            elif label == "TIES":
                row = cell(label, {"adapters": fps, **TIES},
                           lambda out: merge_adapters("lora_ties", TIES, adapters, out))
            elif label == "RegMean":
                models = [{"model": str(own_model(n)), "statistics": {"gram": str(own_gram(n))}} for n in so_far]
                row = cell(label, {"adapters": fps, **REGMEAN, "gram_samples": gram_samples},
                           lambda out, models=models: forgetless.merge(
                               {"method": "regmean", "base": str(base), "parameters": dict(REGMEAN), "seed": 0,
                                "models": models}, out=out, force=True, progress=False, log=None))
            else:
                opts = LPM_STATES[label]
                state = workdir / "states" / f"{_slug(label)}-{X.stable_hash([recipe, gram_samples, opts])[:8]}"
                row = cell(label, {"adapters": fps, "gram_samples": gram_samples, **opts},
                           lambda out, state=state, opts=opts: lpm_step(out, state, opts),
                           measure=lambda state=state: {"state_bytes": state_bytes(state)})
            cells[label].append(row)
            merge_seconds[label].append(row["merge_seconds"])

    for t in range(1, len(sequence) + 1):
        after_task(t)

    joint_row = None
    if joint_adapter is not None:
        key = X.stable_hash({"joint": _adapter_fp(joint_adapter), "tasks": sequence, "limit": task_limit,
                             "general": general_limits})
        f = cells_dir / "joint.json"
        joint_row = json.loads(f.read_text()) if f.is_file() else None
        if joint_row is None or joint_row.get("key") != key:
            out = MT.fold(base, joint_adapter, models_dir / "current", forgetless.merge)
            r, _ = evaluate(out, sequence, with_general=True)
            joint_row = {"key": key, "method": "joint LoRA", "step": len(sequence), **X.task_fields(r),
                         **{k: r["scores"][k] for k in ("G_v", "G_t", "G")}}
            save_cell(f, joint_row)
            shutil.rmtree(out, ignore_errors=True)
    base_r, _ = evaluate(base, sequence, with_general=True)

    # what each method keeps between tasks to make its next model (after the last task)
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*.safetensors")) if p.is_dir() else p.stat().st_size

    kept: dict[str, int | None] = {}
    for label in methods:
        if label == "sequential FT":
            kept[label] = size(chain[-1])
        elif label in ("TA", "TIES"):
            kept[label] = sum(size(own[n]) for n in sequence)
        elif label == "RegMean":
            kept[label] = sum(size(own_model(n)) + size(own_gram(n)) for n in sequence)
        else:
            kept[label] = cells[label][-1].get("state_bytes")
    results = {"sequence": sequence, "methods": methods, "split": "test", "task_limit": task_limit,
               "general_limits": general_limits, "adapter": recipe, "gram_samples": gram_samples,
               "ta_grid": ta_grid, "joint_steps": joint_steps if joint else None, "ta_lambda": chosen_ta,
               "base": str(base),
               "adapters": {n: str(p) for n, p in own.items()}, "sequential": [str(p) for p in chain],
               "base_row": {"method": "base", **X.task_fields(base_r),
                            **{k: base_r["scores"][k] for k in ("G_v", "G_t", "G")}},
               "individual": individual, "matrices": cells, "joint": joint_row,
               "kept_bytes": kept, "merge_seconds": {k: [round(x, 2) for x in v] for k, v in merge_seconds.items()},
               "timings": {k: round(v, 1) for k, v in {**timings, "total": time.perf_counter() - t_start}.items()},
               "threads": torch.get_num_threads()}
    tmp = workdir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(workdir / "results.json")
    shutil.rmtree(models_dir / "current", ignore_errors=True)
    return results


def _choose_ta(adapters: list[Path], so_far: list[str], grid: list[float], models_dir: Path, evaluate: Callable,
               merge_adapters: Callable, log: Callable[[str], None]) -> float:
    """Task arithmetic's λ after task t: the best mean validation accuracy over tasks 1..t (ties: the first)."""
    best: tuple[float, float] | None = None
    for lam in grid:
        out = models_dir / "sweep"
        merge_adapters("lora_task_arithmetic", {"lambda": lam}, adapters, out)
        r, _ = evaluate(out, so_far, "val")
        avg = 100 * sum(r["tasks"][n]["accuracy"] for n in so_far) / len(so_far)
        if best is None or avg > best[0]:
            best = (avg, lam)
    shutil.rmtree(models_dir / "sweep", ignore_errors=True)
    log(f"TA after {len(so_far)} tasks: λ = {best[1]:g} (validation {best[0]:.1f})")  # type: ignore[index]
    return best[1]  # type: ignore[index]


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
            with Image.open(s.image) as im:  # type: ignore[arg-type]
                imgs.append(im.convert("RGB"))
        pixels[name] = processor(images=imgs, return_tensors="pt")["pixel_values"]
    return {k: round(100 * v, 1) for k, v in route(model, pixels).items()}
