"""Fisher throughput on the embedded SmolLM2-135M (CPU): forgetless's batched per-sample Fisher against the
published CGM code's batch-size-1 loop and against a plain batched forward+backward (the floor).

    .venv/bin/python benchmarks/bench_stats.py [--samples 64] [--batch-size 8] [--runs 3] [--json out.json]

All three compute over the same samples and the same parameters (every decoder Linear weight), in one process, one after
the other, repeated `--runs` times; the table quotes medians. The bs-1 loop's Fisher is compared with forgetless's
(they must agree: the benchmark fails otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from forgetless.embedded import export_smollm2
from forgetless.stats.data import Encoder, collate, iter_batches, load_samples
from forgetless.stats.fisher import accumulate_fisher, linear_weights, per_sample_losses


def make_data(path: Path, n: int) -> Path:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in torch.randint(2, 99, (2,), generator=g))
        rows.append(
            {
                "id": str(i),
                "question": f"What is {a} plus {b}? Answer with the number and a short reason.",
                "answer": f"{a + b}, because adding {a} and {b} gives {a + b}.",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bs1_loop(model, params, encoded) -> tuple[dict, float]:
    """The published CGM code's way: one sample at a time, model.zero_grad(), loss.backward() with the model's
    parameters requiring grad as loaded (all of them), then square the .grad of each weight in scope."""
    for p in model.parameters():
        p.requires_grad_(True)
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    t0 = time.perf_counter()
    for e in encoded:
        batch = collate([e], 0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = per_sample_losses(logits, batch["labels"])
        model.zero_grad(set_to_none=True)
        loss.sum().backward()
        for k, p in params.items():
            fisher[k] += p.grad**2
    return {k: v / len(encoded) for k, v in fisher.items()}, time.perf_counter() - t0


def plain_batched(model, params, batches) -> float:
    """The floor: the same batches, one forward and one backward of Σᵢ ℓᵢ, no per-sample anything."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss, _ = per_sample_losses(logits, b["labels"])
        model.zero_grad(set_to_none=True)
        loss.sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = export_smollm2()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        samples = load_samples(make_data(Path(tmp) / "calib.jsonl", args.samples), n=args.samples, seed=0)
    enc = Encoder(model_dir)
    encoded = [enc(s) for s in samples]
    batches = list(iter_batches(samples, enc, args.batch_size))
    tokens = sum(int(e["input_ids"].numel()) for e in encoded)
    # the decoder's Linear weights (CGM's scope is a range of them): SmolLM2's lm_head is tied to the input
    # embedding, whose exact per-sample gradient needs the generic per-sample path (see stats/fisher.py)
    params = {k: p for k, p in linear_weights(model).items() if ".layers." in k}
    print(
        f"SmolLM2-135M fp32, {args.samples} samples ({tokens} tokens), batch {args.batch_size}, "
        f"{len(params)} Linear weights, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    times: dict[str, list[float]] = {"forgetless": [], "bs1_loop": [], "plain_batched": []}
    for run in range(args.runs):
        t0 = time.perf_counter()
        res = accumulate_fisher(model, batches, params=params)
        times["forgetless"].append(time.perf_counter() - t0)
        ref, t = bs1_loop(model, params, encoded)
        times["bs1_loop"].append(t)
        times["plain_batched"].append(plain_batched(model, params, batches))
        if run == 0:
            worst = max(
                float((res.sums[k] / res.num_samples - ref[k]).abs().max() / ref[k].abs().max()) for k in ref
            )
            print(f"agreement with the bs-1 loop: max |ΔF| / max F = {worst:.2e}", file=sys.stderr)
            if worst > 1e-4:
                raise SystemExit("forgetless's Fisher disagrees with the batch-size-1 loop")
        print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    sps = {k: args.samples / v for k, v in med.items()}
    print("| what | median s | samples/s | ratio |\n|---|---:|---:|---|")
    print(
        f"| forgetless batched per-sample Fisher | {med['forgetless']:.2f} | {sps['forgetless']:.2f} | "
        f"{sps['forgetless'] / sps['bs1_loop']:.2f}x the bs-1 loop; "
        f"{med['forgetless'] / med['plain_batched']:.2f}x the plain batched time |"
    )
    print(f"| batch-size-1 loop (published CGM code) | {med['bs1_loop']:.2f} | {sps['bs1_loop']:.2f} | |")
    print(f"| plain batched forward+backward | {med['plain_batched']:.2f} | {sps['plain_batched']:.2f} | |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "times": times,
                    "median_s": med,
                    "samples_per_s": sps,
                    "samples": args.samples,
                    "batch_size": args.batch_size,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
