"""RESULTS.md's section "The forgetting frontier": each task's curves (:mod:`.frontier`) on one E–F plane, F at
matched E and the area under each curve, with 95% intervals and paired differences against WiSE-FT."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..eval.metrics import Bootstrap
from ..eval.report import diff_cell, doc_link, tradeoff_plot
from . import experiment as X
from . import frontier as FR
from .context import read_results
from .experiment import row_draws, row_name
from .tables import N_BOOT, TaskDraws, differences, summary

REFERENCE = "WiSE-FT"


def knob_of(row: Mapping[str, Any], label: str) -> float | None:
    """The swept knob's value of a frontier row (its knob string lists every parameter, in any order)."""
    if label not in FR.KNOBS:
        return None
    pairs = dict(p.split("=", 1) for p in row.get("knob", "").split() if "=" in p)
    v = pairs.get(FR.KNOBS[label].knob)
    return None if v is None else float(v)


class Curves:
    """One task's frontier rows resampled (every row on the same validation items): each method's curve as
    E and F point values ([P]) and draws ([P, B]), base and fine-tune as its ends."""

    def __init__(self, result: Mapping[str, Any], boot: Bootstrap):
        rows = result["rows"]
        draws = row_draws(rows, boot)
        self.boot = boot
        by = {row_name(r): r for r in rows}
        self.ft = by["fine-tuned"]
        self.e_ft, self.e_ft_draws = self.ft["E"], draws["fine-tuned"]["E"]
        self.curves: dict[str, dict[str, np.ndarray]] = {}
        self.singles: dict[str, dict[str, Any]] = {}
        for label in dict.fromkeys(r["method"] for r in rows if r["method"] not in ("base", "fine-tuned")):
            members = [r for r in rows if r["method"] == label]
            if label not in FR.KNOBS:  # a single fine-tune (SPIDER, MagnitudeMask)
                r = members[0]
                self.singles[label] = {"E": r["E"], "F": r["F"], "draws": draws[row_name(r)]}
                continue
            names = [row_name(r) for r in FR.curve_rows(rows, label)]
            self.curves[label] = {
                "E": np.array([by[n]["E"] for n in names], dtype=float),
                "F": np.array([by[n]["F"] for n in names], dtype=float),
                "dE": np.stack([draws[n]["E"] for n in names]),
                "dF": np.stack([draws[n]["F"] for n in names]),
                "knobs": [knob_of(r, label) for r in members],
            }
        self.curves = {
            k: self.curves[k] for k in FR.KNOBS if k in self.curves
        }  # published first, as in KNOBS

    def at(self, label: str, fraction: float) -> tuple[float, np.ndarray]:
        """F of `label`'s curve where E = fraction × the fine-tune's E: the point value and its draws."""
        c = self.curves[label]
        point = float(FR.curve_at(c["E"], c["F"], np.array([fraction * self.e_ft]))[0])
        draws = FR.curve_at(c["dE"], c["dF"], (fraction * self.e_ft_draws)[None, :])[0]
        return point, draws

    def area(self, label: str) -> tuple[float, np.ndarray]:
        c = self.curves[label]
        return FR.curve_area(c["E"], c["F"], self.e_ft), FR.curve_area(c["dE"], c["dF"], self.e_ft_draws)


def _iv_cell(boot: Bootstrap, point: float, draws: np.ndarray) -> str:
    if not np.isfinite(point):
        return "—"
    ok = draws[np.isfinite(draws)]
    if len(ok) < 0.95 * len(draws):  # the target lies beyond the curve's end on too many resamples
        return f"{point:+.1f} (± n/a)"
    lo, hi = boot.interval(ok)
    return f"{point:+.1f} ± {(hi - lo) / 2:.1f}"


def _diff(boot: Bootstrap, a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]) -> str:
    d = a[1] - b[1]
    ok = d[np.isfinite(d)]
    if not np.isfinite(a[0] - b[0]) or len(ok) < 0.95 * len(d):
        return "—"
    return diff_cell(a[0] - b[0], boot.interval(ok))


