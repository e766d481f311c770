"""Continual LPM steps at LLaVA-1.5-7B shapes: time and peak memory per `continual add`, against the task index t.

    .venv/bin/python benchmarks/bench_continual.py [--layers 2] [--tasks 4] [--approx full diagonal] [--rank 16]
                                                  [--scale 1.0] [--bench-dir DIR] [--repeat N] [--device cpu]

Inputs, synthetic:
- the base: bench_lora_merge's sparse LLaVA-1.5-7B-hf-shaped folder (names and shapes only; a state update reads
  nothing else of it). ``--scale`` < 1 shrinks hidden and intermediate sizes (a quick check of this script);
- per task a rank-``--rank`` adapter on q, k, v, o, gate, up, down of the first ``--layers`` decoder layers, and a
  Gram file over the same weights as `stats gram` writes it (float32 sums and token counts; q/k/v and gate/up share
  one matrix, as they read one input). Each Gram is D + UUᵀ (D positive diagonal, U [in, 64]): positive definite,
  made in O(in²·64), not O(in³).

Measured: each `add_task(state, adapter, gram, out=None)` (the state update alone; the fold is the engine's
streaming fold, the rank-r output a truncated SVD per module) in a fresh child process (the process's wall time and
kernel peak RSS: bench_merge.py's `run_measured`; the step's own time, without Python and torch starting, as
``step_s``), for t = 1…``--tasks``. A step streams the state one decoder layer at a time, so
its time and memory are per layer: the 32-layer figure is the measured time × 32 / ``--layers``, its peak memory
the measured one (one layer's part in memory, whatever the number of layers). ``--repeat N`` runs the whole
sequence N times from an empty state and reports each step's median and [min, max]; ``--device`` is `continual
add`'s (where the solves run). Results: benchmarks/bench_continual_results.json (``--out``).

The FLOP floor (full Grams): what a step cannot avoid, :func:`forgetless.methods.lpm.lpm_step_flops` summed
over the step's modules (one factorisation per distinct Gram: q/k/v and gate/up share theirs; ΔW*ₜ₋₁Gₜ from
t = 2 on), divided by the float64 GEMM rate measured here, in a fresh child process with the steps' threads:
the best of 3 float64 products [h, h]·[h, h] at the model's hidden size h, the shape of most of the step's
products. A step's ``step_s / floor_s`` is how far it is from that floor (the state's reading and writing
included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import bench_lora_merge
from bench_lora_merge import TARGETS, llava7b_config
from bench_merge import run_measured

HERE = Path(__file__).resolve()
SHARED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gateup", "up_proj": "gateup"}


def write_base(path: Path, scale: float) -> dict[str, tuple[int, ...]]:
    """bench_lora_merge's sparse LLaVA-1.5-7B-shaped folder, hidden and intermediate sizes × `scale`."""
    if scale == 1.0:
        return bench_lora_merge.write_base(path)

    def scaled():
        cfg = llava7b_config()
        cfg.text_config.hidden_size = int(4096 * scale)
        cfg.text_config.intermediate_size = int(11008 * scale)
        cfg.text_config.head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
        return cfg

    bench_lora_merge.llava7b_config = scaled  # write_base builds its config through this module global
    try:
        return bench_lora_merge.write_base(path)
    finally:
        bench_lora_merge.llava7b_config = llava7b_config


def targets(shapes: dict[str, tuple[int, ...]], layers: int) -> dict[str, tuple[int, int]]:
    """Saved weight name -> (out, in) of every targeted Linear in the first `layers` decoder layers."""
    out = {}
    for n, s in shapes.items():
        parts = n.split(".")
        if ".language_model.layers." in n and parts[-2] in TARGETS and int(parts[3]) < layers:
            out[n] = s
    return out


def write_task(
    root: Path, base: Path, mods: dict[str, tuple[int, int]], rank: int, seed: int
) -> tuple[Path, Path]:
    """One task's adapter and Gram file (written one tensor at a time)."""
    import torch

    from forgetless.checkpoint.writer import Entry, StreamingWriter
    from forgetless.stats.store import model_fingerprints

    adapter, gram = root / f"adapter{seed}", root / f"gram{seed}.safetensors"
    g = torch.Generator().manual_seed(seed)
    if not (adapter / "adapter_model.safetensors").is_file():
        entries = []
        for n, (o, i) in mods.items():
            mod = n.removesuffix(".weight")
            entries += [
                Entry(f"base_model.model.{mod}.lora_A.weight", (rank, i), torch.float32),
                Entry(f"base_model.model.{mod}.lora_B.weight", (o, rank), torch.float32),
            ]
        w = StreamingWriter(
            adapter, entries, shard_size=1 << 62, force=True, single_name="adapter_model.safetensors"
        )
        for e in entries:
            w.write(e.name, torch.randn(e.shape, generator=g) * (0.02 if "lora_A" in e.name else 0.01))
        cfg = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(TARGETS),
            "base_model_name_or_path": "llava-hf/llava-1.5-7b-hf",
            "fan_in_fan_out": False,
        }
        w.commit(extra_files={"adapter_config.json": json.dumps(cfg, indent=2)})
    if not gram.is_file():
        fps = model_fingerprints(base)
        tokens = 4096
        meta = {
            "kind": "gram",
            "num_samples": "64",
            "data_fingerprint": f"synthetic{seed}",
            **fps,
            "token_counts": json.dumps(dict.fromkeys(mods, tokens), sort_keys=True),
        }
        entries = [Entry(n, (i, i), torch.float32) for n, (_, i) in mods.items()]
        tmp = root / f".gram{seed}"
        w = StreamingWriter(tmp, entries, shard_size=1 << 62, force=True, metadata=meta)
        by_input: dict[str, torch.Tensor] = {}
        for n, (_, i) in mods.items():
            key = n.rsplit(".", 2)[0] + "." + SHARED.get(n.split(".")[-2], n.split(".")[-2])
            if key not in by_input:
                by_input.clear()  # one layer's inputs at a time
                U = torch.randn(i, 64, generator=g)
                G = U @ U.T
                G.diagonal().add_(torch.rand(i, generator=g) * 10 + 1)
                by_input[key] = G.mul_(tokens / 64)
            w.write(n, by_input[key])
        w.commit()
        (tmp / "model.safetensors").rename(gram)
        tmp.rmdir()
    return adapter, gram


