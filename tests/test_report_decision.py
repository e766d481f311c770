"""RESULTS.md's "Which recipe when" from synthetic results files: each situation's best and runner-up against a
brute-force ranking of the rows, the candidates of the situations without general data or without labels, the
best's interval against the bootstrap on the same draws, and what the section says where nothing was measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_continual_testbed import _results as continual_results
from test_multitask import _fake_results as multitask_results

from forgetless.eval.metrics import Bootstrap, compare, correct_items
from forgetless.testbed import frontier as FR
from forgetless.testbed import report_decision as D
from forgetless.testbed.experiment import row_name, task_fields
from forgetless.testbed.report import MultitaskDraws
from forgetless.testbed.report_continual import ContinualDraws
from forgetless.testbed.tables import N_BOOT, TaskDraws

TASKS = ["digits", "spatial"]
KINDS = {"colour": "general_visual", "probes": "general_text"}
# the fixed-knob experiment: each published merge and fine-tune, and a knob drawn only for a curve (WiSE-FT 0.3)
FIXED = [
    ("WiSE-FT", "lambda=0.5"),
    ("WiSE-FT", "lambda=0.3"),
    ("task arithmetic", "lambda=0.7"),
    ("TIES", "density=0.2 lambda=1"),
    ("DARE", "density=0.3 lambda=0.7"),
    ("Fisher merging", "base_weight=1"),
    ("CGM", "alpha=0.2"),
    ("SPIDER", ""),
    ("MagnitudeMask", ""),
]
# the frontier's chosen points: (curve, chosen knob); L2-SP chose its variant's own strength, EWC another one
CURVES = [
    ("WiSE-FT", "lambda=0.4"),
    ("CGM", "alpha=25"),
    ("Learned λ (entropy)", "general_weight=1"),
    ("L2-SP", "strength=0.2"),
    ("EWC", "strength=30"),
    ("LoRA → WiSE-FT", "lambda=0.5"),
    ("LoRA + EWC", "strength=3000"),
]
LORA_CURVES = [c for c, _ in CURVES if FR.is_lora(c)]


def _result(task: str, rng, p_task: float, p_general: float, n: int = 120) -> dict:
    acc = {task: ("downstream", p_task), **{g: (k, p_general) for g, k in KINDS.items()}}
    tasks = {}
    for name, (kind, p) in acc.items():
        flags = rng.random(n) < p
        tasks[name] = {"kind": kind, "accuracy": float(flags.mean()), "correct_items": correct_items(flags)}
    return {"tasks": tasks}


def _rows(
    models: dict[tuple[str, str], dict], base: dict, ft: dict, chosen: dict[str, str] | None = None
) -> list[dict]:
    """Rows of results.json: (method, knob) → its result; a method in `chosen` is a frontier's chosen point."""
    rows = []
    for (method, knob), r in {("base", ""): base, ("fine-tuned", ""): ft, **models}.items():
        pick = {"chosen": chosen[method], "val": {"E": 1.0, "F": -1.0}} if method in (chosen or {}) else {}
        rows.append({"method": method, "knob": knob, **compare(r, base, ft), **task_fields(r), **pick})
    return rows


