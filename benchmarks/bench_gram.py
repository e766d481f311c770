"""Gram statistics at 7B shapes: accumulator memory accounted on the meta device for whole models, and measured
(peak RSS of a fresh process) on 1–2 real-shaped decoder layers, float64 per Linear (before) against float32 with
shared inputs (q/k/v, gate/up).

    .venv/bin/python benchmarks/bench_gram.py [--layers 1] [--batches 2] [--rows 1024] [--repeats 1]

Accounting (no weights, no memory): `forgetless.stats.footprint.account` over every Linear of the language model of
LLaVA-1.5-7B (hidden 4096, intermediate 11008, 32 layers), Qwen2.5-VL-7B (3584 / 18944 / 28) and a 13B Llama
(5120 / 13824 / 40), each way.

Measured: a Llama-shaped model of ``--layers`` decoder layers of each family's sizes (a small vocabulary: the
output layer's Gram is hidden², whatever the vocabulary, and its logits would only cost time), random weights,
``--batches`` batches of ``--rows`` tokens; `accumulate_gram` in a child process, whose peak RSS less a baseline
child's (the same model and forward passes, no Gram) is the accumulators' measured memory. Its time per batch is
the child's own. Results: benchmarks/bench_gram_results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_merge import run_measured

HERE = Path(__file__).resolve()
FAMILIES = {
    "llava-1.5-7b": (4096, 11008, 32, 32, 32),
    "qwen2.5-vl-7b": (3584, 18944, 28, 28, 4),
    "llama-13b": (5120, 13824, 40, 40, 40),
}
WAYS = {"before": ("float64", False), "after": ("float32", True)}


def llama_config(family: str, layers: int | None = None, vocab: int = 32064):
    from transformers import LlamaConfig

    hidden, inter, n_layers, heads, kv = FAMILIES[family]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers or n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
    )


def accounted(family: str, way: str, layers: int | None = None) -> int:
    """Accumulator bytes over every Linear of the family's language model, on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    from forgetless.stats.fisher import linear_modules
    from forgetless.stats.footprint import account

    dtype, share = WAYS[way]
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(family, layers))
    fp = account(
        "gram", model, linear_modules(model), getattr(torch, dtype), world=1, split=False, share=share
    )
    return fp.accumulator_bytes


def child(family: str, way: str, layers: int, batches: int, rows: int) -> None:
    """Build the model, run the forward passes (with the Gram when ``way`` is not "baseline"), print JSON."""
    import torch
    from transformers import LlamaForCausalLM

    from forgetless.stats.fisher import linear_modules
    from forgetless.stats.gram import accumulate_gram

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(family, layers, vocab=512)).eval()
    data = [
        {
            "input_ids": torch.randint(0, 512, (rows // 256, 256)),
            "attention_mask": torch.ones(rows // 256, 256, dtype=torch.long),
        }
        for _ in range(batches)
    ]
    t0 = time.perf_counter()
    if way == "baseline":
        with torch.no_grad():
            for b in data:
                model(**b, use_cache=False)
        held = 0
    else:
        dtype, share = WAYS[way]
        res = accumulate_gram(
            model, data, linears=linear_modules(model), dtype=getattr(torch, dtype), share=share
        )
        held = sum(g.numel() * g.element_size() for g in res.grams.values())
    seconds = time.perf_counter() - t0
    print(json.dumps({"held_bytes": held, "s_per_batch": seconds / batches}))


def measure(family: str, way: str, args: argparse.Namespace, log: Path) -> dict:
    cmd = [
        sys.executable,
        str(HERE),
        "--child",
        family,
        way,
        str(args.layers),
        str(args.batches),
        str(args.rows),
    ]
    res = run_measured(cmd, log, 20.0)
    own = json.loads(log.read_text().strip().splitlines()[-1])
    return {**res, **own}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--families", nargs="*", default=["llava-1.5-7b", "qwen2.5-vl-7b"])
    ap.add_argument("--child", nargs=5)
    args = ap.parse_args()
    if args.child:
        family, way, layers, batches, rows = args.child
        child(family, way, int(layers), int(batches), int(rows))
        return
    gib = 2**30
    out: dict = {
        "accounted_gib": {f: {w: round(accounted(f, w) / gib, 2) for w in WAYS} for f in FAMILIES},
        "measured": {},
    }
    print(json.dumps(out["accounted_gib"], indent=1), flush=True)
    log = Path("/tmp/bench_gram.log")
    for family in args.families:
        runs: dict[str, list[dict]] = {w: [] for w in ("baseline", *WAYS)}
        for _ in range(args.repeats):
            for way, done in runs.items():
                done.append(measure(family, way, args, log))
        base_mib = statistics.median(r["peak_rss_mib"] for r in runs["baseline"])
        row = {}
        for way in WAYS:
            rss = statistics.median(r["peak_rss_mib"] for r in runs[way])
            held = runs[way][0]["held_bytes"]
            one = accounted(family, way, args.layers)
            row[way] = {
                "accounted_mib": round(one / 2**20, 1),
                "held_mib": round(held / 2**20, 1),
                "peak_rss_over_baseline_mib": round(rss - base_mib, 1),
                "s_per_batch": [round(r["s_per_batch"], 2) for r in runs[way]],
                "whole_model_accounted_gib": out["accounted_gib"][family][way],
            }
        row["baseline_peak_rss_mib"] = base_mib
        out["measured"][family] = row
        print(family, json.dumps(row, indent=1), flush=True)
    out["args"] = vars(args)
    (HERE.parent / "bench_gram_results.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
