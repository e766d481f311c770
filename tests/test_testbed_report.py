"""The testbed report (RESULTS.md) from results.json files: intervals on every figure, joint means over the tasks,
paired differences, the hand-written reading kept, plots written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forgetless.eval.metrics import Bootstrap, compare, correct_items
from forgetless.testbed import report as R
from forgetless.testbed import tasks as T


def _result(task: str, rng, p_task: float, p_general: float, n_task=300, n_gen=80) -> dict:
    tasks = {task: ("downstream", rng.random(n_task) < p_task)}
    tasks.update({g: ("general_visual", rng.random(n_gen) < p_general) for g in T.GENERAL_VISUAL})
    tasks["probes"] = ("general_text", rng.random(n_gen) < 0.6)
    return {
        "split": "test",
        "tasks": {
            n: {"kind": k, "n": len(c), "accuracy": float(c.mean()), "correct_items": correct_items(c)}
            for n, (k, c) in tasks.items()
        },
    }


def _row(method: str, knob: str, res: dict, base: dict) -> dict:
    return {
        "method": method,
        "knob": knob,
        **compare(res, base),
        "tasks": {n: round(100 * t["accuracy"], 2) for n, t in res["tasks"].items()},
        "kinds": {n: t["kind"] for n, t in res["tasks"].items()},
        "correct_items": {n: t["correct_items"] for n, t in res["tasks"].items()},
    }


@pytest.fixture()
def workdir(tmp_path):
    rng = np.random.default_rng(0)
    results = {}
    for task in ("spatial", "tag"):
        base = _result(task, rng, 0.1, 0.8)
        models = [
            ("base", "", base),
            ("fine-tuned", "", _result(task, rng, 0.6, 0.4)),
            ("WiSE-FT", "lambda=0.3", _result(task, rng, 0.55, 0.75)),
        ]
        rows = [_row(m, k, r, base) for m, k, r in models]
        results[task] = {
            "task": task,
            "finetune": {"train": ["projector"], "steps": 3, "lr": 1e-3},
            "rows": rows,
            "timings": {"finetune": 1.0, "evaluate": 2.0, "total": 3.0},
            "threads": 2,
        }
        (tmp_path / task).mkdir()
        (tmp_path / task / "results.json").write_text(json.dumps(results[task]))
    return tmp_path, results


def test_report_has_intervals_joint_means_and_keeps_the_reading(workdir, tmp_path):
    wd, results = workdir
    out = tmp_path / "RESULTS.md"
    out.write_text(f"old\n{R.READING_START}\nWiSE-FT wins here, by hand.\n{R.READING_END}\nold tail\n")
    text = R.markdown(["spatial", "tag"], wd, tmp_path / "plots", previous=out)
    assert "WiSE-FT wins here, by hand." in text and "old tail" not in text
    assert (tmp_path / "plots" / "tradeoff-spatial.png").read_bytes()[:4] == b"\x89PNG"
    # the mean E of WiSE-FT over both tasks, with the interval of the joint resample
    boot = Bootstrap(R.N_BOOT, seed=0)
    draws = []
    for task in ("spatial", "tag"):
        rows = results[task]["rows"]
        draws.append(boot.compare(R.row_result(rows[2]), R.row_result(rows[0]))["E"])
    lo, hi = boot.interval(np.mean(draws, axis=0))
    mean_e = np.mean([results[t]["rows"][2]["E"] for t in ("spatial", "tag")])
    line = next(x for x in text.splitlines() if x.startswith("| WiSE-FT lambda=0.3 |"))
    assert f"{mean_e:+.1f} ± {(hi - lo) / 2:.1f}" in line
    e, f = results["tag"]["rows"][1]["E"], results["tag"]["rows"][1]["F"]
    ft_line = next(x for x in text.splitlines() if x.startswith("| fine-tuned |"))
    assert f"{e:+.1f} ± " in ft_line and f"{f:+.1f} ± " in ft_line
    # WiSE-FT forgets far less than the fine-tune here: its F difference is outside the interval (starred)
    diff_section = text.split("Against the fine-tuned model")[1].split("## Per task")[0]
    wise = next(x for x in diff_section.splitlines() if x.startswith("| WiSE-FT"))
    assert wise.split("|")[3].strip().endswith("**\\***")
    assert "runs/testbed/<task>/results.json" in text and "± 95% interval" in text


def test_report_without_a_previous_file_says_the_reading_is_missing(workdir, tmp_path):
    wd, _ = workdir
    text = R.markdown(["spatial"], wd, tmp_path / "plots")
    assert f"{R.READING_START}\n_(not written yet)_\n{R.READING_END}" in text


def test_report_of_a_study_under_way_names_the_tasks_not_run_and_keeps_the_reading(workdir, tmp_path):
    wd, _ = workdir
    out = tmp_path / "RESULTS.md"
    out.write_text(f"{R.READING_START}\nby hand\n{R.READING_END}\n")
    text = R.markdown(["spatial", "tag", "digits"], wd, tmp_path / "plots", previous=out)
    assert "`forgetless testbed report --part tasks --task digits`" in text
    assert "| spatial | 300 |" in text and "| digits |" not in text and "### digits" not in text
    empty = tmp_path / "empty"
    empty.mkdir()
    text = R.markdown(["digits", "tag"], empty, tmp_path / "plots", previous=out)
    assert "`forgetless testbed report --part tasks`)" in text and "by hand" in text
    assert "## Summary" not in text and "## Time" not in text and "whole test splits** (items" in text


def test_what_the_target_takes_scales_each_task_by_the_square_of_its_widest_interval(workdir, tmp_path):
    wd, results = workdir
    out = R.run_report(
        ["spatial", "tag"], wd, tmp_path / "R.md", plots=tmp_path / "p", run=False, log=lambda s: None
    )
    text = out.read_text()
    boot = Bootstrap(R.N_BOOT, seed=0)
    for task in ("spatial", "tag"):
        rows = results[task]["rows"]
        ivs = [boot.intervals(boot.compare(R.row_result(r), R.row_result(rows[0]))) for r in rows[1:]]
        hw_e = max((iv["E"][1] - iv["E"][0]) / 2 for iv in ivs)
        need = int(np.ceil(300 * (hw_e / R.TARGET) ** 2))
        line = next(x for x in text.splitlines() if x.startswith(f"| {task} | 300 |"))
        assert f"| {hw_e:.1f} | {need:,} |" in line
    assert not any(p.name == "results.md" for p in wd.iterdir())  # nothing run, nothing else written


@pytest.mark.parametrize(
    ("names", "parts", "ran"),
    [
        (None, None, [*T.DOWNSTREAM, "multitask", "continual"]),
        (["spatial"], None, ["spatial"]),
        (None, ["multitask"], ["multitask"]),
        (["tag"], ["continual", "tasks"], ["tag", "continual"]),
    ],
)
def test_report_runs_the_parts_asked_for_and_reports_every_result(monkeypatch, tmp_path, names, parts, ran):
    from forgetless.cli import testbed_report_cmd
    from forgetless.testbed import continual, multitask

    calls = []
    monkeypatch.setattr(R.X, "run_experiment", lambda name, *a, **k: calls.append(name))
    monkeypatch.setattr(multitask, "run_multitask", lambda *a, **k: calls.append("multitask"))
    monkeypatch.setattr(continual, "run_continual", lambda *a, **k: calls.append("continual"))
    monkeypatch.setattr(R, "markdown", lambda names, *a, **k: f"report of {names}")
    out = R.run_report(names, tmp_path, tmp_path / "R.md", parts=parts, log=lambda s: None)
    assert calls == ran
    assert out.read_text() == f"report of {names or T.DOWNSTREAM}"
    choices = next(p for p in testbed_report_cmd.params if p.name == "parts").type.choices
    assert tuple(choices) == R.PARTS
