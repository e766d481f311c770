"""The testbed experiment's plumbing: the general calibration set, the merge recipes it builds, and the whole
orchestration with fake fine-tunes, statistics, merges and evaluations (no real model): which model each step
takes, the rows against hand-computed scores, and every step reused on a second run (the real runs are
RESULTS.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_llava

from forgetless.recipe import load_recipe
from forgetless.testbed import context as C
from forgetless.testbed import experiment as X
from forgetless.testbed import frontier as FR
from forgetless.testbed import tasks as T
from forgetless.train import LoraSpec


def test_general_calibration_takes_train_visual_samples_and_only_the_probes_val_split(tmp_path):
    for name in [*T.GENERAL_VISUAL, "probes"]:
        T.write_task(tmp_path / "tasks", name, sizes={"train": 12, "val": 2, "test": 2})
    out = X.general_calibration(tmp_path / "tasks", tmp_path / "general.jsonl", per_task=3)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    visual = [r for r in rows if "image" in r]
    assert len(visual) == 3 * len(T.GENERAL_VISUAL) and all(r["image"].startswith("/") for r in visual)
    train_ids = {
        f"{n}-{json.loads(x)['id']}"
        for n in T.GENERAL_VISUAL
        for x in (tmp_path / "tasks" / n / "train.jsonl").read_text().splitlines()
    }
    assert {r["id"] for r in visual} <= train_ids
    val = {
        json.loads(x)["question"]
        for x in (tmp_path / "tasks" / "probes" / "val.jsonl").read_text().splitlines()
    }
    test = {
        json.loads(x)["question"]
        for x in (tmp_path / "tasks" / "probes" / "test.jsonl").read_text().splitlines()
    }
    text = {r["question"] for r in rows if "image" not in r}
    assert text == val and not text & test
    before = out.stat().st_mtime_ns
    X.general_calibration(tmp_path / "tasks", tmp_path / "general.jsonl", per_task=3)
    assert out.stat().st_mtime_ns == before  # unchanged content is not rewritten


def test_merge_recipes_are_valid_and_scoped(tmp_path):
    base = build_tiny_llava(tmp_path / "base")
    stats = {"fisher_general": tmp_path / "g.safetensors", "fisher_task": tmp_path / "t.safetensors"}
    for m in X.MERGES:
        method = m.method
        r = X.merge_recipe(method, m.params, base, tmp_path / "ft", stats if m.task_fisher else None)
        rec = load_recipe(r)
        assert rec.method == method and len(rec.models) == 1
        if method in ("cgm", "cgm_dagger", "fisher_with_base"):
            assert r["scope"]["outside"] == "finetuned" and r["scope"]["include"][0].startswith(
                "language.layers["
            )
        if method == "fisher_with_base":
            assert r["statistics"] == {"fisher_base": str(stats["fisher_general"])}
            assert r["models"][0]["statistics"] == {"fisher": str(stats["fisher_task"])}
    assert "projector" in X.merge_recipe("cgm_dagger", {}, base, tmp_path / "ft", stats)["scope"]["include"]
    assert "projector" not in X.merge_recipe("cgm", {}, base, tmp_path / "ft", stats)["scope"]["include"]


def test_finetune_key_follows_the_training_split_not_the_test_split(tmp_path):
    base = build_tiny_llava(tmp_path / "base")
    small = T.write_task(tmp_path / "a", "spatial", sizes={"train": 6, "val": 2, "test": 3})
    large = T.write_task(tmp_path / "b", "spatial", sizes={"train": 6, "val": 5, "test": 9})
    other = T.write_task(tmp_path / "c", "spatial", sizes={"train": 7, "val": 2, "test": 3})
    recipe = dict(X.FINETUNE)
    assert X.finetune_key(base, small, recipe) == X.finetune_key(base, large, recipe)
    assert X.finetune_key(base, small, recipe) != X.finetune_key(base, other, recipe)
    assert X.finetune_key(base, small, recipe) != X.finetune_key(base, small, {**recipe, "keep": "spider"})
    # a grown test split starts with the same items and pictures
    a, b = (p / "test.jsonl" for p in (small, large))
    assert b.read_text().splitlines()[:3] == a.read_text().splitlines()
    for i in range(3):
        assert (small / "images" / f"test-{i:05d}.png").read_bytes() == (
            large / "images" / f"test-{i:05d}.png"
        ).read_bytes()


def test_task_fishers_of_the_experiment_are_the_published_and_the_own_model():
    rows = {m.label: m.task_fisher for m in X.MERGES}
    assert rows["CGM"] == rows["CGM†"] == ("base", "empirical")  # CGM's published scripts: both at θ₀
    assert rows["Fisher merging"] == ("finetuned", "empirical")  # each model's Fisher at that model
    assert rows["WiSE-FT"] is None


def test_a_merge_of_a_variant_fine_tune_is_checked_before_any_work(tmp_path):
    """An unknown variant, or a task Fisher at the plain fine-tune's weights for another fine-tune, is refused; a
    task Fisher at θ₀ (the same for every fine-tune) is not."""
    for bad in (
        X.Merge("x", "linear", {"lambda": 0.5}, model="nope"),
        X.Merge("x", "fisher_with_base", {"base_weight": 1.0}, X.TASK_FISHER_OWN, model="spider"),
    ):
        with pytest.raises(ValueError, match="fine-tune of VARIANTS"):
            X.run_experiment("digits", tmp_path / "w", merges=[bad])
    assert not (tmp_path / "w").exists()
    X.check_merges([X.Merge("x", "cgm", {"alpha": 1.0}, X.TASK_FISHER_CGM, model="ewc")])


# ------------------------------------------------------------------------------------ the whole experiment
SMALL = {"train": 9, "val": 3, "test": 5}
K = 10  # items per fake evaluation
ACC = {"base": (0.2, 0.7), "finetuned": (0.9, 0.3)}  # (task, general) accuracy of the fake models


class Fakes:
    """Fine-tunes write a model folder (recording the keep rule); statistics and merges record what they were
    given; evaluation scores a model by its folder: the base, a fine-tune, or a merge (its recipe recorded)."""

    def __init__(self, monkeypatch, base: Path):
        self.finetunes: list[dict] = []
        self.merges: list[dict] = []
        self.stats: list[dict] = []
        self.evals: list[str] = []

        def write_tasks(root, names, **kw):
            return {n: T.write_task(root, n, sizes=None if n == "probes" else SMALL) for n in names}

        def finetune(base_, data, out, *, keep=None, log=None, force=False, **kw):
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            self.finetunes.append(
                {"task": Path(data).parent.name, "out": out.name, "keep": keep, "lr": kw["lr"], "kw": kw}
            )
            (out / "config.json").write_text("{}")
            (out / "model.safetensors").write_bytes(f"{keep}".encode())
            (out / "finetune.json").write_text(json.dumps({"seconds": 1.5}))

        def merge(recipe, out, **kw):
            if not isinstance(recipe, dict):  # a recipe file (a learned one)
                recipe = {**yaml.safe_load(Path(recipe).read_text()), "file": Path(recipe).name}
            self.merges.append(recipe)
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "record.json").write_text(json.dumps(recipe))

            class Report:
                def summary(self):
                    return f"merged by {recipe['method']}"

            return Report()

        def statistics_step(kind, model_dir, data, path, **kw):
            self.stats.append(
                {
                    "model": Path(model_dir).name,
                    "data": Path(data).name,
                    "path": Path(path).name,
                    "variant": kw["variant"],
                    "scope": kw["scope"],
                    "all_params": kw.get("all_params", False),
                }
            )
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(b"f")
            return Path(path)

        def evaluate(model, tasks, general, *, cache_dir, split, limit, batch_size, log):
            from forgetless.eval.metrics import scores

            model = Path(model)
            self.evals.append(model.name)
            acc_t, acc_g = (
                (0.6, 0.5)
                if (model / "record.json").is_file()
                else ACC["base" if model == base else "finetuned"]
            )
            out = {
                n: {
                    "kind": "downstream",
                    "correct_items": "1" * round(acc_t * K) + "0" * (K - round(acc_t * K)),
                }
                for n in tasks
            }
            for n in general:
                out[n] = {
                    "kind": "general_text" if n == "probes" else "general_visual",
                    "correct_items": "1" * round(acc_g * K) + "0" * (K - round(acc_g * K)),
                }
            for v in out.values():
                v["accuracy"] = v["correct_items"].count("1") / K
            res = {"tasks": out}
            res["scores"] = scores(res)
            return res, False

        import forgetless
        import forgetless.chains.steps as steps_mod

        monkeypatch.setattr(T, "write_tasks", write_tasks)
        monkeypatch.setattr("forgetless.train.finetune", finetune)
        monkeypatch.setattr("forgetless.testbed.build.testbed_model", lambda: base)
        monkeypatch.setattr(forgetless, "merge", merge)
        monkeypatch.setattr(steps_mod, "statistics_step", statistics_step)
        monkeypatch.setattr("forgetless.eval.cache.cached_evaluate", evaluate)


def test_run_experiment_takes_each_step_at_the_right_model_and_reuses_them(tmp_path, monkeypatch):
    base = build_tiny_llava(tmp_path / "base")
    f = Fakes(monkeypatch, base)
    merges = [*X.MERGES, X.Merge("SPIDER → WiSE-FT", "linear", {"lambda": 0.5}, model="spider")]
    work = tmp_path / "w" / "digits"
    lines: list[str] = []
    res = X.run_experiment("digits", work, merges=merges, keeps=X.KEEPS, log=lines.append)
    # one plain fine-tune and one per keep rule, of the same recipe
    assert [(x["out"], x["keep"]) for x in f.finetunes] == [
        ("finetuned", None),
        ("finetuned-spider", "spider"),
        ("finetuned-magnitude_mask", "magnitude_mask"),
    ]
    # the general Fisher at θ₀ on the calibration set; the task Fisher at θ_ft (Fisher merging) and θ₀ (CGM, CGM†)
    assert [(s["model"], s["data"], s["path"]) for s in f.stats] == [
        ("base", "general.jsonl", "fisher_general.safetensors"),
        ("finetuned", "train.jsonl", "fisher_task-finetuned-empirical.safetensors"),
        ("base", "train.jsonl", "fisher_task-base-empirical.safetensors"),
    ]
    by = {m["method"]: m for m in f.merges}
    assert by["cgm"]["statistics"]["fisher_task"].endswith("fisher_task-base-empirical.safetensors")
    assert by["fisher_with_base"]["models"][0]["statistics"]["fisher"].endswith(
        "fisher_task-finetuned-empirical.safetensors"
    )
    assert [m["models"][0] for m in f.merges if m["method"] == "linear"] == [
        str(work / "finetuned"),
        str(work / "finetuned-spider"),
    ]
    # the rows: E and F against the base, from the fake accuracies
    rows = {X.row_name(r): r for r in res["rows"]}
    assert list(rows)[:4] == ["base", "fine-tuned", "SPIDER", "MagnitudeMask"] and len(rows) == 4 + len(
        merges
    )
    for name, r in rows.items():
        t, g = (
            (0.6, 0.5)
            if name not in ("base", "fine-tuned", "SPIDER", "MagnitudeMask")
            else ACC["base" if name == "base" else "finetuned"]
        )
        assert (r["T"], r["G"]) == (100 * t, 100 * g), name
        assert r["E"] == pytest.approx(100 * (t - 0.2)) and r["F"] == pytest.approx(100 * (g - 0.7)), name
    assert (
        rows["SPIDER"]["finetune_seconds"] == 1.5
        and rows["TIES density=0.2 lambda=1"]["summary"] == "merged by ties"
    )
    assert json.loads((work / "results.json").read_text()) == res and not list((work / "merged").iterdir())
    # a second run reuses every fine-tune; records of an earlier version (the key alone) are read too
    for stamp in work.glob("finetuned*/recipe.hash"):
        stamp.write_text(json.loads(stamp.read_text())["key"] + "\n")
    again = X.run_experiment("digits", work, merges=merges, keeps=X.KEEPS, log=lines.append)
    assert len(f.finetunes) == 3 and "fine-tuned model: reusing " + str(work / "finetuned") in lines
    assert [r for r in again["rows"]] == res["rows"]
    # another recipe fine-tunes again
    X.run_experiment("digits", work, merges=[], keeps=X.KEEPS, finetune_recipe={"lr": 1e-4}, log=lines.append)
    assert [x["lr"] for x in f.finetunes[3:]] == [1e-4] * 3


def test_variants_pipelines_and_learned_merges_take_their_inputs(tmp_path, monkeypatch):
    """Replay fine-tunes on the general visual tasks' training items, EWC on the general Fisher at θ₀ over every
    tensor the recipe trains, a curve of fine-tunes sweeps its option; a pipeline merges its variant's fine-tune
    (with the task Fisher at θ₀); a learned merge learns from its start on the validation splits, once."""
    base = build_tiny_llava(tmp_path / "base")
    f = Fakes(monkeypatch, base)
    learned: list[dict] = []

    def learn(recipe, *, task, general, out, log, **options):
        learned.append({"recipe": recipe, "task": task, "general": general, **options})
        params = {"lambda": [{"scope": "language.layers[0:1]", "value": 0.25}, {"value": 0.5}]}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(yaml.safe_dump({**recipe, "parameters": params}))

    monkeypatch.setattr("forgetless.eval.learn.learn", learn)
    merges = [
        X.Merge("EWC → CGM", "cgm", {"alpha": 5.0}, X.TASK_FISHER_CGM, model="ewc"),
        X.Merge("Replay → WiSE-FT", "linear", {"lambda": 0.5}, model="replay"),
        X.Merge("Learned λ", "linear", {"general_weight": 2.0, "lambda": 0.5}, learn="labels"),
        X.Merge("Model Stock", "model_stock", {}, pair="reseeded"),
    ]
    keeps = [X.VARIANTS["replay"], *FR.tune_points("L2-SP")]
    work = tmp_path / "w" / "digits"
    res = X.run_experiment("digits", work, merges=merges, keeps=keeps, log=lambda _: None)
    runs = {x["out"]: x["kw"] for x in f.finetunes}
    replay = work / "calibration" / "replay.jsonl"
    assert (
        runs["finetuned-replay"]["replay"] == str(replay) and runs["finetuned-replay"]["replay_ratio"] == 1.0
    )
    items = [json.loads(line) for line in replay.read_text().splitlines()]
    assert len(items) == SMALL["train"] * len(T.GENERAL_VISUAL) and all(
        Path(i["image"]).is_file() for i in items
    )
    assert {i["id"].split("-")[0] for i in items} == set(T.GENERAL_VISUAL)
    fisher = work / "statistics" / "fisher_general-train-scope.safetensors"
    assert (
        runs["finetuned-ewc"]["fisher"] == str(fisher) and runs["finetuned-ewc"]["strength"] == X.EWC_STRENGTH
    )
    scope_stats = next(s for s in f.stats if s["path"] == fisher.name)
    assert scope_stats["all_params"] and scope_stats["scope"] == X.FINETUNE["train"]
    assert scope_stats["model"] == "base" and scope_stats["data"] == "general.jsonl"
    points = FR.tune_points("L2-SP")
    assert [runs[f"finetuned-{t.name}"]["strength"] for t in points] == FR.KNOBS["L2-SP"].values
    by = {m["method"]: m for m in f.merges}
    assert by["cgm"]["models"] == [str(work / "finetuned-ewc")]
    assert by["cgm"]["statistics"]["fisher_task"].endswith("fisher_task-base-empirical.safetensors")
    replayed = next(m for m in f.merges if m["method"] == "linear" and "file" not in m)
    assert replayed["models"] == [str(work / "finetuned-replay")]
    (call,) = learned
    assert call["recipe"]["parameters"] == {"lambda": 0.5} and call["general_weight"] == 2.0
    assert (call["objective"], call["by"], call["split"]) == ("labels", "layer", "val")
    assert call["task"] == {"digits": str(work.parent / "tasks" / "digits")} and set(call["general"]) == set(
        T.GENERAL_VISUAL
    ) | {"probes"}
    learned_merge = next(m for m in f.merges if "file" in m)
    assert learned_merge["parameters"]["lambda"][0]["value"] == 0.25
    # Model Stock merges the fine-tune with a second one of the same recipe at seed + RESEED
    assert by["model_stock"]["models"] == [str(work / "finetuned"), str(work / "finetuned-reseeded")]
    assert runs["finetuned-reseeded"]["seed"] == X.FINETUNE["seed"] + X.RESEED
    assert all(kw["seed"] == X.FINETUNE["seed"] for out, kw in runs.items() if out != "finetuned-reseeded")
    rows = {X.row_name(r) for r in res["rows"]}
    assert {
        "Replay 1:1",
        "L2-SP strength=0.02",
        "Learned λ general_weight=2 lambda=0.5",
        "Model Stock",
    } <= rows
    X.run_experiment("digits", work, merges=merges, keeps=keeps, log=lambda _: None)
    assert len(learned) == 1  # the learned recipe is reused


def test_an_extracted_lora_point_merges_the_fine_tunes_truncated_update(tmp_path, monkeypatch):
    """An ``extract`` merge writes the fine-tune's update as the PEFT adapter ``forgetless extract-lora`` writes at
    the point's rank — each Linear's Δ truncated to that rank (checked against torch's SVD), a changed norm saved
    whole — and merges ``BASE+ADAPTER`` with the other parameters; the adapter is reused by a second run."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    base = build_tiny_llava(tmp_path / "base")
    f = Fakes(monkeypatch, base)
    weights = load_file(base / "model.safetensors")
    q = next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.weight"))
    norm = next(k for k in weights if k.endswith("layers.0.input_layernorm.weight"))
    delta = torch.randn(weights[q].shape, generator=torch.Generator().manual_seed(0)) * 0.1

    def finetune(base_, data, out, **kw):  # the base with one Linear and one norm changed
        shutil.copytree(base, out, dirs_exist_ok=True)
        changed = {**weights, q: weights[q] + delta, norm: weights[norm] + 0.5}
        save_file(changed, Path(out) / "model.safetensors", metadata={"format": "pt"})
        (Path(out) / "finetune.json").write_text(json.dumps({"seconds": 1.0}))

    monkeypatch.setattr("forgetless.train.finetune", finetune)
    merges = [X.Merge("Extracted LoRA", "task_arithmetic", {"rank": 2, "lambda": 1.0}, extract=True)]
    work = tmp_path / "w" / "digits"
    lines: list[str] = []
    res = X.run_experiment("digits", work, merges=merges, keeps=[], log=lines.append)
    (recipe,) = f.merges
    assert recipe["method"] == "task_arithmetic" and recipe["parameters"] == {"lambda": 1.0}
    (model,) = recipe["models"]
    left, adapter = model.rsplit("+", 1)
    assert left == str(base) and Path(adapter).parent == work / "extracted"
    factors = load_file(Path(adapter) / "adapter_model.safetensors")
    a = next(v for k, v in factors.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in factors.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    u, s, vh = torch.linalg.svd((weights[q].double() + delta.double()) - weights[q].double())
    assert a.shape[0] == 2 and torch.allclose(
        (b @ a).double(), u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-5
    )
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 2  # PEFT's scale 1: B·A is the update itself
    assert any(m.endswith("layers.0.input_layernorm") for m in config["modules_to_save"])
    assert "Extracted LoRA rank=2 lambda=1" in {X.row_name(r) for r in res["rows"]}
    X.run_experiment("digits", work, merges=merges, keeps=[], log=lines.append)
    assert f"extracted: reusing {adapter}" in lines


def test_a_sparse_log_passes_the_first_line_then_one_per_interval(monkeypatch):
    clock = iter([0.0, 10.0, 59.9, 60.0, 61.0, 130.0])
    monkeypatch.setattr(C.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    say = C.sparse(lines.append, 60.0)
    for i in range(6):
        say(str(i))
    assert lines == ["0", "3", "5"]


def test_lora_variants_fold_their_adapter_once_and_take_ewc_over_their_own_scope(tmp_path, monkeypatch):
    """A LoRA fine-tune trains the testbed's adapter recipe; its row and the merges of it take the adapter folded
    into the base (folded once, then reused); LoRA + EWC's general Fisher covers the adapted layers, in a file of
    its own beside the full fine-tune's."""
    base = build_tiny_llava(tmp_path / "base")
    f = Fakes(monkeypatch, base)
    merges = [X.Merge("LoRA → WiSE-FT", "linear", {"lambda": 0.5}, model="lora")]
    keeps = [X.VARIANTS["lora"], X.VARIANTS["lora_ewc"]]
    work = tmp_path / "w" / "digits"
    res = X.run_experiment("digits", work, merges=merges, keeps=keeps, log=lambda _: None)
    runs = {x["out"]: x for x in f.finetunes}
    lora = runs["finetuned-lora"]
    assert (
        lora["kw"]["lora"] == LoraSpec(**X.LORA)
        and lora["kw"]["train"] == ["language.layers"]
        and lora["lr"] == 5e-4
    )
    fisher = Path(runs["finetuned-lora_ewc"]["kw"]["fisher"])
    assert fisher.name != "fisher_general-train-scope.safetensors"
    assert next(s for s in f.stats if s["path"] == fisher.name)["scope"] == ["language.layers"]
    folds = [m["models"] for m in f.merges if m["method"] == "task_arithmetic"]
    assert folds == [[f"{base}+{work / 'finetuned-lora'}"], [f"{base}+{work / 'finetuned-lora_ewc'}"]]
    (wise,) = [m for m in f.merges if m["method"] == "linear"]
    folded = Path(wise["models"][0])
    assert folded.parent == work / "folded" and folded.name.startswith("finetuned-lora-")
    assert folded.name in f.evals and "finetuned-lora" not in f.evals
    assert {X.row_name(r) for r in res["rows"]} >= {"LoRA", f"LoRA + EWC λ={X.EWC_STRENGTH:g}"}
    X.run_experiment("digits", work, merges=merges, keeps=keeps, log=lambda _: None)
    assert [m["method"] for m in f.merges].count("task_arithmetic") == 2  # the folds are reused
