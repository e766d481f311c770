"""Cost of the keep rules per fine-tuning step on the testbed (CPU): plain fine-tuning against SPIDER and
MagnitudeMask, the documented testbed recipe (layers 18–29 + projector of the testbed LLaVA, 42.9 M trainable
parameters, batch 8, AdamW).

    .venv/bin/python benchmarks/bench_spider.py [--steps 12] [--runs 3] [--task count_many] [--json out.json]

Each run fine-tunes once per rule (plain, SPIDER, MagnitudeMask; the order rotates between runs) with
``forgetless.train.finetune`` and the same seed, so every rule sees the same batches. A timing hook records the end of
every step and the time spent inside the rule (``accumulate`` before the optimizer step, ``apply`` after it). The
first step of each fine-tune is left out (SPIDER captures θ₀ there). Reported: the median step time per rule, the
median time inside the rule, the overhead = median step with the rule / median plain step − 1 (across runs: on
2 cores the forward/backward alone drifts by ±10% from one fine-tune to the next), and the in-step overhead =
median over the rule's own steps of time in the rule / (step − time in the rule), immune to that drift.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from forgetless.testbed import experiment as X
from forgetless.testbed import tasks as T
from forgetless.testbed.build import testbed_model
from forgetless.train import finetune, make_rule

RULES = ("none", "spider", "magnitude_mask")


class Timed:
    """A finetune hook around a keep rule (or none): step end times and the time spent in the rule."""

    def __init__(self, keep: str) -> None:
        self.rule = make_rule(keep)  # θ₀ captured at the first before_step
        self.ends: list[float] = []
        self.inside: list[float] = []
        self._t = 0.0

    def before_step(self, info) -> None:
        t = time.perf_counter()
        if self.rule is not None:
            self.rule.before_step(info)
        self._t = time.perf_counter() - t

    def after_step(self, info) -> None:
        t = time.perf_counter()
        if self.rule is not None:
            self.rule.after_step(info)
        now = time.perf_counter()
        self.inside.append(self._t + now - t)
        self.ends.append(now)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--task", default="count_many", choices=T.DOWNSTREAM)
    ap.add_argument(
        "--tasks-root", default="runs/testbed/tasks", help="where the testbed tasks are (made if not)"
    )
    ap.add_argument("--json")
    args = ap.parse_args()

    base = testbed_model()
    data = T.write_tasks(Path(args.tasks_root), [args.task])[args.task] / "train.jsonl"
    recipe = {k: v for k, v in X.FINETUNE.items() if k != "steps"}
    steps: dict[str, list[float]] = {r: [] for r in RULES}
    inside: dict[str, list[float]] = {r: [] for r in RULES}
    in_step: dict[str, list[float]] = {r: [] for r in RULES}  # rule / (step − rule), step by step
    extra: dict[str, int] = {}
    print(
        f"{torch.get_num_threads()} threads; {args.runs} runs × {len(RULES)} rules × {args.steps} steps, "
        f"batch {recipe['batch_size']}, task {args.task}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            order = RULES[run % len(RULES) :] + RULES[: run % len(RULES)]
            for keep in order:
                timed = Timed(keep)
                out = Path(tmp) / f"{keep}-{run}"
                finetune(base, data, out, steps=args.steps, hook=timed, log=None, **recipe)
                shutil.rmtree(out)
                d = [b - a for a, b in zip(timed.ends, timed.ends[1:], strict=False)]  # steps 2..n
                steps[keep] += d
                inside[keep] += timed.inside[1:]
                in_step[keep] += [r / (s - r) for s, r in zip(d, timed.inside[1:], strict=True)]
                if timed.rule is not None:
                    extra[keep] = timed.rule.extra_bytes()
                print(
                    f"run {run + 1} {keep:15s} step {statistics.median(d):.3f} s  "
                    f"in rule {statistics.median(timed.inside[1:]) * 1e3:.1f} ms"
                )
    plain = statistics.median(steps["none"])
    rows = []
    print(
        f"\n{'rule':15s} {'step (s)':>9s} {'in rule (ms)':>13s} {'overhead':>9s} {'in-step':>8s} "
        f"{'extra MiB':>10s}"
    )
    for keep in RULES:
        step, rule, own = (statistics.median(x[keep]) for x in (steps, inside, in_step))
        row = {
            "rule": keep,
            "median_step_s": round(step, 4),
            "median_in_rule_ms": round(rule * 1e3, 2),
            "overhead": round(step / plain - 1, 4),
            "in_step_overhead": round(own, 4),
            "extra_mib": round(extra.get(keep, 0) / 2**20, 1),
            "steps_timed": len(steps[keep]),
        }
        rows.append(row)
        print(
            f"{keep:15s} {step:9.3f} {rule * 1e3:13.1f} {step / plain - 1:+9.1%} {own:+8.1%} "
            f"{row['extra_mib']:10.1f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "threads": torch.get_num_threads(),
                    "task": args.task,
                    "steps": args.steps,
                    "runs": args.runs,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
