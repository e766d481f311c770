"""RESULTS.md's section "Continual merging" from ``runs/testbed/continual/results.json`` (:mod:`.continual`): per
method the final average accuracy, the average forgetting, MFT, MAA, BWT and G with 95% bootstrap intervals, paired
differences, the accuracy matrices as tables and heat maps, and the average accuracy after each task as a plot.

Definitions (a[t][j]: accuracy on task j after task t, both in percent, t, j = 1..T; MFT, MAA and BWT as
:mod:`forgetless.eval.continual` computes them):

* **final average accuracy** — mean over j of a[T][j]: MFN (MCITlib's Last);
* **average forgetting** — mean over j < T of a[j][j] − a[T][j], the drop from just after learning task j (in that
  method's own model after task j) to the end: −BWT;
* **G** — the general score of the model after the last task (as in the other sections).

Every cell of a matrix is scored on the same test items of its task, so one :class:`Bootstrap` resamples them all
identically: forgetting's two terms, and differences between methods, are paired.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint.writer import atomic_write, human_bytes
from ..eval import continual as CL
from ..eval.metrics import Bootstrap, NamedDraws, item_correct
from ..eval.report import cell, diff_cell, doc_link
from .context import read_results

N_BOOT = 2000
CL_READING_START = "<!-- reading continual: written by hand, kept when the report is rebuilt -->"
CL_READING_END = "<!-- /reading continual -->"
BASELINES = ("sequential FT", "TA", "TIES", "RegMean", "MagMax", "OPCM")
KEEPS = {
    "sequential FT": "one adapter",
    "TA": "every adapter so far",
    "TIES": "every adapter so far",
    "RegMean": "every folded model and its Gram",
    "LPM": "the LPM state",
    "LPM (diagonal)": "the LPM state",
    "LPM + CPM": "the LPM state + projectors",
    "MagMax": "τ_max (one model's size)",
    "OPCM": "the running sum and the norms",
}


class ContinualDraws(NamedDraws):
    """Points and bootstrap draws of each method's final average accuracy (``final``: MFN), average forgetting
    (``forgetting``: −BWT), MFT, MAA, BWT and G; rows ``joint LoRA`` (final and G only), ``base`` and ``own
    adapters`` (each task by its own adapter just after learning: final only)."""

    KEYS = ("final", "forgetting", "MFT", "MAA", "BWT", "G")
    MATRIX_KEYS = ("MFT", "MAA", "BWT")  # beside final and forgetting, of a method's matrix only

    def __init__(self, res: Mapping[str, Any], n_boot: int = N_BOOT):
        super().__init__(Bootstrap(n_boot, seed=0))
        self.res = res
        self.seq: list[str] = list(res["sequence"])
        for name, rows in res["matrices"].items():
            self._add(name, rows[-1], rows)
        if res.get("joint"):
            self._add("joint LoRA", res["joint"], None)
        own = {next(iter(r["tasks"])): r for r in res["individual"]}
        self._add(
            "own adapters",
            {
                "tasks": {n: own[n]["tasks"][n] for n in self.seq},
                "correct_items": {n: own[n]["correct_items"][n] for n in self.seq},
            },
            None,
            general=False,
        )
        self._add("base", res["base_row"], None)

    def acc(self, row: Mapping[str, Any], task: str) -> np.ndarray:
        """[n_boot] resampled accuracy (%) of `row` on `task`."""
        return CL.cell_draws(
            self.boot, task, item_correct({"correct_items": row["correct_items"][task]}, task)
        )

    def matrix(self, rows: list[dict]) -> list[list[float]]:
        """a[t][j] (%) of a method's rows: each task learned so far."""
        return [[r["tasks"][n] for n in self.seq[: t + 1]] for t, r in enumerate(rows)]

    def _add(
        self, name: str, final: Mapping[str, Any], rows: list[dict] | None, general: bool = True
    ) -> None:
        p: dict[str, float | None] = {k: None for k in self.KEYS}
        d: dict[str, np.ndarray | None] = {k: None for k in self.KEYS}
        p["final"] = float(np.mean([final["tasks"][n] for n in self.seq]))
        d["final"] = np.mean([self.acc(final, n) for n in self.seq], axis=0)
        if rows is not None:
            pm = CL.cl_metrics(self.matrix(rows))
            dm = CL.cl_metrics([[self.acc(r, n) for n in self.seq[: t + 1]] for t, r in enumerate(rows)])
            p.update({k: pm[k] for k in self.MATRIX_KEYS})
            d.update({k: dm[k] for k in self.MATRIX_KEYS})
            p["forgetting"], d["forgetting"] = _negated(pm["BWT"]), _negated(dm["BWT"])
        if general and final.get("G") is not None:
            general_names = [n for n, k in final["kinds"].items() if k.startswith("general")]
            result = {
                "tasks": {
                    n: {"kind": final["kinds"][n], "correct_items": final["correct_items"][n]}
                    for n in general_names
                }
            }
            p["G"], d["G"] = float(final["G"]), self.boot.scores(result)["G"]
        self.points[name], self.draws[name] = p, d

    def best_baseline(self) -> str | None:
        """The baseline (:data:`BASELINES`) with the highest final average accuracy."""
        have = [m for m in BASELINES if m in self.res["matrices"]]
        return max(have, key=lambda m: self.points[m]["final"]) if have else None


