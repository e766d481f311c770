"""RESULTS.md's closing section "Which recipe when": per situation (one task fully fine-tuned, one task with LoRA,
several task adapters, tasks in sequence, no general data, no labels) the recipe that measured best on the test
splits with its 95% interval, the runner-up with its paired difference to the best, and what each needs beyond the
fine-tune and a merge.

Built only from the results files present: the frontier's points chosen on validation and evaluated on test (every
seed's ``frontier-test.json``), the fixed-knob experiment (``<task>/results.json``, with the fine-tunes of the
seed-0 ``frontier-test.json`` on the same test items), ``multitask/results.json`` and ``continual/results.json``.
The candidates of each situation are the recipes that need only what that situation has."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ..eval.metrics import NamedDraws
from ..eval.report import cell, diff_cell
from . import experiment as X
from . import frontier as FR
from .context import read_results
from .experiment import row_name
from .report_continual import ContinualDraws
from .tables import N_BOOT, TaskDraws, sure_interval

_FISHERS = f"2 passes over {X.STATS_SAMPLES} samples"
_LEARN = f"{X.LEARN['steps']} forward+backward passes over validation batches of {X.LEARN['batch_size']}"
# what a single-task recipe needs beyond the fine-tune and a merge (statistics, memory while training, data)
COSTS: dict[str, str] = {
    "WiSE-FT": "nothing",
    "task arithmetic": "nothing",
    "TIES": "nothing",
    "DARE": "nothing",
    "Fisher merging": f"general Fisher at θ₀ + task Fisher at θ_ft ({_FISHERS})",
    "CGM": f"general Fisher at θ₀ + task Fisher at θ₀ ({_FISHERS})",
    "CGM†": f"general Fisher at θ₀ + task Fisher at θ₀ ({_FISHERS})",
    "CGM (optimizer Fisher)": (
        f"general Fisher at θ₀ (1 pass over {X.STATS_SAMPLES} samples) + AdamW's squared gradients kept by the "
        "fine-tune"
    ),
    "SPIDER": "θ₀ and SPIDER's G held while training",
    "MagnitudeMask": "θ₀ held while training",
    "EWC": (
        "general Fisher at θ₀ over the trained tensors; θ₀ and F held while training (2 copies of the trained "
        "weights)"
    ),
    "L2-SP": "θ₀ held while training",
    "Replay": "general training data; the same steps see fewer task samples",
    "Learned λ (labels)": f"{_LEARN} (labelled)",
    "Learned λ (entropy)": f"{_LEARN} (no labels)",
    "SLERP": "nothing",
    "Breadcrumbs": "nothing",
    "DELLA": "nothing",
    "Extracted LoRA": "an SVD of each trained Linear's update (`forgetless extract-lora`)",
    "Model Stock": "a second fine-tune of another seed",
}


# the variants that are remedies while fine-tuning (not the reseeded plain fine-tune)
REMEDIES = ("spider", "magnitude_mask", "replay", "ewc", "l2sp")


def _both(finetune: str, merge: str) -> str:
    """A pipeline's cost: its own fine-tune's, then its merge's."""
    return f"both: an extra fine-tune with {finetune} ({COSTS[finetune]}), then {merge} ({COSTS[merge]})"


