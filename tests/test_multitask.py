"""The multi-task LoRA experiment (forgetless.testbed.multitask) and its report section: the orchestration with
fake fine-tunes, merges and evaluations (no real model), and the report's numbers against brute force."""

import json
from pathlib import Path

import numpy as np
import pytest

from forgetless.errors import ForgetlessError
from forgetless.testbed import experiment as X
from forgetless.testbed import multitask as M
from forgetless.testbed import report as R
from forgetless.testbed import tasks as T

SMALL = {"train": 12, "val": 5, "test": 7}
SEEN, UNSEEN = ["spatial", "largest_colour", "odd_colour"], ["count_red", "digit_parity"]
GENERAL = [*T.GENERAL_VISUAL, "probes"]


def _small_tasks(monkeypatch):
    def write_tasks(root, names, **kw):
        return {
            n: T.write_task(
                root,
                n,
                sizes=None
                if n == "probes"
                else {**SMALL, "train": SMALL["train"] if T.TASKS[n].sizes.get("train") else 0},
            )
            for n in names
        }

    monkeypatch.setattr(T, "write_tasks", write_tasks)


class Fakes:
    """finetune writes an adapter folder and counts; merge writes the recipe into a model folder; evaluate scores
    a model by a rule of its recipe, so the sweep's choice and the rows can be checked."""

    def __init__(self, monkeypatch):
        self.finetunes: list[tuple[str, int]] = []
        self.ranks: list[int] = []
        self.merges: list[dict] = []
        self.evals: list[tuple[str, str, tuple]] = []

        def finetune(base, data, out, *, lora=None, steps=0, log=None, force=False, **kw):
            assert (
                lora is not None and lora.targets == X.LORA["targets"]
            )  # a LoraSpec, from the recipe's dict
            self.ranks.append(lora.r)
            self.finetunes.append((Path(data).parent.name, steps))
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "adapter_config.json").write_text(json.dumps({"data": str(data)}))

        def merge(recipe, out, **kw):
            self.merges.append(recipe)
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "recipe.json").write_text(json.dumps(recipe))

        def evaluate(model, tasks, general, *, cache_dir, split, limit, batch_size, log):
            model = Path(model)
            recipe = (
                json.loads((model / "recipe.json").read_text()) if (model / "recipe.json").is_file() else None
            )
            self.evals.append((model.name, split, tuple(tasks)))
            lam = (recipe or {}).get("parameters", {}).get("lambda", 0.0)
            method = (recipe or {}).get("method", "base")
            out = {}
            for n in [*tasks, *(general or {})]:
                # accuracy peaks at λ = 0.5 for every method; CoPA gets 0.9 on everything
                acc = 0.9 if method == "copa" else max(0.0, 1.0 - abs(lam - 0.5))
                if method == "base":
                    acc = 0.25
                k = 4
                items = "1" * round(acc * k) + "0" * (k - round(acc * k))
                kind = (
                    ("general_text" if n == "probes" else "general_visual")
                    if n in (general or {})
                    else "downstream"
                )
                out[n] = {"kind": kind, "accuracy": items.count("1") / k, "correct_items": items}
            from forgetless.eval.metrics import scores

            res = {"tasks": out}
            res["scores"] = scores(res)
            return res, False

        monkeypatch.setattr("forgetless.train.finetune", finetune)
        monkeypatch.setattr("forgetless.eval.cache.cached_evaluate", evaluate)
        monkeypatch.setattr(M, "_available", lambda m: m != "lora_missing")
        self.merge = merge


@pytest.fixture
def base(tmp_path):
    b = tmp_path / "base"
    b.mkdir()
    (b / "config.json").write_text("{}")
    (b / "model.safetensors").write_bytes(b"weights")
    return b


