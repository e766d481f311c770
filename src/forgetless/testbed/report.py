"""``forgetless testbed report``: every downstream task through :func:`.experiment.run_experiment` on the whole
test splits, one trade-off plot per task, and the markdown report — RESULTS.md, rebuilt whole by one command.

Every figure carries its 95% bootstrap interval over the test items (:class:`forgetless.eval.metrics.Bootstrap`):
E, F and E + F are paired with the base model's items, the means over the tasks resample every task jointly (the
general test items are the same in every task's experiment, so they share their draws), and differences between
two methods are paired differences. The hand-written reading between the ``<!-- reading -->`` markers of an
existing report is kept when the report is rebuilt; everything else is generated from each task's
``results.json``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint.writer import atomic_write
from ..eval.metrics import Bootstrap, NamedDraws, half_width, item_correct
from ..eval.report import cell, diff_cell, doc_link, format_table, tradeoff_plot
from . import experiment as X
from . import tasks as T
from .context import read_results
from .experiment import row_draws, row_name, row_result
from .frontier import RESULTS as FRONTIER_RESULTS
from .report_continual import CL_READING_END, CL_READING_START, continual_markdown
from .report_decision import decision_markdown
from .report_frontier import FR_READING_END, FR_READING_START, frontier_markdown
from .tables import N_BOOT, TaskDraws, differences, summary

# extra knob values so that each of these methods draws a curve, not a point
CURVES: list[X.Merge] = [
    X.Merge("WiSE-FT", "linear", {"lambda": 0.3}),
    X.Merge("CGM", "cgm", {"alpha": 1.0}, X.TASK_FISHER_CGM),
]
# CGM with other task Fishers than the published one (θ₀, empirical): at θ_ft, empirical (what this project used
# before the published scripts were read) and sampled (labels drawn from θ_ft's predictions: it does not vanish at a
# converged fine-tune)
TASK_FISHERS: list[X.Merge] = [
    X.Merge("CGM (task Fisher empirical at θ_ft)", "cgm", {"alpha": 0.2}, ("finetuned", "empirical")),
    X.Merge("CGM (task Fisher sampled at θ_ft)", "cgm", {"alpha": 0.2}, ("finetuned", "sampled")),
]
TARGET = 3.0  # points: the half-width the test splits should reach on E and F
EVAL_ITEMS_PER_S = 17.3  # fp32, batch 16, 2 cores (BENCHMARKS.md, "Evaluation cost against its floor")
READING_START = "<!-- reading: written by hand, kept when the report is rebuilt -->"
READING_END = "<!-- /reading -->"
# what `testbed report` runs: each task's experiment, the multi-task protocol, the continual protocol
PARTS = ("tasks", "multitask", "continual")


def _knob_value(knob: str) -> float | None:
    try:
        return float(knob.split()[0].split("=")[1]) if knob else None
    except (IndexError, ValueError):
        return None


def plot_rows(rows: list[dict], path: Path, title: str, intervals: list[dict] | None = None) -> Path:
    pts = []
    for k, r in enumerate(rows):
        role = {"base": "base", "fine-tuned": "finetuned"}.get(r["method"], "method")
        iv = intervals[k] if intervals else {}
        pts.append(
            {
                "method": r["method"],
                "task": r["T"],
                "general": r["G"],
                "role": role,
                "knob": _knob_value(r.get("knob", "")),
                "task_interval": iv.get("T"),
                "general_interval": iv.get("G"),
            }
        )
    return tradeoff_plot(pts, path, title=title)


def table(rows: list[dict], intervals: list[dict] | None = None) -> str:
    return format_table(
        [
            {
                "name": row_name(r),
                **r,
                "accuracy": r["tasks"],
                "intervals": intervals[k] if intervals else None,
            }
            for k, r in enumerate(rows)
        ]
    )


def row_intervals(rows: list[dict], n_boot: int = N_BOOT) -> list[dict]:
    """The 95% intervals of every row of one experiment (T, G_v, G_t, G; E, F, E + F paired with the base)."""
    boot = Bootstrap(n_boot, seed=0)
    draws = row_draws(rows, boot)
    return [boot.intervals(draws[row_name(r)]) for r in rows]


def _sizes(results: Mapping[str, dict], names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        for task, items in results[n]["rows"][0]["correct_items"].items():
            out[task] = len(items)
    return out


def what_target_takes(names: list[str], results: Mapping[str, dict], d: TaskDraws) -> str:
    """Per task: the widest E and F intervals over the methods, and the test items ±TARGET would need (a half-width
    shrinks as 1/√n), with the evaluation compute for every model of the report."""
    head = (
        f"| task | task items | widest E ± | task items for ±{TARGET:g} on E | general items per task | "
        f"widest F ± | general items for ±{TARGET:g} on F |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    extra = 0.0
    for n in names:
        rows = [r for r in results[n]["rows"] if r["method"] != "base"]
        sizes = _sizes(results, [n])
        ivs = [d.boot.intervals(d.draws[n][row_name(r)]) for r in rows]
        hw_e = max(half_width(iv["E"]) for iv in ivs)
        hw_f = max(half_width(iv["F"]) for iv in ivs)
        n_task = sizes[n]
        n_gen = max(v for t, v in sizes.items() if t in T.GENERAL_VISUAL)
        need_e = int(np.ceil(n_task * (hw_e / TARGET) ** 2))
        need_g = int(np.ceil(n_gen * (hw_f / TARGET) ** 2))
        extra += len(results[n]["rows"]) * (
            max(need_e - n_task, 0) + len(T.GENERAL_VISUAL) * max(need_g - n_gen, 0)
        )
        lines.append(f"| {n} | {n_task} | {hw_e:.1f} | {need_e:,} | {n_gen} | {hw_f:.1f} | {need_g:,} |")
    hours = extra / EVAL_ITEMS_PER_S / 3600
    return (
        "\n".join(lines) + f"\n\nReaching ±{TARGET:g} on every row would take about {extra:,.0f} more item "
        f"evaluations, **{hours:.1f} h more evaluation** on 2 cores at {EVAL_ITEMS_PER_S:g} items/s "
        "(BENCHMARKS.md), assuming the per-item variances stay as measured (the text probes cannot grow: 325 "
        "hand-written questions; growing the visual tasks alone narrows F a little less than this says). "
        "`digits` cannot grow beyond 300 test items without taking scikit-learn's 1,797 digits from its "
        "training split.\n"
    )


def _header(names: list[str], results: Mapping[str, dict]) -> str:
    ft = X.FINETUNE
    sizes = _sizes(results, list(results))  # the tasks that ran
    general = ", ".join(f"{t} {sizes[t]}" for t in [*T.GENERAL_VISUAL, "probes"] if t in sizes)
    task = ", ".join(f"{t} {sizes[t]}" for t in names if t in sizes)
    measured = f": {task} items of the downstream task; {general} of the general tasks" if sizes else ""
    merges = "; ".join(
        f"{label} {' '.join(f'{k}={v:g}' for k, v in p.items())}" for label, _, p, *_ in X.MERGES + CURVES
    )
    return f"""# Results: specialization against retention on the testbed

