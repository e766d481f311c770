"""Continual LPM steps at LLaVA-1.5-7B shapes: time and peak memory per `continual add`, against the task index t.

    .venv/bin/python benchmarks/bench_continual.py [--layers 2] [--tasks 4] [--approx full diagonal] [--rank 16]
                                                  [--scale 1.0] [--bench-dir DIR]

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
the measured one (one layer's part in memory, whatever the number of layers). Results:
benchmarks/bench_continual_results.json.
"""

from __future__ import annotations

import argparse
import json
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


def write_task(root: Path, base: Path, mods: dict[str, tuple[int, int]], rank: int, seed: int) -> tuple[Path, Path]:
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
            entries += [Entry(f"base_model.model.{mod}.lora_A.weight", (rank, i), torch.float32),
                        Entry(f"base_model.model.{mod}.lora_B.weight", (o, rank), torch.float32)]
        w = StreamingWriter(adapter, entries, shard_size=1 << 62, force=True, single_name="adapter_model.safetensors")
        for e in entries:
            w.write(e.name, torch.randn(e.shape, generator=g) * (0.02 if "lora_A" in e.name else 0.01))
        cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
               "base_model_name_or_path": "llava-hf/llava-1.5-7b-hf", "fan_in_fan_out": False}
        w.commit(extra_files={"adapter_config.json": json.dumps(cfg, indent=2)})
    if not gram.is_file():
        fps = model_fingerprints(base)
        tokens = 4096
        meta = {"kind": "gram", "num_samples": "64", "data_fingerprint": f"synthetic{seed}", **fps,
                "token_counts": json.dumps(dict.fromkeys(mods, tokens), sort_keys=True)}
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


def child(state: str, adapter: str, gram: str, approx: str, seconds_file: str) -> None:
    from forgetless.chains.continual import add_task

    report = add_task(state, adapter=adapter, gram=gram, out=None, base=str(Path(state).parent / "base"),
                      approx=approx, log=None)
    Path(seconds_file).write_text(str(report.seconds))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--approx", nargs="+", default=["full", "diagonal"])
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
    results: dict = {"layers": a.layers, "scale": a.scale, "rank": a.rank, "modules": len(mods), "runs": {}}
    for approx in a.approx:
        state = root / f"state-{approx}"
        shutil.rmtree(state, ignore_errors=True)
        steps = []
        for t, (adapter, gram) in enumerate(tasks, 1):
            secs = root / "step_seconds.txt"
            cmd = [sys.executable, str(HERE), "--child", str(state), str(adapter), str(gram), approx, str(secs)]
            res = run_measured(cmd, root / f"log-{approx}-{t}.txt", a.poll_ms)
            step_s = float(secs.read_text())
            size = sum(f.stat().st_size for f in state.iterdir())
            steps.append({"t": t, "process_wall_s": round(res["wall_s"], 2), "step_s": round(step_s, 2),
                          "peak_rss_mib": round(res["peak_rss_mib"]), "state_mib": round(size / 2**20, 1),
                          "step_s_32_layers": round(step_s * 32 / a.layers, 1)})
            print(approx, steps[-1], flush=True)
        results["runs"][approx] = steps
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
