"""The forgetting frontier's arithmetic: F at matched E and the area under a curve against hand computations, the
bootstrap draws against the point values, and the section rendered from a synthetic frontier-val.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forgetless.eval.metrics import Bootstrap, compare, correct_items
from forgetless.testbed import experiment as X
from forgetless.testbed import frontier as FR
from forgetless.testbed.experiment import row_result, task_fields
from forgetless.testbed.report_frontier import Curves, chosen_markdown, frontier_markdown, knob_of


def test_curve_at_is_the_best_f_among_points_that_keep_the_target_e():
    e, f = np.array([0.0, 10.0, 4.0, 8.0]), np.array([0.0, -8.0, -2.0, -9.0])
    got = FR.curve_at(e, f, np.array([0.0, 2.0, 4.0, 7.0, 10.0, 11.0]))
    assert np.allclose(got[:5], [0.0, -2.0, -2.0, -8.0, -8.0]) and np.isnan(got[5])
    draws_e = np.stack([e, e * 2]).T  # [P=4, B=2]
    draws_f = np.stack([f, f]).T
    got = FR.curve_at(draws_e, draws_f, np.array([[5.0, 5.0]]))
    assert np.allclose(got, [[-8.0, -2.0]])  # the second resample's E doubled: the point at 4 → 8 reaches 5


def test_curve_area_is_the_mean_best_f_over_e():
    e, f = np.array([0.0, 5.0, 10.0]), np.array([0.0, -2.0, -6.0])
    # best F: 0 at E = 0, -2 on (0, 5], -6 on (5, 10]: mean (-2·5 - 6·5) / 10 = -4, up to the grid's step
    assert FR.curve_area(e, f, 10.0, n=2001) == pytest.approx(-4.0, abs=0.01)
    draws = FR.curve_area(np.stack([e, e]).T, np.stack([f, 2 * f]).T, np.array([10.0, 10.0]), n=2001)
    assert np.allclose(draws, [-4.0, -8.0], atol=0.02)


def test_the_grid_covers_every_knob_and_puts_the_swept_one_first():
    merges = FR.frontier_merges()
    # one merge per knob value; a curve without a knob (Model Stock) is one point at its fixed parameters
    assert len(merges) == sum(len(k.values) or 1 for k in FR.KNOBS.values() if k.method is not None)
    for m in merges:
        k = FR.KNOBS[m.label]
        assert (m.method, m.task_fisher, m.model, m.learn, m.extract, m.pair) == (
            k.method,
            k.task_fisher,
            k.model,
            k.learn,
            k.extract,
            k.pair,
        )
        assert next(iter(m.params)) == k.knob if k.values else m.params == k.fixed
    (stock,) = [m for m in merges if m.label == "Model Stock"]
    assert stock.method == "model_stock" and stock.pair == "reseeded" and stock.params == {}
    assert knob_of({"knob": "lambda=1 density=0.05"}, "TIES") == 0.05


def test_curves_of_fine_tunes_sweep_the_variant_option_and_share_its_folder():
    """A curve of fine-tunes has one Tune per knob value, with the variant's options and that value; the value the
    variant itself takes names the variant's folder (one fine-tune, not two); the tunes a run needs are the keep
    rules', the pipelines' far ends and the curves' points, once each."""
    ewc = FR.KNOBS["EWC"]
    points = FR.tune_points("EWC")
    assert [t.options for t in points] == [{**X.VARIANTS["ewc"].options, "strength": v} for v in ewc.values]
    assert [t.knob for t in points] == [f"strength={v:g}" for v in ewc.values]
    assert {t.label for t in points} == {"EWC"}
    same = [t for t in points if t.options == X.VARIANTS["ewc"].options]
    assert [t.name for t in same] == ["ewc"] and len({t.name for t in points}) == len(points)
    tunes = FR.frontier_tunes(["EWC", "EWC → CGM", "Replay → WiSE-FT", "WiSE-FT"])
    names = [(t.label, t.name, t.knob) for t in tunes]
    assert len(names) == len(set(names))
    assert {t.name for t in tunes} == {"spider", "magnitude_mask", "ewc", "replay"} | {t.name for t in points}
    assert FR.frontier_tunes(["WiSE-FT"]) == X.KEEPS
    assert FR.seed_dir("w/digits", 0) == Path("w/digits") and FR.seed_dir("w/digits", 2) == Path(
        "w/digits/seed-2"
    )