What happens when the testbed model — a real `LlavaForConditionalGeneration` made of the embedded
SmolLM2-135M-Instruct, a CLIP vision tower trained here from scratch and a two-layer projector
([docs/testbed.md](docs/testbed.md)) — is fine-tuned on a downstream task and then merged back with its pre-trained self by each method.

## How it was produced

```sh
make install
.venv/bin/forgetless testbed report --workdir runs/testbed --out RESULTS.md
```

This file is generated whole by that command (tables, intervals, plots, timings) from each task's
`runs/testbed/<task>/results.json`; only the reading between the `reading` markers is written by hand, and kept.

For each downstream task (`{"`, `".join(names)}`; `forgetless testbed tasks` generates them from seed 0): the
documented recipe fine-tunes {", ".join(f"`{x}`" for x in ft["train"])}, {ft["steps"]} AdamW steps of
{ft["batch_size"]} samples, lr {ft["lr"]:g} ({ft["warmup"]} warm-up steps, cosine to 10%), clip {ft["clip"]:g},
seed {ft["seed"]} (`forgetless.testbed.experiment.FINETUNE`). Fisher statistics on {X.STATS_SAMPLES} samples each,
empirical unless said: the general Fisher at θ₀ on 8 training samples of each general visual task and the 60 text
probes of the *validation* split; the task Fisher on the task's training set — **at θ₀ for CGM and CGM†, as CGM's
published scripts take it** (`fisher_matrix_flickr_from_pretrain_full.bin`), at θ_ft for Fisher merging (each
model's Fisher at that model, as Fisher merging defines it).
Every model is evaluated on the **whole test splits**{measured} (items never trained on; the probes are never used
for anything else).

Scores (percent, `forgetless/eval/metrics.py`): **T** the task accuracy; **G_v** the mean accuracy over the four
general visual tasks; **G_t** the text probes' accuracy; **G** = (G_v + G_t)/2; **E** = T − T(base), the
specialization gain; **F** = G − G(base), the general change (negative: forgetting); **E + F** the net. All
multiple-choice scores are by option log-likelihood; `tag` is exact match of the greedy answer.

**Intervals**: every figure is followed by `± h`, half the width of its 95% bootstrap interval over the test items
({N_BOOT} resamples, seed 0). E, F and E + F are paired with the base model's answers on the same items; the means
over the tasks resample every task jointly; differences between two methods are paired differences. One
fine-tuning seed: the intervals say how much the scores would move on other test items, not on another fine-tune.

Methods and knobs, fixed before the runs (published defaults or common values, never tuned on these test sets;
`forgetless sweep` tunes on the validation splits): {merges}. CGM and CGM† over their published scope, tensors
outside it from the fine-tuned model. Two more CGM rows take the task Fisher at θ_ft (`task Fisher … at θ_ft`):
empirical (this project's default before the published scripts were read) and sampled (labels drawn from θ_ft's
own predictions). One fine-tuned model, so task arithmetic at λ equals WiSE-FT at λ; TIES and DARE trim or drop
the single task vector. **SPIDER** and its published baseline **MagnitudeMask** are two more fine-tunes of the
same recipe, same seed and batches, with the keep rule applied after every optimizer step
(`forgetless finetune … --keep spider|magnitude_mask`).
"""


def _reading(previous: Path | None, start: str = READING_START, end: str = READING_END) -> str:
    text = previous.read_text() if previous is not None and previous.is_file() else ""
    m = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), text, re.DOTALL)
    body = m.group(1) if m else "_(not written yet)_\n"
    return f"{start}\n{body}{end}\n"


def _timings(names: list[str], results: Mapping[str, dict]) -> str:
    lines = []
    for n in names:
        t = results[n].get("timings", {})
        lines.append(
            f"- {n}: "
            + ", ".join(
                f"{k} {t[k]:.0f} s"
                for k in ("finetune", "statistics", "merge", "evaluate", "total")
                if k in t
            )
            + f" ({results[n].get('threads', '?')} threads)"
        )
    return "\n".join(lines)


def markdown(names: list[str], workdir: Path, plots: Path | None = None, previous: Path | None = None) -> str:
    """The whole report from the results files under `workdir`: how it was produced, the fixed-knob experiment
    (:func:`_fixed_knobs`; tasks without a ``results.json`` named as not run), the reading kept from `previous`,
    the time it took, then each protocol's section where its results are, and last "Which recipe when"
    (:mod:`.report_decision`)."""
    done = [n for n in names if (workdir / n / "results.json").is_file()]
    results = {n: read_results(workdir / n / "results.json") for n in done}
    missing = [n for n in names if n not in done]
    decision = decision_markdown(workdir, names)
    return "\n".join(
        [
            _header(names, results),
            *(_fixed_knobs(done, results, workdir, plots, previous) if done else []),
            *([_not_run(missing, names)] if missing else []),
            "## Reading (honest)\n",
            _reading(previous),
            *(["## Time (this run, 2 cores)\n", _timings(done, results), ""] if done else []),
            *(
                [
                    frontier_markdown(
                        workdir,
                        names,
                        plots or workdir,
                        previous,
                        _reading(previous, FR_READING_START, FR_READING_END),
                    )
                ]
                if any((workdir / n / FRONTIER_RESULTS).is_file() for n in names)
                else []
            ),
            *(
                [multitask_markdown(workdir / "multitask", plots or workdir / "multitask", previous)]
                if (workdir / "multitask" / "results.json").is_file()
                else []
            ),
            *(
                [
                    continual_markdown(
                        workdir / "continual",
                        plots or workdir / "continual",
                        previous,
                        _reading(previous, CL_READING_START, CL_READING_END),
                    )
                ]
                if (workdir / "continual" / "results.json").is_file()
                else []
            ),
            *([decision] if decision else []),
        ]
    )


def _not_run(missing: list[str], names: list[str]) -> str:
    """The line naming the tasks whose fixed-knob experiment has no results yet, and the command that runs it."""
    tasks = "" if missing == names else "".join(f" --task {n}" for n in missing)
    return (
        f"**Not run yet**: the fixed-knob experiment of {', '.join(f'`{n}`' for n in missing)} (no "
        f"`results.json`; `forgetless testbed report --part tasks{tasks}`).\n"
    )


def _fixed_knobs(
    names: list[str], results: Mapping[str, dict], workdir: Path, plots: Path | None, previous: Path | None
) -> list[str]:
    """The E / F summary with intervals, paired differences against the best method and the fine-tune, what ±TARGET
    would take, and per task its table and trade-off plot (drawn into `plots`, default the task's folder)."""
    d = TaskDraws(results)
    sections = []
    for name in names:
        rows, ivs = results[name]["rows"], d.intervals(name)
        png = plot_rows(
            rows,
            (plots or workdir / name) / f"tradeoff-{name}.png",
            f"testbed: {name} (test split, 95% intervals)",
            ivs,
        )
        rel = doc_link(png, previous)
        ft = results[name]["finetune"]
        sections.append(
            f"### {name}\n\n{T.TASKS[name].description}. Fine-tuned: {', '.join(ft['train'])}, "
            f"{ft['steps']} steps, lr {ft['lr']:g}.\n\n```\n{table(rows, ivs)}\n```\n\n"
            f"![{name}]({rel})\n"
        )
    table_e_f, order = summary(names, d)
    scored = [m for m in order if m != "base" and all(m in d.draws[n] for n in names)]
    best = max(scored, key=lambda m: d.mean_point(m, "E+F", names))
    return [
        "## Summary: specialization gain E and general change F (points, test splits, ± 95% interval)\n",
        table_e_f,
        "",
        (
            f"## Which differences are outside the intervals\n\nPaired differences of the means over the tasks "
            f"against **{best}** (the best mean E + F), with 95% intervals; **\\*** where the interval excludes 0.\n"
        ),
        differences(names, d, order, best),
        "",
        "Against the fine-tuned model (what a merge or a keep rule changes):\n",
        differences(names, d, order, "fine-tuned"),
        "",
        f"## How wide the intervals are, and what ±{TARGET:g} would take\n",
        what_target_takes(names, results, d),
        "## Per task\n",
        "\n".join(sections),
    ]


def run_report(
    names: list[str] | None,
    workdir: str | Path,
    out: str | Path,
    *,
    keep_models: bool = False,
    plots: str | Path | None = None,
    run: bool = True,
    parts: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or reuse) the experiments of `parts` (:data:`PARTS`; default: all of them, or only ``tasks`` when
    `names` are given): each task's experiment on the whole test splits, the multi-task LoRA experiment in
    ``workdir/multitask`` and the continual protocol in ``workdir/continual`` (:mod:`.continual`); then write the
    markdown report to `out`, each protocol's section wherever its results are in `workdir` (its plots into
    `plots`, default ``docs/results`` beside `out`). ``run=False``: only rebuild the report from the
    ``results.json`` files already in `workdir`."""
    from .multitask import run_multitask

    workdir, out = Path(workdir), Path(out)
    parts = set(parts or (["tasks"] if names else PARTS))
    names = names or T.DOWNSTREAM
    for name in names if run and "tasks" in parts else []:
        log(f"=== {name} ===")
        X.run_experiment(
            name,
            workdir / name,
            merges=X.MERGES + CURVES + TASK_FISHERS,
            keeps=X.KEEPS,
            keep_models=keep_models,
            log=log,
        )
    if run and "multitask" in parts:
        log("=== multitask ===")
        run_multitask(workdir / "multitask", keep_models=keep_models, log=log)
    if run and "continual" in parts:
        from .continual import run_continual

        log("=== continual ===")
        run_continual(workdir / "continual", log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(names, workdir, Path(plots) if plots else out.parent / "docs" / "results", previous=out)
    atomic_write(out, text)
    log(f"report: {out}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# merging LoRA adapters of several tasks (.multitask)

MT_READING_START = "<!-- reading multitask: written by hand, kept when the report is rebuilt -->"
MT_READING_END = "<!-- /reading multitask -->"
PUBLISHED_COPA = {
    "seen": 57.3 - 53.9,
    "unseen": 38.0 - 33.3,
}  # CoPA − task arithmetic, MM-MergeBench (CoPA's paper)
OWN = "own adapters"  # the per-task upper bound: each seen task scored by its own adapter


def _tasks_result(items: Mapping[str, str], kind: str = "downstream") -> dict[str, Any]:
    return {"tasks": {n: {"kind": kind, "correct_items": c} for n, c in items.items()}}


class MultitaskDraws(NamedDraws):
    """Per method: the seen-task average, the unseen-task average and G, as points and as bootstrap draws (one
    :class:`Bootstrap`, so every method is resampled on the same items: differences are paired). The
    :data:`OWN` row takes each seen task from its own adapter, and G as the mean of the adapters' G."""

    KEYS = ("seen", "unseen", "G")

    def __init__(self, res: Mapping[str, Any], n_boot: int = N_BOOT):
        super().__init__(Bootstrap(n_boot, seed=0))
        self.res = res
        self.seen, self.unseen = list(res["seen"]), list(res["unseen"])
        own = [r for r in res["rows"] if r["role"] == "own"]
        for r in res["rows"]:
            if r["role"] == "own":
                continue
            self._add(
                r["method"],
                {n: r["correct_items"][n] for n in self.seen},
                {n: r["correct_items"][n] for n in self.unseen},
                [r],
            )
            if r["role"] == "base" and own:  # the own adapters come right after the base
                self._add(OWN, {r2["task"]: r2["correct_items"][r2["task"]] for r2 in own}, {}, own)

    def _add(
        self, name: str, seen: Mapping[str, str], unseen: Mapping[str, str], general_rows: list[dict]
    ) -> None:
        def avg(items: Mapping[str, str]) -> tuple[float | None, np.ndarray | None]:
            if not items:
                return None, None
            acc = [100 * float(np.mean([ch == "1" for ch in c])) for c in items.values()]
            return float(np.mean(acc)), self.boot.scores(_tasks_result(items))["T"]

        gen = [
            row_result({**r, "tasks": {n: r["tasks"][n] for n in self.res["general"]}}) for r in general_rows
        ]
        g_draws = [self.boot.scores(g)["G"] for g in gen]
        self.points[name] = {
            "seen": avg(seen)[0],
            "unseen": avg(unseen)[0],
            "G": float(np.mean([r["G"] for r in general_rows])),
        }
        self.draws[name] = {"seen": avg(seen)[1], "unseen": avg(unseen)[1], "G": np.mean(g_draws, axis=0)}


def multitask_summary(d: MultitaskDraws) -> str:
    lines = ["| method | knob | seen avg | unseen avg | G |", "|---|---|---:|---:|---:|"]
    knobs = {r["method"]: r.get("knob", "") for r in d.res["rows"]}
    for name, p in d.points.items():
        cells = [cell(p[k], False, d.interval(name, k)) for k in d.KEYS]
        lines.append(f"| {name} | {knobs.get(name, '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def multitask_differences(d: MultitaskDraws, reference: str) -> str:
    lines = [
        f"| method | Δ seen avg vs {reference} | Δ unseen avg vs {reference} | Δ G vs {reference} |",
        "|---|---:|---:|---:|",
    ]
    for name in d.points:
        if name in (reference, "base", OWN):
            continue
        cells = []
        for key in d.KEYS:
            diff = d.difference(name, reference, key)
            cells.append("—" if diff is None else diff_cell(*diff))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def multitask_table(d: MultitaskDraws) -> str:
    """Per task accuracy ± 95% half-width, one line per method (:data:`OWN`: each task by its own adapter)."""
    res = d.res
    tasks = [*d.seen, *d.unseen]
    by_name = {r["method"]: r for r in res["rows"]}
    own = {r["task"]: r for r in res["rows"] if r["role"] == "own"}
    lines = ["| method | " + " | ".join(tasks) + " | G_v | G_t |", "|---|" + "---:|" * (len(tasks) + 2)]

    def acc(r: Mapping[str, Any], n: str) -> str:
        c = item_correct({"correct_items": r["correct_items"][n]}, n)
        iv = d.boot.interval(c[d.boot.indices(n, len(c))].mean(axis=1) * 100)
        return cell(r["tasks"][n], False, iv)

    for name in d.points:
        if name == OWN:
            cells = [acc(own[n], n) if n in own else "—" for n in tasks]
            gv = cell(float(np.mean([r["G_v"] for r in own.values()])))
            gt = cell(float(np.mean([r["G_t"] for r in own.values()])))
        else:
            r = by_name[name]
            cells = [acc(r, n) for n in tasks]
            gv, gt = cell(r["G_v"]), cell(r["G_t"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gv} | {gt} |")
    return "\n".join(lines)


def multitask_plot(d: MultitaskDraws, path: Path) -> Path:
    pts = [
        {
            "method": name,
            "task": p["seen"],
            "general": p["unseen"],
            "role": "base" if name == "base" else "method",
            "task_interval": d.interval(name, "seen"),
            "general_interval": d.interval(name, "unseen"),
        }
        for name, p in d.points.items()
        if p["unseen"] is not None
    ]
    return tradeoff_plot(
        pts,
        path,
        title=f"LoRA adapters of {len(d.seen)} tasks merged (test splits, 95% intervals)",
        xlabel="seen-task average (%)",
        ylabel="unseen-task average (%)",
    )


def _multitask_validation(validation: Mapping[str, dict]) -> tuple[str, str]:
    """The adapters' validation table rows, and the sentence saying which learned their task."""
    from . import multitask as M

    rows = "\n".join(f"| {n} | {v['base_val']:.0f} | {v['adapter_val']:.0f} |" for n, v in validation.items())
    failed = [n for n, v in validation.items() if not v["learned"]]
    learned = (
        f"Every adapter learned its task (≥ {M.LEARNED:g} points over the base)"
        if not failed
        else f"Every adapter but {', '.join(f'`{n}`' for n in failed)} learned its task (≥ {M.LEARNED:g} points "
        "over the base; kept as run, not retrained)"
    )
    return rows, learned


MT_INTRO = """## Merging LoRA adapters of several tasks

CoPA-Merging's protocol (MM-MergeBench: LoRA adapters of 8 seen tasks merged, scored on them and on 4 unseen
ones) in small, on the testbed: `forgetless.testbed.multitask.run_multitask`, every step cached, from
`runs/testbed/multitask/results.json`. `forgetless testbed report --workdir runs/testbed --out RESULTS.md` runs it
when no `--task` is given; with `--task …` or `--no-run` this section is rebuilt from the results already there.
"""


def multitask_markdown(workdir: Path, plots: Path, previous: Path | None = None) -> str:
    """The section "Merging LoRA adapters of several tasks" from ``workdir/results.json`` (:mod:`.multitask`)."""
    res = read_results(Path(workdir) / "results.json")
    d = MultitaskDraws(res)
    png = multitask_plot(d, Path(plots) / "multitask-seen-unseen.png")
    setup = _mt_tasks(res) + _mt_adapters(res)
    figures = _mt_figures(d, doc_link(png, previous))
    return "\n".join([MT_INTRO, setup, _mt_merges(res), figures, _mt_closing(res, previous)])


def _mt_tasks(res: Mapping[str, Any]) -> str:
    """The seen and unseen tasks, with their test items."""
    sizes = {n: len(c) for r in res["rows"] for n, c in r["correct_items"].items()}
    seen = ", ".join(f"`{n}`" for n in res["seen"])
    unseen = ", ".join(f"`{n}` ({T.TASKS[n].description})" for n in res["unseen"] if n in T.TASKS)
    items = ", ".join(f"{n} {sizes[n]}" for n in [*res["seen"], *res["unseen"]])
    general = ", ".join(f"{n} {sizes[n]}" for n in res["general"])
    return f"""- **Seen tasks** (one LoRA adapter each): {seen}; **unseen** (held out: no
  training split exists, so no adapter saw them): {unseen}. Test items: {items}; general
  as above ({general}).
"""


def _mt_adapters(res: Mapping[str, Any]) -> str:
    """The adapters' recipe, the joint LoRA's steps, and what each adapter learned on its validation split."""
    a, lora, joint = res["adapter"], res["adapter"]["lora"], res["joint_steps"]
    targets, steps, batch = ", ".join(lora["targets"]), a["steps"], a["batch_size"]
    val, learned = _multitask_validation(res["validation"])
    return f"""- **Adapters**: PEFT LoRA r={lora["r"]}, alpha={lora["alpha"]:g}, dropout {lora["dropout"]:g} on
  {targets} of every decoder layer (vision tower and projector frozen), {steps} AdamW steps
  of {batch}, lr {a["lr"]:g} ({a["warmup"]} warm-up, cosine), seed {a["seed"]}
  (`multitask.ADAPTER`). The **joint LoRA** trains the same recipe on all seen training splits mixed,
  {joint} steps ({joint * batch // len(res["seen"])} samples of each task on
  average; its own adapter sees {steps * batch}). {learned} (validation split, base → adapter, %):

| task | base | own adapter |
|---|---:|---:|
{val}
"""


def _mt_merges(res: Mapping[str, Any]) -> str:
    """How the merges are made and their λ chosen (the sweep, what was skipped), and how they are scored."""
    sweep = "; ".join(f"{s['method']} {s['knob']}: {s['seen_val']:.1f}" for s in res["sweep"]) or "none"
    chosen = "; ".join(f"{k}: {v}" for k, v in res["chosen"].items())
    skipped = (
        f"\n**Not run** (method not available when the experiment ran): {', '.join(res['skipped'])}.\n"
        if res.get("skipped")
        else ""
    )
    return f"""- **Merges** in adapter space, re-factored to rank r where the method says so, folded into a full model
  (`fold: true`) for the evaluation; the own adapters and the joint one are folded alone (`BASE+ADAPTER`, λ = 1).
  CoPA at its published defaults (λ = 2, top 20% of |entries| of each A and B kept), in the paper's rule and the
  published code's (`variant: reference`). Task arithmetic's λ chosen on the seen tasks' **validation** splits
  (mean accuracy; never on test); DARE takes the same λ (its rescaled random drop has task arithmetic's sum in
  expectation); TIES at λ = 1 (its paper; a disjoint mean, not a sum); densities fixed in advance at their
  papers' values (TIES 0.2, DARE 0.3). The weight-space merges (TSV-M, Iso-C, Iso-CTS, Breadcrumbs, DELLA) take
  each adapter folded into the base (`BASE+ADAPTER`): TSV-M at α = 1 and DELLA at density 0.5, ε 0.15, λ = 1
  (their papers), Iso-C's and Iso-CTS's α and Breadcrumbs' λ swept on validation as task arithmetic's.
  Sweep (seen validation average, %): {sweep}. Chosen: {chosen}.{skipped}
- Scores: **seen avg** / **unseen avg**, the mean test accuracy over the seen / unseen tasks; **G** as above (general
  visual and text probes). ± half the 95% bootstrap interval over the test items ({N_BOOT} resamples; every method
  resampled on the same items, so differences are paired). **{OWN}**: each seen task scored by its own adapter
  (the per-task upper bound), G the mean of the six adapters' G.
"""


def _mt_figures(d: MultitaskDraws, plot: Path) -> str:
    """The averages and their plot, the paired differences against task arithmetic, the per-task table."""
    diffs = multitask_differences(d, "TA") if "TA" in d.points else "_(no TA row)_"
    merges = [r["method"] for r in d.res["rows"] if r["role"] == "merge"]
    best = max(merges, key=lambda m: d.points[m]["seen"], default=None)
    against_best = (
        f"\n\nAgainst the best merge on the seen average, **{best}**:\n\n{multitask_differences(d, best)}"
        if best not in (None, "TA")
        else ""
    )
    summary = multitask_summary(d)
    return f"""### Seen, unseen and general averages (test splits, %)

{summary}

![seen against unseen average]({plot})

### Against task arithmetic (paired differences, points, 95% interval; **\\*** where it excludes 0)

CoPA's published advantage over task arithmetic on MM-MergeBench (LLaVA-1.5-7B): seen
{PUBLISHED_COPA["seen"]:+.1f}, unseen {PUBLISHED_COPA["unseen"]:+.1f} points.

{diffs}{against_best}

### Per task (test accuracy %, ± 95% half-width)

{multitask_table(d)}
"""


def _mt_closing(res: Mapping[str, Any], previous: Path | None) -> str:
    """The hand-written reading, kept from ``previous``, and the run's time."""
    t = res.get("timings", {})
    finetune, merge, evaluate = (t.get(k, 0) for k in ("finetune", "merge", "evaluate"))
    return f"""### Reading

{_reading(previous, MT_READING_START, MT_READING_END)}
Time: fine-tunes {finetune:.0f} s, merges {merge:.0f} s, evaluations {evaluate:.0f} s
(this run's own work; cached steps take no time), {res.get("threads", "?")} threads.
"""
