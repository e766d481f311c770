"""Continual-learning metrics of a task sequence: MFT, MFN, MAA, BWT and Last over its accuracy matrix, with paired
bootstrap intervals, and the matrix as a heat map (``forgetless continual eval``).

a[t][j] is the accuracy (%) on task j after learning task t, t, j = 1..T: step t's model is the one after learning
task t. As MCITlib defines them (its evaluation protocol):

- **MFT** (mean fine-tune accuracy) = 1/T Σⱼ a[j][j]: each task just after learning it (the diagonal);
- **MFN** (mean final accuracy) = 1/T Σⱼ a[T][j]: every task after the last step (the last row);
- **MAA** (mean average accuracy) = 1/T Σₜ (1/t Σ_{j≤t} a[t][j]): after each step, the mean over the tasks learned
  so far, averaged over the steps;
- **BWT** (backward transfer) = 1/(T−1) Σ_{j<T} (a[T][j] − a[j][j]): what each earlier task lost (negative) or
  gained from the later steps; undefined for one task;
- **Last**: the mean accuracy over all tasks after the last step — MFN under another name.

Only the cells j ≤ t enter them (a lower-triangular matrix suffices); a cell of a task not yet learned (j > t) is
kept where it was measured, and enters none.

**Intervals**: every cell of task j is scored on the same test items of task j, so one
:class:`~forgetless.eval.metrics.Bootstrap` resamples them identically in every step and every sequence: a
metric's draws are the metric of the resampled matrices, and the two terms of BWT, and any difference between two
sequences (methods) on the same tasks, are paired.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint.writer import atomic_write
from ..errors import ForgetlessError
from .metrics import FINGERPRINTS, Bootstrap, NamedDraws, check_items, item_correct

METRICS = ("MFT", "MFN", "MAA", "BWT", "Last")
SIGNED = ("BWT",)  # shown with its sign
METRIC_DOC = {
    "MFT": "mean fine-tune accuracy: each task just after learning it",
    "MFN": "mean final accuracy: every task after the last step",
    "MAA": "mean over the steps of the average accuracy on the tasks learned so far",
    "BWT": "backward transfer: final minus just-after-learning accuracy, tasks 1..T-1",
    "Last": "the mean accuracy on all tasks after the last step (= MFN)",
}
METRICS_FILE = "continual-metrics.json"
MATRIX_PLOT = "continual-matrix.png"

Matrix = Sequence[Sequence[Any]]  # a[t][j]: a number (%), an array of resampled values, or None: not measured


# ----------------------------------------------------------------------------------------------------------------
# the metrics of one matrix


def _mean(cells: list[Any]) -> Any:
    """The mean of numbers (a float) or of equally long arrays (an array)."""
    m = np.mean(np.stack([np.asarray(c, dtype=np.float64) for c in cells]), axis=0)
    return float(m) if m.ndim == 0 else m


def _check(a: Matrix) -> int:
    """T, after refusing a matrix that lacks a cell j ≤ t."""
    if len(a) == 0:
        raise ForgetlessError("an empty accuracy matrix", remedy="give at least one step")
    for t, row in enumerate(a):
        if len(row) < t + 1 or any(row[j] is None for j in range(t + 1)):
            raise ForgetlessError(
                f"the accuracy matrix lacks a cell of step {t + 1} (every task learned so far is needed)",
                remedy="give after each step the accuracy on every task learned so far",
            )
    return len(a)


def mft(a: Matrix) -> Any:
    """1/T Σⱼ a[j][j]."""
    return _mean([a[j][j] for j in range(_check(a))])


def mfn(a: Matrix) -> Any:
    """1/T Σⱼ a[T][j]."""
    return _mean([a[-1][j] for j in range(_check(a))])


def maa(a: Matrix) -> Any:
    """1/T Σₜ 1/t Σ_{j≤t} a[t][j]."""
    return _mean([_mean([a[t][j] for j in range(t + 1)]) for t in range(_check(a))])


def bwt(a: Matrix) -> Any:
    """1/(T−1) Σ_{j<T} (a[T][j] − a[j][j]); None for one task."""
    T = _check(a)
    return None if T < 2 else _mean([np.subtract(a[-1][j], a[j][j]) for j in range(T - 1)])


def cl_metrics(a: Matrix) -> dict[str, Any]:
    """MFT, MFN, MAA, BWT, Last of a matrix of numbers (floats) or of resampled values (arrays)."""
    final = mfn(a)
    return {"MFT": mft(a), "MFN": final, "MAA": maa(a), "BWT": bwt(a), "Last": final}


def cell_draws(boot: Bootstrap, task: str, correct: np.ndarray) -> np.ndarray:
    """[n_boot] resampled accuracy (%) of one cell from its per-item results (the task's own resamples)."""
    return 100 * boot.resample(task, correct)


# ----------------------------------------------------------------------------------------------------------------
# the matrix of a sequence of step results


def step_entries(
    steps: Sequence[Mapping[str, Any] | None], tasks: Sequence[str]
) -> list[list[Mapping[str, Any] | None]]:
    """Each step's result entry of each task (None: a task not yet learned that the step was not scored on),
    after refusing a step without a task learned so far, or one scored on other items than an earlier step. A step
    given as None (not evaluated yet) is skipped: its row is all None."""
    out: list[list[Mapping[str, Any] | None]] = []
    first: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for t, step in enumerate(steps):
        if step is None:
            out.append([None] * len(tasks))
            continue
        have = step.get("tasks", {})
        for j, name in enumerate(tasks[: t + 1]):
            if name not in have:
                raise ForgetlessError(
                    f"step {t + 1} has no result for task {name!r} (learned at step {j + 1}; it has "
                    f"{', '.join(have) or 'none'})",
                    file=step.get("path"),
                    remedy=f"evaluate step {t + 1}'s model on every task of the sequence (forgetless eval MODEL "
                    f"--tasks {','.join(tasks)})",
                )
        row = [have.get(n) for n in tasks]
        for name, entry in zip(tasks, row):
            if entry is not None:
                _same_items(name, entry, first.setdefault(name, (t, entry)), step.get("path"))
        out.append(row)
    return out


def _same_items(name: str, entry: Mapping[str, Any], ref: tuple[int, Mapping[str, Any]], path: Any) -> None:
    """Refuse a task entry scored on other items than the first step's that has the task."""
    k, first = ref
    try:
        n, m = len(item_correct(entry, name)), len(item_correct(first, name))
    except ForgetlessError as e:
        raise ForgetlessError(e.problem, file=path, remedy=e.remedy) from None
    if n != m:
        raise ForgetlessError(
            f"task {name!r} was scored on {n} items here and on {m} in step {k + 1}'s result",
            file=path,
            remedy="evaluate every step on the same task files, --split and --limit",
        )
    check_items(name, first.get(FINGERPRINTS), entry.get(FINGERPRINTS), path, f"step {k + 1} result")


def point_matrix(entries: Sequence[Sequence[Mapping[str, Any] | None]]) -> list[list[float | None]]:
    """a[t][j] in percent (``accuracy`` × 100) from :func:`step_entries`."""
    return [[None if e is None else 100.0 * float(e["accuracy"]) for e in row] for row in entries]


class ContinualMetrics(NamedDraws):
    """MFT, MFN, MAA, BWT and Last of named task sequences (methods) over the same tasks: their points, their
    matrices and their draws, all resampled by one :class:`Bootstrap` (a difference between two sequences is
    paired)."""

    KEYS = METRICS

    def __init__(self, tasks: Sequence[str], boot: Bootstrap | None = None):
        super().__init__(boot or Bootstrap())
        self.tasks = list(tasks)
        self.matrices: dict[str, list[list[float | None]]] = {}

    def add(self, name: str, points: Matrix, correct: Sequence[Sequence[np.ndarray | None]]) -> None:
        """A sequence from its matrix (%) and each cell's per-item results (cells j ≤ t are resampled)."""
        draws = [
            [cell_draws(self.boot, self.tasks[j], row[j]) for j in range(t + 1)]
            for t, row in enumerate(correct)
        ]
        self.matrices[name] = [list(r) for r in points]
        self.points[name] = cl_metrics(points)
        self.draws[name] = cl_metrics(draws)

    def add_steps(self, name: str, steps: Sequence[Mapping[str, Any]]) -> None:
        """A sequence from its step results (what ``forgetless eval`` writes), one per task, in learning order."""
        entries = step_entries(steps, self.tasks)
        correct = [
            [None if e is None else item_correct(e, n) for n, e in zip(self.tasks, row)] for row in entries
        ]
        self.add(name, point_matrix(entries), correct)

    def intervals(self, name: str) -> dict[str, tuple[float, float] | None]:
        return {k: self.interval(name, k) for k in self.KEYS}


# ----------------------------------------------------------------------------------------------------------------
# tables and the heat map


def matrix_markdown(a: Matrix, tasks: Sequence[str], extra: Mapping[str, Sequence[Any]] | None = None) -> str:
    """The matrix as a markdown table (row t: after task t), with the average over the tasks learned so far; cells
    of tasks not learned yet in parentheses, blank where not measured; ``extra``: more columns, a value per row."""
    extra = extra or {}
    head = ["after task", *tasks, "average so far", *extra]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for t, row in enumerate(a):
        cells = [_cell(row[j] if j < len(row) else None, j > t) for j in range(len(tasks))]
        more = ["—" if v[t] is None else f"{v[t]:.1f}" for v in extra.values()]
        avg = _mean([row[j] for j in range(t + 1)])
        lines.append(f"| {t + 1}. {tasks[t]} | " + " | ".join([*cells, f"{avg:.1f}", *more]) + " |")
    return "\n".join(lines)


def _cell(v: float | None, ahead: bool) -> str:
    return "" if v is None else f"({v:.1f})" if ahead else f"{v:.1f}"


def heatmaps(
    matrices: Mapping[str, Matrix],
    tasks: Sequence[str],
    path: str | os.PathLike,
    title: str = "Accuracy after each task (row) on each task (column)",
) -> Path:
    """A PNG with one panel per named matrix (row t: after task t; column j: task j), measured cells annotated;
    written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(matrices)
    T = len(tasks)
    cols = min(4, len(names))
    rows_n = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.3 * cols, 3.1 * rows_n + 0.5), dpi=110, squeeze=False)
    try:
        for ax in axes.flat[len(names) :]:
            ax.axis("off")
        for ax, name in zip(axes.flat, names):
            m = np.array(
                [[np.nan if v is None else v for v in r] + [np.nan] * (T - len(r)) for r in matrices[name]]
            )
            im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
            for t, j in zip(*np.nonzero(~np.isnan(m))):
                color = "white" if m[t, j] < 55 else "black"
                ax.text(j, t, f"{m[t, j]:.0f}", ha="center", va="center", fontsize=7, color=color)
            ax.set_title(name, fontsize=9)
            ax.set_xticks(range(T), [n[:8] for n in tasks], rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(m)), [f"after {t + 1}" for t in range(len(m))], fontsize=7)
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="test accuracy (%)")
        fig.suptitle(title, fontsize=10)
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# the command


def _task_name(spec: str, split: str, task_root: Any) -> str:
    """A task's name as results key it: its file's or folder's (resolved as ``forgetless eval`` does), else the
    string itself (a name in the step results)."""
    from .harness import resolve_task

    try:
        return resolve_task(spec, split=split, task_root=task_root).name
    except ForgetlessError:
        return spec


def _read_steps(steps: Sequence[str], n_tasks: int) -> list[dict[str, Any] | None]:
    """Each step's result JSON read (None: a model folder to evaluate), after refusing a count other than one
    step per task and a step that is neither."""
    from .report import read_json

    if len(steps) != n_tasks:
        raise ForgetlessError(
            f"{len(steps)} steps for {n_tasks} tasks: step t is the model after learning task t",
            remedy="pass one model folder or forgetless eval result JSON per task of --tasks, in learning order",
        )
    out: list[dict[str, Any] | None] = []
    for s in steps:
        if Path(s).is_dir():
            out.append(None)
        elif Path(s).is_file():
            out.append(read_json(s))
        else:
            raise ForgetlessError(
                "not found", file=s, remedy="pass a model folder or a result JSON written by forgetless eval"
            )
    return out


def _check_outputs(
    out: Path | None, steps: Sequence[str], specs: list[Any], force: bool
) -> list[Path | None]:
    """Before any work: the files the command writes (each evaluated step's result, the metrics, the plot) are
    no input and, without ``force``, new. Returns each step's result path (None: a given JSON, or no --out)."""
    from ..checkpoint.guard import check_output

    if out is None:
        return [None] * len(steps)
    inputs = [*steps, *specs]
    step_out = [None if Path(s).is_file() else out / f"step-{t + 1}.json" for t, s in enumerate(steps)]
    for p in [*[x for x in step_out if x is not None], out / METRICS_FILE, out / MATRIX_PLOT]:
        check_output(p, inputs, force=force)
    return step_out


def continual_eval(
    steps: Sequence[str | os.PathLike],
    tasks: str | Sequence[str] | None,
    general: str | Sequence[str] | None = None,
    *,
    benchmarks: Sequence[tuple[str, str | os.PathLike]] = (),
    out: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    options: Any = None,
    **fields: Any,
) -> dict[str, Any]:
    """``forgetless continual eval``: the accuracy matrix of a task sequence from one model folder (evaluated on
    every task, as ``forgetless eval``) or result JSON per step, its MFT, MFN, MAA, BWT and Last with 95%
    intervals; with ``out`` (a folder) written there as :data:`METRICS_FILE` and :data:`MATRIX_PLOT` beside each
    evaluated step's result. The sequence is ``tasks`` then the standard ``benchmarks`` ((name, folder) pairs,
    :mod:`forgetless.eval.benchmarks`); G per step is that of the ``general`` tasks. Everything is checked before
    the first model is loaded. Returns the metrics record; ``log`` gets each step's progress and table."""
    from .harness import EvalOptions, benchmark_spec
    from .report import _split_list, _task_groups, run_eval, write_json

    o = EvalOptions.of(options, **fields)
    steps = [str(s) for s in steps]
    specs = _split_list(tasks)
    given = _read_steps(steps, len(specs) + len(benchmarks))
    groups = _task_groups(specs, general, o.split, o.task_root) if None in given else None
    if groups:
        groups[0].update({b.name: b for b in (benchmark_spec(n, d) for n, d in benchmarks)})
    given_names = [*(_task_name(s, o.split, o.task_root) for s in specs), *(n for n, _ in benchmarks)]
    names = list(groups[0]) if groups else given_names
    if len(set(names)) != len(names):
        raise ForgetlessError(
            f"a task is given twice: {', '.join(names)}", remedy="give each task of the sequence once"
        )
    step_entries(given, names)  # the given results: every task learned so far, the same items
    if groups:
        _check_given_items(given, groups[0], o.limit)
    folder = Path(out) if out is not None else None
    step_out = _check_outputs(folder, steps, [t.path for g in groups or [] for t in g.values()], force)
    results = []
    for t, (s, r) in enumerate(zip(steps, given)):
        if r is None:
            if log is not None and progress:
                log(f"step {t + 1}/{len(steps)}: evaluating {s}")
            r = run_eval(
                s,
                specs,
                general,
                benchmarks=benchmarks,
                out=step_out[t],
                force=force,
                progress=progress,
                log=log,
                options=o,
            )
            r["path"] = str(step_out[t] or s)
        results.append(r)
    d = ContinualMetrics(names)
    d.add_steps("steps", results)
    record = _record(d, steps, results, [_general_score(r, names) for r in results])
    if folder is not None:
        write_json(folder / METRICS_FILE, record)
        heatmaps({"": d.matrices["steps"]}, names, folder / MATRIX_PLOT)
    return record


def _general_score(result: Mapping[str, Any], sequence: Sequence[str]) -> float | None:
    """G of a step's result over its tasks outside the sequence (a benchmark of the sequence is not general)."""
    from .metrics import scores

    return scores({"tasks": {n: t for n, t in result["tasks"].items() if n not in sequence}})["G"]


def _check_given_items(
    given: Sequence[Mapping[str, Any] | None], specs: Mapping[str, Any], limit: Any
) -> None:
    """The given step results were scored on the items of the task files about to be evaluated."""
    from .harness import task_fingerprints

    mine = {n: task_fingerprints(spec, limit) for n, spec in specs.items()}
    for r in given:
        for n, fp in mine.items():
            if r is not None and n in r["tasks"]:
                check_items(n, fp, r["tasks"][n].get(FINGERPRINTS), r["path"], "task file")


def _record(d: ContinualMetrics, steps: list[str], results: list[dict], general: list[float | None]) -> dict:
    """The metrics record written as :data:`METRICS_FILE`."""
    return {
        "tasks": d.tasks,
        "steps": steps,
        "step_results": [r.get("path") for r in results],
        "items": {n: len(item_correct(results[-1]["tasks"][n], n)) for n in d.tasks},
        "matrix": d.matrices["steps"],
        "metrics": d.points["steps"],
        "intervals": {k: list(v) if v else None for k, v in d.intervals("steps").items()},
        "G": general if any(g is not None for g in general) else None,
        "definitions": METRIC_DOC,
        "bootstrap": {"n_boot": d.boot.n_boot, "seed": d.boot.seed, "level": d.boot.level},
    }


def markdown(record: Mapping[str, Any]) -> str:
    """What the command prints: the matrix and the metrics with ± half their 95% intervals."""
    from .report import cell

    tasks, iv = record["tasks"], record["intervals"]
    extra = {"G": record["G"]} if record.get("G") else {}
    row = [cell(record["metrics"][k], k in SIGNED, iv[k]) for k in METRICS]
    boot = record["bootstrap"]
    note = f"± half the {boot['level']:.0%} bootstrap interval over each task's test items "
    note += f"({boot['n_boot']} resamples, the same in every step). Last = MFN."
    return "\n".join(
        [
            "Accuracy (%) after each task (row) on each task (column; in parentheses: not learned yet)",
            "",
            matrix_markdown(record["matrix"], tasks, extra),
            "",
            "| " + " | ".join(METRICS) + " |",
            "|" + "---:|" * len(METRICS),
            "| " + " | ".join(row) + " |",
            "",
            note,
        ]
    )
