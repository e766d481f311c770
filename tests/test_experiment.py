"""The testbed experiment's plumbing: the general calibration set and the merge recipes it builds (the runs
themselves are benchmarks: RESULTS.md)."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_llava

from forgetless.recipe import load_recipe
from forgetless.testbed import experiment as X
from forgetless.testbed import tasks as T


def test_general_calibration_takes_train_visual_samples_and_only_the_probes_val_split(tmp_path):
    for name in [*T.GENERAL_VISUAL, "probes"]:
        T.write_task(tmp_path / "tasks", name, sizes={"train": 12, "val": 2, "test": 2})
    out = X.general_calibration(tmp_path / "tasks", tmp_path / "general.jsonl", per_task=3)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    visual = [r for r in rows if "image" in r]
    assert len(visual) == 3 * len(T.GENERAL_VISUAL) and all(r["image"].startswith("/") for r in visual)
    train_ids = {f"{n}-{json.loads(x)['id']}" for n in T.GENERAL_VISUAL
                 for x in (tmp_path / "tasks" / n / "train.jsonl").read_text().splitlines()}
    assert {r["id"] for r in visual} <= train_ids
    val = {json.loads(x)["question"] for x in (tmp_path / "tasks" / "probes" / "val.jsonl").read_text().splitlines()}
    test = {json.loads(x)["question"] for x in (tmp_path / "tasks" / "probes" / "test.jsonl").read_text().splitlines()}
    text = {r["question"] for r in rows if "image" not in r}
    assert text == val and not text & test
    before = out.stat().st_mtime_ns
    X.general_calibration(tmp_path / "tasks", tmp_path / "general.jsonl", per_task=3)
    assert out.stat().st_mtime_ns == before  # unchanged content is not rewritten


def test_merge_recipes_are_valid_and_scoped(tmp_path):
    base = build_tiny_llava(tmp_path / "base")
    stats = {"fisher_general": tmp_path / "g.safetensors", "fisher_task": tmp_path / "t.safetensors"}
    for _label, method, params, needs, _model in X.MERGES:
        r = X.merge_recipe(method, params, base, tmp_path / "ft", stats if needs else None)
        rec = load_recipe(r)
        assert rec.method == method and len(rec.models) == 1
        if method in ("cgm", "cgm_dagger", "fisher_with_base"):
            assert r["scope"]["outside"] == "finetuned" and r["scope"]["include"][0].startswith("language.layers[")
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
        assert (small / "images" / f"test-{i:05d}.png").read_bytes() == \
            (large / "images" / f"test-{i:05d}.png").read_bytes()


def test_task_fishers_of_the_experiment_are_the_published_and_the_own_model():
    rows = {m.label: m.task_fisher for m in X.MERGES}
    assert rows["CGM"] == rows["CGM†"] == ("base", "empirical")  # CGM's published scripts: both at θ₀
    assert rows["Fisher merging"] == ("finetuned", "empirical")  # each model's Fisher at that model
    assert rows["WiSE-FT"] is None


def test_a_merge_of_a_keep_rules_fine_tune_is_checked_before_any_work(tmp_path):
    for bad in (X.Merge("x", "linear", {"lambda": 0.5}, model="nope"),
                X.Merge("x", "cgm", {"alpha": 1.0}, X.TASK_FISHER_CGM, model="spider")):
        with pytest.raises(ValueError, match="keep rule of KEEPS"):
            X.run_experiment("digits", tmp_path / "w", merges=[bad])
    assert not (tmp_path / "w").exists()
