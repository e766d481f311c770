"""The forgetting frontier: every method's whole trade-off curve over its knob, on the testbed's
**validation** splits, with intervals; F at matched E and the area under each curve.

A method is better than another only if its whole curve of (E, F) lies above the other's. Each merge method is
swept over its knob (:data:`KNOBS`: WiSE-FT λ, TIES and DARE density, Fisher merging's base weight, CGM α, CGM†
keep; task arithmetic at λ is WiSE-FT at λ with one fine-tuned model, so it is not repeated), SPIDER and
MagnitudeMask are their single fine-tunes. Everything runs through :func:`.experiment.run_experiment` (the same
fine-tune, statistics and evaluation caches as the test-split experiment) with ``split="val"``; the rows go to
``runs/testbed/<task>/frontier-val.json``.

Curves. Every merge curve runs from the base (E = F = 0: each knob has an end that gives θ₀) to the fine-tuned
model (the other end) through the swept points. On a few hundred validation items E is not monotone in a knob, so
a curve is read as what the method can deliver: at each E, the best F among its points that keep at least that E
(:func:`curve_at`; the rule ``forgetless sweep --keep-gain`` applies). Headline numbers, each with its 95%
bootstrap interval over the validation items (the same resamples for every method, so differences are paired;
each resample takes its own best point):

- **F at matched E**: that best F where E must reach 80%, 90% and 95% of the fine-tune's E (on each resample, its
  own fine-tune's E);
- **area**: its mean over E ∈ [0, E_ft], ∫F dE / E_ft.

Picking the best of several noisy points favours a method with more points (the winner's curse): the test splits
report the chosen points again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..checkpoint.writer import atomic_write
from ..errors import ForgetlessError
from . import experiment as X
from .context import read_results

RESULTS = "frontier-val.json"
FRACTIONS = (0.8, 0.9, 0.95)


class Knob(NamedTuple):
    """One method's curve: the registered method, its fixed parameters, the swept knob and its values, the task
    Fisher it needs (as :class:`.experiment.Merge`), which fine-tune it merges with the base (None: the plain one;
    a name of :data:`.experiment.VARIANTS`: that fine-tune, the curve's far end) and whether it is a candidate of
    ours rather than a published method's curve (``trial``). A curve of fine-tunes has no method: ``finetune``
    names the variant whose option ``knob`` is swept, each point a fine-tune of its own."""

    method: str | None
    fixed: dict
    knob: str
    values: list[float]
    task_fisher: tuple[str, str] | None = None
    model: str | None = None
    trial: bool = False
    finetune: str | None = None
    learn: str | None = None  # the coefficients learned per layer with this objective (knob: general_weight)
    extract: bool = False  # the fine-tune first as its extracted LoRA (knob: rank), then merged by `method`
    # a second fine-tune merged with the first (a name of VARIANTS); no values: one point
    pair: str | None = None


KNOBS: dict[str, Knob] = {
    "WiSE-FT": Knob("linear", {}, "lambda", [0.1, 0.2, 0.3, 0.4, 0.5, 0.7]),
    "TIES": Knob("ties", {"lambda": 1.0}, "density", [0.05, 0.1, 0.2, 0.5]),
    "DARE": Knob("dare_linear", {"lambda": 1.0}, "density", [0.1, 0.3, 0.5]),
    "Fisher merging": Knob("fisher_with_base", {}, "base_weight", [0.01, 0.1, 1.0, 10.0], X.TASK_FISHER_OWN),
    "CGM": Knob("cgm", {}, "alpha", [0.2, 1.0, 5.0, 25.0, 125.0], X.TASK_FISHER_CGM),
    "CGM†": Knob("cgm_dagger", {"alpha": 1.0}, "keep", [0.5, 0.8, 0.95], X.TASK_FISHER_CGM),
    # the data-free baselines users compare against: along the great circle θ₀ → θ_ft, and sparsified task vectors
    "SLERP": Knob("slerp", {}, "t", [0.3, 0.5, 0.7]),
    "Breadcrumbs": Knob("breadcrumbs", {"lambda": 1.0, "gamma": 0.01}, "density", [0.1, 0.3, 0.6]),
    "DELLA": Knob("della_linear", {"lambda": 1.0, "epsilon": 0.1}, "density", [0.2, 0.4, 0.6]),
    # the fine-tune's update as a LoRA of each rank (`forgetless extract-lora`), folded back: how much of E and F a
    # low-rank update keeps — what a full fine-tune keeps when it enters adapter-space merges and LPM
    "Extracted LoRA": Knob("task_arithmetic", {"lambda": 1.0}, "rank", [8, 16, 64], extract=True),
    # Model Stock of the fine-tune and a second one of another seed: its ratio comes from their angle, no knob
    "Model Stock": Knob("model_stock", {}, "", [], pair="reseeded"),
    # the remedies while fine-tuning, each a curve of fine-tunes over its strength
    "Replay": Knob(None, {}, "replay_ratio", [1.0, 3.0], finetune="replay"),
    "EWC": Knob(None, {}, "strength", [3.0, 30.0, 300.0, 3000.0], finetune="ewc"),
    "L2-SP": Knob(None, {}, "strength", [0.02, 0.2, 2.0], finetune="l2sp"),
    # pipelines: a remedy's fine-tune merged back toward θ₀ (WiSE-FT, CGM from its far end)
    "SPIDER → WiSE-FT": Knob("linear", {}, "lambda", [0.5, 0.7], model="spider", trial=True),
    "MagnitudeMask → WiSE-FT": Knob("linear", {}, "lambda", [0.5, 0.7], model="magnitude_mask", trial=True),
    "Replay → WiSE-FT": Knob("linear", {}, "lambda", [0.5, 0.7], model="replay", trial=True),
    "EWC → CGM": Knob("cgm", {}, "alpha", [5.0, 25.0], X.TASK_FISHER_CGM, model="ewc", trial=True),
    # WiSE-FT's λ learned per layer on the validation splits, from λ = 0.5: on their labels, and label-free
    # (AdaMerging-style: entropy on the task items, KL to the base on the general items); the knob weighs the two
    "Learned λ (labels)": Knob("linear", {"lambda": 0.5}, "general_weight", [0.5, 1.0, 2.0], learn="labels"),
    "Learned λ (entropy)": Knob(
        "linear", {"lambda": 0.5}, "general_weight", [0.5, 1.0, 2.0], learn="entropy"
    ),
    "SPIDER → learned λ": Knob(
        "linear", {"lambda": 0.5}, "general_weight", [1.0], model="spider", trial=True, learn="labels"
    ),
    # CGM's soft mix with the fine-tune's own optimizer state as the task Fisher (along the path θ₀ → θ_ft): it is
    # orders of magnitude below the general Fisher, so α spans small values, where the mix moves
    "CGM (optimizer Fisher)": Knob(
        "cgm", {}, "alpha", [0.001, 0.01, 0.1, 1.0], X.TASK_FISHER_PATH, trial=True
    ),
    # one task fine-tuned with LoRA (its curves keep a share of the LoRA fine-tune's E, :func:`reference`): the
    # adapter scaled toward θ₀, and the remedies while training it
    "LoRA → WiSE-FT": Knob("linear", {}, "lambda", [0.3, 0.5, 0.7], model="lora"),
    "LoRA + replay": Knob(None, {}, "replay_ratio", [1.0], finetune="lora_replay"),
    "LoRA + EWC": Knob(None, {}, "strength", [300.0, 3000.0], finetune="lora_ewc"),
}
LORA_END = "lora"  # the variant of X.VARIANTS a LoRA curve starts from and is judged against


def is_lora(label: str) -> bool:
    """Whether curve `label` fine-tunes with LoRA (its fine-tune or the one it merges from trains an adapter)."""
    k = KNOBS[label]
    variant = k.model or k.finetune
    return variant is not None and "lora" in X.VARIANTS[variant].options


def end_variant(label: str) -> str | None:
    """The fine-tune curve `label` runs to, as a name of :data:`.experiment.VARIANTS` (None: the plain one)."""
    return KNOBS[label].model or (LORA_END if is_lora(label) else None)


def reference(label: str) -> str:
    """The row whose E the points of curve `label` must keep a share of: the plain LoRA fine-tune for a LoRA curve
    (what a LoRA user starts from), the plain fine-tune for every other (a keep rule's too)."""
    return keep_label(LORA_END) if is_lora(label) else "fine-tuned"


def keep_label(name: str) -> str:
    """The row label of a fine-tune of :data:`.experiment.VARIANTS`."""
    return X.VARIANTS[name].label


def tune_points(label: str, values: Sequence[float] | None = None) -> list[X.Tune]:
    """A curve of fine-tunes as :class:`.experiment.Tune` rows: one per value of its knob (default: the grid)."""
    k = KNOBS[label]
    variant = X.VARIANTS[k.finetune]
    points = []
    for v in k.values if values is None else values:
        options = {**variant.options, k.knob: v}
        name = (
            variant.name if options == variant.options else f"{variant.name}-{k.knob}={v:g}"
        )  # one folder each
        points.append(X.Tune(label, name, options, f"{k.knob}={v:g}"))
    return points


def knob_merge(label: str, params: dict) -> X.Merge:
    """Curve `label`'s merge at `params` (its knob's value and its fixed parameters)."""
    k = KNOBS[label]
    return X.Merge(label, k.method, params, k.task_fisher, k.model, k.learn, k.extract, k.pair)


def frontier_merges() -> list[X.Merge]:
    """The grid as :func:`.experiment.run_experiment`'s ``merges``: one per knob value, or the one point of a
    curve without a knob."""
    return [
        knob_merge(label, {k.knob: v, **k.fixed} if v is not None else dict(k.fixed))
        for label, k in KNOBS.items()
        if k.method is not None
        for v in k.values or [None]
    ]


def frontier_tunes(
    labels: Sequence[str], points: Mapping[str, Sequence[float]] | None = None
) -> list[X.Tune]:
    """The rows of fine-tunes the curves `labels` need: the keep rules' (:data:`.experiment.KEEPS`), the far end
    of each curve among them that runs to another fine-tune (:func:`end_variant`), and the points of each curve of
    fine-tunes among them (its grid, or its values in `points`)."""
    ends = [X.VARIANTS[v] for label in labels if (v := end_variant(label)) is not None]
    curves = [
        t
        for label in labels
        if KNOBS[label].method is None
        for t in tune_points(label, None if points is None else points.get(label, []))
    ]
    unique = {(t.label, t.name, t.knob): t for t in [*X.KEEPS, *ends, *curves]}
    return list(unique.values())


def curve_labels(names: Sequence[str]) -> list[str]:
    """Curve labels from what a user typed: a label of :data:`KNOBS`, case-insensitively, or a prefix of exactly
    one (``spider`` → ``SPIDER → WiSE-FT``; ``->`` stands for ``→``)."""
    out = []
    for name in names:
        key = name.lower().replace("->", "→")
        exact = [k for k in KNOBS if k.lower() == key]
        found = exact or [k for k in KNOBS if k.lower().startswith(key)]
        if len(found) != 1:
            raise ForgetlessError(
                f"curve {name!r} {'is ambiguous' if found else 'is not one of the frontier'}",
                remedy=f"name one of: {', '.join(KNOBS)}",
            )
        out.append(found[0])
    return list(dict.fromkeys(out))


def seed_dir(workdir: str | Path, seed: int) -> Path:
    """Where a task's run with fine-tuning seed `seed` lives: the task's folder (seed 0, the documented recipe) or
    its ``seed-<seed>`` subfolder."""
    return Path(workdir) if seed == 0 else Path(workdir) / f"seed-{seed}"


def seed_results(workdir: str | Path, name: str) -> list[dict]:
    """A task's results file `name` of every seed that has one (seed 0 first, then ``seed-N`` in order of N)."""
    workdir = Path(workdir)
    seeds = sorted(int(p.name.removeprefix("seed-")) for p in workdir.glob("seed-*") if p.name[5:].isdigit())
    paths = [seed_dir(workdir, s) / name for s in [0, *seeds]]
    return [read_results(p) for p in paths if p.is_file()]


def run_frontier(
    task: str,
    workdir: str | Path,
    *,
    curves: Sequence[str] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Every curve of one task — or the `curves` named (labels of :data:`KNOBS`) — on its validation splits
    (cached steps are reused); writes RESULTS in :func:`seed_dir` (`seed`: the fine-tunes' seed: data order, and
    LoRA's initialisation where used). A run of some curves keeps the other curves' rows of the RESULTS file
    already there when they were measured against the same base and fine-tune (:func:`keep_curves`), so curves
    can be added one at a time."""
    ran = curve_labels(curves) if curves is not None else list(KNOBS)
    path = seed_dir(workdir, seed) / RESULTS
    old = read_results(path) if path.is_file() else None
    res = X.run_experiment(
        task,
        seed_dir(workdir, seed),
        merges=[m for m in frontier_merges() if m.label in ran],
        keeps=frontier_tunes(ran),
        finetune_recipe={"seed": seed},
        split="val",
        results_name=RESULTS,
        root=Path(workdir).parent,
        log=log,
    )
    if old is not None and curves is not None:
        res = keep_curves(res, old, ran, log)
        atomic_write(path, json.dumps(res, indent=1) + "\n")
    return res


def keep_curves(
    new: Mapping[str, Any], old: Mapping[str, Any], ran: Sequence[str], log: Callable[[str], None] = print
) -> dict:
    """`new` with the rows of `old`'s curves that `new` did not run, and the fine-tunes those curves merge from —
    when both measured the same base and fine-tune (their per-item answers are equal); otherwise `new` alone (the
    old rows are of another model)."""

    def ends(res: Mapping[str, Any]) -> dict:
        return {r["method"]: r["correct_items"] for r in res["rows"] if r["method"] in ("base", "fine-tuned")}

    if ends(old) != ends(new):
        log("frontier: the earlier curves were measured against another base or fine-tune; not kept")
        return dict(new)
    have = {X.row_name(r) for r in new["rows"]}
    others = [label for label in KNOBS if label not in ran]
    needed = {*others, *(keep_label(v) for label in others if (v := end_variant(label)))}
    kept = [r for r in old["rows"] if r["method"] in needed and X.row_name(r) not in have]
    return {**new, "rows": [*new["rows"], *kept]}


def curve_at(e: np.ndarray, f: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The best F a method reaches while keeping at least each target E: max{f[i] : e[i] ≥ target} (NaN where no
    point reaches it). ``e``, ``f``: [P] points, or [P, B] (B resamples: then ``targets`` is [T] or [T, B]);
    returns [T] or [T, B]. A step function of the target, realised by one of the method's own points — no
    interpolation between knob values that were not run."""
    e, f = np.asarray(e, dtype=float), np.asarray(f, dtype=float)
    t = np.asarray(targets, dtype=float)
    if e.ndim == 2 and t.ndim == 1:
        t = np.broadcast_to(t[:, None], (t.shape[0], e.shape[1]))
    reach = e[None] >= t[:, None]  # [T, P] or [T, P, B]
    best = np.where(reach, f[None], -np.inf).max(axis=1)
    return np.where(np.isfinite(best), best, np.nan)


def curve_area(e: np.ndarray, f: np.ndarray, e_end: np.ndarray | float, n: int = 201) -> np.ndarray | float:
    """The mean of :func:`curve_at` over E ∈ [0, e_end] (trapezoids on `n` evenly spaced E): ∫F dE / e_end."""
    unit = np.linspace(0.0, 1.0, n)
    if np.ndim(e) == 1:
        return float(np.trapezoid(curve_at(e, f, unit * float(e_end)), unit))
    ends = np.broadcast_to(np.asarray(e_end, dtype=float), (np.shape(e)[1],))
    return np.trapezoid(curve_at(e, f, unit[:, None] * ends[None, :]), unit, axis=0)


TEST_RESULTS = "frontier-test.json"
KEEP_GAIN = 0.9
FEW_ITEMS = 100  # the validation splits' size before they grew: choices made on their first 100 task items


def test_results_name(val_items: int | None) -> str:
    """The test-split file of the points chosen on all validation items, or on the first `val_items`."""
    return TEST_RESULTS if val_items is None else TEST_RESULTS.replace(".json", f"-val{val_items}.json")


def first_items(rows: list[Mapping[str, Any]], task: str, n: int) -> list[dict]:
    """The rows scored on the first `n` items of the downstream `task` only (the general tasks' items as they
    are): what the validation split of `n` task items would have said. A grown split starts with the same items."""
    from ..eval.metrics import compare

    def cut(r: Mapping[str, Any]) -> dict:
        result = X.row_result(r)
        for name, entry in result["tasks"].items():  # accuracies from the items, not the rounded percentages
            items = entry["correct_items"][:n] if name == task else entry["correct_items"]
            result["tasks"][name] = {
                **entry,
                "correct_items": items,
                "accuracy": items.count("1") / len(items),
            }
        return result

    by = {r["method"]: r for r in rows if r["method"] in ("base", "fine-tuned")}
    base, ft = cut(by["base"]), cut(by["fine-tuned"])
    out = []
    for r in rows:
        result = cut(r)
        out.append({**r, **compare(result, base, ft), **X.task_fields(result)})
    return out


def curve_rows(rows: list[Mapping[str, Any]], label: str) -> list[Mapping[str, Any]]:
    """A curve's points as rows: its two ends (the base and the fine-tune it merges from) and its swept points."""
    variant = end_variant(label)
    end = "fine-tuned" if variant is None else keep_label(variant)
    by = {X.row_name(r): r for r in rows}
    if end not in by or "base" not in by:
        raise ValueError(f"frontier rows: curve {label!r} merges from {end!r}, which has no row")
    return [by["base"], by[end], *[r for r in rows if r["method"] == label]]


def choose(
    rows: list[Mapping[str, Any]], keep_gain: float = KEEP_GAIN
) -> dict[str, Mapping[str, Any] | None]:
    """Per curve, the point :func:`curve_at` delivers where E must reach `keep_gain` × its :func:`reference`'s E
    (what ``forgetless sweep --keep-gain`` picks): the row of the best F among the curve's points — its ends
    included — that keep that E; None where none does. Ties go to the earlier point (an end before a swept point)."""
    by = {X.row_name(r): r for r in rows}
    out: dict[str, Mapping[str, Any] | None] = {}
    for label in KNOBS:
        if not any(r["method"] == label for r in rows):
            continue
        bar = keep_gain * by[reference(label)]["E"]
        reach = [r for r in curve_rows(rows, label) if r["E"] >= bar]
        out[label] = max(reach, key=lambda r: r["F"]) if reach else None  # max keeps the first of equal F
    return out


def run_chosen(
    task: str,
    workdir: str | Path,
    *,
    keep_gain: float = KEEP_GAIN,
    seed: int = 0,
    val_items: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Each curve's point chosen on the validation splits (:func:`choose`, from RESULTS in :func:`seed_dir`; with
    `val_items`, on the first that many task items: :func:`first_items`) evaluated on the **test** splits
    (evaluations cached as everywhere): writes :func:`test_results_name` there, one row per curve named by its
    label alone (``chosen``: the knob, or the end it chose; ``val``: its validation E and F) beside the base, the
    fine-tune and the fine-tunes the chosen points need."""
    root, workdir = Path(workdir).parent, seed_dir(workdir, seed)
    val = workdir / RESULTS
    if not val.is_file():
        raise ForgetlessError(
            f"{val}: no validation curves to choose from",
            remedy=f"run `forgetless testbed frontier --task {task}` first",
        )
    rows = read_results(val)["rows"]
    picks = choose(rows if val_items is None else first_items(rows, task, val_items), keep_gain)
    swept = {label: r for label, r in picks.items() if r is not None and r["method"] == label}
    merges = [knob_merge(label, _params(r["knob"])) for label, r in swept.items() if KNOBS[label].method]
    chosen_tunes = {
        label: [_params(r["knob"])[KNOBS[label].knob]]
        for label, r in swept.items()
        if KNOBS[label].method is None
    }
    tunes = frontier_tunes(list(picks), chosen_tunes)
    res = X.run_experiment(
        task,
        workdir,
        merges=merges,
        keeps=tunes,
        finetune_recipe={"seed": seed},
        split="test",
        results_name=test_results_name(val_items),
        root=root,
        log=log,
    )
    res = chosen_result(res, picks, keep_gain, log)
    atomic_write(workdir / test_results_name(val_items), json.dumps(res, indent=1) + "\n")
    return res


def chosen_result(
    res: Mapping[str, Any],
    picks: Mapping[str, Mapping[str, Any] | None],
    keep_gain: float,
    log: Callable[[str], None] = print,
) -> dict:
    """The test-split experiment `res` (its merges: the chosen points) rewritten as one row per curve: the row of
    the point each curve chose (a merge, or the end it chose: base, fine-tune, a keep rule's fine-tune) renamed to
    the curve's label, with ``chosen`` and its validation ``val`` E and F; the curves that reach no point are
    listed in ``unreached``."""
    by = {X.row_name(r): r for r in res["rows"]}
    rows = [r for r in res["rows"] if r["method"] not in KNOBS]
    for label, pick in picks.items():
        if pick is None:
            log(f"{label}: no point keeps {keep_gain:g} × the fine-tune's E on validation")
            continue
        rows.append(
            {
                **by[X.row_name(pick)],
                "method": label,
                "knob": "",
                "chosen": pick["knob"] or pick["method"],
                "val": {"E": pick["E"], "F": pick["F"]},
            }
        )
    return {
        **res,
        "rows": rows,
        "keep_gain": keep_gain,
        "unreached": [label for label, pick in picks.items() if pick is None],
    }


def _params(knob: str) -> dict[str, float]:
    """A row's knob string (``lambda=1 density=0.05``) as merge parameters."""
    return {k: float(v) for k, v in (p.split("=", 1) for p in knob.split())}
