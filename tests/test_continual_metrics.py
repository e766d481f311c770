"""Continual-learning metrics (MFT, MFN, MAA, BWT, Last): each against a brute-force loop and a hand-worked 3×3
matrix, their bootstrap draws against a recomputation on the resampled items, the matrix built from step results
and its refusals, and `forgetless continual eval` on result JSONs and on tiny model folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import build_llama_with_tokenizer

from forgetless.cli import main
from forgetless.errors import ForgetlessError
from forgetless.eval import continual as CL
from forgetless.eval.metrics import Bootstrap

# ---------------------------------------------------------------------------------------------------------------
# independent references


def brute(a: list[list[float]]) -> dict[str, float | None]:
    """The definitions as loops (a[t][j], t and j from 0)."""
    T = len(a)
    mft = sum(a[j][j] for j in range(T)) / T
    mfn = sum(a[T - 1][j] for j in range(T)) / T
    maa = sum(sum(a[t][j] for j in range(t + 1)) / (t + 1) for t in range(T)) / T
    bwt = sum(a[T - 1][j] - a[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else None
    return {"MFT": mft, "MFN": mfn, "MAA": maa, "BWT": bwt, "Last": mfn}


def entry(correct: str, salt: str = "") -> dict:
    """A task's entry in a `forgetless eval` result."""
    n = len(correct)
    return {
        "kind": "downstream",
        "accuracy": correct.count("1") / n,
        "n": n,
        "correct_items": correct,
        "item_fingerprints": [f"{salt}{i:04d}" for i in range(n)],
    }


def flags(rng: np.random.Generator, n: int, p: float) -> str:
    return "".join("1" if x else "0" for x in rng.random(n) < p)


def random_steps(
    rng: np.random.Generator, tasks: list[str], sizes: list[int], future: bool = True
) -> list[dict]:
    """Step results of a sequence: step t scored on every task (future=True) or the tasks so far."""
    steps = []
    for t in range(len(tasks)):
        have = tasks if future else tasks[: t + 1]
        steps.append(
            {
                "split": "test",
                "tasks": {n: entry(flags(rng, sizes[tasks.index(n)], rng.random())) for n in have},
            }
        )
    return steps


# ---------------------------------------------------------------------------------------------------------------
# point values


def test_each_metric_equals_a_brute_force_loop_on_random_matrices():
    rng = np.random.default_rng(0)
    for T in (1, 2, 5, 8):
        a = (rng.random((T, T)) * 100).tolist()
        got, want = CL.cl_metrics(a), brute(a)
        for k in CL.METRICS:
            assert got[k] == pytest.approx(want[k], abs=1e-12) if want[k] is not None else got[k] is None
        lower = [row[: t + 1] for t, row in enumerate(a)]  # a lower-triangular matrix suffices
        assert CL.cl_metrics(lower) == got


def test_a_hand_worked_3x3_matrix():
    # rows: after task 1, 2, 3; the cells in brackets are tasks not learned yet, which enter no metric
    a = [
        [80.0, 10.0, 20.0],
        [70.0, 90.0, 30.0],
        [60.0, 85.0, 75.0],
    ]
    m = CL.cl_metrics(a)
    assert m["MFT"] == pytest.approx((80 + 90 + 75) / 3)  # 81.67: the diagonal
    assert m["MFN"] == pytest.approx((60 + 85 + 75) / 3)  # 73.33: the last row
    assert m["Last"] == m["MFN"]
    # after task 1: 80; after task 2: (70 + 90) / 2 = 80; after task 3: 220 / 3 = 73.33; mean 77.78
    assert m["MAA"] == pytest.approx((80 + 80 + 220 / 3) / 3)
    assert m["BWT"] == pytest.approx(((60 - 80) + (85 - 90)) / 2)  # −12.5
    assert m["BWT"] == -12.5


def test_one_task_has_no_bwt_and_a_missing_cell_is_refused():
    assert CL.cl_metrics([[42.0]]) == {"MFT": 42.0, "MFN": 42.0, "MAA": 42.0, "BWT": None, "Last": 42.0}
    with pytest.raises(ForgetlessError, match="lacks a cell of step 2"):
        CL.cl_metrics([[50.0], [None, 60.0]])
    with pytest.raises(ForgetlessError, match="lacks a cell of step 3"):
        CL.cl_metrics([[50.0], [40.0, 60.0], [1.0, 2.0]])
    with pytest.raises(ForgetlessError, match="empty"):
        CL.cl_metrics([])


# ---------------------------------------------------------------------------------------------------------------
# intervals


