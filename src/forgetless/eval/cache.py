"""Evaluations cached by what determines them: the model's weights (sha256 of its weight files), the task files
(sha256, and their place relative to the cache: a workdir copied elsewhere keeps its entries), the split, the
limit, the dtype the model ran in and the harness version. A merge that produces the same weights as another (task
arithmetic and WiSE-FT of one model at the same λ) is evaluated once. Each task's score is
a content-addressed step (:class:`forgetless.chains.steps.Step`): its file is named by the fingerprint of those."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..chains.steps import Step, fingerprint

EVAL_VERSION = (
    2  # bump when scoring or the stored fields change: it invalidates cached results (2: correct_items)
)
# (acc_norm beside acc did not bump it: acc is unchanged, and an entry without acc_norm reads as lacking it)


def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def weights_digest(model_dir: str | os.PathLike) -> str:
    """sha256 over the folder's weight files (safetensors / bin, sorted by name), config.json and a CPM routing
    config (its τ and hard/soft routing change the outputs)."""
    d = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(
        p
        for p in d.iterdir()
        if p.suffix in (".safetensors", ".bin") or p.name in ("config.json", "cpm_routing.json")
    )
    for p in files:
        h.update(p.name.encode() + b"\0")
        _file_digest(p, h)
    return h.hexdigest()[:20]


def _task_digest(spec: Any, split: str, cache: Path) -> str:
    """The task file's content and its place relative to the `cache` folder (its images are found from there):
    the key a copy of the whole workdir, on another machine or in another folder, finds again."""
    p = Path(getattr(spec, "path", None) or spec)  # a path, or a harness TaskSpec
    h = hashlib.sha256()
    target = p / f"{split}.jsonl" if p.is_dir() else p
    h.update(os.path.relpath(target.resolve(), cache.resolve()).encode())
    if target.is_file():
        _file_digest(target, h)
    return h.hexdigest()[:16]


def _cache_step(
    cache: Path, digest: str, split: str, name: str, group: int, spec: Any, limit: int | None, dtype: str
) -> Step:
    """A task's score as a step: its file named by the fingerprint of everything that determines it."""
    fields = {
        "v": EVAL_VERSION,
        "w": digest,
        "split": split,
        "name": name,
        "group": group,
        "t": _task_digest(spec, split, cache),
        "limit": limit,
    }
    if dtype != "float32":
        fields["dtype"] = dtype
    return Step(cache / f"{fingerprint(fields, 24)}.json")


def cached_evaluate(
    model_dir: str | os.PathLike,
    tasks: dict[str, Any],
    general: dict[str, Any] | None,
    *,
    cache_dir: str | os.PathLike,
    split: str = "test",
    limit: int | dict[str, int] | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "auto",
    log=print,
) -> tuple[dict[str, Any], bool]:
    """(result, whether every task came from the cache). Each task's score is cached on its own (weights digest,
    task file digest, split, limit), so the base model's general scores are computed once for every experiment.
    ``limit`` may be one number or a per-task mapping (a task absent from it: no limit). Multiple choice is
    scored as ``acc`` and ``acc_norm``, not ``lmms_eval_acc`` (its extra token per option is not paid here).
    A score in another ``dtype`` than float32 is cached apart (float32's keys are those of earlier versions)."""
    from ..stats.distributed import dist_info, from_rank0
    from .harness import EvalOptions, evaluate
    from .metrics import scores

    general = general or {}
    limits = limit if isinstance(limit, dict) else {n: limit for n in [*tasks, *general]}
    digest = weights_digest(model_dir)
    cache = Path(cache_dir)
    entries: dict[str, Any] = {}
    missing: dict[int | None, tuple[dict, dict]] = {}
    keyed = [
        (group, name, spec) for group, pairs in enumerate((tasks, general)) for name, spec in pairs.items()
    ]
    steps = [
        _cache_step(cache, digest, split, name, group, spec, limits.get(name), dtype)
        for group, name, spec in keyed
    ]
    done = from_rank0([s.done() for s in steps])  # under torchrun every rank takes rank 0's entries
    for (group, name, spec), step, entry in zip(keyed, steps, done):
        if entry is not None:
            entries[name] = entry
        else:
            missing.setdefault(limits.get(name), ({}, {}))[group][name] = (spec, step)
    for lim, (t, g) in missing.items():
        r = evaluate(
            model_dir,
            {n: s for n, (s, _) in t.items()},
            general={n: s for n, (s, _) in g.items()},
            options=EvalOptions(split=split, limit=lim, batch_size=batch_size, dtype=dtype, device=device),
            log=log,
            progress=log is not None,
            keep_predictions=False,
            metrics=("acc", "acc_norm"),
        )
        for name, (_, step) in {**t, **g}.items():
            entry = {**r["tasks"][name], "seconds": r.get("seconds")}
            if dist_info()[0] == 0:
                step.save(entry)
            entries[name] = entry
    result: dict[str, Any] = {
        "model": str(model_dir),
        "split": split,
        "dtype": dtype,
        "tasks": {n: entries[n] for n in [*tasks, *general]},
    }
    result["scores"] = scores(result)
    return result, not missing
