"""kill -9 at every step of a `continual add` commit (tests/test_state_safety.py runs it as a script).

For k = 1, 2, …: restore the pristine state, fork a child that runs the add with every file-system step of the
commit (renames, swaps, syncs, removals) counted and SIGKILLs itself just before the k-th, until a child runs to
the end. After each kill the parent reads the state as the next command would (``load_state``: the old or the new
task count, never "not found"), then adds one more task to it (that must work, whatever the kill left). With
``fallback`` the file system is taken to lack RENAME_EXCHANGE (the two-rename replace and its recovery).

    python crash_worker.py SPEC.json  →  prints one JSON line: {"kills": [[k, tasks_after_kill, tasks_after_add]…]}
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

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


def _tasks(state: Path) -> int:
    return len(continual.load_state(state)["tasks"])


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    state, pristine, out = Path(spec["state"]), Path(spec["pristine"]), Path(spec["out"])
    add = {"adapter": spec["adapter"], "gram": spec["gram"], "log": None}
    kills = []
    for k in range(1, 200):
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, state)
        pid = os.fork()
        if pid == 0:
            _kill_at(k, spec["fallback"])
            continual.add_task(state, out=out, **add)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, f"step {k}: the child failed"
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        after_kill = _tasks(state)
        continual.add_task(state, adapter=spec["next_adapter"], gram=spec["next_gram"], out=None, log=None)
        kills.append([k, after_kill, _tasks(state)])
    print(json.dumps({"kills": kills, "completed": _tasks(state)}))


if __name__ == "__main__":
    main(sys.argv[1])