def test_draws_equal_the_metric_recomputed_on_resampled_items():
    rng = np.random.default_rng(1)
    tasks, sizes = ["a", "b", "c"], [30, 17, 25]
    steps = random_steps(rng, tasks, sizes, future=False)
    d = CL.ContinualMetrics(tasks, Bootstrap(200, seed=3))
    d.add_steps("seq", steps)
    correct = {
        (t, n): np.array([c == "1" for c in s["tasks"][n]["correct_items"]])
        for t, s in enumerate(steps)
        for n in s["tasks"]
    }
    a = [[100 * steps[t]["tasks"][n]["accuracy"] for n in tasks[: t + 1]] for t in range(3)]
    for k, v in brute(a).items():
        assert d.points["seq"][k] == pytest.approx(v)
    idx = {n: d.boot.indices(n, size) for n, size in zip(tasks, sizes)}
    for b in range(200):
        resampled = [[100 * correct[t, n][idx[n][b]].mean() for n in tasks[: t + 1]] for t in range(3)]
        want = brute(resampled)
        for k in CL.METRICS:
            assert d.draws["seq"][k][b] == pytest.approx(want[k], abs=1e-9)
    for k in CL.METRICS:
        lo, hi = d.interval("seq", k)
        assert lo <= d.points["seq"][k] <= hi


def test_differences_between_two_sequences_are_paired():
    rng = np.random.default_rng(2)
    tasks = ["a", "b", "c"]
    first = random_steps(rng, tasks, [40, 40, 40])
    second = [{"tasks": dict(s["tasks"])} for s in first]
    second[2]["tasks"]["a"] = entry("1" * 40)  # the second forgets nothing of task a at the end
    d = CL.ContinualMetrics(tasks, Bootstrap(300))
    d.add_steps("first", first)
    d.add_steps("second", second)
    d.add_steps("again", first)
    for k in CL.METRICS:
        point, (lo, hi) = d.difference("second", "first", k)
        assert point == pytest.approx(d.points["second"][k] - d.points["first"][k]) and lo <= point <= hi
        np.testing.assert_array_equal(d.draws["again"][k], d.draws["first"][k])
        assert d.difference("again", "first", k) == (0.0, (0.0, 0.0))  # the same items: no spread
    # only the final cell of task a differs: its paired draws are those of that cell over T
    cell = (
        100 * np.array([c == "1" for c in first[2]["tasks"]["a"]["correct_items"]])[d.boot.indices("a", 40)]
    )
    np.testing.assert_allclose(
        d.draws["second"]["MFN"] - d.draws["first"]["MFN"], (100 - cell.mean(axis=1)) / 3, atol=1e-9
    )


# ---------------------------------------------------------------------------------------------------------------
# the matrix from step results


def test_future_cells_are_kept_but_enter_no_metric():
    rng = np.random.default_rng(3)
    tasks = ["a", "b"]
    steps = random_steps(rng, tasks, [10, 12])
    entries = CL.step_entries(steps, tasks)
    a = CL.point_matrix(entries)
    assert a[0][1] == pytest.approx(100 * steps[0]["tasks"]["b"]["accuracy"])
    assert CL.cl_metrics(a) == CL.cl_metrics([a[0][:1], a[1]])
    del steps[0]["tasks"]["b"]  # a task not learned yet may be absent
    assert CL.point_matrix(CL.step_entries(steps, tasks))[0] == [a[0][0], None]


def test_step_results_that_cannot_make_a_matrix_are_refused():
    rng = np.random.default_rng(4)
    tasks = ["a", "b"]
    steps = random_steps(rng, tasks, [10, 12], future=False)
    steps[1]["path"] = "after-b.json"
    lacking = [steps[0], {**steps[1], "tasks": {"b": steps[1]["tasks"]["b"]}}]
    with pytest.raises(ForgetlessError, match="after-b.json: step 2 has no result for task 'a'") as e:
        CL.step_entries(lacking, tasks)
    assert "forgetless eval MODEL --tasks a,b" in str(e.value)
    other = [steps[0], {**steps[1], "tasks": {**steps[1]["tasks"], "a": entry("1" * 10, salt="x")}}]
    with pytest.raises(ForgetlessError, match="other items than the step 1 result's"):
        CL.step_entries(other, tasks)
    fewer = [steps[0], {**steps[1], "tasks": {**steps[1]["tasks"], "a": entry("1" * 9)}}]
    with pytest.raises(ForgetlessError, match="scored on 9 items here and on 10 in step 1's result"):
        CL.step_entries(fewer, tasks)
    bare = [steps[0], {**steps[1], "tasks": {**steps[1]["tasks"], "a": {"accuracy": 0.5}}}]
    with pytest.raises(ForgetlessError, match="after-b.json: task 'a' has no per-item results"):
        CL.step_entries(bare, tasks)


# ---------------------------------------------------------------------------------------------------------------
# the command


