"""The scores forgetless reports: specialization against retention, in percentage points.

A result (what :func:`forgetless.eval.harness.evaluate` returns and ``forgetless eval`` writes) holds, per task, its
``kind`` and ``accuracy`` (a fraction). From it:

- **T**, the task score: the mean accuracy over the ``downstream`` tasks, ×100.
- **G_v**, the visual general score: the mean accuracy over the ``general_visual`` tasks, ×100.
- **G_t**, the text general score: the mean accuracy over the ``general_text`` tasks, ×100.
- **G**, the general score: the mean of G_v and G_t (of whichever exist; each kind weighs the same however many
  tasks it has).

A score whose tasks are absent is ``None``. Relative to the base (pre-trained) model and the fine-tuned model,
for a model m:

- **E = T(m) − T(base)**: the specialization gain, in points.
- **F = G(m) − G(base)**: the change in general ability, signed: negative is forgetting, positive a gain.
- **E + F**: their sum, the net effect (a fine-tune that gains 20 points and forgets 5 nets 15).
- **gain kept = E(m) / E(ft)**: the fraction of the fine-tuned model's gain that m keeps (1.0: all of it; a
  fraction, not points; ``None`` when the fine-tune gained nothing).

E, F and E + F are in percentage points. Results are compared only when they cover the same tasks, split and
sample counts.

**Which option a multiple-choice item picks** (:data:`MC_METRICS`, named as the evaluation harnesses name them).
Each option j is scored by Σⱼ, the summed log-probability of its answer tokens and the end-of-turn token:

- ``acc`` (the default: every figure above, RESULTS.md, the testbed, the sweep): argmax Σⱼ — lm-evaluation-harness's
  ``acc`` rule (which sums its continuation: the option's tokens, no end-of-turn token).
- ``acc_norm``: argmax Σⱼ / (the option's length in characters) — lm-evaluation-harness's ``acc_norm`` rule
  (``lls / completion_len``, ``len`` of the choice string: characters, not bytes — its ``acc_bytes`` divides by
  UTF-8 bytes).
- ``lmms_eval_acc``: argmax (Σⱼ + tⱼ) / (nⱼ + kⱼ), the mean log-probability per token, where tⱼ is the
  log-probability of the kⱼ tokens the chat template renders after the end-of-turn token (ChatML's newline) and nⱼ
  the answer's tokens with the end-of-turn — lmms-eval's ``acc``: its LLaVA models return the mean loss over every
  token after the prompt, and it takes the argmin.

Ties go to the first option in each. A task scored by exact match is the same under every metric. A result
carries the others beside ``acc``: per task ``acc_norm`` / ``lmms_eval_acc`` = ``{"accuracy", "correct",
"correct_items"}``, and :func:`metric_view` turns it into a result whose figures are that metric's.

**Intervals** (:class:`Bootstrap`): each score's 95% interval comes from a seeded bootstrap over the test items —
every task's items are resampled with replacement (B = 2000 times), and the scores recomputed on each resample. The
draws are a function of the seed, the task's name and its item count only, so every model evaluated on the same
items sees the same resamples: E, F and any difference between two models are **paired** (the same resampled
items for both), which is much tighter than two independent intervals when the models agree on most items. With
several fine-tuning seeds of one model, each resample also draws the seeds with replacement. An interval is the
2.5th–97.5th percentile of the resampled values; tables show its half-width (``+30.0 ± 2.1``).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ForgetlessError

SCORE_KEYS = ("T", "G_v", "G_t", "G")
COMPARE_KEYS = ("E", "F", "E+F", "gain_kept")
# how a multiple-choice item's option is picked (module docstring); the first is the default, a result's own figures
MC_METRICS = ("acc", "acc_norm", "lmms_eval_acc")
MC_METRIC_DOC = {
    "acc": "options ranked by summed log-likelihood — lm-evaluation-harness's acc rule (the default)",
    "acc_norm": "log-likelihood per character of the option — lm-evaluation-harness's acc_norm",
    "lmms_eval_acc": "mean log-likelihood per token, the template's tokens after end-of-turn included — lmms-eval's acc",
}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _combine(accuracy: Mapping[str, tuple[str | None, Any]]) -> dict[str, Any]:
    """T, G_v, G_t, G (percent) from each task's (kind, accuracy); an accuracy may be a float or an array of
    resampled accuracies (then every score is an array)."""

    def by_kind(kind: str) -> list:
        return [a for k, a in accuracy.values() if k == kind]

    t, gv, gt = _mean(by_kind("downstream")), _mean(by_kind("general_visual")), _mean(by_kind("general_text"))
    g = _mean([x for x in (gv, gt) if x is not None])
    return {k: (None if v is None else 100.0 * v) for k, v in zip(SCORE_KEYS, (t, gv, gt, g))}


ONE_RULE = (
    "exact",
    "benchmark",
)  # task metrics scored by one rule, the same under every multiple-choice metric


def metric_view(result: Mapping[str, Any], metric: str) -> dict[str, Any] | None:
    """``result`` with every task's ``accuracy``, ``correct`` and ``correct_items`` those of ``metric`` (one of
    :data:`MC_METRICS`), so that :func:`scores`, :func:`compare` and :class:`Bootstrap` give that metric's figures;
    ``None`` when a task scored by multiple choice lacks it (a result written before forgetless recorded it)."""
    if metric not in MC_METRICS:
        raise ForgetlessError(
            f"unknown multiple-choice metric {metric!r}", remedy=f"use one of {', '.join(MC_METRICS)}"
        )
    if metric == MC_METRICS[0]:
        return dict(result)
    tasks = {}
    for name, t in result.get("tasks", {}).items():
        if isinstance(t.get(metric), Mapping):
            tasks[name] = {**t, **t[metric]}
        elif t.get("metric") in ONE_RULE:
            tasks[name] = t
        else:
            return None
    return {**result, "tasks": tasks}


def scores(result: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"T", "G_v", "G_t", "G"}`` of one result, in percent (``None`` where the result has no such task)."""
    return _combine({n: (t.get("kind"), float(t["accuracy"])) for n, t in result.get("tasks", {}).items()})


