"""What each rank holds after loading a model for statistics or evaluation (`stats.run.load_model`), measured under
torchrun against the accounting.

    .venv/bin/python benchmarks/bench_load_memory.py

A Llama of LLaVA-1.5-7B's sizes (hidden 4096, intermediate 11008, vocabulary 32000) with two decoder layers, stored
in bf16 as the published checkpoints are. Under ``torchrun --nproc-per-node 2`` each rank loads it in float32 and
in bfloat16 (one fresh torchrun per dtype) and reports its peak resident memory (``ru_maxrss``) before and after
the load, and its anonymous and file-backed resident memory after it has read every weight once
(/proc/self/status): a bf16 weight read from a bf16 file stays mapped from it, shared by the ranks through the page
cache, where a converted one is the rank's own (anonymous) memory. The accounting is the
model's bytes in that dtype on the meta device (`stats.footprint.meta_model`), what `forgetless stats --dry-run`
counts for the weights. Results: benchmarks/bench_load_memory_results.json.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
WORK = Path("/tmp/forgetless-bench-load-memory")
RANKS = 2


def shaped_model() -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = WORK / "model"
    if not (path / "config.json").is_file():
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=32,
            tie_word_embeddings=False,
        )
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        model = model.to_empty(device="cpu").to(torch.bfloat16)  # values do not matter, only the bytes
        for p in model.parameters():
            p.data.zero_()
        model.save_pretrained(path)
    return path


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(dtype: str) -> None:
    """One rank: the peak before and after `load_model`, and the accounted bytes."""
    import torch

    from forgetless.stats.footprint import meta_model
    from forgetless.stats.run import load_model

    model_dir = WORK / "model"
    accounted = sum(p.numel() * p.element_size() for p in meta_model(model_dir, dtype).parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model, _ = load_model(model_dir, "cpu", dtype)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with (
        torch.no_grad()
    ):  # read every weight once: a weight mapped from the file becomes resident (file-backed)
        for p in model.parameters():
            p.sum()
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held == accounted and next(model.parameters()).dtype == getattr(torch, dtype)
    print(
        json.dumps(
            {
                "rank": int(os.environ.get("RANK", "0")),
                "dtype": dtype,
                "accounted_mib": round(accounted / 2**20, 1),
                "peak_before_mib": round(before, 1),
                "peak_after_mib": round(after, 1),
                "load_peak_mib": round(after - before, 1),
                "anon_after_mib": round(_status_mib("RssAnon"), 1),
                "file_after_mib": round(_status_mib("RssFile"), 1),
            }
        ),
        flush=True,
    )


def run_ranks(dtype: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(RANKS),
        str(HERE),
        "--child",
        dtype,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    WORK.mkdir(parents=True, exist_ok=True)
    shaped_model()
    result = {
        "ranks": RANKS,
        "model": "Llama, hidden 4096, intermediate 11008, vocab 32000, 2 layers, stored bf16",
        "runs": {d: run_ranks(d) for d in ("float32", "bfloat16")},
    }
    print(json.dumps(result, indent=1))
    HERE.with_name("bench_load_memory_results.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
