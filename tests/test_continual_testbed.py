"""The continual protocol on the testbed (forgetless.testbed.continual) and its report section: the orchestration
with fake fine-tunes, merges, LPM steps and evaluations (no real model), and the report's numbers against brute
force. The real run is RESULTS.md's "Continual merging" section."""

import json
from pathlib import Path

import numpy as np
import pytest

from forgetless.errors import ForgetlessError
from forgetless.testbed import continual as C
from forgetless.testbed import report_continual as RC
from forgetless.testbed import tasks as T

SMALL = {"train": 6, "val": 3, "test": 5}
SEQ = ["spatial", "tag", "largest_colour"]
K = 10  # items per fake evaluation


def _small_tasks(monkeypatch):
    def write_tasks(root, names, **kw):
        return {n: T.write_task(root, n, sizes=None if n == "probes" else SMALL) for n in names}

    monkeypatch.setattr(T, "write_tasks", write_tasks)


def _items(acc: float) -> str:
    k = round(acc * K)
    return "1" * k + "0" * (K - k)


class Fakes:
    """Fine-tunes write adapter folders (recording init_adapter); merges and LPM steps write what they were asked
    into the output folder; evaluation scores a model from that record: a model "knows" task j with accuracy
    0.9 when its record holds task j's adapter, scaled by the rule of its method (see `accuracy`)."""

    def __init__(self, monkeypatch, tmp_path):
        self.finetunes: list[dict] = []
        self.merges: list[dict] = []
        self.steps: list[dict] = []
        self.merge_steps: list[dict] = []
        self.grams: list[str] = []
        self.evals: list[tuple[str, str, tuple, bool]] = []

        def finetune(base, data, out, *, lora=None, init_adapter=None, log=None, force=False, **kw):
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            task = Path(data).parent.name
            self.finetunes.append({"task": task, "out": str(out), "init": init_adapter})
            known = (
                [task]
                if init_adapter is None
                else [*json.loads((Path(init_adapter) / "adapter_config.json").read_text())["known"], task]
            )
            (out / "adapter_config.json").write_text(json.dumps({"known": known}))
            (out / "adapter_model.safetensors").write_bytes(task.encode() * 10)

        def merge(recipe, out, **kw):
            self.merges.append(recipe)
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "record.json").write_text(json.dumps({"merge": recipe}))

        def statistics_step(kind, model_dir, data, path, **kw):
            self.grams.append(str(model_dir))
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(b"g" * 7)
            return Path(path)

        def add_task(state, *, adapter, out, approx=None, cpm_data=None, base=None, **kw):
            state = Path(state)
            have = json.loads((state / "state.json").read_text())["tasks"] if state.exists() else []
            have.append({"adapter": str(Path(adapter).resolve())})
            state.mkdir(parents=True, exist_ok=True)
            (state / "state.json").write_text(
                json.dumps({"format": chain_mod.FORMAT, "version": chain_mod.VERSION, "tasks": have})
            )
            self.steps.append(
                {
                    "state": state.name,
                    "adapter": str(adapter),
                    "approx": approx,
                    "cpm": cpm_data is not None,
                    "out": out,
                }
            )
            if out is not None:
                Path(out).mkdir(parents=True, exist_ok=True)
                (Path(out) / "config.json").write_text("{}")
                (Path(out) / "record.json").write_text(
                    json.dumps(
                        {"lpm": [h["adapter"] for h in have], "approx": approx, "cpm": cpm_data is not None}
                    )
                )

        def evaluate(model, tasks, general, *, cache_dir, split, limit, batch_size, log):
            model = Path(model)
            self.evals.append((model.name, split, tuple(tasks), bool(general)))
            out = {n: {"kind": "downstream", "correct_items": _items(self.accuracy(model, n))} for n in tasks}
            for n in general or {}:
                out[n] = {
                    "kind": "general_text" if n == "probes" else "general_visual",
                    "accuracy": 0.5,
                    "correct_items": _items(0.5),
                }
            for v in out.values():
                v["accuracy"] = v["correct_items"].count("1") / K
            from forgetless.eval.metrics import scores

            res = {"tasks": out}
            res["scores"] = scores(res)
            return res, False

        def merge_step(state, *, model, method, base, out, name, **kw):
            state = Path(state)
            have = json.loads((state / "state.json").read_text())["tasks"] if state.exists() else []
            folded = json.loads((Path(model) / "record.json").read_text())["merge"]["models"][0]
            have.append({"name": name, "adapter": folded.split("+")[1]})
            state.mkdir(parents=True, exist_ok=True)
            (state / "state.json").write_text(json.dumps({"method": method, "tasks": have}))
            self.merge_steps.append(
                {"state": state.name, "method": method, "name": name, "model": Path(model).name}
            )
            if out is not None:
                Path(out).mkdir(parents=True, exist_ok=True)
                (Path(out) / "config.json").write_text("{}")
                record = {"merge_state": method, "adapters": [h["adapter"] for h in have]}
                (Path(out) / "record.json").write_text(json.dumps(record))

        import forgetless
        import forgetless.chains.continual as chain_mod
        import forgetless.chains.continual_merge as merge_mod
        import forgetless.chains.steps as steps_mod

        monkeypatch.setattr("forgetless.train.finetune", finetune)
        monkeypatch.setattr(forgetless, "merge", merge)
        monkeypatch.setattr(steps_mod, "statistics_step", statistics_step)
        monkeypatch.setattr(chain_mod, "add_task", add_task)
        monkeypatch.setattr(chain_mod, "state_bytes", lambda s: 1234)
        monkeypatch.setattr(merge_mod, "merge_step", merge_step)
        monkeypatch.setattr(
            merge_mod, "load_merge_state", lambda s: json.loads((Path(s) / "state.json").read_text())
        )
        monkeypatch.setattr(
            chain_mod, "load_state", lambda s: json.loads((Path(s) / "state.json").read_text())
        )
        monkeypatch.setattr("forgetless.eval.cache.cached_evaluate", evaluate)
        monkeypatch.setattr(C, "routing_accuracy", lambda model, roots: {n: 100.0 for n in roots})

    @staticmethod
    def accuracy(model: Path, task: str) -> float:
        rec = model / "record.json"
        if (model / "adapter_config.json").is_file():  # never evaluated directly: adapters are folded first
            raise AssertionError("an adapter folder was evaluated")
        if not rec.is_file():
            return 0.1  # the base
        r = json.loads(rec.read_text())
        if "lpm" in r:
            known = [Path(a).name for a in r["lpm"]]
            return 0.8 if task in known else 0.1
        if (
            "merge_state" in r
        ):  # MagMax of the sequential chain or OPCM of the own adapters: every task learned
            known = json.loads((Path(r["adapters"][-1]) / "adapter_config.json").read_text())["known"]
            known = {*known, *(Path(a).name for a in r["adapters"])}
            return 0.6 if task in known else 0.1
        m = r["merge"]
        models = [x if isinstance(x, str) else x["model"] for x in m["models"]]
        names = [Path(x.split("+")[-1]).name.removeprefix("own-") for x in models]
        if m["method"] == "task_arithmetic":  # a fold: an own adapter, a sequential adapter or the joint one
            adapter = Path(models[0].split("+")[1])
            known = json.loads((adapter / "adapter_config.json").read_text())["known"]
            if adapter.name == "joint":
                return 0.7
            return 0.9 if task == known[-1] else (0.3 if task in known else 0.1)
        if m["method"] == "lora_task_arithmetic":  # peaks at λ = 0.7
            lam = m["parameters"]["lambda"]
            return (0.6 - abs(lam - 0.7) / 2) if task in names else 0.1
        return 0.5 if task in names else 0.1