def test_run_multitask_sweeps_on_validation_reuses_adapters_and_skips_missing_methods(
    tmp_path, base, monkeypatch
):
    _small_tasks(monkeypatch)
    f = Fakes(monkeypatch)
    merges = [
        ("TA", "lora_task_arithmetic", {}),
        ("TIES", "lora_ties", {"density": 0.2}),
        ("DARE", "lora_dare_linear", {"density": 0.3}),
        ("CoPA", "copa", {"lambda": 2.0, "density": 0.2, "variant": "paper"}),
        ("gone", "lora_missing", {}),
        ("TSV-M", "tsv_m", {"lambda": 1.0}),
        ("Iso-C", "iso_c", {}),
    ]
    sweep = {
        "lora_task_arithmetic": [0.3, 0.5, 1.0],
        "lora_ties": [1.0, 2.0],
        "lora_dare_linear": "TA",
        "iso_c": [0.5, 1.5],
    }
    kw = {
        "seen": SEEN,
        "unseen": UNSEEN,
        "merges": merges,
        "sweep": sweep,
        "tasks_root": tmp_path / "tasks",
        "base": base,
        "merge": f.merge,
        "log": lambda s: None,
    }
    res = M.run_multitask(tmp_path / "mt", **kw)
    # one adapter per seen task and one joint adapter with steps per task × tasks
    assert f.finetunes == [
        *((n, M.ADAPTER["steps"]) for n in SEEN),
        ("joint-data", M.JOINT_STEPS_PER_TASK * 3),
    ]
    # the sweep picked the λ with the best validation score (0.5 for TA; the grid's best, 1.0, for TIES); DARE
    # takes TA's
    assert res["chosen"] == {
        "TA": "lambda=0.5",
        "TIES": "density=0.2 lambda=1",
        "DARE": "density=0.3 lambda=0.5",
        "CoPA": "lambda=2 density=0.2 variant=paper",
        "TSV-M": "lambda=1",
        "Iso-C": "lambda=0.5",
    }
    assert [s["knob"] for s in res["sweep"]] == [
        "lambda=0.3",
        "lambda=0.5",
        "lambda=1",
        "density=0.2 lambda=1",
        "density=0.2 lambda=2",
        "lambda=0.5",
        "lambda=1.5",
    ]
    assert res["skipped"] == ["gone (lora_missing)"]
    # the sweep and the adapter checks ran on validation only; nothing on test was used to choose
    assert {s for m, s, _ in f.evals if m == "sweep"} == {"val"}
    val_models = {m for m, s, _ in f.evals if s == "val"}
    assert val_models == {"base", "sweep", *(f"own-{n}" for n in SEEN)}
    # merges: the adapters in seen order, folded; the own adapters folded alone by task arithmetic at λ = 1
    adapters = [tmp_path / "mt" / "adapters" / n for n in SEEN]
    real = [r for r in f.merges if r.get("fold")]
    assert all(r["models"] == [str(a) for a in adapters] for r in real)
    # the weight-space merges take each adapter folded into the base, in seen order
    weights = [r for r in f.merges if r["method"] in ("tsv_m", "iso_c")]
    assert [r["method"] for r in weights] == ["iso_c", "iso_c", "tsv_m", "iso_c"]  # Iso-C's sweep, then test
    assert all(r["models"] == [f"{base}+{a}" for a in adapters] and "fold" not in r for r in weights)
    folds = [r for r in f.merges if not r.get("fold") and r not in weights]
    assert all(r["method"] == "task_arithmetic" and r["parameters"] == {"lambda": 1.0} for r in folds)
    assert {r["models"][0].split("+")[1] for r in folds} == {
        str(tmp_path / "mt" / "adapters" / n) for n in [*SEEN, "joint"]
    }
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == [
        "base",
        *(f"own adapter: {n}" for n in SEEN),
        "joint LoRA",
        "TA",
        "TIES",
        "DARE",
        "CoPA",
        "TSV-M",
        "Iso-C",
    ]
    assert set(rows["own adapter: spatial"]["tasks"]) == {"spatial", *GENERAL}
    assert set(rows["CoPA"]["tasks"]) == {*SEEN, *UNSEEN, *GENERAL}
    assert rows["CoPA"]["tasks"]["count_red"] == 100 * round(0.9 * 4) / 4
    assert json.loads((tmp_path / "mt" / "results.json").read_text())["chosen"] == res["chosen"]
    # a second run reuses every adapter (same recipe, base and training data)
    n = len(f.finetunes)
    M.run_multitask(tmp_path / "mt", **kw)
    assert len(f.finetunes) == n
    # a changed recipe trains again
    M.run_multitask(tmp_path / "mt", adapter_recipe={"lr": 1e-4}, **kw)
    assert len(f.finetunes) == n + len(SEEN) + 1