def _result(acc: dict[str, float], n: int = 200, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    kinds = {"digits": "downstream", "colour": "general_visual", "probes": "general_text"}
    tasks = {}
    for t, a in acc.items():
        flags = rng.random(n) < a
        tasks[t] = {"kind": kinds[t], "accuracy": float(flags.mean()), "correct_items": correct_items(flags)}
    return {"tasks": tasks}


def test_curves_and_section_from_a_frontier_file(tmp_path):
    base = _result({"digits": 0.3, "colour": 0.8, "probes": 0.7}, seed=1)
    ft = _result({"digits": 0.9, "colour": 0.5, "probes": 0.5}, seed=2)
    rows = [("base", "", base), ("fine-tuned", "", ft)]
    for i, lam in enumerate((0.3, 0.6)):
        rows.append(
            (
                "WiSE-FT",
                f"lambda={lam:g}",
                _result(
                    {"digits": 0.3 + 0.6 * lam, "colour": 0.8 - 0.2 * lam, "probes": 0.7 - 0.1 * lam},
                    seed=10 + i,
                ),
            )
        )
    for i, a in enumerate((1.0, 25.0)):
        rows.append(
            (
                "CGM",
                f"alpha={a:g}",
                _result({"digits": 0.8 - 0.01 * a, "colour": 0.6, "probes": 0.6}, seed=20 + i),
            )
        )
    rows.append(("SPIDER", "", _result({"digits": 0.85, "colour": 0.6, "probes": 0.55}, seed=30)))
    for i, rank in enumerate((64, 8)):  # out of order: the table sorts by rank
        acc = {"digits": 0.5 + rank / 200, "colour": 0.7, "probes": 0.6}
        rows.append(("Extracted LoRA", f"rank={rank} lambda=1", _result(acc, seed=40 + i)))
    rows.append(
        ("SPIDER → WiSE-FT", "lambda=0.5", _result({"digits": 0.6, "colour": 0.7, "probes": 0.6}, seed=31))
    )
    out = {"rows": [{"method": m, "knob": k, **compare(r, base, ft), **task_fields(r)} for m, k, r in rows]}
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / FR.RESULTS).write_text(json.dumps(out))
    c = Curves(out, Bootstrap(200, seed=0))
    by = {(r["method"], r["knob"]): r for r in out["rows"]}
    e_ft = by[("fine-tuned", "")]["E"]
    pts = [
        (0.0, 0.0),
        (e_ft, by[("fine-tuned", "")]["F"]),
        *[(by[("WiSE-FT", k)]["E"], by[("WiSE-FT", k)]["F"]) for k in ("lambda=0.3", "lambda=0.6")],
    ]
    want = max(f for e, f in pts if e >= 0.9 * e_ft)
    point, draws = c.at("WiSE-FT", 0.9)
    assert point == pytest.approx(want)
    assert draws.shape == (200,) and abs(np.nanmedian(draws) - point) < 5
    # a resample's curve is the curve of that resample's rows
    boot = c.boot
    d_base = boot.compare(row_result(by[("base", "")]), row_result(by[("base", "")]))
    assert np.allclose(d_base["E"], 0.0)
    # a keep rule's fine-tune merged back runs from the base to that fine-tune, not to the plain one
    sw = c.curves["SPIDER → WiSE-FT"]
    assert np.allclose(sw["E"], [0.0, by[("SPIDER", "")]["E"], by[("SPIDER → WiSE-FT", "lambda=0.5")]["E"]])
    assert np.allclose(sw["F"], [0.0, by[("SPIDER", "")]["F"], by[("SPIDER → WiSE-FT", "lambda=0.5")]["F"]])
    with pytest.raises(ValueError, match="'SPIDER' which has no row|from 'SPIDER'"):
        Curves({"rows": [r for r in out["rows"] if r["method"] != "SPIDER"]}, Bootstrap(20, seed=0))
    md = frontier_markdown(tmp_path, ["digits", "tag"], tmp_path / "plots", reading="READING-KEPT\n")
    assert "READING-KEPT" in md and "Curves not run yet on this task: TIES, DARE, Fisher merging" in md
    assert (
        "Not run yet: tag." in md
        and "| WiSE-FT | lambda 0.3, 0.6 |" in md
        and "| SPIDER | one fine-tune" in md
    )
    assert (tmp_path / "plots" / "frontier-digits.png").stat().st_size > 10_000
    # what the extracted LoRA keeps: E and F of each rank, in rank order, with E's share of the fine-tune's
    line = next(x for x in md.splitlines() if x.startswith("| digits |") and "%)" in x)
    cells = line.strip("|").split("|")[1:]
    r8, r64 = by[("Extracted LoRA", "rank=8 lambda=1")], by[("Extracted LoRA", "rank=64 lambda=1")]
    assert "| task | fine-tune E / F | rank 8 E (share) / F | rank 64 E (share) / F |" in md
    assert (
        cells[1].strip().startswith(f"{r8['E']:+.1f} ± ")
        and f"({r8['E'] / e_ft:.0%}) / {r8['F']:+.1f} ±" in cells[1]
    )
    assert cells[2].strip().startswith(f"{r64['E']:+.1f} ± ") and f"/ {r64['F']:+.1f} ±" in cells[2]


