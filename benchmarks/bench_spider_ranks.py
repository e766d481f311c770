"""Memory of the keep rules per rank: one process against FSDP2 on N ranks (issue 15, part 2).

    .venv/bin/python benchmarks/bench_spider_ranks.py [--ranks 2] [--steps 3] [--json out.json]

The model is the embedded SmolLM2-135M-Instruct (the testbed's language model), trainable decoder layers 18–29 as
in the testbed's fine-tuning recipe (42.5 M entries), AdamW left out: the rule alone is measured. First in this
process, unsharded; then under ``torchrun --standalone --nproc-per-node N`` (gloo) with ``fully_shard`` on every decoder layer and at the root, so each rank holds its pieces of every tensor.
For each rule (SPIDER, MagnitudeMask) and each rank: what the rule keeps, from its own tensors — θ₀, then G
(SPIDER) or the mask (MagnitudeMask), then SPIDER's scratch — checked to add up to ``rule.extra_bytes()``; and the
median time per step inside the rule (``accumulate`` + ``apply``, on the gradients of a real backward of a batch
of 4 rows × 128 random tokens, each rank its 4/N rows): wall time, collectives and waits for the other ranks
included, and the CPU time of the rule's own thread. Every process runs one thread (on a shared machine, several
threads per process make the many small parallel regions of the rule wait on each other).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from forgetless.embedded import export_smollm2
from forgetless.train import make_rule

RULES = ("spider", "magnitude_mask")
TRAIN = range(18, 30)  # the testbed recipe's language.layers[18:30]
ROWS, TOKENS = 4, 128


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(steps: int) -> list[dict]:
    """Both rules on this process's model (sharded when a process group is up); one row per rule."""
    from transformers import LlamaForCausalLM

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = LlamaForCausalLM.from_pretrained(export_smollm2(), dtype=torch.float32).train()
    model.requires_grad_(False)
    for i in TRAIN:
        model.model.layers[i].requires_grad_(True)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (ROWS, TOKENS), generator=g)[rank::world]
    rows = []
    for name in RULES:
        rule = make_rule(name, params)
        theta0 = nbytes(rule.theta0.values())
        second = nbytes(rule.grad_sum.values() if name == "spider" else rule.mask.values())
        scratch = nbytes(rule._scratch.values()) if name == "spider" else 0
        assert theta0 + second + scratch == rule.extra_bytes()
        times, cpu = [], []
        for _ in range(steps + 1):  # the first step is left out
            model(input_ids=ids, labels=ids).loss.backward()
            t, c = time.perf_counter(), time.thread_time()
            rule.accumulate()
            rule.apply()
            times.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
            model.zero_grad(set_to_none=True)
        rows.append(
            {
                "rule": name,
                "ranks": world,
                "rank": rank,
                "threads": torch.get_num_threads(),
                "entries": rule.numel,
                "local_entries": sum(t.numel() for t in rule.theta0.values()),
                "theta0_bytes": theta0,
                "second_bytes": second,
                "scratch_bytes": scratch,
                "extra_bytes": rule.extra_bytes(),
                "median_rule_ms": round(statistics.median(times[1:]) * 1e3, 1),
                "median_rule_cpu_ms": round(statistics.median(cpu[1:]) * 1e3, 1),
            }
        )
    return rows


def worker(steps: int, out: Path) -> None:
    dist.init_process_group("gloo")
    rows = measure(steps)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        out.write_text(json.dumps([r for part in gathered for r in part]))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # set by the torchrun launch: where rank 0 writes
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        worker(args.steps, Path(args.worker))
        return

    rows = measure(args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(args.ranks),
                __file__,
                "--steps",
                str(args.steps),
                "--worker",
                str(out),
            ],
            check=True,
            env=env,
        )
        rows += json.loads(out.read_text())
    mib = 2**20
    print(
        f"\n{'rule':15s} {'ranks':>5s} {'rank':>4s} {'entries':>11s} {'θ₀ MiB':>8s} {'G/mask MiB':>11s} "
        f"{'scratch MiB':>12s} {'extra_bytes()':>14s} {'rule ms/step':>13s} {'CPU ms':>7s}"
    )
    for r in sorted(rows, key=lambda r: (r["rule"], r["ranks"], r["rank"])):
        print(
            f"{r['rule']:15s} {r['ranks']:5d} {r['rank']:4d} {r['local_entries']:11,d} "
            f"{r['theta0_bytes'] / mib:8.1f} {r['second_bytes'] / mib:11.1f} {r['scratch_bytes'] / mib:12.2f} "
            f"{r['extra_bytes']:14,d} {r['median_rule_ms']:13.1f} {r['median_rule_cpu_ms']:7.1f}"
        )
    for name in RULES:
        one = next(r["extra_bytes"] for r in rows if r["rule"] == name and r["ranks"] == 1)
        per_rank = max(r["extra_bytes"] for r in rows if r["rule"] == name and r["ranks"] == args.ranks)
        print(f"{name}: largest rank {per_rank / one:.3f} of one process ({args.ranks} ranks)")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"ranks": args.ranks, "steps": args.steps, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