FINGERPRINTS = "item_fingerprints"  # per task: one short hash per item (what is asked and expected)


def check_items(name: str, fa: Any, fb: Any, path: Any, what: str) -> None:
    """Refuse two results of a task that were scored on different items. A result written before forgetless
    recorded the items has no fingerprints: it is matched by task name and size only (see :func:`unchecked`)."""
    if fa is None or fb is None or fa == fb:
        return
    first = next((i for i, (x, y) in enumerate(zip(fa, fb)) if x != y), min(len(fa), len(fb)))
    raise ForgetlessError(
        f"task {name!r} was scored on other items than the {what}'s (item {first} differs: "
        "another file, split or version of a task with the same name)",
        file=path,
        remedy="evaluate every model on the same task files",
    )


def unchecked(result: Mapping[str, Any]) -> list[str]:
    """The tasks of ``result`` without item fingerprints (written by an older forgetless)."""
    return [n for n, t in result.get("tasks", {}).items() if t.get(FINGERPRINTS) is None]


def _check_same(a: Mapping[str, Any], b: Mapping[str, Any], what: str) -> None:
    ta, tb = a.get("tasks", {}), b.get("tasks", {})
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            raise ForgetlessError(
                f"task {name!r} is in one result but not in the {what}'s",
                file=b.get("path") or a.get("path"),
                remedy="evaluate every model on the same --tasks and --general",
            )
        ka, kb = ta[name].get("kind"), tb[name].get("kind")
        na, nb = ta[name].get("n"), tb[name].get("n")
        if ka != kb or na != nb:
            raise ForgetlessError(
                f"task {name!r} differs from the {what}'s (kind {ka} vs {kb}, n {na} vs {nb})",
                file=b.get("path") or a.get("path"),
                remedy="evaluate every model with the same --split and --limit",
            )
        check_items(
            name, ta[name].get(FINGERPRINTS), tb[name].get(FINGERPRINTS), b.get("path") or a.get("path"), what
        )
    if a.get("split") != b.get("split"):
        raise ForgetlessError(
            f"split {a.get('split')!r} differs from the {what}'s ({b.get('split')!r})",
            remedy="evaluate every model on the same --split",
        )