COSTS.update(
    {
        "SPIDER → WiSE-FT": _both("SPIDER", "WiSE-FT"),
        "MagnitudeMask → WiSE-FT": _both("MagnitudeMask", "WiSE-FT"),
        "Replay → WiSE-FT": _both("Replay", "WiSE-FT"),
        "EWC → CGM": _both("EWC", "CGM"),
        "SPIDER → learned λ": _both("SPIDER", "Learned λ (labels)"),
        # one task with LoRA: beyond the LoRA fine-tune and a fold
        "LoRA → WiSE-FT": "nothing (the adapter scaled by λ)",
        "LoRA + replay": COSTS["Replay"],
        "LoRA + EWC": (
            "general Fisher at θ₀ over the adapted layers; θ₀ and F of those layers held while training (the "
            "penalty is on the folded update)"
        ),
        # the single fine-tunes of the variants (``EWC λ=3``, ``Replay 1:1``, …): their family's cost
        **{v.label: COSTS[v.label.split()[0]] for v in X.VARIANTS.values() if v.name in REMEDIES},
    }
)
MT_COSTS: dict[str, str] = {
    "TA": "λ chosen on the seen tasks' labelled validation splits (one merge scored per λ)",
    "TIES": "nothing (density and λ fixed)",
    "DARE": "task arithmetic's λ (chosen on labelled validation)",
    "CoPA": "nothing (published defaults)",
    "CoPA (reference)": "nothing (published defaults)",
    "TSV-M": "an SVD of each adapted Linear's update per task (α fixed)",
    "Iso-C": "an SVD of each adapted Linear's summed update; α chosen on labelled validation",
    "Iso-CTS": "SVDs of each adapted Linear's summed and per-task updates; α chosen on labelled validation",
    "Breadcrumbs": "λ chosen on the seen tasks' labelled validation splits (masks fixed)",
    "DELLA": "nothing (published defaults)",
}
CL_COSTS: dict[str, str] = {
    "sequential FT": "nothing: one adapter, trained on from the last",
    "TA": "every adapter so far; λ chosen after each task on the labelled validation splits of the tasks so far",
    "TIES": "every adapter so far",
    "RegMean": "every folded model and the Gram of its inputs (a forward pass over training samples per task)",
    "LPM": "the LPM state; a Gram of each task's inputs at the base (a forward pass over training samples)",
    "LPM (diagonal)": "the LPM state, diagonal (bounded memory); a Gram at the base per task",
    "LPM + CPM": "the LPM state + a projector and a visual prototype per task; a Gram at the base per task",
    "MagMax": "τ_max (one model's size); the tasks fine-tuned in sequence",
    "OPCM": "the running sum of projected task vectors and their norms; SVDs of each Linear's sum per task",
}


def _published(labels: Sequence[str]) -> list[str]:
    """The row names of :data:`.experiment.MERGES` among `labels`: each method at its knob fixed before the runs."""
    knob = {m.label: " ".join(f"{k}={v:g}" for k, v in m.params.items()) for m in X.MERGES}
    return [f"{label} {knob[label]}" for label in labels]


FINE_TUNES = [X.VARIANTS[n].label for n in ("spider", "magnitude_mask", "l2sp")]
NO_GENERAL = [*_published(["WiSE-FT", "task arithmetic", "TIES", "DARE"]), *FINE_TUNES]
NO_LABELS = [
    *_published([m.label for m in X.MERGES]),
    *[X.VARIANTS[n].label for n in REMEDIES],
    "Learned λ (entropy)",
]


def choice_cost(label: str) -> str:
    """What choosing a frontier curve's point on validation takes: one model scored per value of its knob."""
    k = FR.KNOBS.get(label)
    if k is None or not k.values:
        return ""
    what = "fine-tunes" if k.finetune else "learned runs" if k.learn else "merges"
    return f"; {k.knob} chosen on labelled validation ({len(k.values)} {what} scored)"


class Ranked(NamedTuple):
    """A situation's candidates, best first, with the cells of the best and of the runner-up."""

    order: list[str]
    scores: list[str]  # each one's score as shown, in that order
    best: str
    runner: str
    missing: list[str]  # candidates measured on some tasks only, left out


def rank_tasks(d: TaskDraws, tasks: list[str], candidates: Sequence[str]) -> Ranked | None:
    """`candidates` measured on every task ranked by mean E + F over `tasks` (ties keep their order); the best with
    its interval, the runner-up's paired difference to it."""
    seen = [m for m in dict.fromkeys(candidates) if any(m in d.rows[t] for t in tasks)]
    have = [m for m in seen if all(m in d.rows[t] for t in tasks)]
    if not have:
        return None
    points = {m: d.mean_point(m, "E+F", tasks) for m in have}
    order = sorted(have, key=lambda m: -points[m])
    best, draws = order[0], d.mean(order[0], "E+F", tasks)
    e, f = (d.mean_point(best, k, tasks) for k in ("E", "F"))
    score = (
        f"**{best}**: E+F {cell(points[best], True, sure_interval(d.boot, draws))} (E {e:+.1f}, F {f:+.1f})"
    )
    runner = "—"
    if len(order) > 1:
        gap = d.mean(order[1], "E+F", tasks) - draws
        runner = f"{order[1]}: {diff_cell(points[order[1]] - points[best], sure_interval(d.boot, gap))}"
    scores = [f"{points[m]:+.1f}" for m in order]
    return Ranked(order, scores, score, runner, [m for m in seen if m not in have])


