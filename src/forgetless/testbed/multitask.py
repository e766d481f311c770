"""Merging LoRA adapters of several tasks on the testbed, with seen and held-out (unseen) tasks — CoPA-Merging's
protocol (MM-MergeBench) in small, every step cached.

1. one LoRA adapter per **seen** task (:data:`forgetless.testbed.tasks.SEEN`: the four downstream tasks and
   ``largest_colour``, ``odd_colour``) with the fixed recipe :data:`ADAPTER`, cached by
   :func:`.experiment.finetune_key`; each checked on its validation split (:data:`LEARNED`);
2. one LoRA trained **jointly** on all seen training splits mixed (:func:`joint_data`), the same recipe with
   :data:`JOINT_STEPS_PER_TASK` steps per seen task — the multi-task reference;
3. task arithmetic's λ chosen on the seen tasks' **validation** splits (:data:`SWEEP`, the best mean seen
   accuracy), DARE taking the same λ; TIES and CoPA at their published defaults (:data:`MERGES`);
4. the merges, each through :func:`forgetless.merge` with ``fold: true`` (a full model folder the harness loads);
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ForgetlessError
from ..eval.cache import cached_evaluate
from . import experiment as X
from . import tasks as T

# LoRA on every Linear of the decoder layers (attention and MLP), rank 16 as in MM-MergeBench's LLaVA recipe,
# alpha 2r; the vision tower and projector stay frozen (the adapters differ only in language.layers). lr 5e-4:
# LoRA's usual 2–5× the full fine-tune's 2e-4 (experiment.FINETUNE) for the same short run of 120 steps of 8.
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
ADAPTER = {"train": ["language.layers"], "lora": LORA, "steps": 120, "batch_size": 8, "lr": 5e-4, "warmup": 10,
           "clip": 1.0, "seed": 0}
# the joint adapter: 60 steps per seen task (360 for six, three times one adapter's run), half the samples of each
# task that its own adapter sees — what one session's compute allowed (a step takes ~1.6 s on 2 cores)
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
]
# λ on the seen tasks' validation splits: a grid, or the label of a row whose chosen λ is taken. The sum of 6 task
# vectors wants λ well below 1 (task arithmetic's authors find 0.3–0.5 for 8 tasks). DARE's random drop is
# rescaled, so its sum equals task arithmetic's in expectation: it takes TA's λ. TIES averages the agreeing
# entries (a disjoint mean, not a sum): λ = 1 as its paper, fixed (no entry here).
SWEEP: dict[str, list[float] | str] = {"lora_task_arithmetic": [0.3, 0.5, 0.8], "lora_dare_linear": "TA"}
EVAL_BATCH = 16


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
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    meta = json.dumps({"name": "joint", "tasks": seen, "version": T.VERSION, "seed": seed}, indent=1) + "\n"
    for f, content in (("train.jsonl", text), ("task.json", meta)):
        if not (out / f).is_file() or (out / f).read_text() != content:
            (out / f).write_text(content)
    return out


def fold(base: Path, adapter: Path, out: Path, merge: Callable) -> Path:
    """The full model ``base + adapter`` (task arithmetic of ``BASE+ADAPTER`` at λ = 1), for the harness."""
    merge({"method": "task_arithmetic", "base": str(base), "models": [f"{base}+{adapter}"],
           "parameters": {"lambda": 1.0}}, out=out, force=True, progress=False, log=None)
    return out


def merge_adapters(method: str, params: dict, base: Path, adapters: list[Path], out: Path,
                   merge: Callable) -> Any:
    """The adapters merged in adapter space by `method`, folded into a full model folder (``fold: true``)."""
    recipe = {"method": method, "base": str(base), "models": [str(a) for a in adapters],
              "parameters": dict(params), "seed": 0, "fold": True}
    return merge(recipe, out=out, force=True, progress=False, log=None)


def _row(label: str, role: str, knob: str, r: dict, cached: bool, **extra) -> dict:
    return {"method": label, "role": role, "knob": knob, **X.task_fields(r),
            **{k: r["scores"][k] for k in ("G_v", "G_t", "G")}, "cached_eval": cached, **extra}


def _available(method: str) -> bool:
    from ..methods import METHODS

    return method in METHODS


def run_multitask(workdir: str | Path, *, seen: list[str] | None = None, unseen: list[str] | None = None,
                  merges: list[tuple[str, str, dict]] | None = None,
                  sweep: dict[str, list[float] | str] | None = None,
                  adapter_recipe: dict | None = None, tasks_root: str | Path | None = None,
                  cache_dir: str | Path | None = None, limits: dict[str, int] | None = None,
                  keep_models: bool = False, base: Path | None = None, merge: Callable | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """The whole experiment (module docstring); writes and returns ``workdir/results.json``. Tasks are generated
    under `tasks_root` (default ``workdir/../tasks``, shared with :func:`.experiment.run_experiment`) and
    evaluations cached under `cache_dir` (default ``workdir/../eval-cache``), so the base model's scores are
    shared with the single-task experiments. A merge method not registered in :data:`forgetless.methods.METHODS`
    is skipped and listed under ``skipped``. `merge`: the merge function (default :func:`forgetless.merge`)."""
    import forgetless

    from .build import testbed_model

    t_start = time.perf_counter()
    merge = merge or forgetless.merge
    workdir = Path(workdir)
    seen, unseen = list(seen or T.SEEN), list(unseen or T.UNSEEN)
    if set(seen) & set(unseen):
        raise ForgetlessError(f"tasks {sorted(set(seen) & set(unseen))} are both seen and unseen",
                              remedy="a held-out task must not be one an adapter trains on")
    merges = MERGES if merges is None else merges
    sweep = SWEEP if sweep is None else sweep
    recipe = {**ADAPTER, **(adapter_recipe or {})}
    base = Path(base) if base is not None else testbed_model()
    tasks_root = Path(tasks_root) if tasks_root else workdir.parent / "tasks"
    cache = Path(cache_dir) if cache_dir else workdir.parent / "eval-cache"
    roots = T.write_tasks(tasks_root, [*seen, *unseen, *T.GENERAL_VISUAL, "probes"])
    for name in unseen:
        if (roots[name] / "train.jsonl").read_text().strip():
            raise ForgetlessError(f"held-out task {name!r} has training records", file=roots[name] / "train.jsonl",
                                  remedy="an unseen task is generated without a training split (sizes train 0)")
    general = {n: roots[n] for n in [*T.GENERAL_VISUAL, "probes"]}
    timings = {"finetune": 0.0, "merge": 0.0, "evaluate": 0.0}
    models_dir = workdir / "models"

    def evaluate(model: Path, tasks: list[str], split: str = "test", with_general: bool = True):
        t0 = time.perf_counter()
        out = cached_evaluate(model, {n: roots[n] for n in tasks}, general if with_general else None,
                              cache_dir=cache, split=split, limit=limits, batch_size=EVAL_BATCH, log=None)
        timings["evaluate"] += time.perf_counter() - t0
        return out

    def timed_merge(fn: Callable, *args) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        timings["merge"] += time.perf_counter() - t0
        return out

    # 1–2: the adapters (each checked on its validation split) and the joint one
    base_val, _ = evaluate(base, seen, "val", with_general=False)
    adapters: dict[str, Path] = {}
    learned: dict[str, dict] = {}
    for name in seen:
        t0 = time.perf_counter()
        adapters[name] = X.finetuned_model(base, roots[name], workdir / "adapters" / name, recipe, log)
        timings["finetune"] += time.perf_counter() - t0
        folded = timed_merge(fold, base, adapters[name], models_dir / f"own-{name}", merge)
        r, _ = evaluate(folded, [name], "val", with_general=False)
        b, a = 100 * base_val["tasks"][name]["accuracy"], 100 * r["tasks"][name]["accuracy"]
        learned[name] = {"base_val": round(b, 2), "adapter_val": round(a, 2), "learned": a - b >= LEARNED}
        log(f"adapter {name}: validation {b:.1f} → {a:.1f}" + ("" if a - b >= LEARNED else "  (did not learn)"))
    joint_recipe = {**recipe, "steps": JOINT_STEPS_PER_TASK * len(seen)}
    t0 = time.perf_counter()
    joint = X.finetuned_model(base, joint_data(roots, seen, workdir / "joint-data"), workdir / "adapters" / "joint",
                              joint_recipe, log)
    timings["finetune"] += time.perf_counter() - t0

    # 3: the baselines' λ on the seen validation splits
    chosen: dict[str, dict] = {}
    sweeps: list[dict] = []
    skipped: list[str] = []
    order = [a for _, a in sorted((seen.index(n), adapters[n]) for n in seen)]
    for label, method, params in merges:
        if not _available(method):
            skipped.append(f"{label} ({method})")
            log(f"{label}: method {method!r} is not registered yet, skipped")
            continue
        grid = sweep.get(method)
        if isinstance(grid, str):  # the λ chosen for another row
            if grid not in chosen:
                raise ForgetlessError(f"{label} takes the λ of {grid!r}, which is not chosen before it",
                                      remedy="list that row earlier in merges, with a grid in sweep")
            chosen[label] = {**params, "lambda": chosen[grid]["lambda"]}
            continue
        if not grid or "lambda" in params:
            chosen[label] = dict(params)
            continue
        best = None
        for lam in grid:
            p = {**params, "lambda": lam}
            out = models_dir / "sweep"
            timed_merge(merge_adapters, method, p, base, order, out, merge)
            r, _ = evaluate(out, seen, "val", with_general=False)
            avg = 100 * sum(r["tasks"][n]["accuracy"] for n in seen) / len(seen)
            sweeps.append({"method": label, "knob": _knob(p), "seen_val": round(avg, 2)})
            log(f"sweep {label} {_knob(p)}: seen validation {avg:.1f}")
            if best is None or avg > best[0]:
                best = (avg, p)
        shutil.rmtree(models_dir / "sweep", ignore_errors=True)
        chosen[label] = best[1]

    # 4–5: every model on the test splits
    rows: list[dict] = []
    everything = [*seen, *unseen]
    r, c = evaluate(base, everything)
    rows.append(_row("base", "base", "", r, c))
    for name in seen:
        folded = models_dir / f"own-{name}"
        if not folded.is_dir():
            timed_merge(fold, base, adapters[name], folded, merge)
        r, c = evaluate(folded, [name])
        rows.append(_row(f"own adapter: {name}", "own", "", r, c, task=name))
        if not keep_models:
            shutil.rmtree(folded, ignore_errors=True)
    folded = timed_merge(fold, base, joint, models_dir / "joint", merge)
    r, c = evaluate(folded, everything)
    rows.append(_row("joint LoRA", "joint", "", r, c))
    if not keep_models:
        shutil.rmtree(folded, ignore_errors=True)
    for label, method, _ in merges:
        if label not in chosen:
            continue
        out = models_dir / "merged"
        report = timed_merge(merge_adapters, method, chosen[label], base, order, out, merge)
        r, c = evaluate(out, everything)
        summary = report.summary() if hasattr(report, "summary") else None
        rows.append(_row(label, "merge", _knob(chosen[label]), r, c, merge_method=method, summary=summary))
        if not keep_models:
            shutil.rmtree(out, ignore_errors=True)
        log(f"{label} ({_knob(chosen[label])}): " + "  ".join(f"{n} {rows[-1]['tasks'][n]:.1f}" for n in everything)
            + f"  G {rows[-1]['G']:.1f}")
    results = {"seen": seen, "unseen": unseen, "general": list(general), "split": "test", "limits": limits,
               "adapter": recipe, "joint_steps": joint_recipe["steps"], "base": str(base),
               "adapters": {n: str(p) for n, p in adapters.items()}, "joint": str(joint),
               "validation": learned, "sweep": sweeps, "chosen": {k: _knob(v) for k, v in chosen.items()},
               "skipped": skipped, "rows": rows,
               "timings": {k: round(v, 1) for k, v in {**timings, "total": time.perf_counter() - t_start}.items()},
               "threads": torch.get_num_threads()}
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(workdir / "results.json")
    return results