def _diff(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


def compare(
    model: Mapping[str, Any], base: Mapping[str, Any], finetuned: Mapping[str, Any] | None = None
) -> dict[str, float | None]:
    """T, G_v, G_t, G of ``model`` and, relative to ``base`` (and ``finetuned``): E, F, E+F (points) and
    gain_kept (a fraction; needs ``finetuned``). See the module docstring for the definitions."""
    _check_same(model, base, "base model")
    if finetuned is not None:
        _check_same(model, finetuned, "fine-tuned model")
    s, b = scores(model), scores(base)
    e, f = _diff(s["T"], b["T"]), _diff(s["G"], b["G"])
    out: dict[str, float | None] = {
        **s,
        "E": e,
        "F": f,
        "E+F": None if e is None or f is None else e + f,
        "gain_kept": None,
    }
    if finetuned is not None and e is not None:
        e_ft = _diff(scores(finetuned)["T"], b["T"])
        if e_ft is not None and abs(e_ft) > 1e-12:
            out["gain_kept"] = e / e_ft
    return out


# ----------------------------------------------------------------------------------------------------------------
# intervals


def item_correct(task: Mapping[str, Any], name: str = "?") -> np.ndarray:
    """A task entry's per-item correctness (bool array, item order): its ``correct_items`` string of 0/1, else
    its ``predictions``' ``correct`` flags. A benchmark scored per unit by a graded value (VQA accuracy, CIDEr)
    has ``item_scores`` instead: those values (float array), whose mean is its ``accuracy``."""
    if isinstance(task.get("item_scores"), list):
        return np.asarray(task["item_scores"], dtype=np.float64)
    if isinstance(task.get("correct_items"), str):
        return np.frombuffer(task["correct_items"].encode("ascii"), dtype=np.uint8) == ord("1")
    if isinstance(task.get("predictions"), list):
        return np.array([bool(p["correct"]) for p in task["predictions"]])
    raise ForgetlessError(
        f"task {name!r} has no per-item results, so no interval can be computed",
        remedy="re-evaluate with this version of forgetless (it records which items were right)",
    )


def correct_items(flags: Sequence[bool]) -> str:
    """The compact form of per-item correctness stored in results: one character per item, ``1`` correct."""
    return "".join("1" if f else "0" for f in flags)


class Bootstrap:
    """Seeded bootstrap over test items (module docstring). One instance caches its draws, so every result it
    scores on a task with the same name and item count is resampled identically (paired)."""

    def __init__(self, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
        if n_boot < 10 or not 0 < level < 1:
            raise ForgetlessError(
                f"bootstrap needs n_boot ≥ 10 and 0 < level < 1, got {n_boot}, {level}",
                remedy="use e.g. n_boot=2000, level=0.95",
            )
        self.n_boot, self.seed, self.level = n_boot, seed, level
        self._draws: dict[tuple[str, int], np.ndarray] = {}

    def indices(self, task: str, n: int) -> np.ndarray:
        """[n_boot, n] item indices for `task` with `n` items (the same for every model)."""
        key = (task, n)
        if key not in self._draws:
            rng = np.random.default_rng([self.seed, zlib.crc32(task.encode()), n])
            self._draws[key] = rng.integers(
                0, n, size=(self.n_boot, n), dtype=np.int64 if n > 2**31 else np.int32
            )
        return self._draws[key]

    def resample(self, name: str, values: np.ndarray) -> np.ndarray:
        """[n_boot] means of task `name`'s per-item `values` (correctness or graded) over its resamples."""
        if len(values) == 0:
            raise ForgetlessError(f"task {name!r} has no items", remedy="evaluate on a non-empty split")
        return values[self.indices(name, len(values))].mean(axis=1)

    def task(self, name: str, task: Mapping[str, Any]) -> np.ndarray:
        """[n_boot] resampled accuracy (a fraction, as the entry's) of one task entry."""
        return self.resample(name, item_correct(task, name))

    def _one(self, result: Mapping[str, Any]) -> dict[str, Any]:
        acc = {name: (t.get("kind"), self.task(name, t)) for name, t in result.get("tasks", {}).items()}
        return _combine(acc)

    def scores(self, result: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray | None]:
        """T, G_v, G_t, G on each resample ([n_boot] arrays, percent). A sequence of results is one model's
        fine-tuning seeds: each resample averages a draw (with replacement) of the seeds."""
        if isinstance(result, Mapping):
            return self._one(result)
        per_seed = [self._one(r) for r in result]
        if not per_seed:
            raise ForgetlessError("no results to bootstrap", remedy="pass at least one result")
        rng = np.random.default_rng([self.seed, 7, len(per_seed)])
        pick = rng.integers(0, len(per_seed), size=(self.n_boot, len(per_seed)))
        out: dict[str, np.ndarray | None] = {}
        for k in SCORE_KEYS:
            if per_seed[0][k] is None:
                out[k] = None
                continue
            stack = np.stack([s[k] for s in per_seed])  # [S, B]
            out[k] = stack[pick, np.arange(self.n_boot)[:, None]].mean(axis=1)
        return out

    def compare(self, model, base) -> dict[str, np.ndarray | None]:
        """Resampled T, G_v, G_t, G of `model` and E, F, E+F against `base` (paired: the same items)."""
        s, b = self.scores(model), self.scores(base)
        e, f = _diff(s["T"], b["T"]), _diff(s["G"], b["G"])
        return {**s, "E": e, "F": f, "E+F": None if e is None or f is None else e + f}

    def difference_draws(self, a, b, key: str) -> np.ndarray | None:
        """Resampled key(a) − key(b), paired. ``key``: a score (T, G_v, G_t, G) or E, F, E+F — against a common
        base E(a) − E(b) = T(a) − T(b), F(a) − F(b) = G(a) − G(b), and E+F's difference is that of T + G."""
        sa, sb = self.scores(a), self.scores(b)
        pick = {"E": "T", "F": "G"}.get(key, key)
        if pick == "E+F":
            if sa["T"] is None or sa["G"] is None or sb["T"] is None or sb["G"] is None:
                return None
            return (sa["T"] + sa["G"]) - (sb["T"] + sb["G"])
        return _diff(sa[pick], sb[pick])

    def difference(self, a, b, key: str) -> tuple[float, tuple[float, float]] | None:
        """(key(a) − key(b), its paired interval) of two results on the same items (or two lists of seeds' results),
        or None where either lacks ``key``: the number a reader quotes, ``+2.1 [0.4, 3.9]``."""
        draws = self.difference_draws(a, b, key)
        if draws is None:
            return None
        pick = {"E": "T", "F": "G"}.get(key, key)
        sa, sb = _seed_mean(a), _seed_mean(b)
        point = (sa["T"] + sa["G"] - sb["T"] - sb["G"]) if pick == "E+F" else sa[pick] - sb[pick]
        iv = self.interval(draws)
        assert iv is not None
        return point, iv

    def interval(self, draws: np.ndarray | None) -> tuple[float, float] | None:
        """The central `level` percentile interval of resampled values."""
        if draws is None:
            return None
        q = 100 * (1 - self.level) / 2
        lo, hi = np.percentile(draws, [q, 100 - q])
        return float(lo), float(hi)

    def intervals(self, draws: Mapping[str, np.ndarray | None]) -> dict[str, tuple[float, float] | None]:
        return {k: self.interval(v) for k, v in draws.items()}


def _seed_mean(result: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """:func:`scores` of one result, or their mean over a list of seeds' results (the keys all have)."""
    many = [scores(result)] if isinstance(result, Mapping) else [scores(r) for r in result]
    return {
        k: float(np.mean([s[k] for s in many])) for k in SCORE_KEYS if all(s[k] is not None for s in many)
    }


class NamedDraws:
    """Named rows' point values and bootstrap draws (name → key → value / [n_boot] array), all resampled by one
    :class:`Bootstrap`, so that a difference between two rows is paired."""

    def __init__(self, boot: Bootstrap):
        self.boot = boot
        self.points: dict[str, dict[str, float | None]] = {}
        self.draws: dict[str, dict[str, np.ndarray | None]] = {}

    def interval(self, name: str, key: str) -> tuple[float, float] | None:
        return self.boot.interval(self.draws[name][key])

    def difference(self, a: str, b: str, key: str) -> tuple[float, tuple[float, float]] | None:
        """(point a − b, its paired 95% interval), or None where either row lacks `key`."""
        pa, pb, da, db = self.points[a][key], self.points[b][key], self.draws[a][key], self.draws[b][key]
        if pa is None or pb is None or da is None or db is None:
            return None
        iv = self.boot.interval(da - db)
        assert iv is not None
        return pa - pb, iv


def intervals(
    model: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float] | None]:
    """95% intervals of T, G_v, G_t, G (and, given `base`, the paired E, F, E+F) of one result."""
    boot = Bootstrap(n_boot, seed, level)
    if base is not None:
        _check_same(model, base, "base model")
        return boot.intervals(boot.compare(model, base))
    return boot.intervals(boot.scores(model))


def half_width(iv: Sequence[float] | None) -> float | None:
    """The ± shown for an interval: half its width."""
    return None if iv is None else (iv[1] - iv[0]) / 2
