"""Tables over several tasks' rows of one kind (a ``results.json`` per task): every task's rows resampled by one
:class:`~forgetless.eval.metrics.Bootstrap` — paired within a task, joint across tasks (the general items are the
same in every task's experiment, so they share their draws) — the E / F summary with means over the tasks, and
paired differences against a reference row. Used by the test-split report and the frontier's chosen points."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..eval.metrics import Bootstrap
from ..eval.report import cell, diff_cell
from .experiment import row_draws, row_name, row_result

N_BOOT = 2000


class TaskDraws:
    """Every task's rows resampled with one :class:`Bootstrap` (paired within a task, joint across tasks). A task's
    results may be a list, one per fine-tuning seed: a row's point is then its mean over the seeds (the rows every
    seed has), and each resample also draws the seeds with replacement (:meth:`Bootstrap.scores`)."""

    def __init__(self, results: Mapping[str, dict | list[dict]], n_boot: int = N_BOOT):
        self.boot = Bootstrap(n_boot, seed=0)
        self.results = {t: r if isinstance(r, list) else [r] for t, r in results.items()}
        self.draws: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # task -> row name -> key -> [B]
        self.rows: dict[
            str, dict[str, dict]
        ] = {}  # task -> row name -> row (its scores: means over the seeds)
        for task, seeds in self.results.items():
            if len(seeds) == 1:
                self.draws[task] = row_draws(seeds[0]["rows"], self.boot)
                self.rows[task] = {row_name(r): r for r in seeds[0]["rows"]}
            else:
                self.rows[task], self.draws[task] = seed_rows([s["rows"] for s in seeds], self.boot)

    @property
    def seeds(self) -> dict[str, int]:
        """The number of seeds of each task."""
        return {t: len(s) for t, s in self.results.items()}

    def intervals(self, task: str) -> list[dict]:
        return [self.boot.intervals(self.draws[task][row_name(r)]) for r in self.results[task][0]["rows"]]

    def mean(self, name: str, key: str, tasks: list[str]) -> np.ndarray:
        return np.mean([self.draws[t][name][key] for t in tasks], axis=0)

    def mean_point(self, name: str, key: str, tasks: list[str]) -> float:
        return float(np.mean([self.rows[t][name][key] for t in tasks]))


SCORES = ("T", "G_v", "G_t", "G", "E", "F", "E+F")


def seed_rows(
    per_seed: list[list[dict]], boot: Bootstrap
) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray | None]]]:
    """Rows of several seeds' runs of one task, by name: each row every seed has, its scores averaged over the
    seeds (the first seed's row otherwise), and its draws, seeds and items resampled, E and F paired with the
    ``base`` row."""
    by_seed = [{row_name(r): r for r in rows} for rows in per_seed]
    names = [n for n in by_seed[0] if all(n in b for b in by_seed)]
    base = row_result(by_seed[0]["base"])
    rows, draws = {}, {}
    for n in names:
        runs = [b[n] for b in by_seed]
        rows[n] = {
            **runs[0],
            **{k: float(np.mean([r[k] for r in runs])) for k in SCORES if runs[0].get(k) is not None},
        }
        draws[n] = boot.compare([row_result(r) for r in runs], base)
    return rows, draws


def sure_interval(boot: Bootstrap, draws: np.ndarray) -> tuple[float, float]:
    iv = boot.interval(draws)
    assert iv is not None
    return iv


def summary(names: list[str], d: TaskDraws) -> tuple[str, list[str]]:
    """The E / F table (per task and mean, with intervals) and the methods in it, in row order."""
    order = list(dict.fromkeys(m for n in names for m in d.rows[n]))
    lines = [
        "| method | " + " | ".join(f"{n} E / F" for n in names) + " | mean E | mean F | mean E+F |",
        "|---|" + "---|" * (len(names) + 3),
    ]
    for m in order:
        cells, have = [], []
        for n in names:
            r = d.rows[n].get(m)
            if r is None:
                cells.append("—")
                continue
            have.append(n)
            iv = d.boot.intervals(d.draws[n][m])
            cells.append(f"{cell(r['E'], True, iv['E'])} / {cell(r['F'], True, iv['F'])}")
        means = []
        for key in ("E", "F", "E+F"):
            if len(have) != len(names):
                means.append("—")
                continue
            means.append(
                cell(d.mean_point(m, key, names), True, sure_interval(d.boot, d.mean(m, key, names)))
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(means) + " |")
    return "\n".join(lines), order


def differences(names: list[str], d: TaskDraws, order: list[str], reference: str) -> str:
    """Paired differences of mean E, F and E + F against `reference`, marked where the interval excludes 0."""
    lines = ["| method | Δ mean E | Δ mean F | Δ mean E+F |", "|---|---|---|---|"]
    for m in order:
        if m in (reference, "base") or any(m not in d.draws[n] for n in names):
            continue
        cells = []
        for key in ("E", "F", "E+F"):
            diff = d.mean(m, key, names) - d.mean(reference, key, names)
            point = float(np.mean([d.rows[n][m][key] - d.rows[n][reference][key] for n in names]))
            cells.append(diff_cell(point, sure_interval(d.boot, diff)))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