def _negated(x: Any) -> Any:
    """−x, None kept (0.0 − x: no negative zero to print)."""
    return None if x is None else 0.0 - x


def summary_table(d: ContinualDraws) -> str:
    res = d.res
    scores = "final avg accuracy (MFN) | avg forgetting (−BWT) | MFT | MAA | BWT | G"
    lines = [
        f"| method | {scores} | build s/task (median) | keeps between tasks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, p in d.points.items():
        cells = [cell(p[k], k in CL.SIGNED, d.interval(name, k)) for k in d.KEYS]
        secs = res["merge_seconds"].get(name)
        build = f"{float(np.median(secs)):.0f}" if secs else "—"
        kept = res.get("kept_bytes", {}).get(name)
        keeps = f"{KEEPS[name]} ({human_bytes(kept)})" if name in KEEPS and kept else KEEPS.get(name, "—")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {build} | {keeps} |")
    return "\n".join(lines)


def differences_table(d: ContinualDraws, pairs: list[tuple[str, str]]) -> str:
    lines = ["| comparison | Δ final avg accuracy | Δ avg forgetting | Δ G |", "|---|---:|---:|---:|"]
    for a, b in pairs:
        if a in d.points and b in d.points:
            diffs = [d.difference(a, b, k) for k in ("final", "forgetting", "G")]
            lines.append(
                f"| {a} − {b} | " + " | ".join("—" if x is None else diff_cell(*x) for x in diffs) + " |"
            )
    return "\n".join(lines)


def matrix_table(d: ContinualDraws, name: str) -> str:
    return CL.matrix_markdown(d.matrix(d.res["matrices"][name]), d.seq)


def heatmaps(d: ContinualDraws, path: Path) -> Path:
    """One panel per method: its accuracy matrix (row t: after task t; column j: task j), values annotated."""
    matrices = {name: d.matrix(rows) for name, rows in d.res["matrices"].items()}
    return CL.heatmaps(matrices, d.seq, path, "Accuracy after each task (row) on each task so far (column)")


def average_curve(d: ContinualDraws, path: Path) -> Path:
    """Average accuracy over the tasks so far after each task, one line per method (the joint LoRA: a point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(d.seq)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        for name, rows in d.res["matrices"].items():
            ys = [float(np.mean([r["tasks"][n] for n in d.seq[: t + 1]])) for t, r in enumerate(rows)]
            ax.plot(
                range(1, len(ys) + 1),
                ys,
                marker="o",
                ms=4,
                lw=1.3,
                label=name,
                ls="--" if name == "sequential FT" else "-",
            )
        for name, marker in (("joint LoRA", "*"), ("own adapters", "D")):
            if name in d.points:
                ax.scatter([T], [d.points[name]["final"]], marker=marker, s=80, zorder=5, label=name)
        ax.set_xticks(range(1, T + 1), [f"{t}. {n}" for t, n in enumerate(d.seq, 1)], rotation=20, fontsize=8)
        ax.set_ylabel("average accuracy over tasks so far (%)")
        ax.set_title("Continual merging on the testbed (test splits)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def continual_markdown(workdir: Path, plots: Path, previous: Path | None = None, reading: str = "") -> str:
    """The section "Continual merging" from ``workdir/results.json``; `reading`: the hand-written reading (kept
    between :data:`CL_READING_START` and :data:`CL_READING_END` by the caller); figure links relative to
    `previous`'s folder."""
    from . import tasks as T

    res = read_results(Path(workdir) / "results.json")
    d = ContinualDraws(res)
    heat = heatmaps(d, Path(plots) / "continual-matrices.png")
    curve = average_curve(d, Path(plots) / "continual-average.png")
    a, lora = res["adapter"], res["adapter"]["lora"]
    best = d.best_baseline()
    against_best = ("LPM + CPM", "LPM", "LPM (diagonal)", "MagMax", "OPCM")
    pairs = [(m, best) for m in against_best if best not in (None, m)] + [
        ("LPM (diagonal)", "LPM"),
        ("LPM + CPM", "LPM"),
        ("joint LoRA", "LPM + CPM"),
    ]
    cpm_row = res["matrices"].get("LPM + CPM", [{}])[-1]
    routing = cpm_row.get("routing")
    routing_txt = ", ".join(f"{n} {v:.0f}%" for n, v in routing.items()) if routing else "not measured"
    lam = ", ".join(f"{x:g}" for x in res.get("ta_lambda", [])) or "—"
    sizes = {n: len(c) for n, c in res["matrices"][next(iter(res["matrices"]))][-1]["correct_items"].items()}
    matrices = "\n\n".join(f"**{name}**\n\n{matrix_table(d, name)}" for name in res["matrices"])
    t = res.get("timings", {})
    return f"""## Continual merging: {len(d.seq)} tasks in sequence

MAny's setting (continual instruction tuning, a training-free merge on CPU after every task) in small:
`forgetless.testbed.continual.run_continual`, every step cached, from `runs/testbed/continual/results.json`;
`forgetless testbed report --workdir runs/testbed --out RESULTS.md` runs it when no `--task` is given.

- **Sequence**: {" → ".join(f"`{n}`" for n in d.seq)}
  ({"; ".join(T.TASKS[n].description for n in d.seq if n in T.TASKS)}).
  Test items per task and cell: {", ".join(f"{n} {sizes[n]}" for n in d.seq)} (the first {res["task_limit"]} of
  each test split: every cell of every matrix is scored on the same items); G on the full general test splits
  after the last task.
- **Adapters**: one per task, trained from the base on that task alone: PEFT LoRA r={lora["r"]},
  alpha={lora["alpha"]:g} on {", ".join(lora["targets"])} (every decoder layer, and the projector's two Linear
  layers: MAny trains the projector with each task), {a["steps"]} AdamW steps of {a["batch_size"]}, lr {a["lr"]:g}.
  The **joint LoRA** trains the same recipe on the {len(d.seq)} training splits mixed, {res.get("joint_steps")} steps.
- **Methods**, each after every task from what it may keep: **sequential FT** — one adapter trained on task 1,
  then on task 2 from there (`finetune --init-adapter`), … (no merge: the forgetting reference); **TA** — task
  arithmetic of the adapters so far, λ chosen after each task on the validation splits of the tasks so far (grid
  {", ".join(f"{x:g}" for x in res["ta_grid"])}; chosen: {lam}); **TIES** — density 0.2, λ = 1; **RegMean** —
  classic batch RegMean (α = 0.9) of the folded models, each with the Gram of its inputs at itself on
  {res["gram_samples"]} training samples of its task (it needs every earlier model and Gram); **LPM** —
  `forgetless continual add` (Grams at the base, {res["gram_samples"]} samples per task, γ relative 1e-4);
  **LPM (diagonal)** — the bounded-memory form (`--approx diagonal`); **LPM + CPM** — LPM plus one projector
  and visual prototype per task, images routed by softmax(cos/τ), τ = 0.1; **MagMax** — `forgetless continual
  merge --method magmax` (λ = 0.5) on the sequential chain's models (its paper's setting); **OPCM** — `--method
  opcm` (α = 0.5) on each task's own model, merged as it arrives (its paper's setting).
- **Scores**: final average accuracy (after the last task, over all {len(d.seq)} tasks), average forgetting
  (mean over tasks 1..{len(d.seq) - 1} of the accuracy just after learning it minus the final one, in the method's
  own models), G after the last task; ± half the 95% bootstrap interval over the test items ({N_BOOT} resamples,
  paired across methods and cells). **own adapters**: each task by its own adapter alone (the per-task upper
  bound, no merge).

### Final average accuracy, forgetting and G (test splits, %)

{summary_table(d)}

CPM routing accuracy (first 64 test images per task routed to their own task's projector): {routing_txt}.

![average accuracy after each task]({doc_link(curve, previous)})

### Paired differences (points, 95% interval; **\\*** where it excludes 0)

Best baseline by final average accuracy: **{best}**.

{differences_table(d, pairs)}

### Accuracy matrices (row: after task t; column: task j; test accuracy %)

![accuracy matrices]({doc_link(heat, previous)})

{matrices}

### Reading

{reading}
Time: fine-tunes {t.get("finetune", 0):.0f} s, statistics {t.get("statistics", 0):.0f} s, evaluations
{t.get("evaluate", 0):.0f} s (this run's own work; cached steps take no time), {res.get("threads", "?")} threads.
"""