@pytest.fixture
def run(monkeypatch, tmp_path):
    _small_tasks(monkeypatch)
    fakes = Fakes(monkeypatch, tmp_path)
    base = tmp_path / "base"
    base.mkdir()

    def go(**kw):
        return C.run_continual(tmp_path / "continual", sequence=SEQ, base=base, log=lambda s: None, **kw)

    return fakes, go, tmp_path


def test_protocol_builds_each_method_from_what_it_may_keep(run):
    fakes, go, tmp_path = run
    res = go()
    T_ = len(SEQ)
    # one adapter per task from the base, the sequential chain continuing the previous adapter, the joint one
    own = [f for f in fakes.finetunes if f["init"] is None and Path(f["out"]).name in SEQ]
    assert [f["task"] for f in own] == SEQ
    chain = [f for f in fakes.finetunes if f["init"] is not None]
    assert [f["task"] for f in chain] == SEQ[1:]
    assert chain[0]["init"] == str(tmp_path / "continual" / "adapters" / SEQ[0])
    assert chain[1]["init"] == chain[0]["out"]
    assert res["sequential"] == [
        str(tmp_path / "continual" / "adapters" / SEQ[0]),
        *(f["out"] for f in chain),
    ]
    # every matrix is lower triangular: row t holds tasks 1..t (and the general tasks after the last one)
    for name, rows in res["matrices"].items():
        assert [r["step"] for r in rows] == list(range(1, T_ + 1)), name
        for t, r in enumerate(rows, 1):
            downstream = [n for n, k in r["kinds"].items() if k == "downstream"]
            assert downstream == SEQ[:t], name
            assert (r["G"] is not None) == (t == T_), name
    # the sequential model forgets: 0.9 on the task just learned, 0.3 on the earlier ones
    seq = res["matrices"]["sequential FT"]
    assert seq[-1]["tasks"] == {
        **{n: 30.0 for n in SEQ[:-1]},
        SEQ[-1]: 90.0,
        **{n: 50.0 for n in [*T.GENERAL_VISUAL, "probes"]},
    }
    # TA's λ chosen on the validation splits after every task (the rule peaks at 0.7), and used on test
    assert res["ta_lambda"] == [0.7] * T_
    ta_test = [m for m in fakes.merges if m["method"] == "lora_task_arithmetic"]
    assert [len(m["models"]) for m in ta_test] == [
        t for t in range(1, T_ + 1) for _ in range(len(C.TA_GRID) + 1)
    ]
    sweeps = [e for e in fakes.evals if e[1] == "val"]
    assert len(sweeps) == len(C.TA_GRID) * T_ and all(e[0] == "sweep" for e in sweeps)
    # RegMean: the folded own models, each with a Gram taken at itself
    reg = [m for m in fakes.merges if m["method"] == "regmean"]
    assert [len(m["models"]) for m in reg] == list(range(1, T_ + 1))
    assert [Path(x["model"]).name for x in reg[-1]["models"]] == [f"own-{n}" for n in SEQ]
    assert sorted(set(fakes.grams)) == sorted(x["model"] for x in reg[-1]["models"])
    # LPM: each state steps once per task, in order, never replayed; the diagonal and CPM states by their options
    by_state: dict[str, list[dict]] = {}
    for s in fakes.steps:
        by_state.setdefault(s["state"], []).append(s)
    assert len(by_state) == 3 and all(len(v) == T_ for v in by_state.values())
    for v in by_state.values():
        assert [Path(s["adapter"]).name for s in v] == SEQ
    assert sorted((str(v[0]["approx"]), v[0]["cpm"]) for v in by_state.values()) == [
        ("None", False),
        ("None", True),
        ("diagonal", False),
    ]
    assert res["matrices"]["LPM + CPM"][-1]["routing"] == {n: 100.0 for n in SEQ}
    # MagMax steps its state once per task on the sequential chain's folded models, OPCM on each own model; each
    # task named by its adapter's fingerprint
    by_method: dict[str, list[dict]] = {}
    for s in fakes.merge_steps:
        by_method.setdefault(s["method"], []).append(s)
    assert sorted(by_method) == ["magmax", "opcm"]
    assert [s["model"] for s in by_method["magmax"]] == ["fold"] * T_
    assert [s["model"] for s in by_method["opcm"]] == [f"own-{n}" for n in SEQ]
    assert [s["name"].rsplit("-", 1)[0] for s in by_method["opcm"]] == SEQ
    # the chain starts with the first own adapter; every later one is another adapter
    assert len({s["name"] for s in fakes.merge_steps}) == 2 * T_ - 1
    state = json.loads(
        (tmp_path / "continual" / "states").glob("magmax-*").__next__().joinpath("state.json").read_text()
    )
    assert [Path(h["adapter"]).name for h in state["tasks"]] == [
        SEQ[0],
        *(Path(f["out"]).name for f in chain),
    ]
    assert res["matrices"]["MagMax"][-1]["tasks"][SEQ[0]] == 60.0
    assert res["kept_bytes"]["MagMax"] == res["kept_bytes"]["OPCM"] == 1234
    assert res["kept_bytes"]["LPM"] == 1234 and res["kept_bytes"]["TA"] == sum(len(n) * 10 for n in SEQ)
    assert res["joint"]["tasks"][SEQ[0]] == 70.0
    # just after learning: each task by its own adapter
    assert [r["tasks"] for r in res["individual"]] == [{n: 90.0} for n in SEQ]


