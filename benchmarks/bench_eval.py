"""What `forgetless eval` costs on the testbed model (CPU), against what its forward passes must cost.

    .venv/bin/python benchmarks/bench_eval.py [--per-task 48] [--runs 3] [--batch-sizes 8,16,32] [--json out.json]
    .venv/bin/python benchmarks/bench_eval.py --generate ...   # the same items answered by greedy generation

Items: the first ``--per-task`` test items of each general visual task (colour, shape, count, caption), of the text
probes and of one multiple-choice downstream task (count_many) — multiple choice, scored by the harness exactly as
``forgetless eval`` scores them (:func:`forgetless.eval.harness.evaluate`, fp32, the model loaded once per run).

Measured, interleaved over ``--runs`` runs, medians:

- **items/s** of the whole evaluation per batch size (model load excluded, encoding included).
- **the GEMM floor**: forward hooks record every ``nn.Linear`` / ``Conv2d`` call of one evaluation (its input rows
  and weight shape); each distinct shape is then timed alone with ``torch.nn.functional.linear`` (conv: the same
  FLOPs as a matmul) on the same threads, and the floor is Σ calls × time(shape) — the time of the matrix products
  the forward passes cannot avoid, with nothing else (attention products, norms, rope, KV-cache copies, Python).
  Also the FLOPs (2·rows·in·out per call, lm_head included where it runs) and the achieved GFLOP/s against the
  matmul rate of a large square product.
- **the shared prefix**: the tokens every prompt of the run starts with (the chat template's ``<|im_start|>user\\n``
  here) as a fraction of all prompt and option tokens: the most that reusing its KV cache could save.
- **bf16** (``--dtype bfloat16`` of ``forgetless eval``; this CPU's AMX units): items/s and how many predictions
  differ from fp32 — a data point, not what RESULTS.md uses.
- **items remembered** (:mod:`forgetless.eval.memo`): the report's batch again with every item already encoded, as
  for the second and later models of a sweep or a frontier in one process; its predictions must equal the cold
  run's. Every other run starts with nothing remembered, as one ``forgetless eval`` command does.

With ``--generate`` every item is answered by greedy generation instead (its task's metric set to exact match: the
path of the open-ended benchmarks — batched, left-padded, KV cache, stopping at the end-of-turn token), and the
floor counts the prefill's and every decoding step's products; the generated tokens are counted too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from forgetless.eval.harness import ENCODED, _encode_options, evaluate
from forgetless.stats.data import Encoder, load_samples
from forgetless.testbed import tasks as T
from forgetless.testbed.build import testbed_model
from forgetless.testbed.context import EVAL_BATCH

TASKS = [*T.GENERAL_VISUAL, "probes", "count_many"]


def subset(root: Path, out: Path, per_task: int, generate: bool = False) -> dict[str, Path]:
    """JSONL files of the first `per_task` test items of each task, images by absolute path (`generate`: each task
    scored by exact match of a generated answer)."""
    files = {}
    for name in TASKS:
        rows = [json.loads(x) for x in (root / name / "test.jsonl").read_text().splitlines()[:per_task]]
        for r in rows:
            if "image" in r:
                r["image"] = str((root / name / r["image"]).resolve())
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        meta = json.loads((root / name / "task.json").read_text())
        meta = {k: meta[k] for k in ("name", "kind", "metric")}
        (out / name / "task.json").write_text(
            json.dumps({**meta, "metric": "exact" if generate else meta["metric"]})
        )
        files[name] = out / name
    return files


def run_eval(
    model: Path, files: dict[str, Path], batch_size: int, dtype: str = "float32", warm: bool = False
) -> tuple[float, dict]:
    """(items/s, result) of one evaluation; cold (nothing remembered) unless `warm`."""
    if not warm:
        ENCODED.clear()
    general = {n: p for n, p in files.items() if n != "count_many"}
    r = evaluate(
        model,
        {"count_many": files["count_many"]},
        general=general,
        batch_size=batch_size,
        dtype=dtype,
        progress=False,
        log=None,
    )
    n = sum(t["n"] for t in r["tasks"].values())
    return n / r["seconds"], r


def gemm_calls(model_dir: Path, files: dict[str, Path], batch_size: int) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every Linear / Conv2d call of one evaluation."""
    from forgetless.stats.run import load_model

    calls: list[tuple[int, int, int]] = []
    model, _ = load_model(model_dir, torch.device("cpu"), "float32")

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, torch.nn.Linear):
            calls.append((x.numel() // x.shape[-1], mod.in_features, mod.out_features))
        else:  # Conv2d as its im2col product
            k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] // mod.groups
            calls.append((out.numel() // out.shape[1], k, mod.out_channels))

    hs = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    import forgetless.stats.run as R

    orig = R.load_model
    R.load_model = lambda *a, **k: (model, None)  # evaluate() reuses the hooked model
    try:
        general = {n: p for n, p in files.items() if n != "count_many"}
        evaluate(
            model_dir,
            {"count_many": files["count_many"]},
            general=general,
            batch_size=batch_size,
            progress=False,
            log=None,
        )
    finally:
        R.load_model = orig
        for h in hs:
            h.remove()
    return calls


def time_shape(rows: int, n_in: int, n_out: int, reps: int) -> float:
    x, w = torch.randn(rows, n_in), torch.randn(n_out, n_in)
    torch.nn.functional.linear(x, w)
    t = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    return (time.perf_counter() - t) / reps


def gemm_floor(calls: list[tuple[int, int, int]]) -> tuple[float, float]:
    """(seconds, FLOPs): every distinct shape timed alone, times its number of calls."""
    from collections import Counter

    seconds = 0.0
    for (rows, n_in, n_out), k in Counter(calls).items():
        flops = 2 * rows * n_in * n_out
        reps = max(3, min(200, int(2e9 / max(flops, 1))))
        seconds += k * min(time_shape(rows, n_in, n_out, reps) for _ in range(3))
    return seconds, float(sum(2 * r * i * o for r, i, o in calls))


def square_rate(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def token_counts(model: Path, files: dict[str, Path]) -> dict[str, float]:
    enc = Encoder(model)
    n, prompts, options, prefix = 0, 0, 0, None
    for p in files.values():
        for s in load_samples(p / "test.jsonl", shuffle=False):
            n += 1
            it = _encode_options(enc, s)
            ids = it.prompt["input_ids"].tolist()
            prompts += len(ids)
            options += sum(len(a) + len(t) - 1 for a, t in zip(it.answers, it.tails))  # fed after the prompt
            if prefix is None:
                prefix = ids
            else:
                k = 0
                while k < min(len(prefix), len(ids)) and prefix[k] == ids[k]:
                    k += 1
                prefix = prefix[:k]
    shared = len(prefix or [])
    return {
        "items": n,
        "prompt_tokens": prompts,
        "option_tokens": options,
        "shared_prefix_tokens": shared,
        "shared_fraction": shared * n / (prompts + options),
    }


def generated_tokens(model: Path, result: dict) -> int:
    """The tokens generated in a result: each answer's tokens and the stop token that ended it."""
    tok = Encoder(model).tokenizer
    texts = [p["prediction"] for t in result["tasks"].values() for p in t["predictions"]]
    return sum(len(tok(x, add_special_tokens=False)["input_ids"]) + 1 for x in texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-task", type=int, default=48)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-sizes", default="8,16,32")
    ap.add_argument("--task-root", default="runs/testbed/tasks")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--generate", action="store_true", help="answer every item by greedy generation")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = testbed_model()
    root = Path(a.task_root)
    T.write_tasks(root, TASKS)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        files = subset(root, Path(tmp), a.per_task, a.generate)
        tokens = token_counts(model, files)
        print(
            f"{tokens['items']} items, {tokens['prompt_tokens']} prompt + {tokens['option_tokens']} option tokens; "
            f"shared prefix {tokens['shared_prefix_tokens']} tokens = {tokens['shared_fraction']:.1%} of them",
            flush=True,
        )
        rates: dict[str, list[float]] = {str(b): [] for b in sizes}
        if not a.no_bf16:
            rates["bf16"] = []
        preds: dict[str, list] = {}
        for run in range(a.runs):
            for b in sizes:
                r, res = run_eval(model, files, b)
                rates[str(b)].append(r)
                preds.setdefault(str(b), [res["tasks"][n]["correct_items"] for n in TASKS])
                if a.generate:
                    tokens.setdefault("generated_tokens", generated_tokens(model, res))
                preds.setdefault("fp32", preds[str(b)])
                print(f"run {run}: batch {b}: {r:.2f} items/s", flush=True)
            if not a.generate:  # (generated answers' prompts are not remembered)
                r, res = run_eval(model, files, EVAL_BATCH, warm=True)  # after a cold run: every item held
                rates.setdefault("remembered", []).append(r)
                preds["remembered"] = [res["tasks"][n]["correct_items"] for n in TASKS]
                print(f"run {run}: batch {EVAL_BATCH}, items remembered: {r:.2f} items/s", flush=True)
            if not a.no_bf16:
                r, res = run_eval(model, files, sizes[-1], "bfloat16")
                rates["bf16"].append(r)
                preds["bf16"] = [res["tasks"][n]["correct_items"] for n in TASKS]
                print(f"run {run}: bf16 batch {sizes[-1]}: {r:.2f} items/s", flush=True)
        out: dict = {
            "tokens": tokens,
            "threads": torch.get_num_threads(),
            "items_per_s": {k: statistics.median(v) for k, v in rates.items()},
            "runs": rates,
        }
        for b in sizes:
            calls = gemm_calls(model, files, b)
            floor, flops = gemm_floor(calls)
            out.setdefault("floor", {})[str(b)] = {
                "gemm_seconds": floor,
                "gflop": flops / 1e9,
                "measured_seconds": tokens["items"] / out["items_per_s"][str(b)],
            }
        out["square_gflops"] = square_rate()
        out["correct_differs_from_first_batch_size"] = {
            str(b): sum(x != y for x, y in zip("".join(preds["fp32"]), "".join(preds[str(b)]))) for b in sizes
        }
        if "remembered" in preds:
            out["remembered_correct_differs"] = sum(
                x != y for x, y in zip("".join(preds["fp32"]), "".join(preds["remembered"]))
            )
        if "bf16" in preds:
            a32 = "".join(preds["fp32"])
            a16 = "".join(preds["bf16"])
            out["bf16_correct_differs"] = sum(x != y for x, y in zip(a32, a16))
    print(f"\nthreads {out['threads']}; square 2048 matmul {out['square_gflops']:.0f} GFLOP/s")
    if a.generate:
        print(f"generated {tokens['generated_tokens']} tokens (answers and their stop tokens)")
    print("batch  items/s  measured s  GEMM floor s  measured/floor  GFLOP  achieved GFLOP/s")
    for b in sizes:
        f = out["floor"][str(b)]
        print(
            f"{b:>5}  {out['items_per_s'][str(b)]:7.2f}  {f['measured_seconds']:10.2f}  {f['gemm_seconds']:12.2f}"
            f"  {f['measured_seconds'] / f['gemm_seconds']:14.2f}  {f['gflop']:5.0f}"
            f"  {f['gflop'] / f['measured_seconds']:16.1f}"
        )
    print(f"items scored differently from batch {sizes[0]}: {out['correct_differs_from_first_batch_size']}")
    if "remembered" in out["items_per_s"]:
        warm, cold = out["items_per_s"]["remembered"], out["items_per_s"].get(str(EVAL_BATCH))
        print(
            f"batch {EVAL_BATCH}, items remembered: {warm:.2f} items/s"
            + (f" ({warm / cold:.2f}× cold)" if cold else "")
            + f"; items scored differently from batch {sizes[0]}: {out['remembered_correct_differs']}"
        )
    if "bf16" in out["items_per_s"]:
        print(
            f"bf16 (batch {sizes[-1]}): {out['items_per_s']['bf16']:.2f} items/s; items scored differently from "
            f"fp32: {out['bf16_correct_differs']} of {tokens['items']}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
