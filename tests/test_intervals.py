"""Bootstrap intervals over test items (forgetless.eval.metrics.Bootstrap) against brute-force loops and the
normal approximation, paired differences, seeds, and the tables that show them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forgetless.errors import ForgetlessError
from forgetless.eval.metrics import Bootstrap, correct_items, intervals, item_correct
from forgetless.eval.report import cell, format_table, table_row


def result(**tasks) -> dict:
    """{name: (kind, bool array)} as an evaluation result."""
    return {
        "split": "test",
        "tasks": {
            n: {"kind": k, "n": len(c), "accuracy": float(np.mean(c)), "correct_items": correct_items(c)}
            for n, (k, c) in tasks.items()
        },
    }


def flags(rng, n, p) -> np.ndarray:
    return rng.random(n) < p


def test_correct_items_round_trip_and_predictions_fallback():
    c = [True, False, False, True]
    assert correct_items(c) == "1001"
    assert item_correct({"correct_items": "1001"}).tolist() == c
    assert item_correct({"predictions": [{"correct": x} for x in c]}).tolist() == c
    with pytest.raises(ForgetlessError, match="per-item"):
        item_correct({"accuracy": 0.5}, "quiz")


def test_scores_on_each_resample_equal_a_brute_force_loop():
    rng = np.random.default_rng(1)
    res = result(
        task=("downstream", flags(rng, 23, 0.4)),
        a=("general_visual", flags(rng, 17, 0.7)),
        b=("general_visual", flags(rng, 11, 0.5)),
        probes=("general_text", flags(rng, 29, 0.6)),
    )
    boot = Bootstrap(n_boot=50, seed=3)
    got = boot.scores(res)
    for k in range(50):  # recompute draw k by hand from the same indices
        acc = {}
        for name, t in res["tasks"].items():
            c = [ch == "1" for ch in t["correct_items"]]
            idx = boot.indices(name, len(c))[k]
            acc[name] = sum(c[i] for i in idx) / len(idx)
        gv = (acc["a"] + acc["b"]) / 2
        assert got["T"][k] == pytest.approx(100 * acc["task"], abs=1e-9)
        assert got["G_v"][k] == pytest.approx(100 * gv, abs=1e-9)
        assert got["G"][k] == pytest.approx(100 * (gv + acc["probes"]) / 2, abs=1e-9)


def test_interval_of_one_accuracy_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    c = flags(rng, 1000, 0.5)
    p = c.mean()
    lo, hi = intervals(result(t=("downstream", c)), n_boot=4000)["T"]
    se = 100 * math.sqrt(p * (1 - p) / len(c))
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.08)
    assert lo < 100 * p < hi


def test_paired_difference_matches_its_closed_form_and_is_tighter_than_unpaired():
    rng = np.random.default_rng(2)
    n = 800
    base = flags(rng, n, 0.6)
    model = base.copy()
    flip = rng.random(n) < 0.1  # the model disagrees with the base on 10% of the items
    model[flip] = ~model[flip]
    boot = Bootstrap(n_boot=4000, seed=0)
    m, b = result(t=("downstream", model)), result(t=("downstream", base))
    e = boot.compare(m, b)["E"]
    d = model.astype(float) - base.astype(float)  # per-item difference: its variance / n is E's variance
    se = 100 * d.std() / math.sqrt(n)
    lo, hi = boot.interval(e)
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.08)
    assert np.allclose(e, boot.difference_draws(m, b, "T")) and np.allclose(
        e, boot.difference_draws(m, b, "E")
    )
    point, interval = boot.difference(m, b, "E")
    assert point == pytest.approx(100 * d.mean()) and interval == boot.interval(e)
    unpaired = (
        1.96 * 100 * math.sqrt(model.mean() * (1 - model.mean()) / n + base.mean() * (1 - base.mean()) / n)
    )
    assert (hi - lo) / 2 < unpaired / 2  # pairing: much tighter than two independent intervals


def test_the_same_items_get_the_same_draws_in_every_instance_and_other_items_others():
    a, b = Bootstrap(seed=0), Bootstrap(seed=0)
    assert np.array_equal(a.indices("colour", 50), b.indices("colour", 50))
    assert not np.array_equal(a.indices("colour", 50), a.indices("shape", 50))
    assert not np.array_equal(a.indices("colour", 50), Bootstrap(seed=1).indices("colour", 50))


def test_seeds_are_resampled_too():
    rng = np.random.default_rng(4)
    seeds = [result(t=("downstream", flags(rng, 400, p))) for p in (0.3, 0.5, 0.7)]
    boot = Bootstrap(n_boot=3000, seed=0)
    over_seeds = boot.interval(boot.scores(seeds)["T"])
    one = boot.interval(boot.scores(seeds[1])["T"])
    assert over_seeds[1] - over_seeds[0] > 3 * (one[1] - one[0])  # the seeds' spread dominates
    assert over_seeds[0] < 40 and over_seeds[1] > 60


def test_compare_refuses_results_of_other_items():
    rng = np.random.default_rng(5)
    with pytest.raises(ForgetlessError, match="differs"):
        intervals(
            result(t=("downstream", flags(rng, 10, 0.5))), result(t=("downstream", flags(rng, 11, 0.5)))
        )


def test_table_shows_half_widths():
    assert cell(30.0, True, (27.9, 32.1)) == "+30.0 ± 2.1"
    assert cell(None, True, (0, 1)) == "—" and cell(62.25) == "62.2"
    rng = np.random.default_rng(6)
    base = result(t=("downstream", flags(rng, 200, 0.2)), g=("general_text", flags(rng, 200, 0.6)))
    ft = result(t=("downstream", flags(rng, 200, 0.7)), g=("general_text", flags(rng, 200, 0.5)))
    boot = Bootstrap()
    rows = [table_row("base", base, base, boot=boot), table_row("ft", ft, base, boot=boot)]
    text = format_table(rows)
    lo, hi = rows[1]["intervals"]["E"]
    assert f"{rows[1]['E']:+.1f} ± {(hi - lo) / 2:.1f}" in text
    assert "+0.0 ± 0.0" in text  # the base against itself