def _row(method: str, knob: str, e: float, f: float) -> dict:
    return {"method": method, "knob": knob, "E": e, "F": f}


def test_choose_takes_the_best_f_that_keeps_the_gain_ends_included():
    rows = [
        _row("base", "", 0, 0),
        _row("fine-tuned", "", 20, -20),
        _row("SPIDER", "", 17, -10),
        _row("WiSE-FT", "lambda=0.5", 19, -9),
        _row("WiSE-FT", "lambda=0.7", 18.5, -4),
        _row("WiSE-FT", "lambda=0.3", 10, -1),
        _row("TIES", "density=0.2", 12, -3),
        _row("SPIDER → WiSE-FT", "lambda=0.5", 15, -2),
    ]
    picks = FR.choose(rows, 0.9)
    # brute force: every curve's points (its ends and its own rows), E ≥ 18, the largest F
    want_wise = max(
        [r for r in rows if r["method"] in ("base", "fine-tuned", "WiSE-FT") and r["E"] >= 18],
        key=lambda r: r["F"],
    )
    assert picks["WiSE-FT"] is want_wise and want_wise["knob"] == "lambda=0.7"
    assert picks["TIES"]["method"] == "fine-tuned"  # its only point below 18: the fine-tune is its choice
    assert picks["SPIDER → WiSE-FT"] is None  # SPIDER's own E (17) is below 18 already
    assert set(picks) == {"WiSE-FT", "TIES", "SPIDER → WiSE-FT"}
    assert FR.choose(rows, 0.5)["SPIDER → WiSE-FT"]["method"] == "SPIDER → WiSE-FT"


def test_a_lora_curve_keeps_a_share_of_the_lora_fine_tunes_e_and_runs_to_it():
    """The LoRA curves start from the LoRA fine-tune and are judged against its E (what a LoRA user has), the other
    curves against the full fine-tune's, whatever the LoRA fine-tune reaches."""
    lora = X.VARIANTS["lora"].label
    rows = [
        _row("base", "", 0, 0),
        _row("fine-tuned", "", 20, -20),
        _row(lora, "", 12, -6),
        _row("LoRA → WiSE-FT", "lambda=0.7", 11, -3),
        _row("LoRA → WiSE-FT", "lambda=0.5", 9, -1),
        _row("LoRA + EWC", "strength=300", 10.5, -2),
        _row("WiSE-FT", "lambda=0.7", 17, -5),
    ]
    picks = FR.choose(rows, 0.9)
    # brute force: 0.9 × 12 = 10.8 for the LoRA curves (their ends: base and the LoRA fine-tune), 18 for WiSE-FT
    assert picks["LoRA → WiSE-FT"]["knob"] == "lambda=0.7"
    assert picks["LoRA + EWC"]["method"] == lora  # its point at 10.5 is below 10.8: the LoRA fine-tune itself
    assert picks["WiSE-FT"]["method"] == "fine-tuned"
    assert [FR.reference(c) for c in ("LoRA → WiSE-FT", "LoRA + EWC", "SPIDER → WiSE-FT", "EWC")] == [
        lora,
        lora,
        "fine-tuned",
        "fine-tuned",
    ]
    assert [FR.is_lora(c) for c in FR.KNOBS].count(True) == 3
    # a LoRA curve of fine-tunes needs the LoRA fine-tune's row, and each LoRA variant trains an adapter
    tunes = FR.frontier_tunes(["LoRA + EWC"], {"LoRA + EWC": [3000.0]})
    assert [t.name for t in tunes] == ["spider", "magnitude_mask", "lora", "lora_ewc-strength=3000"]
    for name in ("lora", "lora_replay", "lora_ewc"):
        assert {**X.FINETUNE, **X.VARIANTS[name].options}["lora"] == X.LORA


