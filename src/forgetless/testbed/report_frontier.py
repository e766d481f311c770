"""RESULTS.md's section "The forgetting frontier": each task's curves (:mod:`.frontier`) on one E–F plane, F at
matched E and the area under each curve, with 95% intervals and paired differences against WiSE-FT."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..eval.metrics import Bootstrap
from ..eval.report import diff_cell, doc_link, tradeoff_plot
from . import frontier as FR
from .experiment import row_draws, row_name
from .tables import N_BOOT

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
            model = FR.KNOBS[label].model
            ends = ["base", "fine-tuned" if model is None else FR.keep_label(model)]
            if ends[1] not in by:
                raise ValueError(f"frontier rows: curve {label!r} merges from {ends[1]!r}, which has no row")
            names = [row_name(r) for r in members]
            self.curves[label] = {
                "E": np.array([by[n]["E"] for n in ends + names], dtype=float),
                "F": np.array([by[n]["F"] for n in ends + names], dtype=float),
                "dE": np.stack([draws[n]["E"] for n in ends + names]),
                "dF": np.stack([draws[n]["F"] for n in ends + names]),
                "knobs": [knob_of(r, label) for r in members]}

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
    head = ("| method | points | " + " | ".join(f"F at E = {int(f * 100)}%" for f in FR.FRACTIONS) +
            " | area (mean F) | " + " | ".join(f"vs {REFERENCE} at {int(f * 100)}%" for f in FR.FRACTIONS) +
            f" | area vs {REFERENCE} |")
    lines = [head, "|" + "---|" * (2 + 2 * len(FR.FRACTIONS) + 2)]
    ref = ([c.at(REFERENCE, f) for f in FR.FRACTIONS] + [c.area(REFERENCE)]) if REFERENCE in c.curves else None
    for label in c.curves:
        at = [c.at(label, f) for f in FR.FRACTIONS]
        area = c.area(label)
        diffs = ([_diff(c.boot, a, r) for a, r in zip([*at, area], ref)]
                 if ref is not None and label != REFERENCE else ["—"] * (len(FR.FRACTIONS) + 1))
        knobs = ", ".join(f"{k:g}" for k in c.curves[label]["knobs"] if k is not None)
        lines.append(f"| {label} | {FR.KNOBS[label].knob} {knobs} | " + " | ".join(_iv_cell(c.boot, *a) for a in at) +
                     f" | {_iv_cell(c.boot, *area)} | " + " | ".join(diffs) + " |")
    for label, s in c.singles.items():
        e_iv, f_iv = c.boot.interval(s["draws"]["E"]), c.boot.interval(s["draws"]["F"])
        lines.append(f"| {label} | one fine-tune: E {s['E']:+.1f} ± {(e_iv[1] - e_iv[0]) / 2:.1f}, "
                     f"F {s['F']:+.1f} ± {(f_iv[1] - f_iv[0]) / 2:.1f} |" + " |" * (2 * len(FR.FRACTIONS) + 2))
    return "\n".join(lines)


def task_plot(task: str, c: Curves, path: Path) -> Path:
    pts: list[dict[str, Any]] = []
    for label, cv in c.curves.items():
        for k, (e, f) in enumerate(zip(cv["E"][2:], cv["F"][2:])):
            pts.append({"method": label, "task": float(e), "general": float(f), "knob": cv["knobs"][k],
                        "task_interval": c.boot.interval(cv["dE"][2 + k]),
                        "general_interval": c.boot.interval(cv["dF"][2 + k])})
    for label, s in c.singles.items():
        pts.append({"method": label, "task": s["E"], "general": s["F"], "task_interval": c.boot.interval(
            s["draws"]["E"]), "general_interval": c.boot.interval(s["draws"]["F"])})
    pts.append({"method": "base", "task": 0.0, "general": 0.0, "role": "base"})
    pts.append({"method": "fine-tuned", "task": c.e_ft, "general": c.ft["F"], "role": "finetuned",
                "task_interval": c.boot.interval(c.e_ft_draws)})
    return tradeoff_plot(pts, path, title=f"{task}: every method's curve (validation, 95% intervals)",
                         xlabel="specialization gain E (points)", ylabel="general change F (points)")


def frontier_markdown(workdir: Path, names: list[str], plots: Path, previous: Path | None = None) -> str:
    """The section, from each task's ``workdir/<task>/frontier-val.json`` (tasks without one are listed as not
    run)."""
    done = [n for n in names if (Path(workdir) / n / FR.RESULTS).is_file()]
    missing = [n for n in names if n not in done]
    parts = []
    for name in done:
        result = json.loads((Path(workdir) / name / FR.RESULTS).read_text())
        c = Curves(result, Bootstrap(N_BOOT, seed=0))
        png = task_plot(name, c, Path(plots) / f"frontier-{name}.png")
        sizes = ", ".join(f"{t} {len(x)}" for t, x in c.ft["correct_items"].items())
        parts.append(f"""### {name}

Fine-tune: E {c.e_ft:+.1f}, F {c.ft['F']:+.1f} (validation items: {sizes}).

{task_table(c)}

![{name}: curves]({doc_link(png, previous)})
""")
    grid = "; ".join(f"{label}: {k.knob} {', '.join(f'{v:g}' for v in k.values)}"
                     + (f" ({', '.join(f'{n}={v:g}' for n, v in k.fixed.items())})" if k.fixed else "")
                     for label, k in FR.KNOBS.items() if not k.trial)
    return f"""## The forgetting frontier (validation splits)

Each method's whole curve over its knob (`forgetless testbed frontier`, :mod:`forgetless.testbed.frontier`), on
the **validation** splits (the test splits stay for the points chosen on these curves). Grid: {grid}. Task
arithmetic at λ is WiSE-FT at λ with one fine-tuned model. SPIDER and MagnitudeMask are one fine-tune each. Every
merge curve has the base (E = F = 0) and the fine-tune as its ends. **F at E = x%**: the best F among the method's
points whose E is at least x% of the fine-tune's E (what `forgetless sweep --keep-gain` would pick; one of its own
points, no interpolation); **area**: the mean of that best F over E ∈ [0, E_ft]. ± half the 95% bootstrap interval
over the validation items ({N_BOOT} resamples; the fine-tune's E and each method's best point re-taken on every
resample); **vs {REFERENCE}**: the paired difference, **\\*** where its interval excludes 0. The best of several
noisy points flatters the methods with more points (a winner's curse); the test splits are for the chosen points.
{f"Not run yet: {', '.join(missing)}." if missing else ""}

{chr(10).join(parts)}"""
