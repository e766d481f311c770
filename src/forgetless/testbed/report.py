"""``forgetless testbed report``: every downstream task through :func:`.experiment.run_experiment` on the test
splits, one trade-off plot per task, and a markdown report (the source of RESULTS.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..eval.report import format_table, tradeoff_plot
from . import experiment as X
from . import tasks as T

# extra knob values so that each of these methods draws a curve, not a point
CURVES: list[tuple[str, str, dict, bool]] = [
    ("WiSE-FT", "linear", {"lambda": 0.3}, False),
    ("CGM", "cgm", {"alpha": 1.0}, True),
]
# the first N test samples of each task (2 CPU cores: a model's evaluation is about a minute); all text probes
REPORT_LIMITS = {"probes": None, **{n: 40 for n in T.GENERAL_VISUAL}}
REPORT_TASK_LIMIT = 150


def _knob_value(knob: str) -> float | None:
    try:
        return float(knob.split()[0].split("=")[1]) if knob else None
    except (IndexError, ValueError):
        return None


def plot_rows(rows: list[dict], path: Path, title: str) -> Path:
    pts = []
    for r in rows:
        role = {"base": "base", "fine-tuned": "finetuned"}.get(r["method"], "method")
        pts.append({"method": r["method"], "task": r["T"], "general": r["G"], "role": role,
                    "knob": _knob_value(r.get("knob", ""))})
    return tradeoff_plot(pts, path, title=title)


def table(rows: list[dict]) -> str:
    return format_table([{"name": f"{r['method']} {r.get('knob', '')}".strip(), **r,
                          "accuracy": r["tasks"]} for r in rows])


def markdown(names: list[str], workdir: Path, plots: Path | None = None) -> str:
    """The report's markdown from each task's ``results.json`` under `workdir`: a summary of E and F per method
    and task, then per task its table and trade-off plot (drawn into `plots`, default the task's folder)."""
    import json

    sections, summary = [], []
    for name in names:
        res = json.loads((workdir / name / "results.json").read_text())
        rows = res["rows"]
        png = plot_rows(rows, (plots or workdir / name) / f"tradeoff-{name}.png", f"testbed: {name} (test split)")
        ft = res["finetune"]
        sections.append(f"### {name}\n\n{T.TASKS[name].description}. Fine-tuned: {', '.join(ft['train'])}, "
                        f"{ft['steps']} steps, lr {ft['lr']:g}.\n\n```\n{table(rows)}\n```\n\n![{name}]({png})\n")
        summary += [(name, r) for r in rows]
    key = [f"{r['method']} {r.get('knob', '')}".strip() for _, r in summary]
    lines = ["| method | " + " | ".join(f"{n} E / F" for n in names) + " | mean E | mean F | mean E+F |",
             "|---|" + "---|" * (len(names) + 3)]
    for m in dict.fromkeys(key):
        cells, es, fs = [], [], []
        for n in names:
            r = next((r for (t, r), k in zip(summary, key) if t == n and k == m), None)
            if r is None:
                cells.append("—")
                continue
            cells.append(f"{r['E']:+.1f} / {r['F']:+.1f}")
            es.append(r["E"])
            fs.append(r["F"])
        me, mf = sum(es) / len(es), sum(fs) / len(fs)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {me:+.1f} | {mf:+.1f} | {me + mf:+.1f} |")
    return ("## Summary: specialization gain E and general change F (points, test splits)\n\n" + "\n".join(lines)
            + "\n\n" + "\n".join(sections))


def run_report(names: list[str] | None, workdir: str | Path, out: str | Path, *, keep_models: bool = False,
               log: Callable[[str], None] = print) -> Path:
    """Run (or reuse) every task's experiment, then write the markdown report to `out`."""
    workdir, out = Path(workdir), Path(out)
    names = names or T.DOWNSTREAM
    limits = {k: v for k, v in REPORT_LIMITS.items() if v is not None}
    for name in names:
        log(f"=== {name} ===")
        X.run_experiment(name, workdir / name, merges=X.MERGES + CURVES, keeps=X.KEEPS, limits=limits,
                         task_limit=REPORT_TASK_LIMIT, keep_models=keep_models, log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(names, workdir))
    log(f"report: {out}")
    return out