def task_table(c: Curves) -> str:
    head = (
        "| method | points | "
        + " | ".join(f"F at E = {int(f * 100)}%" for f in FR.FRACTIONS)
        + " | area (mean F) | "
        + " | ".join(f"vs {REFERENCE} at {int(f * 100)}%" for f in FR.FRACTIONS)
        + f" | area vs {REFERENCE} |"
    )
    lines = [head, "|" + "---|" * (2 + 2 * len(FR.FRACTIONS) + 2)]
    ref = (
        ([c.at(REFERENCE, f) for f in FR.FRACTIONS] + [c.area(REFERENCE)]) if REFERENCE in c.curves else None
    )
    for label in c.curves:
        at = [c.at(label, f) for f in FR.FRACTIONS]
        area = c.area(label)
        diffs = (
            [_diff(c.boot, a, r) for a, r in zip([*at, area], ref)]
            if ref is not None and label != REFERENCE
            else ["—"] * (len(FR.FRACTIONS) + 1)
        )
        knobs = ", ".join(f"{k:g}" for k in c.curves[label]["knobs"] if k is not None)
        points = f"{FR.KNOBS[label].knob} {knobs}" if FR.KNOBS[label].knob else "one point"
        lines.append(
            f"| {label} | {points} | "
            + " | ".join(_iv_cell(c.boot, *a) for a in at)
            + f" | {_iv_cell(c.boot, *area)} | "
            + " | ".join(diffs)
            + " |"
        )
    for label, s in c.singles.items():
        e_iv, f_iv = c.boot.interval(s["draws"]["E"]), c.boot.interval(s["draws"]["F"])
        lines.append(
            f"| {label} | one fine-tune: E {s['E']:+.1f} ± {(e_iv[1] - e_iv[0]) / 2:.1f}, "
            f"F {s['F']:+.1f} ± {(f_iv[1] - f_iv[0]) / 2:.1f} |" + " |" * (2 * len(FR.FRACTIONS) + 2)
        )
    return "\n".join(lines)


def task_plot(task: str, c: Curves, path: Path) -> Path:
    pts: list[dict[str, Any]] = []
    for label, cv in c.curves.items():
        for k, (e, f) in enumerate(zip(cv["E"][2:], cv["F"][2:])):
            pts.append(
                {
                    "method": label,
                    "task": float(e),
                    "general": float(f),
                    "knob": cv["knobs"][k],
                    "task_interval": c.boot.interval(cv["dE"][2 + k]),
                    "general_interval": c.boot.interval(cv["dF"][2 + k]),
                }
            )
    for label, s in c.singles.items():
        pts.append(
            {
                "method": label,
                "task": s["E"],
                "general": s["F"],
                "task_interval": c.boot.interval(s["draws"]["E"]),
                "general_interval": c.boot.interval(s["draws"]["F"]),
            }
        )
    pts.append({"method": "base", "task": 0.0, "general": 0.0, "role": "base"})
    pts.append(
        {
            "method": "fine-tuned",
            "task": c.e_ft,
            "general": c.ft["F"],
            "role": "finetuned",
            "task_interval": c.boot.interval(c.e_ft_draws),
        }
    )
    return tradeoff_plot(
        pts,
        path,
        title=f"{task}: every method's curve (validation, 95% intervals)",
        xlabel="specialization gain E (points)",
        ylabel="general change F (points)",
    )


FR_READING_START = "<!-- reading frontier: written by hand, kept when the report is rebuilt -->"
FR_READING_END = "<!-- /reading frontier -->"
GOAL_E, GOAL_F = (
    0.95,
    0.90,
)  # issue 16: keep ≥ 95% of the task gain while recovering ≥ 90% of the lost general score


