"""The re-factoring SVD of the adapter-space baselines at LLaVA-1.5-7B's widest shape: exact against randomized.

    .venv/bin/python benchmarks/bench_svd.py [--out 4096] [--in 11008] [--models 8] [--rank 16] [--runs 3]
    .venv/bin/python benchmarks/bench_svd.py --whole [--runs 3]
    .venv/bin/python benchmarks/bench_svd.py --trained

One module: `--models` random rank-`--rank` adapters (factors N(0, 0.01²)), their deltas merged by TIES (density
0.5, mergekit's convention), the merged [out, in] update re-factored to rank `--rank` by the exact truncated SVD
(`truncated_svd`, what PEFT computes) and by `randomized_svd` at its defaults and at a cheaper setting. Reports
each one's wall time (median of `--runs`, with the spread), the relative Frobenius error of the rank-r
reconstruction ‖M − BA‖/‖M‖, its excess over the exact SVD's (the Eckart–Young optimum), and the largest relative
error of the r singular values. Random factors give a nearly flat spectrum after the trim: the hardest case for a
range finder. Results: benchmarks/bench_svd_results.json.

``--whole``: the whole merge, `forgetless.merge` of `lora_ties` (density 0.5, ``svd: randomized``) over 8 rank-16
adapters on all 224 Linears of bench_lora_merge's LLaVA-1.5-7B-shaped folders, in a fresh process per run (wall
time and peak RSS: bench_merge's `run_measured`; the method's own time per module shape beside). Results:
benchmarks/bench_svd_whole_results.json.

``--trained``: real adapters. Eight rank-16 LoRA adapters trained by `forgetless finetune` on the embedded
SmolLM2-135M (every Linear of its 30 layers; eight seeded synthetic question-answer tasks, 40 steps each), merged
per module by TIES (density 0.5) and re-factored to rank 16 both ways: the randomized reconstruction error's
excess over the exact SVD's, and the largest singular-value error, over the 210 modules. Results:
benchmarks/bench_svd_trained_results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from forgetless.methods.adapter import randomized_svd, truncated_svd
from forgetless.methods.baselines import ties


def timed(fn, runs: int):
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def rel_err(M: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    return float((M.double() - B.double() @ A.double()).norm() / M.double().norm())


def whole(runs: int) -> None:
    """The 224-module lora_ties merge with svd: randomized, `runs` times (module docstring)."""
    import sys

    import bench_lora_merge as blm
    from bench_merge import median_of, run_measured, spread_of

    d = Path("/tmp/forgetless-bench-lora")
    d.mkdir(parents=True, exist_ok=True)
    modules = blm.lora_modules(blm.write_base(d / "base"))
    adapters = [d / f"adapter-{k}" for k in range(8)]
    for k, a in enumerate(adapters):
        blm.write_adapter(a, modules, 16, seed=k)
    params = json.dumps({"density": 0.5, "svd": "randomized"})
    cmd = [
        sys.executable,
        blm.__file__,
        "--child-forgetless",
        "lora_ties",
        str(d / "base"),
        str(d / "out-ties-rsvd"),
        params,
        *map(str, adapters),
    ]
    results = [run_measured(cmd, d / f"ties-rsvd-{r}.log", 50.0) for r in range(runs)]
    per = json.loads((d / "out-ties-rsvd" / "module_seconds.json").read_text())
    out = {
        "modules": len(modules),
        "adapters": 8,
        "rank": 16,
        "params": json.loads(params),
        "median": median_of(results),
        "spread": spread_of(results),
        "last_run_module_seconds": per,
        "threads": torch.get_num_threads(),
    }
    Path(__file__).with_name("bench_svd_whole_results.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("median", "spread")}, indent=1))


def task_data(path: Path, k: int) -> Path:
    """Task k: 64 seeded questions 'k: a b c' answered by a fixed word permutation of task k."""
    g = torch.Generator().manual_seed(k)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "salt", "rain"]
    perm = torch.randperm(len(words), generator=g).tolist()
    rows = []
    for _ in range(64):
        q = torch.randint(0, len(words), (3,), generator=g).tolist()
        rows.append(
            {
                "question": f"Task {k}: {' '.join(words[i] for i in q)}",
                "answer": " ".join(words[perm[i]] for i in q),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained() -> None:
    """Randomized against exact re-factoring on eight trained adapters (module docstring)."""
    from forgetless.checkpoint.lora import LoraAdapter
    from forgetless.checkpoint.reader import CheckpointReader
    from forgetless.embedded import export_smollm2
    from forgetless.train.loop import LoraSpec, finetune

    base, d = export_smollm2(), Path("/tmp/forgetless-bench-svd-trained")
    d.mkdir(parents=True, exist_ok=True)
    for k in range(8):
        if not (d / f"adapter-{k}" / "adapter_config.json").is_file():
            finetune(
                base,
                task_data(d / f"task-{k}.jsonl", k),
                d / f"adapter-{k}",
                lora=LoraSpec(r=16, alpha=32),
                steps=40,
                batch_size=8,
                lr=1e-3,
                seed=k,
                device="cpu",
                tensorboard=False,
                log=None,
            )
    names = CheckpointReader(base).names()
    adapters = [LoraAdapter(d / f"adapter-{k}", names).loras() for k in range(8)]
    rows = {}
    for name in adapters[0]:
        pairs = [(A * s, B) for A, B, s in (a[name].factors() for a in adapters)]
        M = ties(
            torch.zeros(pairs[0][1].shape[0], pairs[0][0].shape[1]),
            [B @ A for A, B in pairs],
            weight=[1.0] * 8,
            density=[0.5] * 8,
            lambda_=1.0,
        )
        S = torch.linalg.svdvals(M)[:16]
        exact, rand = truncated_svd(M, 16), randomized_svd(M, 16)
        rows[name] = {
            "exact": rel_err(M, *exact),
            "randomized": rel_err(M, *rand),
            "sv_max_rel_err": float(((torch.linalg.svdvals(rand[1] @ rand[0])[:16] - S).abs() / S).max()),
        }
    excess = [r["randomized"] - r["exact"] for r in rows.values()]
    out = {
        "modules": len(rows),
        "max_excess_over_exact": max(excess),
        "median_excess_over_exact": statistics.median(excess),
        "median_exact_rel_err": statistics.median(r["exact"] for r in rows.values()),
        "max_sv_rel_err": max(r["sv_max_rel_err"] for r in rows.values()),
        "per_module": rows,
    }
    Path(__file__).with_name("bench_svd_trained_results.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "per_module"}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--trained", action="store_true", help="eight trained SmolLM2 adapters (module docstring)"
    )
    ap.add_argument("--whole", action="store_true", help="the whole 224-module merge (module docstring)")
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--in", dest="inp", type=int, default=11008)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if args.whole:
        whole(args.runs)
        return
    if args.trained:
        trained()
        return
    g = torch.Generator().manual_seed(0)
    pairs = [
        (
            torch.randn(args.rank, args.inp, generator=g) / 100,
            torch.randn(args.out, args.rank, generator=g) / 100,
        )
        for _ in range(args.models)
    ]
    n = args.models
    M = ties(
        torch.zeros(args.out, args.inp),
        [B @ A for A, B in pairs],
        weight=[1.0] * n,
        density=[0.5] * n,
        lambda_=1.0,
    )
    S = torch.linalg.svdvals(M)[: args.rank]
    variants = {
        "exact": lambda: truncated_svd(M, args.rank),
        "randomized (defaults: oversample 30, 6 power iterations)": lambda: randomized_svd(M, args.rank),
        "randomized (oversample 20, 4 power iterations)": lambda: randomized_svd(
            M, args.rank, oversample=20, power_iters=4
        ),
    }
    rows = {}
    for name, fn in variants.items():
        runs = 1 if name == "exact" else args.runs
        (A, B), t = timed(fn, runs)
        Sr = torch.linalg.svdvals(B @ A)[: args.rank]
        rows[name] = {
            **t,
            "runs": runs,
            "rel_err": rel_err(M, A, B),
            "sv_max_rel_err": float(((Sr - S).abs() / S).max()),
        }
    for r in rows.values():
        r["excess_over_exact"] = r["rel_err"] - rows["exact"]["rel_err"]
    result = {
        "shape": [args.out, args.inp],
        "models": n,
        "rank": args.rank,
        "threads": torch.get_num_threads(),
        "variants": rows,
    }
    print(json.dumps(result, indent=1))
    Path(__file__).with_name("bench_svd_results.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