def _write(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Two tasks' fixed-knob experiments and frontier test files (digits with a second seed), and the multi-task
    and continual experiments."""
    wd = tmp_path_factory.mktemp("testbed")
    rng = np.random.default_rng(0)
    for task in TASKS:
        base, ft = _result(task, rng, 0.2, 0.8), _result(task, rng, 0.9, 0.5)
        models = {m: _result(task, rng, rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.8)) for m in FIXED}
        recipe = {"train": ["projector"], "steps": 3, "lr": 1e-3}
        _write(wd / task / "results.json", {"rows": _rows(models, base, ft), "finetune": recipe})
        # a pipeline chose a point on one task only
        picks = dict(CURVES) | ({"SPIDER → WiSE-FT": "lambda=0.5"} if task == "digits" else {})
        for seed in (0, 1) if task == "digits" else (0,):
            tunes = {("SPIDER", ""): models[("SPIDER", "")], ("Replay 1:1", ""): _result(task, rng, 0.8, 0.6)}
            points = {
                (c, ""): _result(task, rng, rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.8)) for c in picks
            }
            ft_s = ft if seed == 0 else _result(task, rng, 0.85, 0.5)
            rows = _rows({**tunes, **points}, base, ft_s, picks)
            _write(FR.seed_dir(wd / task, seed) / FR.TEST_RESULTS, {"rows": rows, "keep_gain": 0.9})
    _write(wd / "multitask" / "results.json", multitask_results())
    _write(wd / "continual" / "results.json", continual_results(np.random.default_rng(1)))
    return wd


def _mean(task_rows: dict[str, list[dict]], name: str, key: str = "E+F") -> float:
    """Brute force: the mean over the tasks of the row's mean over the seeds."""
    per_task = []
    for rows in task_rows.values():
        per_task.append(np.mean([next(r[key] for r in seed if row_name(r) == name) for seed in rows]))
    return float(np.mean(per_task))


def _line(md: str, label: str) -> list[str]:
    row = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def _ranked(task_rows: dict[str, list[dict]], names: list[str]) -> list[str]:
    return sorted(names, key=lambda m: -_mean(task_rows, m))


def test_one_task_full_fine_tune_ranks_every_chosen_point(workdir):
    per_task = {t: [s["rows"] for s in FR.seed_results(workdir / t, FR.TEST_RESULTS)] for t in TASKS}
    want = _ranked(per_task, [c for c, _ in CURVES if c not in LORA_CURVES])
    s = D.frontier_situation(workdir, TASKS)
    assert s.ranked.order == want and s.ranked.missing == ["SPIDER → WiSE-FT"]
    # the best's interval: the bootstrap's on the same draws (tasks and seeds resampled jointly)
    d = TaskDraws({t: FR.seed_results(workdir / t, FR.TEST_RESULTS) for t in TASKS}, N_BOOT)
    lo, hi = Bootstrap(N_BOOT, seed=0).interval(np.mean([d.draws[t][want[0]]["E+F"] for t in TASKS], axis=0))
    assert s.ranked.best.startswith(
        f"**{want[0]}**: E+F {_mean(per_task, want[0]):+.1f} ± {(hi - lo) / 2:.1f} ("
    )
    point = _mean(per_task, want[1]) - _mean(per_task, want[0])
    assert s.ranked.runner.startswith(f"{want[1]}: {point:+.1f} [")
    md = D.decision_markdown(workdir, TASKS)
    cells = _line(md, s.label)
    assert cells[1] == s.ranked.best and cells[2] == s.ranked.runner
    assert cells[3] == D.COSTS[want[0]] + D.choice_cost(want[0])
    assert "at least 0.9 × the fine-tune's validation E" in md
    lora = D.frontier_situation(workdir, TASKS, lora=True)
    assert LORA_CURVES == ["LoRA → WiSE-FT", "LoRA + EWC"] and lora.ranked.order == _ranked(
        per_task, LORA_CURVES
    )
    assert _line(md, lora.label)[1] == lora.ranked.best


def test_without_general_data_or_labels_only_fixed_knobs_compete(workdir):
    """No general data: the published merges that need no statistics and the single fine-tunes (L2-SP at its own
    strength, from the frontier's chosen point that took it); no labels: every published merge and fine-tune and
    the label-free learned λ. The knob drawn only for a curve (WiSE-FT 0.3) competes in neither."""
    seed0 = {}
    for t in TASKS:
        rows = {row_name(r): r for r in json.loads((workdir / t / "results.json").read_text())["rows"]}
        frontier = {row_name(r): r for r in json.loads((workdir / t / FR.TEST_RESULTS).read_text())["rows"]}
        l2sp = {**frontier["L2-SP"], "method": "L2-SP λ=0.2"}  # the curve chose its variant's own strength
        seed0[t] = [list({**frontier, "L2-SP λ=0.2": l2sp, **rows}.values())]
    no_general = [
        "WiSE-FT lambda=0.5",
        "task arithmetic lambda=0.7",
        "TIES density=0.2 lambda=1",
        "DARE density=0.3 lambda=0.7",
        "SPIDER",
        "MagnitudeMask",
        "L2-SP λ=0.2",
    ]
    no_labels = [
        *no_general[:4],
        "Fisher merging base_weight=1",
        "CGM alpha=0.2",
        "SPIDER",
        "MagnitudeMask",
        "Replay 1:1",
        "L2-SP λ=0.2",
        "Learned λ (entropy)",
    ]
    general, labels = D.fixed_situations(workdir, TASKS)
    assert general.ranked.order == _ranked(seed0, no_general)
    assert labels.ranked.order == _ranked(seed0, no_labels)
    assert "EWC λ=3" not in labels.ranked.order  # EWC chose another strength: its own was not measured
    d = TaskDraws({t: {"rows": seed0[t][0]} for t in TASKS}, N_BOOT)
    best = general.ranked.order[0]
    lo, hi = Bootstrap(N_BOOT, seed=0).interval(d.mean(best, "E+F", TASKS))
    assert f"E+F {_mean(seed0, best):+.1f} ± {(hi - lo) / 2:.1f}" in general.ranked.best
    assert D._cost(labels, "Learned λ (entropy)").endswith(
        "general_weight chosen on labelled validation (3 learned runs scored)"
    )


def test_adapters_and_sequence_rank_by_their_own_scores(workdir):
    mt = multitask_results()
    d = MultitaskDraws(mt, N_BOOT)
    merges = [r["method"] for r in mt["rows"] if r["role"] == "merge"]
    want = sorted(merges, key=lambda m: -d.points[m]["seen"])
    s = D.multitask_situation(workdir)
    assert s.ranked.order == want
    lo, hi = d.boot.interval(d.draws[want[0]]["seen"])
    assert s.ranked.best.startswith(
        f"**{want[0]}**: seen {d.points[want[0]]['seen']:.1f} ± {(hi - lo) / 2:.1f} (unseen "
    )
    point = d.points[want[1]]["seen"] - d.points[want[0]]["seen"]
    assert s.ranked.runner.startswith(f"{want[1]}: {point:+.1f} [")
    cl = continual_results(np.random.default_rng(1))
    c = ContinualDraws(cl, N_BOOT)
    s = D.continual_situation(workdir)
    assert s.ranked.order == sorted(cl["matrices"], key=lambda m: -c.points[m]["final"])
    assert "G " in s.ranked.best and "forgetting " in s.ranked.best


def test_situations_without_data_say_so_and_no_results_give_nothing(workdir, tmp_path):
    md = D.decision_markdown(workdir, TASKS)
    assert md.startswith("## Which recipe when")
    only = tmp_path / "only"
    _write(only / "multitask" / "results.json", multitask_results())
    md = D.decision_markdown(only, TASKS)
    for lora in (False, True):
        label = D.frontier_situation(only, TASKS, lora).label
        assert _line(md, label)[1] == "not measured yet (no `frontier-test.json`)"
    assert _line(md, "tasks in sequence")[1] == "not measured yet (no `continual/results.json`)"
    assert D.decision_markdown(tmp_path / "empty", TASKS) == ""


def test_the_report_ends_with_the_section(workdir, tmp_path):
    from forgetless.testbed import report as R

    text = R.markdown(TASKS, workdir, tmp_path / "plots")
    section = D.decision_markdown(workdir, TASKS)
    assert text.count("## Which recipe when") == 1 and text.rstrip().endswith(section.rstrip())