def test_unseen_tasks_are_in_no_training_data(tmp_path, base, monkeypatch):
    _small_tasks(monkeypatch)
    roots = T.write_tasks(tmp_path / "tasks", [*SEEN, *UNSEEN])
    joint = M.joint_data(roots, SEEN, tmp_path / "joint")
    train_rows = [json.loads(x) for x in (joint / "train.jsonl").read_text().splitlines()]
    assert len(train_rows) == len(SEEN) * SMALL["train"]
    assert {r["id"].rsplit("-", 2)[0] for r in train_rows} == set(SEEN)
    unseen_questions = {
        json.loads(x)["question"] for n in UNSEEN for x in (roots[n] / "test.jsonl").read_text().splitlines()
    }
    assert unseen_questions == {"How many red shapes are there?", "Is this digit odd or even?"}
    assert not unseen_questions & {r["question"] for r in train_rows}
    for n in UNSEEN:
        assert (roots[n] / "train.jsonl").read_text() == ""
        assert json.loads((roots[n] / "task.json").read_text())["role"] == "unseen"
    with pytest.raises(ForgetlessError, match="both seen and unseen"):
        M.run_multitask(
            tmp_path / "mt",
            seen=["spatial", "count_red"],
            unseen=["count_red"],
            base=base,
            tasks_root=tmp_path / "tasks",
            merge=lambda *a, **k: None,
            log=lambda s: None,
        )


def test_lora_finetune_is_cached_by_recipe(tmp_path, base, monkeypatch):
    _small_tasks(monkeypatch)
    f = Fakes(monkeypatch)
    root = T.write_tasks(tmp_path / "tasks", ["odd_colour"])["odd_colour"]
    out = tmp_path / "adapter"
    assert X.finetuned_model(base, root, out, M.ADAPTER, lambda s: None) == out
    X.finetuned_model(base, root, out, M.ADAPTER, lambda s: None)
    assert len(f.finetunes) == 1
    X.finetuned_model(base, root, out, {**M.ADAPTER, "lora": {**X.LORA, "r": 8}}, lambda s: None)
    assert len(f.finetunes) == 2 and f.ranks == [16, 8]
    assert X.finetune_key(base, root, M.ADAPTER) != X.finetune_key(base, root, {**M.ADAPTER, "lr": 1e-3})


# ---------------------------------------------------------------------------------------------------- report


