"""How the engine runs a merge: units merged side by side on several threads give the result of one after the
other (tensors, element counts, row blocks in order); torch's thread count is set for the merge and restored; the
memory the units in flight hold stays within the estimate's allowance; the writer syncs its shards in the
background while the merge runs, and the output folder is renamed into place only once every file in it and the
folder itself are synced; a failed background sync stops the merge with nothing left behind."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from test_engine import tensors
from test_engine_blocks import recipes, small_allowances, tied_family  # noqa: F401  (fixtures)

import forgetless
from forgetless import engine
from forgetless.checkpoint import writer as W
from forgetless.engine import budget, run, runner
from forgetless.errors import ForgetlessError


def test_merge_threads_policy(monkeypatch):
    for cores, want in ((1, (1, 1)), (2, (2, 1)), (4, (2, 1)), (16, (2, 7))):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert engine.merge_threads() == want


@pytest.mark.parametrize(
    "which", ["ties", "dare_ties", "task_arithmetic", "cgm_dagger_tensor", "fisher", "scope_copy"]
)
def test_units_merged_side_by_side_equal_one_after_the_other(tied_family, tmp_path, monkeypatch, which):
    recipe = recipes(tied_family)[which]
    monkeypatch.setattr(run, "MERGERS", 1)
    one = forgetless.merge(recipe, out=tmp_path / "one", progress=False)
    monkeypatch.setattr(run, "MERGERS", 4)
    seen: set[str] = set()
    compute = runner.Runner.compute

    def spy(self, unit, loaded):
        seen.add(threading.current_thread().name)
        return compute(self, unit, loaded)

    monkeypatch.setattr(runner.Runner, "compute", spy)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    many = forgetless.merge(recipe, out=tmp_path / "many", progress=False)
    assert len(seen) > 1  # merged on several threads
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "many")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert many.counts == one.counts  # CGM†'s per-part counts: each call's own, added up
    assert bool(one.counts) == (which == "cgm_dagger_tensor")


def test_row_blocks_on_several_merge_threads_stay_in_order_and_alone(
    tied_family,
    tmp_path,
    monkeypatch,
    small_allowances,
):
    recipe = recipes(tied_family)["dare_ties"]  # random draws, block after block: order matters
    whole = tensors(forgetless.merge(recipe, out=tmp_path / "whole", progress=False, memory="1GiB").out)
    monkeypatch.setattr(run, "MERGERS", 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    active, most, order = [0], [0], []
    lock = threading.Lock()
    compute = runner.Runner.compute

    def spy(self, unit, loaded):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0]) if unit.rows is not None else most[0]
            if unit.rows is not None:
                order.append((unit.job.name, unit.rows))
        try:
            return compute(self, unit, loaded)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(runner.Runner, "compute", spy)
    plan = engine.build_plan(recipe, out=tmp_path / "blocks", memory=12_000)
    assert plan.block_rows
    engine.execute(plan, progress=False)
    assert most[0] == 1  # a block never merged beside anything else
    for name in plan.block_rows:
        rows = [r for n, r in order if n == name]
        assert rows == sorted(rows) and rows[0][0] == 0
    got = tensors(tmp_path / "blocks")
    assert all(torch.equal(got[k], whole[k]) for k in whole)


def test_torch_threads_are_set_for_the_merge_and_restored(tied_family, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    before = torch.get_num_threads()
    seen = []
    compute = runner.Runner.compute
    monkeypatch.setattr(
        runner.Runner,
        "compute",
        lambda self, u, x: seen.append(torch.get_num_threads()) or compute(self, u, x),
    )
    forgetless.merge(recipes(tied_family)["ties"], out=tmp_path / "o", progress=False)
    assert set(seen) == {7} and torch.get_num_threads() == before


def test_units_in_flight_stay_within_the_estimate(tied_family, tmp_path, monkeypatch):
    """Every unit is counted whole from the start of its read to the end of its write; their sum never exceeds
    what the peak-memory estimate allows beyond the runtime (unless one unit alone does)."""
    monkeypatch.setattr(run, "MERGERS", 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr(budget, "PREFETCH_BYTES", 4096)
    plan = engine.build_plan(recipes(tied_family)["ties"], out=tmp_path / "o", memory="1GiB")
    allowance = plan.peak_memory_estimate() - budget.RUNTIME_BYTES
    held, most, lock = [0], [0], threading.Lock()
    load, compute = runner.Runner.load, runner.Runner.compute

    def spy_load(self, unit):
        with lock:
            held[0] += sum(plan.unit_cost(unit))
            most[0] = max(most[0], held[0])
        return load(self, unit)

    def spy_compute(self, unit, loaded):
        try:
            return compute(self, unit, loaded)
        finally:
            with lock:
                held[0] -= sum(plan.unit_cost(unit))

    monkeypatch.setattr(runner.Runner, "load", spy_load)
    monkeypatch.setattr(runner.Runner, "compute", spy_compute)
    engine.execute(plan, progress=False)
    largest = max(sum(plan.unit_cost(u)) for u in plan.units())
    assert largest < most[0] <= allowance  # several units at once, within the allowance


# ----------------------------------------------------------------------------------------------- the writer
def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name synced files")
def test_shards_sync_in_the_background_and_everything_before_the_rename(tied_family, tmp_path, monkeypatch):
    monkeypatch.setattr(W, "SYNC_EVERY", 4096)
    events: list[tuple[str, str]] = []
    real_fsync, real_fdatasync, real_commit = os.fsync, os.fdatasync, W.commit_folder
    lock = threading.Lock()

    def fsync(fd):
        with lock:
            events.append(("fsync", _fd_path(fd)))
        real_fsync(fd)

    def fdatasync(fd):
        with lock:
            events.append(("fdatasync " + threading.current_thread().name, _fd_path(fd)))
        real_fdatasync(fd)

    def commit(tmp, out, *, replace):
        synced = {p for kind, p in events if kind == "fsync"}
        files = {str(p) for p in tmp.iterdir()}
        assert files <= synced and str(tmp) in synced  # every file, and the folder, before the rename
        events.append(("rename", str(out)))
        return real_commit(tmp, out, replace=replace)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(W, "commit_folder", commit)
    recipe = {**recipes(tied_family)["ties"], "shard_size": 60_000}
    out = tmp_path / "o"
    forgetless.merge(recipe, out=out, progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1
    background = [p for kind, p in events if kind.startswith("fdatasync forgetless-sync")]
    assert {os.path.basename(p) for p in background} == set(shards)  # each shard synced while the merge ran
    rename = events.index(("rename", str(out)))
    assert events[rename + 1 :] == [("fsync", str(tmp_path))]  # and the rename itself


def test_a_failed_background_sync_stops_the_merge_and_leaves_nothing(tied_family, tmp_path, monkeypatch):
    import errno

    monkeypatch.setattr(W, "SYNC_EVERY", 4096)

    def fdatasync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    out = tmp_path / "o"
    with pytest.raises(OSError, match="Input/output error"):
        forgetless.merge(recipes(tied_family)["ties"], out=out, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "forgetless-tmp" in p.name]


def test_a_writer_error_on_a_merge_thread_is_the_merge_s_error(tied_family, tmp_path, monkeypatch):
    monkeypatch.setattr(run, "MERGERS", 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    write = W.StreamingWriter.write

    def full(self, name, data, at=0):
        if name.endswith("mlp.up_proj.weight"):
            raise ForgetlessError("disk full", file=self.tmp, remedy="free some space")
        return write(self, name, data, at)

    monkeypatch.setattr(W.StreamingWriter, "write", full)
    with pytest.raises(ForgetlessError, match="disk full"):
        forgetless.merge(recipes(tied_family)["ties"], out=tmp_path / "o", progress=False)
    assert not [p for p in tmp_path.iterdir()]


def test_merge_imports_torch_but_not_transformers(tied_family, tmp_path):
    """`import forgetless` loads nothing heavy; `forgetless merge` loads torch and the recipe's pydantic models,
    not transformers, peft, accelerate, matplotlib or scikit-learn (their imports cost seconds at start-up)."""
    import json
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipes(tied_family)["ties"]))
    code = f"""
