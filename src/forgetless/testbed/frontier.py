"""The forgetting frontier (issue 16): every method's whole trade-off curve over its knob, on the testbed's
**validation** splits, with intervals; F at matched E and the area under each curve.

A method is better than another only if its whole curve of (E, F) lies above the other's. Each merge method is
swept over its knob (:data:`KNOBS`: WiSE-FT λ, TIES and DARE density, Fisher merging's base weight, CGM α, CGM†
keep; task arithmetic at λ is WiSE-FT at λ with one fine-tuned model, so it is not repeated), SPIDER and
MagnitudeMask are their single fine-tunes. Everything runs through :func:`.experiment.run_experiment` (the same
fine-tune, statistics and evaluation caches as the test-split experiment) with ``split="val"``; the rows go to
``runs/testbed/<task>/frontier-val.json``.

Curves. Every merge curve runs from the base (E = F = 0: each knob has an end that gives θ₀) to the fine-tuned
model (the other end), through the swept points ordered by E. Headline numbers, each with its 95% bootstrap
interval over the validation items (the same resamples for every method, so differences are paired):

- **F at matched E**: F of the curve, linearly interpolated, where E reaches 80%, 90% and 95% of the fine-tune's E
  (on each resample, its own fine-tune's E);
- **area**: the mean F along the curve, ∫F dE / E_ft over E ∈ [0, E_ft] (trapezoids on the interpolated curve).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import experiment as X

RESULTS = "frontier-val.json"
FRACTIONS = (0.8, 0.9, 0.95)
# label -> (method, fixed parameters, knob, values, task Fisher)
KNOBS: dict[str, tuple[str, dict, str, list[float], tuple[str, str] | None]] = {
    "WiSE-FT": ("linear", {}, "lambda", [0.1, 0.2, 0.3, 0.4, 0.5, 0.7], None),
    "TIES": ("ties", {"lambda": 1.0}, "density", [0.05, 0.1, 0.2, 0.5], None),
    "DARE": ("dare_linear", {"lambda": 1.0}, "density", [0.1, 0.3, 0.5], None),
    "Fisher merging": ("fisher_with_base", {}, "base_weight", [0.01, 0.1, 1.0, 10.0], X.TASK_FISHER_OWN),
    "CGM": ("cgm", {}, "alpha", [0.2, 1.0, 5.0, 25.0, 125.0], X.TASK_FISHER_CGM),
    "CGM†": ("cgm_dagger", {"alpha": 1.0}, "keep", [0.5, 0.8, 0.95], X.TASK_FISHER_CGM),
}


def frontier_merges() -> list[tuple[str, str, dict, tuple[str, str] | None]]:
    """The grid as :func:`.experiment.run_experiment`'s ``merges``."""
    return [(label, method, {knob: v, **fixed}, tf) for label, (method, fixed, knob, values, tf) in KNOBS.items()
            for v in values]


def run_frontier(task: str, workdir: str | Path, *, log: Callable[[str], None] = print) -> dict:
    """Every curve of one task on its validation splits (cached steps are reused); writes `workdir`/RESULTS."""
    return X.run_experiment(task, workdir, merges=frontier_merges(), keeps=X.KEEPS, split="val",
                            results_name=RESULTS, log=log)


def curve_at(e: np.ndarray, f: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """F of the curve through the points (e[i], f[i]) at each E in `targets`, linearly interpolated along E
    (points ordered by E; NaN outside their range). ``e``, ``f``: [P] or [P, B] (B resamples, then ``targets`` is
    [T] or [T, B]); returns [T] or [T, B]."""
    if e.ndim == 1:
        o = np.argsort(e, kind="stable")
        return np.interp(targets, e[o], f[o], left=np.nan, right=np.nan)
    out = np.empty((targets.shape[0], e.shape[1]))
    for b in range(e.shape[1]):
        out[:, b] = curve_at(e[:, b], f[:, b], targets[:, b] if targets.ndim == 2 else targets)
    return out


def curve_area(e: np.ndarray, f: np.ndarray, e_end: np.ndarray | float, n: int = 101) -> np.ndarray | float:
    """The mean F along the curve over E ∈ [0, e_end] (∫F dE / e_end on `n` evenly spaced E)."""
    if e.ndim == 1:
        grid = np.linspace(0.0, float(e_end), n)
        return float(np.trapezoid(curve_at(e, f, grid), grid) / float(e_end))
    ends = np.broadcast_to(np.asarray(e_end, dtype=float), (e.shape[1],))
    unit = np.linspace(0.0, 1.0, n)
    grid = unit[:, None] * ends[None, :]
    return np.trapezoid(curve_at(e, f, grid), unit, axis=0)  # ∫F dE / e_end = ∫F d(E / e_end)
