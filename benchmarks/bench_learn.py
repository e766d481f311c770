"""What one step of `forgetless learn --objective entropy` costs on the testbed, with each multiple-choice prompt run
once (the harness's fast path: its keys and values reused by every option) against each (question, option) sequence
run whole.

    .venv/bin/python benchmarks/bench_learn.py [--finetuned runs/testbed/count_many/finetuned] [--steps 4] [--json out.json]

The learner of the testbed's learned-λ curve (WiSE-FT's λ per layer, count_many's validation items against the
general tasks' validation items, batch 8, float32) is built once; then steps (objective and its gradient in the
coefficients, on the same mini-batches) alternate between the two ways, ``--steps`` each. Reported: seconds per
step, median and range, their ratio, and the largest difference of objective and gradient between the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from forgetless.eval import harness
from forgetless.eval.learn import Learner, LearnOptions, _draws
from forgetless.testbed import tasks as T
from forgetless.testbed.build import testbed_model


def step(learner: Learner, task: list[int], general: list[int]) -> tuple[float, float, torch.Tensor]:
    """(seconds, objective, gradient) of one step at the start coefficients."""
    raw = learner.raw_start().requires_grad_(True)
    start = time.perf_counter()
    value = learner.value(raw, task, general)
    (grad,) = torch.autograd.grad(value, raw)
    return time.perf_counter() - start, float(value.detach()), grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetuned", default="runs/testbed/count_many/finetuned")
    ap.add_argument("--task-root", default="runs/testbed/tasks")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    base = testbed_model()
    recipe = {"method": "linear", "base": str(base), "models": [a.finetuned], "parameters": {"lambda": 0.5}}
    general = {n: str(Path(a.task_root) / n) for n in [*T.GENERAL_VISUAL, "probes"]}
    options = LearnOptions(objective="entropy", by="layer", general_weight=1.0, batch_size=8, device="cpu")
    learner = Learner(recipe, {"count_many": str(Path(a.task_root) / "count_many")}, general, options)
    task_draw = _draws(len(learner.objective.task), 8, 0)
    general_draw = _draws(len(learner.objective.general), 8, 1)
    fast_parts = harness._fast_parts
    times: dict[str, list[float]] = {"fast": [], "whole": []}
    worst = {"objective": 0.0, "gradient": 0.0}
    for i in range(a.steps):
        batch = (task_draw(), general_draw())
        got = {}
        for way in ("fast", "whole") if i % 2 == 0 else ("whole", "fast"):
            harness._fast_parts = fast_parts if way == "fast" else (lambda model: None)
            seconds, value, grad = step(learner, *batch)
            times[way].append(seconds)
            got[way] = (value, grad)
            print(f"step {i + 1}/{a.steps} {way}: {seconds:.1f} s, objective {value:.5f}", flush=True)
        harness._fast_parts = fast_parts
        worst["objective"] = max(worst["objective"], abs(got["fast"][0] - got["whole"][0]))
        worst["gradient"] = max(worst["gradient"], float((got["fast"][1] - got["whole"][1]).abs().max()))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "threads": torch.get_num_threads(),
        "groups": len(learner.groups),
        "seconds": times,
        "median": med,
        "speedup": med["whole"] / med["fast"],
        "max_difference": worst,
    }
    for way, v in times.items():
        print(f"{way}: {med[way]:.1f} s per step (range {min(v):.1f}–{max(v):.1f})")
    print(f"fast path: {result['speedup']:.2f}× faster; largest difference {worst}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