def goal_table(names: list[str], d: TaskDraws, order: list[str]) -> str:
    """Over the tasks: the share of the fine-tune's mean E each row keeps and the share of the fine-tune's mean
    general loss it recovers ((F − F_ft) / −F_ft), with 95% intervals, and whether both goals hold."""
    e_ft, f_ft = d.mean_point("fine-tuned", "E", names), d.mean_point("fine-tuned", "F", names)
    de_ft, df_ft = d.mean("fine-tuned", "E", names), d.mean("fine-tuned", "F", names)
    lines = [
        (
            f"| method | mean E kept (of the fine-tune's {e_ft:+.1f}) | mean general loss recovered (of "
            f"{f_ft:+.1f}) | ≥ {GOAL_E:.0%} kept and ≥ {GOAL_F:.0%} recovered |"
        ),
        "|---|---|---|---|",
    ]
    for m in order:
        if m in ("base", "fine-tuned") or any(m not in d.rows[n] for n in names):
            continue
        kept = (d.mean_point(m, "E", names) / e_ft, d.mean(m, "E", names) / de_ft)
        rec = ((d.mean_point(m, "F", names) - f_ft) / -f_ft, (d.mean(m, "F", names) - df_ft) / -df_ft)
        cells = []
        for point, draws in (kept, rec):
            lo, hi = d.boot.interval(draws)
            cells.append(f"{point:.0%} [{lo:.0%}, {hi:.0%}]")
        met = kept[0] >= GOAL_E and rec[0] >= GOAL_F
        lines.append(f"| {m} | {cells[0]} | {cells[1]} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


EXTRACTED = "Extracted LoRA"


def extracted_table(workdir: Path, names: list[str]) -> str:
    """How much of the fine-tune's E and F its extracted LoRA keeps at each rank (validation): per task the
    fine-tune's E / F and each rank's, ± half the 95% interval, and E as a share of the fine-tune's. Empty where
    no task has the curve."""
    lines = []
    ranks: list[float] = []
    for n in names:
        path = Path(workdir) / n / FR.RESULTS
        rows = read_results(path)["rows"] if path.is_file() else []
        points = sorted((r for r in rows if r["method"] == EXTRACTED), key=lambda r: knob_of(r, EXTRACTED))
        if not points:
            continue
        ranks = ranks or [knob_of(r, EXTRACTED) for r in points]
        boot = Bootstrap(N_BOOT, seed=0)
        draws = row_draws(rows, boot)
        ft = next(r for r in rows if r["method"] == "fine-tuned")
        cells = [_kept_cell(boot, draws, r, ft) for r in [ft, *points]]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = "| task | fine-tune E / F | " + " | ".join(f"rank {r:g} E (share) / F" for r in ranks) + " |"
    return "\n".join([head, "|---|" + "---|" * (1 + len(ranks)), *lines])


def _kept_cell(boot: Bootstrap, draws: Mapping[str, Any], r: Mapping[str, Any], ft: Mapping[str, Any]) -> str:
    """A row's E and F ± half their 95% intervals, E's share of the fine-tune's `ft` in brackets (not for itself)."""
    d = draws[row_name(r)]
    (e0, e1), (f0, f1) = boot.interval(d["E"]), boot.interval(d["F"])
    share = f" ({r['E'] / ft['E']:.0%})" if r is not ft and ft["E"] > 0 else ""
    return f"{r['E']:+.1f} ± {(e1 - e0) / 2:.1f}{share} / {r['F']:+.1f} ± {(f1 - f0) / 2:.1f}"


def _pick(result: Mapping[str, Any], method: str) -> str:
    """What one seed's run chose for `method`: the knob (or end) with its validation E and F, — where no point
    kept the gain, empty where the method is not a curve."""
    r = {row_name(x): x for x in result["rows"]}.get(method, {})
    if "chosen" in r:
        return f"{r['chosen']} (val E {r['val']['E']:+.1f}, F {r['val']['F']:+.1f})"
    return "—" if method in result["unreached"] else ""


def curse_table(workdir: Path, names: list[str]) -> str:
    """The winner's curse: per curve, validation minus test E and F of its chosen points (means over the tasks
    and seeds), for the choice made on every validation item and on the first :data:`.frontier.FEW_ITEMS`."""
    sizes = {"all": FR.TEST_RESULTS, f"first {FR.FEW_ITEMS}": FR.test_results_name(FR.FEW_ITEMS)}
    gaps: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for size, file in sizes.items():
        for n in names:
            for res in FR.seed_results(Path(workdir) / n, file):
                for r in res["rows"]:
                    if "val" in r:
                        gap = (r["val"]["E"] - r["E"], r["val"]["F"] - r["F"])
                        gaps.setdefault(r["method"], {}).setdefault(size, []).append(gap)
    lines = [
        "| method | " + " | ".join(f"val − test E / F (chosen on {s} items)" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for m, by in gaps.items():
        cells = [
            f"{np.mean([g[0] for g in by[s]]):+.1f} / {np.mean([g[1] for g in by[s]]):+.1f} ({len(by[s])})"
            if s in by
            else "—"
            for s in sizes
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chosen_markdown(workdir: Path, names: list[str]) -> str:
    """The points chosen on validation (:func:`.frontier.run_chosen`) on the test splits: which point each curve
    chose, the E / F summary over the tasks, the goal table and paired differences against WiSE-FT's choice and
    the fine-tune. Empty where no task has a ``frontier-test.json``."""
    results = {n: FR.seed_results(Path(workdir) / n, FR.TEST_RESULTS) for n in names}
    done = [n for n in names if results[n]]
    if not done:
        return ""
    results = {n: results[n] for n in done}
    gains = sorted({r["keep_gain"] for n in done for r in results[n]})
    d = TaskDraws(results)
    table, order = summary(done, d)
    picks = ["| method | " + " | ".join(done) + " |", "|---|" + "---|" * len(done)]
    for m in order:
        cells = [" / ".join(_pick(r, m) for r in results[n]) for n in done]
        if any(c.strip(" /") for c in cells):
            picks.append(f"| {m} | " + " | ".join(cells) + " |")
    never = [
        m for m in FR.KNOBS if m not in order and all(m in r["unreached"] for n in done for r in results[n])
    ]
    if never:
        picks.append(
            f"\nNo point of {', '.join(never)} keeps that share of E on validation in any task or seed."
        )
    seeds = ", ".join(f"{n} {k}" for n, k in d.seeds.items())
    missing = [n for n in names if n not in done]
    not_yet = f"; not run yet: {', '.join(missing)}" if missing else ""
    return f"""### Chosen points on the test splits

Each curve's point chosen on **validation** — the best F among its points (its ends included) that keep at least
{" / ".join(f"{g:g}" for g in gains)} × the fine-tune's E there (`forgetless sweep --keep-gain`), "—" where none
does — merged again and evaluated on the **test** splits (`forgetless testbed frontier --test`; tasks:
{", ".join(done)}{not_yet}).
Fine-tuning seeds per task: {seeds} (a cell lists each seed's choice; the rows below average the seeds, and
every interval resamples the seeds as well as the items). Intervals as in the summary at the top (paired within
a task, joint across tasks).

{chr(10).join(picks)}

{table}

Against the goal of issue 16 (over the tasks: at least {GOAL_E:.0%} of the fine-tune's E kept and at least
{GOAL_F:.0%} of its general loss recovered):

{goal_table(done, d, order)}

The winner's curse: how much better each chosen point looked on validation than it is on test (means over the
tasks and seeds; in brackets the number of chosen points), when chosen on every validation item and on the first
{FR.FEW_ITEMS} task items (the validation splits' earlier size):

{curse_table(workdir, done)}

Paired differences of the means against **WiSE-FT**'s chosen point (**\\*** where the interval excludes 0):

{differences(done, d, order, REFERENCE) if "WiSE-FT" in order else "_(no WiSE-FT row)_"}
"""


def frontier_markdown(
    workdir: Path, names: list[str], plots: Path, previous: Path | None = None, reading: str = ""
) -> str:
    """The section, from each task's ``workdir/<task>/frontier-val.json`` (tasks without one are listed as not
    run); `reading`: the hand-written reading (kept between :data:`FR_READING_START` and :data:`FR_READING_END` by
    the caller)."""
    done = [n for n in names if (Path(workdir) / n / FR.RESULTS).is_file()]
    missing = [n for n in names if n not in done]
    parts = []
    for name in done:
        result = read_results(Path(workdir) / name / FR.RESULTS)
        c = Curves(result, Bootstrap(N_BOOT, seed=0))
        png = task_plot(name, c, Path(plots) / f"frontier-{name}.png")
        sizes = ", ".join(f"{t} {len(x)}" for t, x in c.ft["correct_items"].items())
        absent = [k for k in FR.KNOBS if k not in c.curves]
        parts.append(f"""### {name}

Fine-tune: E {c.e_ft:+.1f}, F {c.ft["F"]:+.1f} (validation items: {sizes}).{
            f" Curves not run yet on this task: {', '.join(absent)}." if absent else ""
        }

{task_table(c)}

![{name}: curves]({doc_link(png, previous)})
""")

    def grid(trial: bool) -> str:
        return "; ".join(
            f"{label}: "
            + (f"{k.knob} {', '.join(f'{v:g}' for v in k.values)}" if k.values else "one point")
            + (f" ({', '.join(f'{n}={v:g}' for n, v in k.fixed.items())})" if k.fixed else "")
            for label, k in FR.KNOBS.items()
            if k.trial == trial
        )

    extracted = extracted_table(workdir, done)
    if extracted:
        extracted = f"""### What a LoRA of the fine-tune keeps

The fine-tune's update written as a LoRA adapter of each rank (`forgetless extract-lora`: the truncated SVD of each
trained Linear's Δ; norms saved whole) and folded back, on the validation splits: E and F ± half the 95% interval,
in brackets E as a share of the fine-tune's. What a full fine-tune keeps when it enters adapter-space merges or LPM.

{extracted}
"""
    return f"""## The forgetting frontier (validation splits)

Each method's whole curve over its knob (`forgetless testbed frontier`, :mod:`forgetless.testbed.frontier`), on
the **validation** splits (the test splits stay for the points chosen on these curves). Grid: {grid(False)}. Task
arithmetic at λ is WiSE-FT at λ with one fine-tuned model. Model Stock merges the fine-tune with a second one of
the same recipe at seed + {X.RESEED} (its ratio comes from their angle: one point). SPIDER and MagnitudeMask are one fine-tune each;
Replay, EWC and L2-SP are curves of fine-tunes over their strength (`forgetless finetune --replay … --replay-ratio`,
`--keep ewc --fisher … --strength`, `--keep l2sp --strength`; the replay data is the general visual tasks'
training splits, EWC's Fisher the general Fisher at θ₀ over the fine-tuned tensors). Every curve has the base
(E = F = 0) and the plain fine-tune as its ends. The LoRA curves fine-tune with LoRA instead (rank {X.LORA["r"]} on
every Linear of the decoder layers, lr {X.LORA_OPTIONS["lr"]:g}: the multi-task adapters' recipe) and run to the plain
LoRA fine-tune; their chosen points keep a share of its E, their F at E = x% is against the full fine-tune's E. Pipelines and candidates of ours (not published methods):
{grid(True)} — a remedy's fine-tune merged back toward θ₀ runs from the base to that fine-tune (its own far end);
the optimizer Fisher is AdamW's squared gradients of the same fine-tune (`forgetless finetune
--optimizer-fisher`). **F at E = x%**: the best F among the method's
points whose E is at least x% of the fine-tune's E (what `forgetless sweep --keep-gain` would pick; one of its own
points, no interpolation); **area**: the mean of that best F over E ∈ [0, E_ft]. ± half the 95% bootstrap interval
over the validation items ({N_BOOT} resamples; the fine-tune's E and each method's best point re-taken on every
resample); **vs {REFERENCE}**: the paired difference, **\\*** where its interval excludes 0. The best of several
noisy points flatters the methods with more points (a winner's curse); the test splits are for the chosen points.
{f"Not run yet: {', '.join(missing)}." if missing else ""}

{reading}
{chr(10).join(parts)}
{extracted}
{chosen_markdown(workdir, names)}"""