def test_a_second_run_is_cached_and_a_lost_cell_redoes_only_itself(run):
    fakes, go, tmp_path = run
    first = go()
    counts = (len(fakes.finetunes), len(fakes.merges), len(fakes.steps), len(fakes.evals))
    for stamp in [
        *(tmp_path / "continual").rglob("recipe.hash"),
        *(tmp_path / "continual").rglob("adapter.hash"),
    ]:
        stamp.write_text(
            json.loads(stamp.read_text())["key"]
        )  # as earlier versions wrote them: read the same
    again = go()
    assert (len(fakes.finetunes), len(fakes.steps)) == (counts[0], counts[2])
    # only the TA sweep re-merges and re-evaluates the validation splits (its choice is not cached; the harness's
    # cache answers those), and the base row asks the harness again; no cell is rebuilt or evaluated, no own
    # adapter folded again
    assert all(m["method"] == "lora_task_arithmetic" for m in fakes.merges[counts[1] :])
    assert all(e[1] == "val" or e[0] == "base" for e in fakes.evals[counts[3] :])
    for k in ("matrices", "individual", "joint", "ta_lambda"):
        assert json.dumps(again[k], sort_keys=True) == json.dumps(first[k], sort_keys=True)
    # a cell lost after its state stepped past it (and its output was removed): the state is replayed from the
    # first task, and only that cell is evaluated again
    n, e = len(fakes.steps), len(fakes.evals)
    (tmp_path / "continual" / "cells" / f"lpm-{len(SEQ)}.json").unlink()
    go()
    assert [Path(s["adapter"]).name for s in fakes.steps[n:]] == SEQ
    assert [x for x in fakes.evals[e:] if x[1] == "test" and x[0] != "base"] == [
        ("current", "test", tuple(SEQ), True)
    ]
    # the same for a merge state: replayed from the first task when its output is gone, else only the last step
    n = len(fakes.merge_steps)
    (tmp_path / "continual" / "cells" / f"opcm-{len(SEQ)}.json").unlink()
    go()
    assert [s["model"] for s in fakes.merge_steps[n:]] == [f"own-{x}" for x in SEQ]
    n = len(fakes.merge_steps)
    state = next((tmp_path / "continual" / "states").glob("opcm-*")) / "state.json"
    meta = json.loads(state.read_text())
    state.write_text(json.dumps({**meta, "tasks": meta["tasks"][:-1]}))
    (tmp_path / "continual" / "cells" / f"opcm-{len(SEQ)}.json").unlink()
    go()
    assert [s["model"] for s in fakes.merge_steps[n:]] == [f"own-{SEQ[-1]}"]


