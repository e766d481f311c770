"""Reporting results: a fixed-width table, atomic JSON files and the specialization/retention trade-off plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import safeload
from ..checkpoint.writer import atomic_write
from ..errors import ForgetlessError
from .harness import EvalOptions
from .metrics import (
    FINGERPRINTS,
    MC_METRIC_DOC,
    MC_METRICS,
    Bootstrap,
    check_items,
    compare,
    half_width,
    item_correct,
    metric_view,
    scores,
    unchecked,
)

TABLE_SCORES = ("T", "G_v", "G_t", "G", "E", "F", "E+F")


# ----------------------------------------------------------------------------------------------------------------
# table


def table_row(
    name: str,
    result: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
    finetuned: Mapping[str, Any] | None = None,
    *,
    boot: Bootstrap | None = None,
) -> dict[str, Any]:
    """A table row: ``name``, ``accuracy`` (task → percent) and T, G_v, G_t (and, given ``base``, E, F, E+F,
    gain_kept — :func:`forgetless.eval.metrics.compare`). With ``boot``, ``intervals``: each score's 95%
    interval, E, F and E+F paired with ``base``."""
    acc = {k: 100.0 * float(t["accuracy"]) for k, t in result.get("tasks", {}).items()}
    vals: dict[str, Any] = dict(compare(result, base, finetuned) if base is not None else scores(result))
    row = {"name": name, "accuracy": acc, **vals}
    if boot is not None:
        row["intervals"] = boot.intervals(
            boot.compare(result, base) if base is not None else boot.scores(result)
        )
    return row


def cell(v: Any, signed: bool = False, interval: Sequence[float] | None = None) -> str:
    """A score as shown: ``62.1``, signed ``+30.0``, with an interval ``+30.0 ± 2.1`` (its half-width)."""
    if v is None:
        return "—"
    text = f"{v:+.1f}" if signed else f"{v:.1f}"
    return text if interval is None else f"{text} ± {half_width(interval):.1f}"


def diff_cell(point: float, interval: Sequence[float]) -> str:
    r"""A paired difference as shown: ``+3.1 [+0.4, +5.9]``, marked **\*** when its interval excludes 0."""
    lo, hi = interval
    return f"{point:+.1f} [{lo:+.1f}, {hi:+.1f}]" + (" **\\***" if lo > 0 or hi < 0 else "")


def doc_link(path: Path, doc: Path | None) -> Path:
    """How a markdown file `doc` links to `path`: relative to the document's folder when `path` is inside it."""
    return path.relative_to(doc.parent) if doc is not None and path.is_relative_to(doc.parent) else path


def format_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str] | None = None) -> str:
    """One line per row (model): its accuracy on each task, then T, G_v, G_t, G, E, F, E+F; all in percent/points,
    ``—`` where a value does not exist, ``± h`` (half the 95% interval) where the row has ``intervals``. Columns
    E, F, E+F appear only when some row has them. ``tasks`` orders the task columns (default: first
    appearance)."""
    if tasks is None:
        tasks = list(dict.fromkeys(k for r in rows for k in r.get("accuracy", {})))
    cols = [
        c for c in TABLE_SCORES if c in ("T", "G_v", "G_t", "G") or any(r.get(c) is not None for r in rows)
    ]
    header = ["model", *tasks, *cols]
    body = [
        [
            str(r["name"]),
            *[cell(r.get("accuracy", {}).get(t)) for t in tasks],
            *[cell(r.get(c), c in ("E", "F", "E+F"), (r.get("intervals") or {}).get(c)) for c in cols],
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(
            x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, body)])


# ----------------------------------------------------------------------------------------------------------------
# files


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON: to a temporary file beside ``path``, renamed into place."""
    return atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A result file written by :func:`write_json`, with ``path`` recorded in it (for messages)."""
    from ..errors import ForgetlessError

    p = Path(path)
    data = safeload.read_json(p, remedy="pass a JSON written by forgetless eval", expect=dict)
    if not isinstance(data.get("tasks"), dict):
        raise ForgetlessError(
            "not an evaluation result (no 'tasks')",
            file=p,
            remedy="pass a JSON written by forgetless eval --out",
        )
    data["path"] = str(p)
    return data


# ----------------------------------------------------------------------------------------------------------------
# plot