import json, sys
import forgetless
light = sorted(m for m in ("torch", "pydantic", "numpy") if m in sys.modules)
from forgetless.cli import main
try:
    main(["merge", {str(recipe)!r}, "--out", {str(tmp_path / "o")!r}, "--quiet"])
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps({{"light": light, "modules": sorted(sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["light"] == []
    top = {m.split(".")[0] for m in got["modules"]}
    assert {"torch", "pydantic"} <= top
    assert not top & {"transformers", "peft", "accelerate", "matplotlib", "sklearn", "scipy", "PIL"}
    assert tensors(tmp_path / "o")  # the merge ran


# ----------------------------------------------------------------------------------------------- reading
def test_a_view_is_the_tensor_mapped_copy_on_write(tied_family, tmp_path):
    import shutil

    from forgetless.checkpoint.reader import CheckpointReader

    folder = tmp_path / "m"
    shutil.copytree(tied_family["fts"][0], folder)
    before = (folder / "model.safetensors").read_bytes()
    with CheckpointReader(folder) as r:
        for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
            v = r.view(name)
            assert torch.equal(v, r.get(name)) and v.dtype == r.info(name).dtype
            assert torch.equal(r.view(name, (3, 7)), r.get(name)[3:7])
            v.mul_(2.0)  # a write copies the page: the file and other views are untouched
            assert torch.equal(r.view(name), r.get(name)) and not torch.equal(v, r.get(name))

        def mappings() -> int:
            return len(Path("/proc/self/maps").read_text().splitlines())

        maps = mappings()
        views = [r.view("model.embed_tokens.weight") for _ in range(20)]
        assert mappings() >= maps + 20
        del views, v
        assert mappings() <= maps  # unmapped with the tensors
    assert (folder / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("which, viewed", [("ties", True), ("task_arithmetic", True), ("dare_ties", False)])
def test_methods_that_only_read_get_views_of_the_fine_tuned_files(
    tied_family,
    tmp_path,
    monkeypatch,
    which,
    viewed,
):
    from forgetless.checkpoint.reader import CheckpointReader

    calls = []
    view = CheckpointReader.view
    monkeypatch.setattr(CheckpointReader, "view", lambda self, *a: calls.append(self.path) or view(self, *a))
    recipe = recipes(tied_family)[which]
    forgetless.merge(recipe, out=tmp_path / "o", progress=False)
    models = {str(p) for p in recipe["models"]}
    assert bool(calls) == viewed and {str(p) for p in calls} <= models  # never the base: it is written into