def test_chosen_points_on_test_rows_goal_and_differences(tmp_path):
    val = [
        _row("base", "", 0, 0),
        _row("fine-tuned", "", 20, -20),
        _row("SPIDER", "", 17, -10),
        _row("WiSE-FT", "lambda=0.7", 19, -4),
        _row("TIES", "density=0.2", 12, -3),
        _row("SPIDER → WiSE-FT", "lambda=0.5", 10, -2),  # below 0.9 × 20 like SPIDER itself: unreached
    ]
    picks = FR.choose(val, 0.9)
    base = _result({"digits": 0.3, "colour": 0.8, "probes": 0.7}, seed=1)
    models = {
        "fine-tuned": _result({"digits": 0.9, "colour": 0.5, "probes": 0.5}, seed=2),
        "SPIDER": _result({"digits": 0.85, "colour": 0.6, "probes": 0.55}, seed=3),
        "WiSE-FT": _result({"digits": 0.85, "colour": 0.75, "probes": 0.65}, seed=4),
    }
    test_rows = [
        {"method": "base", "knob": "", **compare(base, base, models["fine-tuned"]), **task_fields(base)}
    ]
    for m, knob in (("fine-tuned", ""), ("SPIDER", ""), ("WiSE-FT", "lambda=0.7")):
        test_rows.append(
            {
                "method": m,
                "knob": knob,
                **compare(models[m], base, models["fine-tuned"]),
                **task_fields(models[m]),
            }
        )
    res = FR.chosen_result({"rows": test_rows}, picks, 0.9, log=lambda _: None)
    by = {r["method"]: r for r in res["rows"]}
    assert (
        by["WiSE-FT"]["chosen"] == "lambda=0.7"
        and by["WiSE-FT"]["knob"] == ""
        and by["WiSE-FT"]["val"]["F"] == -4
    )
    assert by["TIES"]["chosen"] == "fine-tuned" and by["TIES"]["E"] == by["fine-tuned"]["E"]
    for task in ("digits", "spatial"):
        (tmp_path / task).mkdir()
        (tmp_path / task / FR.TEST_RESULTS).write_text(json.dumps(res))
    md = chosen_markdown(tmp_path, ["digits", "spatial", "tag"])
    assert "not run yet: tag" in md and "| WiSE-FT | lambda=0.7 (val E +19.0, F -4.0) |" in md
    assert "No point of SPIDER → WiSE-FT keeps that share of E on validation in any task or seed." in md
    assert "| SPIDER → WiSE-FT |" not in md
    # the goal table: the same rows in both tasks, so the means are the rows' own E and F
    e_ft, f_ft, w = by["fine-tuned"]["E"], by["fine-tuned"]["F"], by["WiSE-FT"]
    kept, rec = w["E"] / e_ft, (w["F"] - f_ft) / -f_ft
    line = next(x for x in md.splitlines() if x.startswith("| WiSE-FT | ") and "%" in x)
    assert line.startswith(f"| WiSE-FT | {kept:.0%} [") and f"| {rec:.0%} [" in line
    assert line.endswith("| yes |" if kept >= 0.95 and rec >= 0.9 else "| no |")
    assert (
        "| TIES | +0.0 [+0.0, +0.0] |" not in md
    )  # TIES chose the fine-tune: compared with WiSE-FT, not itself
    assert chosen_markdown(tmp_path, ["count_many"]) == ""
    # the winner's curse: validation minus test of each chosen point, per choice size, over tasks and seeds
    gap_e, gap_f = 19 - w["E"], -4 - w["F"]
    assert f"| WiSE-FT | {gap_e:+.1f} / {gap_f:+.1f} (2) | — |" in md
    (tmp_path / "digits" / "seed-1").mkdir()
    (tmp_path / "digits" / "seed-1" / FR.TEST_RESULTS).write_text(json.dumps(res))
    (tmp_path / "digits" / FR.test_results_name(FR.FEW_ITEMS)).write_text(json.dumps(res))
    md = chosen_markdown(tmp_path, ["digits", "spatial"])
    assert "seeds per task: digits 2, spatial 1" in md
    assert "| WiSE-FT | lambda=0.7 (val E +19.0, F -4.0) / lambda=0.7 (val E +19.0, F -4.0) |" in md
    assert f"| WiSE-FT | {gap_e:+.1f} / {gap_f:+.1f} (3) | {gap_e:+.1f} / {gap_f:+.1f} (1) |" in md