def test_bad_arguments_are_refused(run):
    _, go, _ = run
    with pytest.raises(ForgetlessError, match="unknown methods"):
        go(methods=["LPM", "EWC"])
    with pytest.raises(ForgetlessError, match="two tasks"):
        C.run_continual("x", sequence=["tag"], log=lambda s: None)


# ------------------------------------------------------------------------------------------------ the report
def _row(step: int, acc: dict[str, str], general: bool = False) -> dict:
    tasks = {n: 100 * c.count("1") / len(c) for n, c in acc.items()}
    kinds = {n: "downstream" for n in acc}
    if general:
        for n, c in (("probes", "1100"), ("colour", "1110")):
            tasks[n], kinds[n] = 100 * c.count("1") / 4, "general_text" if n == "probes" else "general_visual"
            acc = {**acc, n: c}
    return {
        "step": step,
        "tasks": tasks,
        "kinds": kinds,
        "correct_items": dict(acc),
        "G": 62.5 if general else None,
    }


def _results(rng: np.random.Generator) -> dict:
    seq = ["a", "b", "c"]
    draw = {n: "".join("1" if x else "0" for x in rng.random(20) < p) for n, p in zip(seq, (0.9, 0.8, 0.7))}
    worse = {n: "".join("1" if x else "0" for x in rng.random(20) < 0.3) for n in seq}
    m1 = [
        _row(1, {"a": draw["a"]}),
        _row(2, {"a": worse["a"], "b": draw["b"]}),
        _row(3, {"a": worse["a"], "b": worse["b"], "c": draw["c"]}, general=True),
    ]
    m2 = [
        _row(1, {"a": draw["a"]}),
        _row(2, {"a": draw["a"], "b": draw["b"]}),
        _row(3, {"a": draw["a"], "b": draw["b"], "c": draw["c"]}, general=True),
    ]
    individual = [_row(t + 1, {n: draw[n]}) for t, n in enumerate(seq)]
    return {
        "sequence": seq,
        "matrices": {"sequential FT": m1, "LPM": m2},
        "individual": individual,
        "joint": _row(3, draw, general=True),
        "base_row": _row(3, worse, general=True),
        "task_limit": 20,
        "merge_seconds": {"sequential FT": [1.0, 3.0, 2.0], "LPM": [4.0, 4.0, 5.0]},
        "kept_bytes": {"sequential FT": 10, "LPM": 2048},
        "adapter": {
            "lora": {"r": 4, "alpha": 8, "targets": ["q_proj"]},
            "steps": 2,
            "batch_size": 2,
            "lr": 1e-3,
        },
        "ta_grid": [1.0],
        "gram_samples": 4,
        "joint_steps": 6,
        "timings": {},
    }


