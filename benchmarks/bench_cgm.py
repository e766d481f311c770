"""CGM and CGM† merge time against task arithmetic on the foundation benchmark's checkpoints (issue 4).

    .venv/bin/python benchmarks/bench_cgm.py [--runs 3] [--bench-dir bench-out]

Base: the embedded SmolLM2-135M in fp32; fine-tuned: a seeded perturbed copy (bench_merge.py's `smollm2-ft1` when
present, else made here); two Fisher files over every tensor of the model (so as large as the model, 513 MiB each,
seeded positive random values, with the metadata `forgetless stats` writes). Each merge runs through the CLI as a
subprocess, interleaved, `--runs` times; the table quotes median wall times and the ratio to task arithmetic.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from forgetless.checkpoint.reader import CheckpointReader
from forgetless.embedded import export_smollm2

CLI = [sys.executable, "-m", "forgetless.cli"]


def prepare(root: Path) -> tuple[Path, Path, dict[str, Path]]:
    base = export_smollm2()
    ft = root / "ckpt" / "smollm2-ft1"
    if not ft.exists():
        shutil.copytree(base, ft)
        sd = load_file(str(base / "model.safetensors"))
        g = torch.Generator().manual_seed(1)
        save_file(
            {
                k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g)
                if v.is_floating_point() and v.numel() > 1
                else v
                for k, v in sd.items()
            },
            str(ft / "model.safetensors"),
            metadata={"format": "pt"},
        )
    fp = CheckpointReader(base).fingerprint()
    files = {}
    for i, role in enumerate(("fisher_task", "fisher_general")):
        path = files[role] = root / "cgm" / f"{role}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(10 + i)
            reader = CheckpointReader(base)
            stats = {n: torch.rand(reader.info(n).shape, generator=g) * 1e-6 for n in reader.names()}
            save_file(
                stats, str(path), metadata={"kind": "fisher", "num_samples": "16", "model_fingerprint": fp}
            )
    return base, ft, files


def timed(recipe: dict, root: Path, name: str) -> float:
    rpath, out = root / "cgm" / f"{name}.yaml", root / "cgm" / f"out-{name}"
    rpath.write_text(yaml.safe_dump(recipe))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([*CLI, "merge", str(rpath), "--out", str(out), "--quiet"], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bench-dir", type=Path, default=Path("bench-out"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    base, ft, files = prepare(args.bench_dir)
    common = {"base": str(base), "models": [str(ft)]}
    stats = {k: str(v) for k, v in files.items()}
    recipes = {
        "task_arithmetic": {**common, "method": "task_arithmetic", "parameters": {"lambda": 0.5}},
        "cgm": {**common, "method": "cgm", "statistics": stats},
        "cgm_dagger": {**common, "method": "cgm_dagger", "statistics": stats},
    }
    times: dict[str, list[float]] = {k: [] for k in recipes}
    for run in range(args.runs):
        for name, recipe in recipes.items():
            times[name].append(timed(recipe, args.bench_dir, name))
        print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| merge (whole model in scope) | median s | vs task arithmetic |\n|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {v / med['task_arithmetic']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "median_s": med}, indent=2))


if __name__ == "__main__":
    main()
