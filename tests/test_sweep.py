"""`forgetless sweep` and the evaluation cache, on a tiny model with the SmolLM2 tokenizer: the grid's end points
are the base and the fine-tuned models, so their scores must equal those models' own evaluations."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import build_llama_with_tokenizer

from forgetless.cli import cli
from forgetless.errors import ForgetlessError
from forgetless.eval.cache import cached_evaluate, weights_digest
from forgetless.eval.harness import evaluate
from forgetless.eval.sweep import Rule, choose, parse_param


def _task(folder, name, kind, rows):
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"name": name, "kind": kind, "metric": "mc"}))
    (folder / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text(
        "".join(
            json.dumps({**r, "id": f"t{r['id']}", "question": r["question"] + " Again?"}) + "\n"
            for r in rows[::-1]
        )
    )
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    base = build_llama_with_tokenizer(root / "base", seed=0)
    ft = build_llama_with_tokenizer(root / "ft", seed=1)
    opts = ["red", "green", "blue", "yellow"]
    t = _task(
        root / "tasks" / "colours",
        "colours",
        "downstream",
        [
            {"id": str(i), "question": f"Colour {i}?", "answer": opts[i % 4], "options": opts}
            for i in range(8)
        ],
    )
    g = _task(
        root / "tasks" / "facts",
        "facts",
        "general_text",
        [
            {"id": str(i), "question": f"Fact {i}?", "answer": "yes", "options": ["yes", "no", "maybe"]}
            for i in range(6)
        ],
    )
    return root, base, ft, t, g


def test_choose_rule():
    pts = [{"T": 90.0, "G": 50.0}, {"T": 99.0, "G": 40.0}, {"T": 98.0, "G": 45.0}, {"T": 97.9, "G": 80.0}]
    assert choose(pts, 100.0, 0.98) == (pts[2], True)  # best G among T >= 98
    assert choose(pts, 200.0, 0.98) == (pts[1], False)  # none qualifies: highest T
    assert choose([], 1.0) == (None, False)
    ft = {"T": 100.0, "G": 30.0, "E": 40.0, "F": -20.0}
    pts = [
        {"T": 90, "G": 50, "E": 30, "F": -5},
        {"T": 99, "G": 40, "E": 39, "F": -12},
        {"T": 98, "G": 45, "E": 38, "F": -9},
        {"T": 96, "G": 46, "E": 36, "F": -8},
    ]
    assert choose(pts, ft, Rule(keep_gain=0.95)) == (pts[2], True)  # E ≥ 38: best F
    assert choose(pts, ft, Rule(keep_gain=0.99)) == (pts[1], False)  # none: the highest E
    assert choose(pts, ft, Rule(max_loss=8.5)) == (pts[3], True)  # F ≥ −8.5: best E
    assert choose(pts, ft, Rule(max_loss=1)) == (pts[0], False)  # none: the highest F
    with pytest.raises(ForgetlessError, match="one target"):
        Rule(keep_gain=0.9, max_loss=2)
    with pytest.raises(ForgetlessError, match="fraction"):
        Rule(keep_gain=95)
    assert parse_param("cgm:alpha=0.05,0.2,1") == ("cgm", "alpha", [0.05, 0.2, 1.0])
    assert parse_param("lambda=0.5") == (None, "lambda", [0.5])
    with pytest.raises(ForgetlessError, match="NAME=V1"):
        parse_param("lambda")


def test_cache_reuses_identical_weights_and_sees_changes(setup, tmp_path):
    _root, base, ft, t, g = setup
    r1, c1 = cached_evaluate(base, {"colours": t}, {"facts": g}, cache_dir=tmp_path, split="val", log=None)
    r2, c2 = cached_evaluate(base, {"colours": t}, {"facts": g}, cache_dir=tmp_path, split="val", log=None)
    assert (c1, c2) == (False, True) and r1["scores"] == r2["scores"]
    direct = evaluate(base, {"colours": t}, general={"facts": g}, split="val", log=None, progress=False)
    assert r1["scores"] == direct["scores"]
    assert weights_digest(base) != weights_digest(ft)


def test_sweep_end_points_are_the_base_and_the_finetuned_model(setup, tmp_path):
    _root, base, ft, t, g = setup
    recipe = tmp_path / "wise.yaml"
    recipe.write_text(f"method: linear\nbase: {base}\nmodels: [{ft}]\n")
    res = CliRunner().invoke(
        cli,
        [
            "sweep",
            str(recipe),
            "--param",
            "lambda=0,1",
            "--tasks",
            str(t),
            "--general",
            str(g),
            "--workdir",
            str(tmp_path / "w"),
            "--min-task-ratio",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "w" / "sweep.json").read_text())
    p0, p1 = out["points"]
    for key in ("T", "G_t"):
        assert p0[key] == out["base"][key] and p1[key] == out["finetuned"][key]
    assert p0["intervals"]["E"] == [0.0, 0.0]  # λ = 0 is the base: E paired with itself is exactly 0
    lo, hi = p1["intervals"]["T"]
    assert lo <= p1["T"] <= hi and "±" in res.output
    assert (tmp_path / "w" / "sweep.png").stat().st_size > 1000
    assert out["chosen"] in out["points"] and "chosen" in res.output
    assert not (tmp_path / "w" / "merged" / "linear-lambda-0").exists()  # scratch merges are removed


def test_sweep_refuses_a_parameter_no_recipe_has(setup, tmp_path):
    _root, base, ft, t, g = setup
    recipe = tmp_path / "wise.yaml"
    recipe.write_text(f"method: linear\nbase: {base}\nmodels: [{ft}]\n")
    res = CliRunner().invoke(
        cli,
        [
            "sweep",
            str(recipe),
            "--param",
            "linear:alpha=1",
            "--tasks",
            str(t),
            "--general",
            str(g),
            "--workdir",
            str(tmp_path / "w"),
        ],
    )
    assert res.exit_code != 0 and "no parameter 'alpha'" in str(res.exception or res.output)


def test_sweep_picks_by_the_users_target_and_reports_the_held_out_split(setup, tmp_path):
    _root, base, ft, t, g = setup
    wise = tmp_path / "wise.yaml"
    wise.write_text(f"method: linear\nbase: {base}\nmodels: [{ft}]\n")
    ta = tmp_path / "ta.yaml"
    ta.write_text(f"method: task_arithmetic\nbase: {base}\nmodels: [{ft}]\n")
    res = CliRunner().invoke(
        cli,
        [
            "sweep",
            str(wise),
            str(ta),
            "--param",
            "lambda=0,0.5,1",
            "--tasks",
            str(t),
            "--general",
            str(g),
            "--workdir",
            str(tmp_path / "w"),
            "--max-loss",
            "0",
            "--held-out",
            "test",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "w" / "sweep.json").read_text())
    assert len(out["points"]) == 6 and out["rule"] == "best E with F ≥ −0"
    ok = [p for p in out["points"] if p["F"] >= 0]
    assert out["chosen"] == max(ok, key=lambda p: (p["E"], p["F"]))  # λ = 0 (the base) qualifies at least
    h = out["held_out"]
    assert h["split"] == "test" and h["intervals"]["E"][0] <= h["E"] <= h["intervals"]["E"][1]
    direct = cached_evaluate(
        base, {"colours": t}, {"facts": g}, cache_dir=tmp_path / "w" / "eval-cache", split="test", log=None
    )[0]
    assert direct["split"] == "test" and "(held out)" in res.output
    if out["chosen"]["value"] == 0:  # the base itself: E and F exactly 0 on the held-out split too
        assert h["E"] == 0 and h["F"] == 0 and h["rule_met"]


def test_sweep_under_torchrun_is_one_process_group_and_gives_the_one_process_result(setup, tmp_path):
    """2 gloo ranks: rank 0 merges each point and writes the cache and the result, every rank evaluates its share;
    the chosen point, every point's scores and intervals are the one process's; one group, ended once."""
    import dist_worker as W

    _root, base, ft, t, g = setup
    recipe = tmp_path / "wise.yaml"
    recipe.write_text(f"method: linear\nbase: {base}\nmodels: [{ft}]\n")

    def args(work):
        return [
            "sweep",
            str(recipe),
            "--param",
            "lambda=0,0.5,1",
            "--tasks",
            str(t),
            "--general",
            str(g),
            "--workdir",
            str(tmp_path / work),
            "--min-task-ratio",
            "0",
            "--device",
            "cpu",
        ]

    res = CliRunner().invoke(cli, args("one"))
    assert res.exit_code == 0, res.output
    assert W.torchrun("cli", tmp_path / "probe", *args("two"), timeout=300) == [0]
    one, two = (json.loads((tmp_path / w / "sweep.json").read_text()) for w in ("one", "two"))
    assert (
        two["chosen"] == one["chosen"] and two["base"] == one["base"] and two["finetuned"] == one["finetuned"]
    )
    for p, q in zip(one["points"], two["points"], strict=True):
        assert q == p
    assert sorted(p.name for p in (tmp_path / "two" / "eval-cache").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "eval-cache").iterdir()
    )
    assert not (tmp_path / "two" / "merged").exists() or not any((tmp_path / "two" / "merged").iterdir())