def _fake_results(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    seen, unseen, general = ["a", "b"], ["u"], ["colour", "probes"]
    n = {"a": 40, "b": 30, "u": 50, "colour": 20, "probes": 25}
    kinds = {
        "a": "downstream",
        "b": "downstream",
        "u": "downstream",
        "colour": "general_visual",
        "probes": "general_text",
    }

    def row(method, role, tasks, **extra):
        items = {t: "".join(rng.choice(["0", "1"], size=n[t])) for t in tasks}
        acc = {t: 100 * c.count("1") / len(c) for t, c in items.items()}
        return {
            "method": method,
            "role": role,
            "knob": "",
            "tasks": acc,
            "kinds": {t: kinds[t] for t in tasks},
            "correct_items": items,
            "G_v": acc["colour"],
            "G_t": acc["probes"],
            "G": (acc["colour"] + acc["probes"]) / 2,
            **extra,
        }

    everything = [*seen, *unseen, *general]
    rows = [
        row("base", "base", everything),
        row("own adapter: a", "own", ["a", *general], task="a"),
        row("own adapter: b", "own", ["b", *general], task="b"),
        row("joint LoRA", "joint", everything),
        row("TA", "merge", everything),
        row("CoPA", "merge", everything),
    ]
    return {
        "seen": seen,
        "unseen": unseen,
        "general": general,
        "rows": rows,
        "adapter": M.ADAPTER,
        "joint_steps": 240,
        "validation": {"a": {"base_val": 20, "adapter_val": 90, "learned": True}},
        "sweep": [{"method": "TA", "knob": "lambda=0.5", "seen_val": 61.0}],
        "chosen": {"TA": "lambda=0.5"},
        "skipped": [],
        "timings": {"finetune": 1, "merge": 2, "evaluate": 3},
        "threads": 2,
    }


def test_report_averages_equal_brute_force(tmp_path):
    res = _fake_results()
    d = R.MultitaskDraws(res, n_boot=200)
    rows = {r["method"]: r for r in res["rows"]}

    def acc(r, t):
        c = r["correct_items"][t]
        return 100 * sum(ch == "1" for ch in c) / len(c)

    for name in ("base", "joint LoRA", "TA", "CoPA"):
        r = rows[name]
        assert d.points[name]["seen"] == pytest.approx((acc(r, "a") + acc(r, "b")) / 2)
        assert d.points[name]["unseen"] == pytest.approx(acc(r, "u"))
        assert d.points[name]["G"] == pytest.approx((acc(r, "colour") + acc(r, "probes")) / 2)
        for key in d.KEYS:
            lo, hi = d.interval(name, key)
            assert lo <= d.points[name][key] + 1e-9 and d.points[name][key] <= hi + 1e-9
    own = d.points[R.OWN]
    assert own["seen"] == pytest.approx(
        (acc(rows["own adapter: a"], "a") + acc(rows["own adapter: b"], "b")) / 2
    )
    assert own["unseen"] is None
    assert own["G"] == pytest.approx((rows["own adapter: a"]["G"] + rows["own adapter: b"]["G"]) / 2)
    # the seen average's draws are the mean of the two tasks' resampled accuracies on the shared item draws
    boot = d.boot
    by_hand = (
        np.mean(
            [
                np.array(
                    [
                        [rows["TA"]["correct_items"][t][i] == "1" for i in idx]
                        for idx in boot.indices(t, len(rows["TA"]["correct_items"][t]))
                    ]
                ).mean(1)
                for t in ("a", "b")
            ],
            axis=0,
        )
        * 100
    )
    assert np.allclose(d.draws["TA"]["seen"], by_hand)
    # the paired difference CoPA − TA
    point, (lo, hi) = d.difference("CoPA", "TA", "unseen")
    assert point == pytest.approx(acc(rows["CoPA"], "u") - acc(rows["TA"], "u"))
    assert lo <= point <= hi


def test_report_section_keeps_its_reading_and_draws_the_plot(tmp_path):
    wd = tmp_path / "testbed" / "multitask"
    wd.mkdir(parents=True)
    (wd / "results.json").write_text(json.dumps(_fake_results()))
    prev = tmp_path / "RESULTS.md"
    prev.write_text(f"x\n{R.MT_READING_START}\nCoPA loses here, by hand.\n{R.MT_READING_END}\n")
    text = R.multitask_markdown(wd, tmp_path / "docs", previous=prev)
    assert "## Merging LoRA adapters of several tasks" in text
    assert f"{R.MT_READING_START}\nCoPA loses here, by hand.\n{R.MT_READING_END}" in text
    assert (tmp_path / "docs" / "multitask-seen-unseen.png").stat().st_size > 1000
    assert "](docs/multitask-seen-unseen.png)" in text
    d = R.MultitaskDraws(_fake_results())
    line = next(x for x in text.splitlines() if x.startswith("| CoPA |"))
    assert f"{d.points['CoPA']['seen']:.1f} ±" in line and f"{d.points['CoPA']['unseen']:.1f} ±" in line
    diff = next(x for x in text.splitlines() if x.startswith("| CoPA | ") and "[" in x)
    assert f"{d.points['CoPA']['seen'] - d.points['TA']['seen']:+.1f} [" in diff
    own = next(x for x in text.splitlines() if x.startswith(f"| {R.OWN} |") and "—" in x)
    assert own.count("—") >= 1  # no unseen score for the own adapters
    # the paired differences against the best merge on the seen average, when it is not TA
    merges = [r["method"] for r in _fake_results()["rows"] if r["role"] == "merge"]
    assert max(merges, key=lambda m: d.points[m]["seen"]) == "CoPA"
    assert "Against the best merge on the seen average, **CoPA**" in text and "| Δ seen avg vs CoPA |" in text
