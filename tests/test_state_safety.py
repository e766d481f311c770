"""The continual state as a database: one writer at a time (a lock; a second writer waits, a dead holder's lock is
free), a commit atomic at every instant of a kill -9 (the old state or the new one at the path, and the next add
works), SIGTERM and a full disk leave the old state whole with one line, and every damaged state is named."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import crash_worker
import pytest
import torch
from conftest import add_args
from safetensors.torch import load_file, save_file
from test_continual import _add, _snapshot, tasks  # noqa: F401  (tasks: the fixture)

from forgetless.chains import continual
from forgetless.chains.continual import add_task, load_state, show_state
from forgetless.checkpoint import writer as W
from forgetless.checkpoint.guard import exclusive, lock_path
from forgetless.cli import main
from forgetless.errors import ForgetlessError, naming

HERE = Path(__file__).parent


@pytest.fixture()
def one_task(tasks, tiny_llava_dir, tmp_path):
    state = tmp_path / "state"
    _add(state, tasks[0], None, base=tiny_llava_dir)
    return state


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".forgetless-" in p.name)


# ---------------------------------------------------------------------------------------------- one writer
def test_a_second_writer_waits_for_the_first_and_no_task_is_lost(tasks, one_task, monkeypatch):
    held, release, logs, errors = threading.Event(), threading.Event(), [], []
    real = continual._check_adapter

    def slow_first(adapter, *a, **kw):  # the first writer stops inside the lock until released
        if threading.current_thread().name == "first":
            held.set()
            assert release.wait(120)
        return real(adapter, *a, **kw)

    monkeypatch.setattr(continual, "_check_adapter", slow_first)

    def run(t, log):
        try:
            add_task(one_task, adapter=t[0], gram=t[1], out=None, log=log)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    first = threading.Thread(target=run, args=(tasks[1], None), name="first")
    second = threading.Thread(target=run, args=(tasks[2], logs.append), name="second")
    first.start()
    assert held.wait(120)
    second.start()
    deadline = time.monotonic() + 120
    while not any("waiting for process" in m for m in logs) and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()
    first.join(120)
    second.join(120)
    assert not errors, errors
    assert any(f"waiting for process {os.getpid()}" in m for m in logs)
    assert [t["name"] for t in load_state(one_task)["tasks"]] == ["a0", "a1", "a2"]


def _holder(state: Path, *, die: bool) -> subprocess.Popen:
    """A process that takes the state's lock, says so, then dies (kill -9) or waits to be killed."""
    code = (
        "import os, signal, sys, time; from forgetless.checkpoint.guard import exclusive\n"
        f"with exclusive({str(state)!r}):\n"
        "    print('locked', flush=True)\n"
        f"    {'os.kill(os.getpid(), signal.SIGKILL)' if die else 'time.sleep(600)'}\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_held_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tasks, one_task):
    live = _holder(one_task, die=False)
    try:
        with (
            pytest.raises(ForgetlessError, match=f"in use by process {live.pid}"),
            exclusive(one_task, wait=False),
        ):
            pass
    finally:
        live.kill()
        live.wait()
    dead = _holder(one_task, die=True)
    assert dead.wait() == -signal.SIGKILL
    logs = []
    add_task(one_task, adapter=tasks[1][0], gram=tasks[1][1], out=None, log=logs.append)
    assert not any("waiting" in m for m in logs) and len(load_state(one_task)["tasks"]) == 2


# ---------------------------------------------------------------------------------------------- kill -9
@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
def test_a_kill_at_any_step_of_the_commit_leaves_the_old_or_the_new_state(
    tasks,
    one_task,
    tmp_path,
    fallback,
):
    pristine = tmp_path / "pristine"
    shutil.copytree(one_task, pristine)
    spec = {
        "state": str(one_task),
        "pristine": str(pristine),
        "out": str(tmp_path / "out"),
        "fallback": fallback,
        "adapter": str(tasks[1][0]),
        "gram": str(tasks[1][1]),
        "next_adapter": str(tasks[2][0]),
        "next_gram": str(tasks[2][1]),
    }
    result = crash_worker.run(spec, tmp_path)
    kills = result["kills"]
    assert len(kills) >= 8 and result["completed"] == 2  # every step was killed once, then a run completed
    for k, after_kill, after_add in kills:
        assert after_kill in (1, 2), k  # the old state or the new one, never "not found"
        assert after_add == after_kill + 1, k  # and the next add works on it
    assert {a for _, a, _ in kills} == {1, 2}  # the kills fell before and after the commit point
    assert not _leftovers(tmp_path)  # the next add removed what the dead writers left


def test_a_state_a_crash_left_moved_aside_is_put_back_before_any_cleanup(tasks, one_task, tiny_llava_dir):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    aside = one_task.parent / f".{one_task.name}.forgetless-old-{int(dead.stdout)}-xyz"
    aside.mkdir()
    before = _snapshot(one_task)
    os.rename(one_task, aside / "old")  # a two-rename replace killed between its renames
    assert "1 task(s)" in show_state(one_task)  # show puts it back
    os.rename(one_task, aside / "old")
    _add(one_task, tasks[1], None, base=tiny_llava_dir)  # --base on a recoverable state: no new state
    assert [t["name"] for t in load_state(one_task)["tasks"]] == ["a0", "a1"]
    assert not aside.exists() and set(before) <= set(_snapshot(one_task))


# ---------------------------------------------------------------------------------------------- SIGTERM, full disk
def test_sigterm_during_add_keeps_the_old_state_and_says_so(tasks, one_task, tmp_path):
    before = _snapshot(one_task)
    code = (
        "import os, signal, sys\nfrom forgetless.chains import continual\nfrom forgetless.cli import main\n"
        "real, n = continual._step_part, [0]\n"
        "def step(*a, **kw):\n"
        "    n[0] += 1\n"
        "    if n[0] == 2: os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*a, **kw)\n"
        "continual._step_part = step\nmain(sys.argv[1:])\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "continual",
            "add",
            str(one_task),
            "--adapter",
            str(tasks[1][0]),
            "--gram",
            str(tasks[1][1]),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert r.stderr.strip() == f"{one_task}: interrupted; the state is whole, with 1 task(s)"
    assert _snapshot(one_task) == before and not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_a_full_disk_while_writing_the_state_names_the_file(tasks, one_task, tmp_path, capsys, monkeypatch):
    before = _snapshot(one_task)
    calls = []

    def full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name
        return save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(continual, "save_file", full)
    with pytest.raises(SystemExit) as e:
        main(["continual", "add", str(one_task), "--adapter", str(tasks[1][0]), "--gram", str(tasks[1][1])])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith(f"error: {calls[1]}: No space left on device — free space")
    assert _snapshot(one_task) == before and not _leftovers(tmp_path)


def test_naming_turns_safetensors_io_errors_into_named_os_errors(tmp_path):
    where = tmp_path / "no" / "such" / "x.safetensors"
    with pytest.raises(OSError) as e, naming(where):
        save_file({"a": torch.zeros(2)}, str(where))  # safetensors' own error, "(os error 2)"
    assert e.value.errno == errno.ENOENT and e.value.filename == str(where)
    with pytest.raises(OSError) as e, naming(where):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(where)
    with pytest.raises(ValueError, match="unrelated"), naming(where):
        raise ValueError("unrelated")


# ---------------------------------------------------------------------------------------------- damaged states
def _part(state: Path) -> Path:
    return min(state.glob("part-*.safetensors"))


def _meta_edit(edit):
    def damage(state: Path) -> None:
        meta = json.loads((state / "state.json").read_text())
        edit(meta)
        (state / "state.json").write_text(json.dumps(meta))

    return damage


def _wrong_shapes(state: Path) -> None:
    t = load_file(str(_part(state)))
    key = next(k for k in t if k.startswith("delta/"))
    t[key] = t[key][:, :1].contiguous()
    save_file(t, str(_part(state)))


DAMAGES = [
    ("part deleted", lambda s: _part(s).unlink(), "part-00000.safetensors: missing"),
    (
        "part truncated",
        lambda s: os.truncate(_part(s), _part(s).stat().st_size // 2),
        "part-00000.safetensors: unreadable",
    ),
    ("part garbage", lambda s: _part(s).write_bytes(os.urandom(64)), "part-00000.safetensors: unreadable"),
    ("part of wrong shapes", _wrong_shapes, "expected"),
    ("no options", _meta_edit(lambda m: m.pop("options")), "'options' is missing"),
    ("tasks not a list", _meta_edit(lambda m: m.update(tasks="a0")), "'tasks' is missing or not a list"),
    ("unknown version", _meta_edit(lambda m: m.update(version=99)), "state format version 99"),
    ("gamma inf", _meta_edit(lambda m: m["options"].update(gamma=float("inf"))), "gamma=inf"),
    ("state.json garbage", lambda s: (s / "state.json").write_bytes(b"\x00\xff\xfe{["), "not a text file"),
    (
        "state.json cut short",
        lambda s: (s / "state.json").write_text('{"format": "forgetless-continual", '),
        "invalid JSON",
    ),
    (
        "state.json nested deep",
        lambda s: (s / "state.json").write_text("[" * 100_000 + "]" * 100_000),
        "JSON nested deeper than",
    ),
]


@pytest.mark.parametrize("damage, words", [(d, w) for _, d, w in DAMAGES], ids=[n for n, _, _ in DAMAGES])
def test_a_damaged_state_is_named_by_show_and_add(tasks, one_task, tmp_path, capsys, damage, words):
    damage(one_task)
    before = _snapshot(one_task)
    for argv in (
        ["continual", "show", str(one_task)],
        [
            *add_args(one_task, tasks[1]),
            "--out",
            str(tmp_path / "out"),
        ],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and words in err, err
        assert str(one_task) in err and "bug" not in err
    assert _snapshot(one_task) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option",
    [["--gamma", "inf"], ["--gamma", "nan"], ["--gamma", "-1"], ["--cpm-data", "x.jsonl", "--tau", "inf"]],
)
def test_options_out_of_range_are_refused_at_the_first_task(
    tasks,
    tiny_llava_dir,
    tmp_path,
    capsys,
    option,
):
    state = tmp_path / "state"
    with pytest.raises(SystemExit) as e:
        main(
            [
                *add_args(state, tasks[0], base=tiny_llava_dir),
                *option,
            ]
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "invalid option" in err and not state.exists()
    assert lock_path(state).exists()  # the lock file stays: removing it would let two writers lock two files


def test_show_of_an_absent_state_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["continual", "show", str(tmp_path / "typo" / "state")])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no lock file, no folder made by a command that only reads


def test_a_full_disk_while_writing_the_output_keeps_the_old_state(
    tasks,
    one_task,
    tmp_path,
    capsys,
    monkeypatch,
):
    before = _snapshot(one_task)
    real, calls = os.pwrite, []

    def full(*a):  # the shard's header goes through, then the disk is full
        calls.append(a)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a)

    monkeypatch.setattr(W.os, "pwrite", full)
    with pytest.raises(SystemExit) as e:
        main(
            [
                *add_args(one_task, tasks[1]),
                "--out",
                str(tmp_path / "out"),
            ]
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(
        f"error: {tmp_path / 'out' / 'model.safetensors'}: No space left"
    )
    assert _snapshot(one_task) == before and not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_the_new_state_and_the_output_must_fit_their_disk_before_any_work(
    tasks,
    one_task,
    tmp_path,
    capsys,
    monkeypatch,
):
    meta = load_state(one_task)
    state_bytes = sum(p.stat().st_size for p in one_task.glob("part-*.safetensors"))
    planned = sum(continual._sums_bytes(meta))
    assert 0 < state_bytes - planned < 4096 * len(meta["parts"])  # the parts' sums, and their headers
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=planned + 1000))
    calls = []
    monkeypatch.setattr(continual, "_step_part", lambda *a, **kw: calls.append(a))
    with pytest.raises(SystemExit) as e:
        main(
            [
                *add_args(one_task, tasks[1]),
                "--out",
                str(tmp_path / "out"),
            ]
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "the new state and the output needs" in err and str(one_task) in err
    assert not calls and not (tmp_path / "out").exists()
    continual._check_space(one_task, meta, None, 10**15)  # without an output, the state alone fits
    with pytest.raises(ForgetlessError, match="the new state needs"):
        continual._check_space(one_task, meta | {"options": meta["options"] | {"dtype": "float64"}}, None, 0)


def test_a_gram_with_nan_is_named_not_reported_as_differing_grams(tasks, one_task, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(tasks[1][1]), framework="pt") as f:
        meta, sums = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    q = "language_model.model.layers.1.self_attn.q_proj.weight"
    sums[q][0, 0] = float("nan")
    save_file(sums, str(tmp_path / "nan.safetensors"), metadata=meta)
    before = _snapshot(one_task)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "continual",
                "add",
                str(one_task),
                "--adapter",
                str(tasks[1][0]),
                "--gram",
                str(tmp_path / "nan.safetensors"),
            ]
        )
    err = capsys.readouterr().err.strip()
    assert (
        e.value.code == 2 and f"tensor '{q}': the Gram has NaN or Inf entries" in err and "differ" not in err
    )
    assert _snapshot(one_task) == before and not _leftovers(tmp_path)