def test_curve_labels_and_keeping_the_other_curves():
    from forgetless.errors import ForgetlessError

    assert FR.curve_labels(["wise-ft", "SPIDER -> wise", "magnitudemask ->", "cgm†"]) == [
        "WiSE-FT",
        "SPIDER → WiSE-FT",
        "MagnitudeMask → WiSE-FT",
        "CGM†",
    ]
    for bad, words in (("cg", "ambiguous"), ("spider", "ambiguous"), ("nope", "not one of")):
        with pytest.raises(ForgetlessError, match=words):
            FR.curve_labels([bad])
    base, ft = (
        {"method": "base", "knob": "", "correct_items": {"d": "1"}},
        {"method": "fine-tuned", "knob": "", "correct_items": {"d": "3"}},
    )
    old = {
        "rows": [
            base,
            ft,
            {"method": "TIES", "knob": "density=0.1"},
            {"method": "CGM", "knob": "alpha=1"},
            {"method": "gone", "knob": ""},
            {"method": "Replay 1:1", "knob": ""},  # the far end Replay → WiSE-FT merges from
            {"method": "Replay → WiSE-FT", "knob": "lambda=0.5"},
            {"method": "EWC λ=300", "knob": ""},  # the end of EWC → CGM, which is run again
        ]
    }
    new = {"rows": [base, ft, {"method": "CGM", "knob": "alpha=5"}]}
    got = FR.keep_curves(new, old, ["CGM", "EWC → CGM"], log=lambda _: None)
    assert [(r["method"], r["knob"]) for r in got["rows"]] == [
        ("base", ""),
        ("fine-tuned", ""),
        ("CGM", "alpha=5"),
        ("TIES", "density=0.1"),
        ("Replay 1:1", ""),
        ("Replay → WiSE-FT", "lambda=0.5"),
    ]
    other_ft = {"rows": [base, {**ft, "correct_items": {"d": "2"}}, {"method": "CGM", "knob": "alpha=5"}]}
    assert FR.keep_curves(other_ft, old, ["CGM"], log=lambda _: None) == other_ft


