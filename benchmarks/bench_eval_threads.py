"""How a long testbed run should use the cores: one process with N torch threads, or N processes with one each.

    .venv/bin/python benchmarks/bench_eval_threads.py [--per-task 40] [--runs 3] [--cores 2] [--json out.json]

Each worker loads the testbed model, encodes the items of :mod:`bench_eval` once (the first ``--per-task`` test items
of each general task, the probes and count_many), then evaluates them ``--reps`` times warm, as the second and later
models of a frontier do, at the report's batch, and prints its items/s. Per run, interleaved: one worker with
``--cores`` threads alone, then ``--cores`` one-thread workers side by side. The side-by-side throughput is the sum of
their rates (they run the same work over the same span). Reports medians with their range and the ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(task_root: Path, per_task: int, reps: int) -> None:
    """Print the items/s of `reps` warm evaluations (the threads come from OMP_NUM_THREADS)."""
    sys.path.insert(0, str(HERE.parent))
    from bench_eval import run_eval, subset

    from forgetless.testbed.build import testbed_model
    from forgetless.testbed.context import EVAL_BATCH

    model = testbed_model()
    with tempfile.TemporaryDirectory() as tmp:
        files = subset(task_root, Path(tmp), per_task)
        run_eval(model, files, EVAL_BATCH)  # encodes every item once
        rates = [run_eval(model, files, EVAL_BATCH, warm=True)[0] for _ in range(reps)]
    print(json.dumps(statistics.median(rates)), flush=True)


def launch(threads: int, a: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(HERE), "--worker", "--task-root", a.task_root, "--per-task", str(a.per_task)]
    return subprocess.Popen(
        [*cmd, "--reps", str(a.reps)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def rate(p: subprocess.Popen) -> float:
    out, _ = p.communicate()
    if p.returncode:
        raise SystemExit(f"a worker failed (exit {p.returncode})")
    return float(out.strip().splitlines()[-1])


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-task", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="warm evaluations per worker")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--task-root", default="runs/testbed/tasks")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(Path(a.task_root), a.per_task, a.reps)
    one, side = [], []
    for run in range(a.runs):
        one.append(rate(launch(a.cores, a)))
        side.append(sum(rate(p) for p in [launch(1, a) for _ in range(a.cores)]))
        print(
            f"run {run}: one process × {a.cores} threads {one[-1]:.2f} items/s; "
            f"{a.cores} processes × 1 thread {side[-1]:.2f} items/s in all",
            flush=True,
        )
    ratios = [s / o for s, o in zip(side, one)]
    print(f"\none process, {a.cores} threads: {summary(one)} items/s")
    print(f"{a.cores} processes, 1 thread each: {summary(side)} items/s in all; ratio {summary(ratios)}")
    if a.json:
        Path(a.json).write_text(
            json.dumps({"one_process": one, "side_by_side": side, "ratio": ratios}, indent=1)
        )


if __name__ == "__main__":
    main()
