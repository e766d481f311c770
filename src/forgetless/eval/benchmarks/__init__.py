"""Standard retention benchmarks, read from the files their maintainers publish and scored by their official metric.

    forgetless eval MODEL --benchmark pope --benchmark-dir /data/POPE --out merged.json

Each benchmark is a :class:`Benchmark` in :data:`REGISTRY`: ``read(folder)`` turns the benchmark's own files into
:class:`Item` s (the prompt as the LLaVA evaluation scripts build it, the reference answer as the assistant turn),
the model answers every item by greedy generation, and ``score(items, predictions)`` applies the official scorer.

A benchmark is one task of the result (kind ``general_visual``: it measures what was kept), so E, F and the paired
intervals work as for any task. Its per-item values are per *unit* — the items that stand or fall together
(MME's two questions of an image, MMBench's circular copies of a question) — and their mean is ``accuracy``:
``accuracy × scale`` is the benchmark's headline figure in its own units (:attr:`Benchmark.headline`). The
official scorer's full figures are in the result's ``benchmarks`` section.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ForgetlessError
from ...stats.data import Sample

CACHE_ENV = "FORGETLESS_CACHE"
# the line LLaVA-1.5's evaluation scripts put after a short-answer question (VQAv2, GQA, TextVQA, MME, POPE)
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass
class Item(Sample):
    """One benchmark question: a :class:`~forgetless.stats.data.Sample` (image, prompt, reference answer) with
    ``unit``, the resampling unit it belongs to, and ``meta``, what the scorer needs beyond the generated text
    (the human answers, the category, the option letters …)."""

    unit: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Scored:
    """What a scorer returns: ``values``, one per unit in the order units first appear among the items (their
    mean is the result's ``accuracy``), ``correct``, per item whether the official rule counts it right (for
    reading the predictions), and ``official``, the official scorer's figures (keys and units as it reports)."""

    values: list[float]
    correct: list[bool]
    official: dict[str, Any]


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: how its files are read, how predictions are scored, and what its headline figure is
    (``accuracy × scale`` in ``headline``'s units). ``max_new_tokens``: how long an answer may be; ``graded``:
    its unit values are graded (VQA accuracy, CIDEr), recorded as ``item_scores`` even where all are 0 or 1."""

    name: str
    description: str
    read: Callable[[Path], list[Item]]
    score: Callable[[list[Item], list[str]], Scored]
    headline: str
    scale: float = 100.0
    max_new_tokens: int = 16
    graded: bool = False


REGISTRY: dict[str, Benchmark] = {}


def register(bench: Benchmark) -> Benchmark:
    """Add ``bench`` to :data:`REGISTRY` (a name is registered once)."""
    if bench.name in REGISTRY:
        raise ValueError(f"benchmark {bench.name!r} registered twice")
    REGISTRY[bench.name] = bench
    return bench


def get(name: str) -> Benchmark:
    """The registered benchmark ``name``, or an error listing them."""
    _load_all()
    if name not in REGISTRY:
        raise ForgetlessError(
            f"unknown benchmark {name!r}", remedy=f"choose one of {', '.join(sorted(REGISTRY)) or '(none)'}"
        )
    return REGISTRY[name]


def names() -> list[str]:
    """Every registered benchmark's name."""
    _load_all()
    return sorted(REGISTRY)


def _load_all() -> None:
    """Import the modules that register the benchmarks (on first use, so importing forgetless stays light)."""
    from . import families  # noqa: F401


# ----------------------------------------------------------------------------------------------------------------
# what readers share


def need_file(folder: Path, *names: str) -> Path:
    """The first of ``names`` that exists under ``folder``, or an error naming what was looked for."""
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise ForgetlessError(
        f"no {' or '.join(names)} in the benchmark folder",
        file=folder,
        remedy="pass --benchmark-dir the folder the benchmark's maintainers publish (see docs/evaluation.md)",
    )


def cache_dir(*parts: str) -> Path:
    """Where decoded files are kept between runs: ``$FORGETLESS_CACHE`` (default ``~/.cache/forgetless``)/parts."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "forgetless")
    return root.joinpath(*parts)


def decoded_image(data: bytes, folder: Path, suffix: str = ".png") -> Path:
    """``data`` (an image file's bytes) as a file in ``folder`` named by its sha256, written once and whole."""
    from ...checkpoint.writer import atomic_write

    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    return path


def units_in_order(items: Sequence[Item]) -> list[str]:
    """The distinct units of ``items`` in the order they first appear."""
    return list(dict.fromkeys(it.unit for it in items))


def by_unit(items: Sequence[Item], flags: Sequence[float]) -> dict[str, list[float]]:
    """Per unit (first-appearance order), its items' values in item order."""
    out: dict[str, list[float]] = {u: [] for u in units_in_order(items)}
    for it, v in zip(items, flags):
        out[it.unit].append(v)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the result's task entry


def unit_fingerprints(items: Sequence[Item], item_prints: Sequence[str]) -> list[str]:
    """Per unit, 12 hex digits of the sha256 of its items' fingerprints: two results are compared unit by unit
    only when they were scored on the same questions."""
    per: dict[str, list[str]] = {u: [] for u in units_in_order(items)}
    for it, fp in zip(items, item_prints):
        per[it.unit].append(fp)
    return [hashlib.sha256(json.dumps(v).encode()).hexdigest()[:12] for v in per.values()]


def task_entry(
    bench: Benchmark,
    folder: Path,
    items: list[Item],
    predictions: list[str],
    item_prints: list[str],
    keep: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The result's task entry for ``bench`` (per-unit values, their mean as ``accuracy``) and its official
    figures (with the headline)."""
    from ..harness import _answer
    from ..metrics import correct_items

    scored = bench.score(items, predictions)
    n = len(units_in_order(items))
    if len(scored.values) != n or len(scored.correct) != len(items):
        raise AssertionError(f"{bench.name}: the scorer returned {len(scored.values)} values for {n} units")
    accuracy = sum(scored.values) / n
    entry: dict[str, Any] = {
        "kind": "general_visual",
        "path": str(folder),
        "metric": "benchmark",
        "benchmark": bench.name,
        "n": n,
        "n_questions": len(items),
        "correct": round(sum(scored.values), 6),
        "accuracy": accuracy,
        "item_fingerprints": unit_fingerprints(items, item_prints),
    }
    if not bench.graded and all(v in (0.0, 1.0) for v in scored.values):
        entry["correct_items"] = correct_items([v == 1.0 for v in scored.values])
    else:
        entry["item_scores"] = [float(v) for v in scored.values]
    if keep:
        entry["predictions"] = [
            {"id": it.id, "unit": it.unit, "answer": _answer(it), "prediction": p, "correct": c}
            for it, p, c in zip(items, predictions, scored.correct)
        ]
    official = {"headline": bench.headline, "value": accuracy * bench.scale, **scored.official}
    return entry, official