def test_report_numbers_match_brute_force(tmp_path):
    res = _results(np.random.default_rng(0))
    d = RC.ContinualDraws(res, n_boot=300)
    acc = {
        m: [[r["tasks"][n] for n in res["sequence"][: t + 1]] for t, r in enumerate(rows)]
        for m, rows in res["matrices"].items()
    }
    for m, a in acc.items():
        assert d.points[m]["final"] == pytest.approx(np.mean(a[-1]))
        assert d.points[m]["forgetting"] == pytest.approx(np.mean([a[j][j] - a[-1][j] for j in range(2)]))
        assert d.points[m]["G"] == 62.5
        # the added columns, MCITlib's: the diagonal, the mean of each step's average so far, −forgetting
        assert d.points[m]["MFT"] == pytest.approx(np.mean([a[j][j] for j in range(3)]))
        assert d.points[m]["MAA"] == pytest.approx(np.mean([np.mean(a[t]) for t in range(3)]))
        assert d.points[m]["BWT"] == -d.points[m]["forgetting"]
    assert d.points["LPM"]["forgetting"] == 0.0
    assert d.interval("LPM", "forgetting") == (0.0, 0.0)  # the same items just after and at the end: paired
    lo, hi = d.interval("sequential FT", "forgetting")
    assert lo > 0 and lo <= d.points["sequential FT"]["forgetting"] <= hi
    # the final-average draws by hand, from the bootstrap's own item indices
    boot = d.boot
    by_hand = np.mean(
        [
            np.array([c == "1" for c in res["matrices"]["LPM"][-1]["correct_items"][n]])[
                boot.indices(n, 20)
            ].mean(axis=1)
            * 100
            for n in res["sequence"]
        ],
        axis=0,
    )
    np.testing.assert_allclose(d.draws["LPM"]["final"], by_hand)
    diff, (dlo, dhi) = d.difference("LPM", "sequential FT", "final")
    assert (
        diff == pytest.approx(d.points["LPM"]["final"] - d.points["sequential FT"]["final"])
        and dlo <= diff <= dhi
    )
    assert d.best_baseline() == "sequential FT"
    assert d.points["own adapters"]["final"] == pytest.approx(np.mean([acc["LPM"][-1]]))
    assert d.points["joint LoRA"]["forgetting"] is None


def test_report_markdown_and_plots(tmp_path):
    work = tmp_path / "continual"
    work.mkdir()
    res = _results(np.random.default_rng(1))
    # MagMax with LPM's matrix: the best baseline now, so LPM is paired with it and it with no one
    res["matrices"]["MagMax"] = res["matrices"]["LPM"]
    res["merge_seconds"]["MagMax"], res["kept_bytes"]["MagMax"] = [1.0, 1.0, 1.0], 1024
    (work / "results.json").write_text(json.dumps(res))
    prev = tmp_path / "RESULTS.md"
    prev.write_text(f"x\n{RC.CL_READING_START}\nkept by hand\n{RC.CL_READING_END}\n")
    from forgetless.testbed.report import _reading

    text = RC.continual_markdown(
        work,
        tmp_path / "plots",
        previous=prev,
        reading=_reading(prev, RC.CL_READING_START, RC.CL_READING_END),
    )
    assert (tmp_path / "plots" / "continual-matrices.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "continual-average.png").stat().st_size > 1000
    assert "kept by hand" in text and "Best baseline by final average accuracy: **MagMax**" in text
    assert "| LPM − MagMax |" in text and "| MagMax − " not in text and "plots/continual-matrices.png" in text
    assert "τ_max (one model's size) (1.00 KiB)" in text
    assert "| 3. c |" in text and "the LPM state (2.00 KiB)" in text
