"""The one step cache (forgetless.chains.steps.Step), the one atomic file write and the one read_json: a step is
reused only when its record holds the same fingerprint and its output is there, records from earlier versions
are read, and a damaged record or a writer killed at any instant means the step is redone (never a wrong reuse);
concurrent writers: tests/test_reliability.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from forgetless.chains.steps import Step, fingerprint, read_record
from forgetless.checkpoint.writer import atomic_write
from forgetless.errors import ForgetlessError
from forgetless.safeload import read_json


def test_fingerprint_is_sha256_of_sorted_json():
    obj = {"b": [1, 2.5, "x"], "a": {"z": None, "y": True}}
    text = '{"a": {"y": true, "z": null}, "b": [1, 2.5, "x"]}'
    assert fingerprint(obj) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert fingerprint(obj, 24) == hashlib.sha256(text.encode()).hexdigest()[:24]
    assert fingerprint({"p": Path("/a")}) == fingerprint({"p": "/a"})  # not JSON: its str


def _counting_step(tmp_path: Path, key: str, made: list[str]):
    out = tmp_path / "out.bin"
    step = Step(tmp_path / "out.bin.json", key, out)

    def make():
        made.append(key)
        out.write_bytes(key.encode())
        return {"size": len(key)}

    return step, make


def test_a_step_is_reused_while_its_key_matches_and_its_output_is_there(tmp_path):
    made: list[str] = []
    step, make = _counting_step(tmp_path, "aaaa", made)
    rec, reused = step.run(make)
    assert (rec, reused) == ({"key": "aaaa", "size": 4}, False) and made == ["aaaa"]
    lines: list[str] = []
    assert step.run(make, log=lines.append, reusing="reusing it") == (rec, True)
    assert made == ["aaaa"] and lines == ["reusing it"]
    other, make_b = _counting_step(tmp_path, "bbbbbb", made)
    assert other.run(make_b) == ({"key": "bbbbbb", "size": 6}, False)
    (tmp_path / "out.bin").unlink()
    assert other.done() is None  # the output is gone: not done, whatever the record says
    other.run(make_b)
    assert made == ["aaaa", "bbbbbb", "bbbbbb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.bin.json"]


def test_records_of_earlier_versions_and_damaged_ones(tmp_path):
    f = tmp_path / "recipe.hash"
    f.write_text("0123456789abcdef\n")  # an earlier version's stamp: the key on one line
    assert read_record(f) == {"key": "0123456789abcdef"}
    assert Step(f, "0123456789abcdef").done() == {"key": "0123456789abcdef"}
    f.write_text("1e5\n")  # a key that JSON would read as a number is still a key
    assert read_record(f) == {"key": "1e5"}
    for damaged in ('{"key": "0123', '{"key": "0123"', "", '{"key": ' + "[" * 500 + "]" * 500 + "}"):
        f.write_text(damaged)
        assert Step(f, "0123").done() is None, damaged
    f.write_bytes(b"\xff\xfe\x00")
    assert read_record(f) is None and read_record(tmp_path / "absent") is None


def test_a_step_that_fails_after_touching_its_output_leaves_no_record(tmp_path):
    """A failure (or a kill) between the output being replaced and the record written: the old record is gone
    first, so the new output is never taken for the old step's."""
    made: list[str] = []
    step_a, make_a = _counting_step(tmp_path, "aaaa", made)
    step_a.run(make_a)
    step_b = Step(tmp_path / "out.bin.json", "bbbb", tmp_path / "out.bin")

    def dies():
        (tmp_path / "out.bin").write_bytes(b"bbbb")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        step_b.run(dies)
    assert step_a.done() is None and step_b.done() is None


KILLED = """
import os, signal, sys
from pathlib import Path
from forgetless.chains.steps import Step
out = Path(sys.argv[1])
def make():
    out.write_bytes(b"new")
    os.kill(os.getpid(), signal.SIGKILL)
Step(out.with_name("rec.json"), "new", out).run(make)
"""