def write_steps(folder: Path, steps: list[dict]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, s in enumerate(steps, 1):
        (folder / f"after-{t}.json").write_text(json.dumps(s))
        paths.append(str(folder / f"after-{t}.json"))
    return paths


def test_cli_on_result_jsons_writes_the_metrics_matrix_and_heat_map(tmp_path, capsys):
    rng = np.random.default_rng(5)
    tasks = ["a", "b", "c"]
    steps = random_steps(rng, tasks, [20, 30, 25])
    for s in steps:
        s["tasks"]["g"] = {**entry(flags(rng, 8, 0.5)), "kind": "general_text"}
    paths = write_steps(tmp_path / "steps", steps)
    out = tmp_path / "report"
    main(["continual", "eval", *paths, "--tasks", "a,b,c", "--out", str(out)])
    text = capsys.readouterr().out
    rec = json.loads((out / CL.METRICS_FILE).read_text())
    a = [[100 * s["tasks"][n]["accuracy"] for n in tasks] for s in steps]
    np.testing.assert_allclose(rec["matrix"], a)
    for k, v in brute(a).items():
        assert rec["metrics"][k] == pytest.approx(v)
        lo, hi = rec["intervals"][k]
        assert lo <= v <= hi
    assert rec["tasks"] == tasks and rec["steps"] == paths and rec["items"] == {"a": 20, "b": 30, "c": 25}
    assert rec["G"] == pytest.approx([100 * s["tasks"]["g"]["accuracy"] for s in steps])
    assert (out / CL.MATRIX_PLOT).stat().st_size > 1000
    assert "| MFT | MFN | MAA | BWT | Last |" in text
    assert f"| 1. a | {a[0][0]:.1f} | ({a[0][1]:.1f}) | ({a[0][2]:.1f}) | {a[0][0]:.1f} |" in text
    with pytest.raises(SystemExit):  # an existing report is kept without --force
        main(["continual", "eval", *paths, "--tasks", "a,b,c", "--out", str(out)])
    assert "already exists" in capsys.readouterr().err
    main(["continual", "eval", *paths, "--tasks", "a,b,c", "--out", str(out), "--force"])


def test_cli_refuses_before_any_work(tmp_path, capsys):
    rng = np.random.default_rng(6)
    steps = random_steps(rng, ["a", "b", "c"], [5, 5, 5], future=False)
    paths = write_steps(tmp_path / "steps", steps)
    out = tmp_path / "report"
    model = build_llama_with_tokenizer(tmp_path / "model")
    for args, says in [
        ([*paths[:2], "--tasks", "a,b,c"], "2 steps for 3 tasks: step t is the model after learning task t"),
        ([*paths, str(model), "--tasks", "a,b,c"], "4 steps for 3 tasks"),
        (
            [paths[1], paths[0], paths[2], "--tasks", "a,b,c"],
            "after-1.json: step 2 has no result for task 'b' (learned at step 2; it has a)",
        ),
        ([*paths, "--tasks", "a,a,c"], "a task is given twice"),
    ]:
        with pytest.raises(SystemExit):
            main(["continual", "eval", *args, "--out", str(out)])
        assert says in capsys.readouterr().err
    assert not out.exists()


def mc_task(folder: Path, name: str, items: list[tuple[str, list[str], str]]) -> Path:
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"name": name, "kind": "downstream", "metric": "mc"}))
    records = [
        {"id": f"{name}{i}", "question": q, "options": o, "answer": a} for i, (q, o, a) in enumerate(items)
    ]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_cli_end_to_end_on_model_folders_and_a_result_json(tmp_path, capsys):
    from forgetless.eval import evaluate, resolve_task

    models = [build_llama_with_tokenizer(tmp_path / f"m{s}", seed=s) for s in range(2)]
    one = mc_task(
        tmp_path / "tasks" / "sky",
        "sky",
        [("Sky colour?", ["blue", "red"], "blue"), ("Grass colour?", ["green", "grey"], "green")],
    )
    two = mc_task(
        tmp_path / "tasks" / "sums",
        "sums",
        [("Two plus two?", ["four", "five"], "four"), ("One plus one?", ["two", "three"], "two")] * 2,
    )
    tasks = {"sky": resolve_task(one), "sums": resolve_task(two)}
    refs = [evaluate(m, tasks, device="cpu", progress=False, log=None) for m in models]
    out = tmp_path / "report"
    main(
        [
            "continual",
            "eval",
            *map(str, models),
            "--tasks",
            f"{one},{two}",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    rec = json.loads((out / CL.METRICS_FILE).read_text())
    a = [[100 * r["tasks"][n]["accuracy"] for n in tasks] for r in refs]
    np.testing.assert_allclose(rec["matrix"], a)
    assert rec["tasks"] == ["sky", "sums"]
    assert rec["metrics"]["BWT"] == pytest.approx(a[1][0] - a[0][0])
    assert rec["step_results"] == [str(out / "step-1.json"), str(out / "step-2.json")]
    # a step given as the result JSON written for it gives the same matrix
    capsys.readouterr()
    main(
        [
            "continual",
            "eval",
            str(out / "step-1.json"),
            str(models[1]),
            "--tasks",
            f"{one},{two}",
            "--device",
            "cpu",
        ]
    )
    assert f"| 2. sums | {a[1][0]:.1f} | {a[1][1]:.1f} |" in capsys.readouterr().out
    # a given result scored on other items than the task files is refused before any model is loaded
    moved = json.loads((out / "step-1.json").read_text())
    moved["tasks"]["sums"]["item_fingerprints"].reverse()
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    with pytest.raises(SystemExit):
        main(["continual", "eval", str(tmp_path / "moved.json"), str(models[1]), "--tasks", f"{one},{two}"])
    cap = capsys.readouterr()
    assert "moved.json: task 'sums' was scored on other items than the task file's" in cap.err
    assert "evaluating" not in cap.out + cap.err