def rank_named(d: NamedDraws, candidates: Sequence[str], key: str, others: Sequence[str]) -> Ranked | None:
    """`candidates` ranked by `key` (higher is better), the best with its interval and the `others` keys."""
    have = [m for m in candidates if m in d.points and d.points[m][key] is not None]
    if not have:
        return None
    order = sorted(have, key=lambda m: -d.points[m][key])
    best = order[0]
    extra = ", ".join(f"{k} {cell(d.points[best][k], False, d.interval(best, k))}" for k in others)
    score = f"**{best}**: {key} {cell(d.points[best][key], False, d.interval(best, key))} ({extra})"
    diff = d.difference(order[1], best, key) if len(order) > 1 else None
    runner = "—" if diff is None else f"{order[1]}: {diff_cell(*diff)}"
    return Ranked(order, [f"{d.points[m][key]:.1f}" for m in order], score, runner, [])


class Situation(NamedTuple):
    """One row of the table: the situation, its ranking (None: nothing measured), the costs of its candidates."""

    label: str
    ranked: Ranked | None
    why: str  # what the row says when nothing ranks
    costs: Mapping[str, str]
    extra: Mapping[str, str] = {}  # per candidate, what choosing it took, after its cost
    score: str = "mean E + F"


def frontier_situation(workdir: Path, names: list[str], lora: bool = False) -> Situation:
    """One task, full fine-tune (or with `lora`: the LoRA curves, :func:`.frontier.is_lora`): every such curve's
    point chosen on validation, on test, over the tasks and seeds."""
    kind = "LoRA" if lora else "full fine-tune"
    label = f"one task, {kind} (general data and labelled validation data)"
    results = {n: FR.seed_results(workdir / n, FR.TEST_RESULTS) for n in names}
    done = [n for n in names if results[n]]
    if not done:
        return Situation(label, None, f"not measured yet (no `{FR.TEST_RESULTS}`)", COSTS)
    d = TaskDraws({n: results[n] for n in done}, N_BOOT)
    chosen = [
        r["method"]
        for n in done
        for res in results[n]
        for r in res["rows"]
        if "chosen" in r and FR.is_lora(r["method"]) == lora
    ]
    ranked = rank_tasks(d, done, chosen)
    return Situation(
        label, ranked, f"no {kind} curve has a chosen point on every task", COSTS, _choices(chosen)
    )


def _choices(labels: Sequence[str]) -> dict[str, str]:
    return {m: choice_cost(m) for m in labels}


def _with_frontier(res: Mapping[str, Any], frontier: Path) -> dict:
    """`res` with the seed-0 frontier test file's rows it lacks (on the same test items: the same base answers);
    a fine-tune curve's chosen point at its variant's own strength also under the variant's label."""
    if not frontier.is_file():
        return dict(res)
    extra = read_results(frontier)["rows"]
    if _base_items(res) != _base_items({"rows": extra}):
        return dict(res)
    rows = {row_name(r): r for r in res["rows"]}
    for r in extra:
        rows.setdefault(row_name(r), r)
        k = FR.KNOBS.get(r["method"])
        if k is not None and k.finetune is not None and r.get("chosen") == _default_knob(k):
            rows.setdefault(X.VARIANTS[k.finetune].label, {**r, "method": X.VARIANTS[k.finetune].label})
    return {**res, "rows": list(rows.values())}


def _base_items(res: Mapping[str, Any]) -> Any:
    return next((r["correct_items"] for r in res["rows"] if r["method"] == "base"), None)


def _default_knob(k: FR.Knob) -> str:
    """The knob string of a fine-tune curve's point at its variant's own strength (``strength=0.2``)."""
    return f"{k.knob}={X.VARIANTS[str(k.finetune)].options[k.knob]:g}"


def fixed_situations(workdir: Path, names: list[str]) -> list[Situation]:
    """No general data, no labels: the recipes whose knob is fixed in advance, on fine-tuning seed 0."""
    labels = ("no general data", "no labels (no labelled validation data)")
    tasks = [n for n in names if (workdir / n / "results.json").is_file()]
    if not tasks:
        return [Situation(label, None, "not measured yet (no `results.json`)", COSTS) for label in labels]
    results = {
        n: _with_frontier(read_results(workdir / n / "results.json"), workdir / n / FR.TEST_RESULTS)
        for n in tasks
    }
    d = TaskDraws(results, N_BOOT)
    why = "no candidate measured on every task"
    return [
        Situation(labels[0], rank_tasks(d, tasks, NO_GENERAL), why, COSTS),
        Situation(labels[1], rank_tasks(d, tasks, NO_LABELS), why, COSTS, _choices(NO_LABELS)),
    ]


def _experiment(path: Path, label: str, costs: Mapping[str, str], score: str, rank: Callable) -> Situation:
    """A situation ranked from one experiment's results file by `rank` (its results → :class:`Ranked`)."""
    if not path.is_file():
        return Situation(label, None, f"not measured yet (no `{path.parent.name}/{path.name}`)", costs)
    return Situation(label, rank(read_results(path)), "nothing measured", costs, score=score)