def test_a_writer_killed_mid_step_leaves_the_step_to_redo(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    Step(tmp_path / "rec.json", "old", out).save()
    p = subprocess.run([sys.executable, "-c", KILLED, str(out)], capture_output=True, check=False)
    assert p.returncode == -signal.SIGKILL and out.read_bytes() == b"new"
    assert Step(tmp_path / "rec.json", "old", out).done() is None
    assert Step(tmp_path / "rec.json", "new", out).done() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_content_addressed_record_is_its_own_key(tmp_path):
    step = Step(tmp_path / f"{fingerprint({'w': 1}, 24)}.json")
    assert step.done() is None
    assert step.save({"accuracy": 0.5}) == {"accuracy": 0.5} and step.done() == {"accuracy": 0.5}
    step.record.write_text(json.dumps({"accuracy": 0.25}, indent=2) + "\n")  # as earlier versions wrote
    assert step.done() == {"accuracy": 0.25}


# ------------------------------------------------------------------------------------------- atomic_write
def test_atomic_write_bytes_text_and_a_writer_function(tmp_path):
    assert atomic_write(tmp_path / "a" / "b.txt", "π\n").read_bytes() == "π\n".encode()
    assert atomic_write(tmp_path / "c.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "d.txt", lambda p: p.write_text("by path"))
    assert (tmp_path / "d.txt").read_text() == "by path"
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "c.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c.bin", "d.txt"]


def test_atomic_write_keeps_the_old_file_on_failure_and_without_replace(tmp_path):
    f = tmp_path / "f.json"
    f.write_text("old")

    def fails(p: Path) -> None:
        p.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as e:
        atomic_write(f, fails)
    assert e.value.filename == str(f) and f.read_text() == "old"  # the error names the file being written
    with pytest.raises(FileExistsError):
        atomic_write(f, "new", replace=False)
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    atomic_write(tmp_path / "g.json", "new", replace=False)
    assert (tmp_path / "g.json").read_text() == "new"


# ------------------------------------------------------------------------------------------------ read_json
def test_read_json_names_the_file_and_the_remedy(tmp_path):
    with pytest.raises(ForgetlessError, match=r"absent\.json: not found — do this"):
        read_json(tmp_path / "absent.json", remedy="do this")
    with pytest.raises(ForgetlessError, match=r"d: not a file — do this"):
        (tmp_path / "d").mkdir()
        read_json(tmp_path / "d", remedy="do this")
    (tmp_path / "l.json").write_text("[1]")
    assert read_json(tmp_path / "l.json", remedy="x") == [1]
    with pytest.raises(ForgetlessError, match=r"l\.json: not a JSON object — do this"):
        read_json(tmp_path / "l.json", remedy="do this", expect=dict)
    (tmp_path / "o.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "o.json", remedy="x", expect=dict) == {"a": 1}
    with pytest.raises(ForgetlessError, match=r"o\.json: not a JSON array"):
        read_json(tmp_path / "o.json", remedy="x", expect=list)


# ---------------------------------------------------------------------------------------- evaluation cache
def test_the_evaluation_cache_reuses_reads_earlier_entries_and_redoes_a_damaged_one(tmp_path, monkeypatch):
    from forgetless.eval import cache as EC

    calls: list[tuple[str, ...]] = []

    def evaluate(model, tasks, general, **kw):
        calls.append(tuple(tasks) + tuple(general))
        return {
            "tasks": {n: {"kind": "downstream", "accuracy": 0.5, "correct_items": "10"} for n in tasks}
            | {n: {"kind": "general_text", "accuracy": 1.0, "correct_items": "11"} for n in general},
            "seconds": 1.0,
        }

    monkeypatch.setattr("forgetless.eval.harness.evaluate", evaluate)
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w")
    task, probes = tmp_path / "t.jsonl", tmp_path / "p.jsonl"
    task.write_text('{"question": "q", "answer": "a"}\n')
    probes.write_text('{"question": "p", "answer": "a"}\n')
    cache = tmp_path / "cache"
    r1, hit1 = EC.cached_evaluate(model, {"t": task}, {"p": probes}, cache_dir=cache, log=None)
    r2, hit2 = EC.cached_evaluate(model, {"t": task}, {"p": probes}, cache_dir=cache, log=None)
    assert (hit1, hit2, calls) == (False, True, [("t", "p")]) and r1 == r2
    # the entry's name is the fingerprint of what determines it, as earlier versions named it
    fields = {
        "v": EC.EVAL_VERSION,
        "w": EC.weights_digest(model),
        "split": "test",
        "name": "t",
        "group": 0,
        "t": EC._task_digest(task, "test", cache),
        "limit": None,
    }
    entry = cache / f"{hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]}.json"
    assert entry.is_file()
    entry.write_text(
        json.dumps({**read_record(entry), "accuracy": 0.25}, indent=2) + "\n"
    )  # an earlier writer's
    r3, hit3 = EC.cached_evaluate(model, {"t": task}, {"p": probes}, cache_dir=cache, log=None)
    assert hit3 and r3["tasks"]["t"]["accuracy"] == 0.25
    entry.write_text(entry.read_text()[:20])  # a damaged entry: evaluated again, not a crash
    r4, hit4 = EC.cached_evaluate(model, {"t": task}, {"p": probes}, cache_dir=cache, log=None)
    assert not hit4 and calls == [("t", "p"), ("t",)] and r4["tasks"]["t"]["accuracy"] == 0.5
    assert read_record(entry)["accuracy"] == 0.5 and len(list(cache.iterdir())) == 2


def test_the_evaluation_cache_moves_with_its_workdir_and_tells_equal_task_files_apart(tmp_path, monkeypatch):
    """A workdir copied to another folder (another machine, another checkout) reads its entries back; the same
    task file's content in another folder (other images beside it) is another task."""
    import shutil

    from forgetless.eval import cache as EC

    calls: list[str] = []

    def evaluate(model, tasks, general, **kw):
        calls.extend(tasks)
        return {"tasks": {n: {"kind": "downstream", "accuracy": 0.5, "correct_items": "10"} for n in tasks}}

    monkeypatch.setattr("forgetless.eval.harness.evaluate", evaluate)
    a = tmp_path / "a"
    (a / "m").mkdir(parents=True)
    (a / "m" / "model.safetensors").write_bytes(b"w")
    (a / "tasks" / "t").mkdir(parents=True)
    (a / "tasks" / "t" / "test.jsonl").write_text(
        '{"question": "q", "answer": "a", "image": "images/0.png"}\n'
    )

    def run(root: Path, task_dir: str = "tasks/t") -> bool:
        return EC.cached_evaluate(
            root / "m", {"t": root / task_dir}, None, cache_dir=root / "eval-cache", log=None
        )[1]

    assert not run(a) and run(a) and calls == ["t"]
    shutil.copytree(a, tmp_path / "elsewhere" / "b")
    assert run(tmp_path / "elsewhere" / "b") and calls == ["t"]
    shutil.copytree(a / "tasks" / "t", a / "tasks" / "u")
    assert not run(a, "tasks/u") and calls == ["t", "t"]