def child(state: str, adapter: str, gram: str, approx: str, seconds_file: str, device: str = "cpu") -> None:
    from forgetless.chains.continual import add_task

    report = add_task(
        state,
        adapter=adapter,
        gram=gram,
        out=None,
        base=str(Path(state).parent / "base"),
        approx=approx,
        device=device,
        log=None,
    )
    Path(seconds_file).write_text(str(report.seconds))


def step_flops(mods: dict[str, tuple[int, int]], rank: int, t: int) -> float:
    """The FLOP floor of step t over all the modules (full Grams): one factorisation per distinct Gram."""
    from forgetless.methods.lpm import lpm_step_flops

    seen: set[str] = set()
    total = 0.0
    for n, (o, i) in mods.items():
        key = n.rsplit(".", 2)[0] + "." + SHARED.get(n.split(".")[-2], n.split(".")[-2])
        total += lpm_step_flops(o, i, rank, previous=t > 1, factorise=key not in seen)
        seen.add(key)
    return total


def gemm_child(size: str, out_file: str) -> None:
    """The float64 GEMM rate (FLOP/s) of [size, size]·[size, size], best of 3, written to `out_file`."""
    import time

    import torch

    n = int(size)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    b = torch.randn(n, n, generator=g, dtype=torch.float64)
    c = a @ b  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    Path(out_file).write_text(
        json.dumps(
            {"size": n, "seconds": best, "flops_per_s": 2 * n**3 / best, "threads": torch.get_num_threads()}
        )
    )


def summary(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--approx", nargs="+", default=["full", "diagonal"])
    p.add_argument("--repeat", type=int, default=1, help="Run the whole sequence this many times.")
    p.add_argument("--device", default="cpu", help="continual add --device (where the solves run).")
    p.add_argument("--bench-dir", type=Path, default=Path("runs/bench_continual"))
    p.add_argument("--poll-ms", type=float, default=50.0)
    p.add_argument("--out", type=Path, default=HERE.parent / "bench_continual_results.json")
    a = p.parse_args()
    import shutil

    root = a.bench_dir / f"scale{a.scale}-layers{a.layers}"
    base = root / "base"
    shapes = write_base(base, a.scale)
    mods = targets(shapes, a.layers)
    tasks = [write_task(root, base, mods, a.rank, seed) for seed in range(1, a.tasks + 1)]
    hidden = min(i for _, i in mods.values())
    rate_file = root / "gemm_rate.json"
    run_measured(
        [sys.executable, str(HERE), "--gemm", str(hidden), str(rate_file)], root / "log-gemm.txt", a.poll_ms
    )
    gemm = json.loads(rate_file.read_text())
    print("float64 GEMM", gemm, flush=True)
    results: dict = {
        "layers": a.layers,
        "scale": a.scale,
        "rank": a.rank,
        "modules": len(mods),
        "device": a.device,
        "repeat": a.repeat,
        "gemm_float64": gemm,
        "runs": {},
    }
    for approx in a.approx:
        runs: list[list[dict]] = []
        for rep in range(a.repeat):
            state = root / f"state-{approx}"
            shutil.rmtree(state, ignore_errors=True)
            steps = []
            for t, (adapter, gram) in enumerate(tasks, 1):
                secs = root / "step_seconds.txt"
                cmd = [
                    sys.executable,
                    str(HERE),
                    "--child",
                    str(state),
                    str(adapter),
                    str(gram),
                    approx,
                    str(secs),
                    a.device,
                ]
                res = run_measured(cmd, root / f"log-{approx}-{t}.txt", a.poll_ms)
                step_s = float(secs.read_text())
                size = sum(f.stat().st_size for f in state.iterdir())
                step = {
                    "t": t,
                    "process_wall_s": round(res["wall_s"], 2),
                    "step_s": round(step_s, 2),
                    "peak_rss_mib": round(res["peak_rss_mib"]),
                    "state_mib": round(size / 2**20, 1),
                    "other_cpu_s": round(res["other_cpu_s"], 1),
                    "step_s_32_layers": round(step_s * 32 / a.layers, 1),
                }
                if approx == "full":
                    floor = step_flops(mods, a.rank, t) / gemm["flops_per_s"]
                    step.update(
                        flop_floor=step_flops(mods, a.rank, t),
                        floor_s=round(floor, 2),
                        over_floor=round(step_s / floor, 3),
                    )
                steps.append(step)
                print(approx, f"run {rep + 1}/{a.repeat}", steps[-1], flush=True)
            runs.append(steps)
        by_t = [[r[t] for r in runs] for t in range(len(tasks))]
        results["runs"][approx] = {
            "steps": runs,
            "summary": [
                {
                    "t": t + 1,
                    **{
                        k: summary([s[k] for s in group])
                        for k in ("step_s", "peak_rss_mib", "over_floor")
                        if k in group[0]
                    },
                }
                for t, group in enumerate(by_t)
            ],
        }
        print(approx, "summary", json.dumps(results["runs"][approx]["summary"]), flush=True)
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--gemm":
        gemm_child(*sys.argv[2:])
    else:
        main()