def test_task_draws_over_seeds_average_the_points_and_resample_the_seeds():
    """A task's results of several seeds: each row's point is the mean of the seeds' points; each resample is a
    mean of the seeds' resamples on the same items (so it lies between them), and identical seeds give the single
    seed's draws exactly."""
    from forgetless.testbed.tables import TaskDraws

    base = _result({"digits": 0.3, "colour": 0.8, "probes": 0.7}, seed=1)

    def run(seed: int) -> dict:
        ft = _result({"digits": 0.9, "colour": 0.5, "probes": 0.5}, seed=seed)
        wise = _result({"digits": 0.7, "colour": 0.7, "probes": 0.6}, seed=seed + 50)
        rows = [("base", base), ("fine-tuned", ft), ("WiSE-FT", wise)]
        return {
            "rows": [{"method": m, "knob": "", **compare(r, base, ft), **task_fields(r)} for m, r in rows]
        }

    one, two = run(2), run(3)
    d1, d2 = TaskDraws({"digits": one}, n_boot=300), TaskDraws({"digits": two}, n_boot=300)
    both = TaskDraws({"digits": [one, two]}, n_boot=300)
    assert both.seeds == {"digits": 2}
    for key in ("E", "F", "E+F"):
        point = both.rows["digits"]["WiSE-FT"][key]
        assert point == pytest.approx(
            (d1.rows["digits"]["WiSE-FT"][key] + d2.rows["digits"]["WiSE-FT"][key]) / 2
        )
        a, b = d1.draws["digits"]["WiSE-FT"][key], d2.draws["digits"]["WiSE-FT"][key]
        mixed = both.draws["digits"]["WiSE-FT"][key]
        assert np.all(mixed >= np.minimum(a, b) - 1e-9) and np.all(mixed <= np.maximum(a, b) + 1e-9)
    same = TaskDraws({"digits": [one, one]}, n_boot=300)
    assert np.array_equal(same.draws["digits"]["WiSE-FT"]["F"], d1.draws["digits"]["WiSE-FT"]["F"])


def test_first_items_rescore_the_task_on_its_first_items_only():
    """Rows cut to the first n task items: T is the accuracy of those items, E and F are against the cut base, and
    the general tasks keep every item."""
    base = _result({"digits": 0.3, "colour": 0.8, "probes": 0.7}, n=300, seed=1)
    ft = _result({"digits": 0.9, "colour": 0.5, "probes": 0.5}, n=300, seed=2)
    rows = [
        {"method": m, "knob": "", **compare(r, base, ft), **task_fields(r)}
        for m, r in (("base", base), ("fine-tuned", ft))
    ]
    cut = {r["method"]: r for r in FR.first_items(rows, "digits", 100)}
    flags = {
        m: [c == "1" for c in r["tasks"]["digits"]["correct_items"][:100]]
        for m, r in (("base", base), ("fine-tuned", ft))
    }
    t_ft, t_base = 100 * np.mean(flags["fine-tuned"]), 100 * np.mean(flags["base"])
    assert cut["fine-tuned"]["T"] == pytest.approx(t_ft) and cut["fine-tuned"]["E"] == pytest.approx(
        t_ft - t_base
    )
    assert (
        cut["fine-tuned"]["F"] == pytest.approx(rows[1]["F"])
        and len(cut["base"]["correct_items"]["digits"]) == 100
    )
    assert len(cut["base"]["correct_items"]["colour"]) == 300
    assert (
        FR.test_results_name(None) == FR.TEST_RESULTS
        and FR.test_results_name(100) == "frontier-test-val100.json"
    )


def test_every_data_free_point_plans_on_a_llava_folder(tmp_path):
    """Each frontier merge that needs no statistics (WiSE-FT, TIES, DARE, SLERP, Breadcrumbs, DELLA …) makes a
    recipe whose parameters the engine accepts at plan time, on a LLaVA base and fine-tune."""
    from conftest import build_tiny_llava

    from forgetless.engine import build_plan

    base, ft = build_tiny_llava(tmp_path / "base"), build_tiny_llava(tmp_path / "ft", seed=1)
    other = build_tiny_llava(tmp_path / "other", seed=2)  # a pair's second fine-tune
    points = [
        m
        for m in FR.frontier_merges()
        if m.task_fisher is None and m.learn is None and m.model is None and not m.extract
    ]
    assert {"slerp", "breadcrumbs", "della_linear", "model_stock"} <= {m.method for m in points}
    for m in points:
        knob = FR.KNOBS[m.label].knob
        recipe = X.merge_recipe(m.method, m.params, base, ft, None)
        recipe["models"] += [str(other)] if m.pair else []
        plan = build_plan(recipe)
        assert plan.recipe.method == m.method and len(plan.recipe.models) == 1 + bool(m.pair)
        if knob:
            got = plan.params[knob.replace("lambda", "lambda_")]
            assert got in (m.params[knob], [m.params[knob]])  # per model: a list