def multitask_situation(workdir: Path) -> Situation:
    """Several task adapters: the adapter-space merges ranked by the seen-task average."""
    from .report import MultitaskDraws

    def rank(res: Mapping[str, Any]) -> Ranked | None:
        merges = [r["method"] for r in res["rows"] if r["role"] == "merge"]
        return rank_named(MultitaskDraws(res, N_BOOT), merges, "seen", ("unseen", "G"))

    path = workdir / "multitask" / "results.json"
    return _experiment(path, "several task adapters, one model wanted", MT_COSTS, "seen-task average", rank)


def continual_situation(workdir: Path) -> Situation:
    """Tasks in sequence: every method of the continual protocol ranked by its final average accuracy."""

    def rank(res: Mapping[str, Any]) -> Ranked | None:
        d = ContinualDraws(res, N_BOOT)
        return rank_named(d, list(res["matrices"]), "final", ("forgetting", "G"))

    path = workdir / "continual" / "results.json"
    return _experiment(path, "tasks in sequence", CL_COSTS, "final average accuracy", rank)


def _cost(s: Situation, name: str) -> str:
    return s.costs.get(name, "—") + s.extra.get(name, "")


def _line(s: Situation) -> str:
    if s.ranked is None:
        return f"| {s.label} | {s.why} | — | — | — |"
    r = s.ranked
    runner = _cost(s, r.order[1]) if len(r.order) > 1 else "—"
    return f"| {s.label} | {r.best} | {r.runner} | {_cost(s, r.order[0])} | {runner} |"


def _candidates(s: Situation) -> str:
    if s.ranked is None:
        return ""
    left = f"; not on every task, so left out: {', '.join(s.ranked.missing)}" if s.ranked.missing else ""
    ranked = ", ".join(f"{m} {v}" for m, v in zip(s.ranked.order, s.ranked.scores))
    return f"- {s.label}, by {s.score}: {ranked}{left}"


def _gains(workdir: Path, names: list[str]) -> list[float]:
    """The keep-gain fractions the chosen points were chosen with (:data:`.frontier.KEEP_GAIN` where none was)."""
    runs = [r for n in names for r in FR.seed_results(workdir / n, FR.TEST_RESULTS)]
    return sorted({r.get("keep_gain", FR.KEEP_GAIN) for r in runs} or {FR.KEEP_GAIN})


def decision_markdown(workdir: Path, names: list[str]) -> str:
    """The section "Which recipe when" from the results files under `workdir`; empty where no situation has a
    measured candidate."""
    workdir = Path(workdir)
    fixed = fixed_situations(workdir, names)
    situations = [
        frontier_situation(workdir, names),
        frontier_situation(workdir, names, lora=True),
        multitask_situation(workdir),
        continual_situation(workdir),
        *fixed,
    ]
    if all(s.ranked is None for s in situations):
        return ""
    gain = " / ".join(f"{g:g}" for g in _gains(workdir, names))
    table = "\n".join(_line(s) for s in situations)
    candidates = "\n".join(c for s in situations if (c := _candidates(s)))
    return f"""## Which recipe when

Per situation, the recipe that measured best on the testbed's **test** splits, the runner-up with its paired
difference to the best (points, 95% interval, **\\*** where it excludes 0) and what each needs beyond the
fine-tune and a merge; generated from the results files present, like the rest of this report.

The rule: a single-task recipe is ranked by its mean E + F over the tasks, a curve by its point chosen on
validation (the best F among its points that keep at least {gain} × the fine-tune's validation E, a LoRA curve's
× the LoRA fine-tune's; every seed run).
Without general data or without labels, only recipes whose knob is fixed in advance compete, at their published
value, on fine-tuning seed 0 (the extra values drawn for the curves do not: choosing among them here would be
choosing on test). Several task adapters: the adapter-space merges, ranked by the seen-task average (the joint
LoRA and the own adapters are references: they need every task's data at once, or one model per task). Tasks in
sequence: every method of the continual protocol, ranked by the final average accuracy. The best of several noisy
candidates flatters the winner (the winner's curse: its score is optimistic, the more so the more candidates
there are); the runner-up's paired difference says whether the order is resolved — without a **\\*** the two
are not told apart on these items, and the cheaper one is the safer choice.

| situation | best (test, ± 95% interval) | runner-up: Δ vs the best [95% interval] | what the best needs | what the runner-up needs |
|---|---|---|---|---|
{table}

Candidates, best first:

{candidates}
"""