@dataclass
class TradeoffPoint:
    """One model on the trade-off plot: ``task`` (x, T) and ``general`` (y, G) scores; ``method`` and ``knob``
    (the value of the method's parameter) for merged models; ``role`` ``"method"``, ``"base"`` or
    ``"finetuned"``; ``chosen`` marks the point to highlight; ``task_interval`` / ``general_interval`` (95%,
    optional) are drawn as error bars."""

    method: str
    task: float
    general: float
    knob: str | float | None = None
    role: str = "method"
    chosen: bool = False
    task_interval: tuple[float, float] | None = None  # drawn as error bars
    general_interval: tuple[float, float] | None = None


def _point(p: TradeoffPoint | Mapping[str, Any]) -> TradeoffPoint:
    return p if isinstance(p, TradeoffPoint) else TradeoffPoint(**dict(p))


def _knob_key(p: TradeoffPoint) -> float:
    try:
        return float(p.knob)
    except (TypeError, ValueError):
        return float("nan")


def _error_bars(ax, pts: Sequence[TradeoffPoint], color) -> None:
    for p in pts:
        if p.task_interval is None and p.general_interval is None:
            continue
        xe = (
            None
            if p.task_interval is None
            else [[p.task - p.task_interval[0]], [p.task_interval[1] - p.task]]
        )
        ye = (
            None
            if p.general_interval is None
            else [[p.general - p.general_interval[0]], [p.general_interval[1] - p.general]]
        )
        ax.errorbar(
            [p.task],
            [p.general],
            xerr=xe,
            yerr=ye,
            fmt="none",
            ecolor=color,
            alpha=0.45,
            lw=0.9,
            capsize=2,
            zorder=2,
        )


