"""kill -9 at every step of a `continual add` commit (tests/test_state_safety.py runs it as a script).

For k = 1, 2, …: restore the pristine state, fork a child that runs the add with every file-system step of the
commit (renames, swaps, syncs, removals) counted and SIGKILLs itself just before the k-th, until a child runs to
the end. After each kill the parent reads the state as the next command would (``load_state``: the old or the new
task count, never "not found"), then adds one more task to it (that must work, whatever the kill left). With
``fallback`` the file system is taken to lack RENAME_EXCHANGE (the two-rename replace and its recovery). With
``"merge": true`` the steps are `continual merge` steps (``model``, ``next_model``) instead of `continual add`'s.

    python crash_worker.py SPEC.json  →  prints one JSON line: {"kills": [[k, tasks_after_kill, tasks_after_add]…],
                                         "states": [the stored tensors' hashes after each kill…]}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from forgetless.chains import continual
from forgetless.checkpoint import writer as W


def _kill_at(k: int, fallback: bool) -> None:
    """Patch the commit's file-system steps so that the k-th of them is never done: SIGKILL just before it."""
    count = [0]

    def counted(fn):
        def step(*a, **kw):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)

        return step

    if fallback:
        W._rename_exchange = lambda a, b: False
    for name in ("_rename_noreplace", "_rename_exchange", "fsync_path"):
        setattr(W, name, counted(getattr(W, name)))
    os.replace = counted(os.replace)
    shutil.rmtree = counted(shutil.rmtree)


def _tasks(state: Path, spec: dict) -> int:
    from forgetless.chains.continual_merge import load_merge_state

    return len((load_merge_state if spec.get("merge") else continual.load_state)(state)["tasks"])


def _step(state: Path, spec: dict, out: Path | None, prefix: str = "") -> None:
    """One step on `state` with the spec's inputs (``prefix="next_"``: the next task's)."""
    if spec.get("merge"):
        from forgetless.chains.continual_merge import merge_step

        merge_step(state, model=spec[f"{prefix}model"], out=out, device="cpu", log=None)
    else:
        continual.add_task(
            state, adapter=spec[f"{prefix}adapter"], gram=spec[f"{prefix}gram"], out=out, log=None
        )


def digest(state: str | Path) -> dict[str, str]:
    """Every tensor of the state's part files, hashed (the files' headers order their metadata as they please)."""
    out = {}
    for p in sorted(Path(state).glob("part-*.safetensors")):
        for k, t in load_file(str(p)).items():
            out[f"{p.name}/{k}"] = hashlib.sha256(t.numpy().tobytes()).hexdigest()
    return out


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    state, pristine, out = Path(spec["state"]), Path(spec["pristine"]), Path(spec["out"])
    kills, states = [], []
    for k in range(1, 200):
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, state)
        pid = os.fork()
        if pid == 0:
            _kill_at(k, spec["fallback"])
            _step(state, spec, out)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, f"step {k}: the child failed"
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        after_kill = _tasks(state, spec)  # as the next command reads it: a state moved aside is put back
        states.append(digest(state))
        _step(state, spec, None, "next_")
        kills.append([k, after_kill, _tasks(state, spec)])
    print(json.dumps({"kills": kills, "completed": _tasks(state, spec), "states": states}))


def run(spec: dict, folder: Path) -> dict:
    """Run this script on `spec` (written into `folder`) in a new process; its JSON line."""
    import subprocess

    (folder / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run(
        [sys.executable, __file__, str(folder / "spec.json")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.splitlines()[-1])


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