def tradeoff_plot(
    points: Sequence[TradeoffPoint | Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    xlabel: str = "task score T (%)",
    ylabel: str = "general score G (%)",
) -> Path:
    """A PNG of the specialization/retention trade-off: x = task score, y = general score; one line per method
    through its knob values (in numeric knob order when every knob is a number, else as given), each point
    annotated with its knob; the base and fine-tuned models as distinct markers; a ``chosen`` point ringed; 95%
    intervals, where the points have them, as error bars.
    Written atomically (temporary file, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [_point(p) for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    try:
        methods = list(dict.fromkeys(p.method for p in pts if p.role == "method"))
        if len(methods) > 10:  # the default cycle has 10 colours: one colour per method beyond that
            ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i % 20) for i in range(len(methods))])
        for m in methods:
            line = [p for p in pts if p.role == "method" and p.method == m]
            keys = [_knob_key(p) for p in line]
            if not any(math.isnan(k) for k in keys):  # every knob numeric
                line = [p for _, p in sorted(zip(keys, line), key=lambda kp: kp[0])]
            (handle,) = ax.plot(
                [p.task for p in line], [p.general for p in line], marker="o", ms=4, lw=1.2, label=m
            )
            for p in line:
                if p.knob is not None:
                    ax.annotate(
                        f"{p.knob}",
                        (p.task, p.general),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=handle.get_color(),
                    )
            _error_bars(ax, line, handle.get_color())
        styles = {"base": ("s", "black", "base"), "finetuned": ("^", "tab:red", "fine-tuned")}
        for role, (marker, color, label) in styles.items():
            sel = [p for p in pts if p.role == role]
            if sel:
                ax.scatter(
                    [p.task for p in sel],
                    [p.general for p in sel],
                    marker=marker,
                    s=70,
                    color=color,
                    zorder=5,
                    label=label,
                )
                _error_bars(ax, sel, color)
        chosen = [p for p in pts if p.chosen]
        if chosen:
            ax.scatter(
                [p.task for p in chosen],
                [p.general for p in chosen],
                s=260,
                facecolors="none",
                edgecolors="gold",
                linewidths=2.5,
                zorder=6,
                label="chosen",
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        if pts:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# the command


def _split_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [x for v in value for x in v.split(",")]
    return [x.strip() for x in items if x.strip()]


def _figures(
    name: str,
    res: Mapping[str, Any],
    base: Mapping[str, Any] | None,
    ft: Mapping[str, Any] | None,
    *,
    boot: Bootstrap,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One metric's figures of a result — ``scores``, ``intervals`` and, given the base model's result,
    ``comparison`` and ``comparison_intervals`` — and its table rows (base, fine-tuned, the model)."""
    figures: dict[str, Any] = {"scores": scores(res), "intervals": boot.intervals(boot.scores(res))}
    rows = []
    if base is not None:
        figures["comparison"] = compare(res, base, ft)
        figures["comparison_intervals"] = boot.intervals(boot.compare(res, base))
        rows.append(table_row("base", base, base, boot=boot))
        if ft is not None:
            rows.append(table_row("fine-tuned", ft, base, ft, boot=boot))
    rows.append(table_row(name, res, base, ft, boot=boot))
    return figures, rows


@contextmanager
def _loading_bars(shown: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") hidden while the block runs, unless ``shown``: --quiet
    means no progress output at all."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not shown and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not shown and was:
            hf_logging.enable_progress_bar()


def _check_items_first(result: dict[str, Any], who: str, mine: Mapping[str, list[str]], log) -> None:
    """Before any work: the tasks about to be evaluated (``mine``: their item fingerprints by name) hold the items
    ``result`` was scored on. Tasks of a result written before forgetless recorded its items are matched by name
    and size only, which ``log`` notes."""
    for name, fingerprints in mine.items():
        theirs = result["tasks"].get(name, {}).get(FINGERPRINTS)
        if theirs is not None:
            check_items(name, fingerprints, theirs, result["path"], who)
    old = unchecked(result)
    if old and log is not None:
        log(
            f"note: {result['path']} has no item fingerprints for {', '.join(old)} (written by an older "
            "forgetless): matched by task name and size only; evaluate that model again to check its items"
        )


def run_eval(
    model: str | os.PathLike,
    tasks: str | Sequence[str] | None,
    general: str | Sequence[str] | None = None,
    *,
    out: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    finetuned: str | os.PathLike | None = None,
    benchmarks: Sequence[tuple[str, str | os.PathLike]] = (),
    progress: bool = True,
    force: bool = False,
    log=print,
    options: EvalOptions | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """``forgetless eval``: evaluate ``model`` on the comma-separated ``tasks`` (downstream) and ``general`` tasks,
    print the table and write the result JSON to ``out``. With result files of the ``base`` (and ``finetuned``)
    model, the result gets a ``comparison`` (E, F, E+F, gain_kept) and the table their rows. Every score gets its
    95% bootstrap interval (``intervals``; ``comparison_intervals``: E, F, E+F paired with the base model's
    items), shown as ``± h`` in the table. These are ``acc``; where tasks are scored by multiple choice, the
    result's ``acc_norm`` and ``lmms_eval_acc`` get the same keys (E and F where the base result has that metric
    too) and a table each (:data:`forgetless.eval.metrics.MC_METRICS`). ``progress``: print progress lines
    (through ``log``, which also prints the tables). An existing ``out`` is replaced only with ``force``. Under
    torchrun the items are shared among the ranks (:func:`~forgetless.eval.harness.evaluate`) and rank 0 alone
    prints and writes. How the tasks are read and the model run: ``options`` or its fields as keywords
    (:class:`~forgetless.eval.harness.EvalOptions`). ``benchmarks``: (name, folder) pairs of standard benchmarks
    (:mod:`forgetless.eval.benchmarks`), general tasks whose official figures are printed too."""
    from ..checkpoint.guard import check_output
    from ..checkpoint.lora import parse_model_ref
    from ..stats.distributed import dist_info
    from .harness import evaluate, task_fingerprints

    o = EvalOptions.of(options, **fields)
    base_r, ft_r = _references(base, finetuned)
    groups = _task_groups(tasks, general, o.split, o.task_root)
    _add_benchmarks(groups[1], benchmarks)
    if out is not None:  # the model folder, the task files and the result files read are never written over
        specs = [t.path for g in groups for t in g.values()]
        check_output(out, [*parse_model_ref(str(model)), *specs, base, finetuned], force=force)
    if base_r is not None:  # each task read once for both results
        mine = {name: task_fingerprints(spec, o.limit) for g in groups for name, spec in g.items()}
        for r, who in ((base_r, "base model"), (ft_r, "fine-tuned model")):
            if r is not None:
                _check_items_first(r, who, mine, log)
    with _loading_bars(progress):
        res = evaluate(model, groups[0], general=groups[1], options=o, progress=progress, log=log)
    if dist_info()[0] != 0:  # under torchrun every rank has the whole result; rank 0 alone prints and writes
        log, out = None, None
    if base_r is not None:
        res["base"], res["finetuned"] = str(base), (str(finetuned) if finetuned is not None else None)
    boot = Bootstrap()
    name = Path(model).name or str(model)
    for metric in [m for m in MC_METRICS if m == MC_METRICS[0] or m in res]:
        views = [metric_view(r, metric) if r is not None else None for r in (res, base_r, ft_r)]
        figures, rows = _figures(name, *views, boot=boot)
        (res if metric == MC_METRICS[0] else res[metric]).update(figures)
        if log is not None:
            _log_metric(log, metric, views, base_r, ft_r, figures, rows, list(res["tasks"]))
    if "benchmarks" in res:
        _benchmark_figures(res, base_r, boot, log)
    if out is not None:
        write_json(out, res)
        if log is not None:
            log(f"wrote {out}")
    return res


def _add_benchmarks(general: dict[str, Any], benchmarks: Sequence[tuple[str, Any]]) -> None:
    """The benchmarks' task specs added to the general tasks, each name once."""
    from .harness import benchmark_spec

    for name, folder in benchmarks:
        spec = benchmark_spec(name, folder)
        if spec.name in general:
            raise ForgetlessError(
                f"{spec.name!r} is given twice (a benchmark and a task share the name, or a benchmark repeats)",
                remedy="give each benchmark once",
            )
        general[spec.name] = spec


def _benchmark_figures(res: dict[str, Any], base: Mapping[str, Any] | None, boot: Bootstrap, log) -> None:
    """Each benchmark's headline with its 95% interval and, given the base's result, its paired change, in the
    benchmark's own units; one line each."""
    from .benchmarks import get

    for name, official in res["benchmarks"].items():
        scale = get(res["tasks"][name]["benchmark"]).scale
        draws = boot.task(name, res["tasks"][name])
        official["interval"] = [v * scale for v in boot.interval(draws) or ()]
        line = f"{name}: {official['headline']} {official['value']:.2f} [{official['interval'][0]:.2f}, "
        line += f"{official['interval'][1]:.2f}]"
        if base is not None and name in base.get("tasks", {}):
            delta = (res["tasks"][name]["accuracy"] - base["tasks"][name]["accuracy"]) * scale
            iv = boot.interval(draws - boot.task(name, base["tasks"][name])) or (0.0, 0.0)
            official["vs_base"] = {"value": delta, "interval": [iv[0] * scale, iv[1] * scale]}
            line += f", vs base {delta:+.2f} [{iv[0] * scale:+.2f}, {iv[1] * scale:+.2f}]"
        if log is not None:
            log(line)


def _references(base: Any, finetuned: Any) -> tuple[dict | None, dict | None]:
    """The base's and fine-tuned model's results, each with the per-item results the intervals pair with."""
    if finetuned is not None and base is None:
        raise ForgetlessError(
            "--finetuned needs --base (E and F are measured from the base model)",
            remedy="pass --base base.json too",
        )
    base_r = read_json(base) if base is not None else None
    ft_r = read_json(finetuned) if finetuned is not None else None
    for r in (base_r, ft_r):  # intervals are paired with these: they need their per-item results
        for name, t in (r or {}).get("tasks", {}).items():
            try:
                item_correct(t, name)
            except ForgetlessError as e:
                raise ForgetlessError(e.problem, file=r["path"], remedy=e.remedy) from None
    return base_r, ft_r


def _task_groups(tasks: Any, general: Any, split: str, task_root: Any) -> list[dict[str, Any]]:
    """{name: TaskSpec} of the downstream and of the general tasks, each name once."""
    from .harness import resolve_task

    groups = []
    for specs in (_split_list(tasks), _split_list(general)):
        resolved = [resolve_task(s, split=split, task_root=task_root) for s in specs]
        groups.append({t.name: t for t in resolved})
        if len(groups[-1]) != len(resolved):
            raise ForgetlessError(
                f"two tasks share a name: {', '.join(t.name for t in resolved)}",
                remedy="give each task once (rename a JSONL file if two have the same stem)",
            )
    return groups


def _log_metric(
    log: Any,
    metric: str,
    views: list,
    base_r: dict | None,
    ft_r: dict | None,
    figures: dict,
    rows: list,
    task_names: list[str],
) -> None:
    """One metric's table, saying which comparison an older reference result lacks, and the gain kept."""
    lacks = next(
        (
            f" (the {who} result, written by an older version, lacks it: no {what})"
            for who, r, v, what in (
                ("base", base_r, views[1], "comparison"),
                ("fine-tuned", ft_r, views[2], "gain kept"),
            )
            if r is not None and v is None
        ),
        "",
    )
    log(f"\n{metric}: {MC_METRIC_DOC[metric]}{lacks}")
    log(format_table(rows, task_names))
    kept = figures.get("comparison", {}).get("gain_kept")
    if kept is not None:
        log(f"gain kept: {kept:.1%} of the fine-tuned model's")
