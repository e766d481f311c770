"""Every heavy path of forgetless on a GPU against the same path on the CPU: one script, a few minutes on one GPU.

    .venv/bin/python benchmarks/gpu_check.py [--device cuda] [--layers 1] [--samples 16] [--out DIR] [--quick]

On two models — the embedded SmolLM2-135M (real weights) and a Llama of LLaVA-1.5-7B's sizes (hidden 4096,
intermediate 11008) with ``--layers`` decoder layers (random weights, bf16 on disk) — it runs each step on the
CPU and on ``--device``, and compares the two results:

    fisher     stats fisher (empirical, every Linear of the last layer), fp32 model
    gram       stats gram (float32 accumulation on the device, float64 on the CPU), every Linear
    cgm        the CGM chain's merge of the base and a perturbed fine-tune (both Fishers at the base)
    continual  continual add of a rank-16 adapter on every Linear, full Grams (LPM solves on the device)
    regmean    a RegMean merge of the base and the fine-tune with the Gram (recipe device:)
    svd        lora_ties over 8 rank-16 adapters, svd: randomized (recipe device:)
    finetune   4 steps of a LoRA fine-tune (AdamW), the adapter's weights compared
    eval       multiple-choice evaluation: every option's log-likelihood compared
    torchrun   the cgm command under `torchrun --nproc-per-node 1` on the device (against the CPU's cgm merge)
    fsdp       one full fine-tune step of the last layer, `finetune --fsdp` under `torchrun --nproc-per-node 1`
               on the device (FSDP2 over one rank, --no-tf32), against the plain fine-tune on the CPU

Each row: the relative Frobenius error of the device's result against the CPU's (over every tensor the step
writes, for the merges and fine-tune over what changed from the base), the tolerance it must meet, the time of
each and the device's peak memory. Exit status 1 if a step misses its tolerance. ``--device cpu`` runs the script
itself end to end where there is no GPU (the tests do, with ``--quick``). Results: OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

TOLERANCES = {
    "fisher": 1e-4,
    "gram": 1e-5,
    "cgm": 1e-3,
    "continual": 1e-5,
    "regmean": 1e-5,
    "svd": 1e-3,
    "finetune": 5e-2,
    "eval": 1e-4,
    "torchrun": 1e-3,
    "fsdp": 5e-2,
}
QA = [
    ("What is the capital of France?", "Paris."),
    ("2 + 3 =", "5"),
    ("Colour of the sky?", "Blue, mostly."),
    ("Opposite of hot?", "Cold"),
    ("Largest planet?", "Jupiter is the largest planet."),
    ("H2O is?", "Water"),
]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------ inputs
def write_data(path: Path, samples: int, options: bool = False) -> Path:
    """QA pairs (``options``: each with the answers of two other pairs as wrong options, multiple choice)."""
    pairs = (QA * samples)[:samples]
    rows = [{"id": str(i), "question": q * (1 + i % 3), "answer": a} for i, (q, a) in enumerate(pairs)]
    if options:
        rows = [{**r, "options": [r["answer"], *[a for _, a in QA if a != r["answer"]][:2]]} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def shaped_model(path: Path, layers: int, quick: bool) -> Path:
    """A Llama of LLaVA-1.5-7B's sizes (or 1/16 of them with ``quick``) with the SmolLM2 tokenizer, bf16."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from forgetless.embedded import export_smollm2

    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(export_smollm2())
    hidden, inter = (256, 688) if quick else (4096, 11008)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def finetuned_copy(base: Path, path: Path) -> Path:
    """The base with every weight moved by 1% of its scale (a stand-in for a fine-tune)."""
    from transformers import AutoModelForCausalLM

    if (path / "config.json").is_file():
        return path
    model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * (0.01 * float(p.float().std())))
    model.save_pretrained(path)
    return path


def write_adapter(base: Path, path: Path, seed: int) -> Path:
    """A rank-16 PEFT adapter on every Linear of the decoder layers, B ≠ 0 as after training."""
    from safetensors.torch import save_file

    from forgetless.checkpoint.reader import CheckpointReader

    if (path / "adapter_model.safetensors").is_file():
        return path
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with CheckpointReader(base) as r:
        for n in r.names():
            if n.endswith("proj.weight") and n.split(".")[-2] in TARGETS:
                out, inp = r.info(n).shape
                mod = n.removesuffix(".weight")
                tensors[f"base_model.model.{mod}.lora_A.weight"] = (
                    torch.randn(16, inp, generator=g) * inp**-0.5
                )
                tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(out, 16, generator=g) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": 16,
        "lora_alpha": 32,
        "target_modules": list(TARGETS),
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": str(base),
        "task_type": "CAUSAL_LM",
        "fan_in_fan_out": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


# ------------------------------------------------------------------------------------------------ steps
def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file or of a folder's safetensors files, float64; of an evaluation's result,
    its options' log-likelihoods."""
    from safetensors.torch import load_file

    if path.suffix == ".json":
        preds = json.loads(path.read_text())["tasks"]["mc"]["predictions"]
        return {"logprobs": torch.tensor([lp for p in preds for lp in p["logprobs"]], dtype=torch.float64)}
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return {k: v.double() for f in files for k, v in load_file(str(f)).items()}


def step_fisher(ctx: dict, device: str, out: Path) -> Path:
    from forgetless.stats.run import compute_statistics

    compute_statistics(
        "fisher",
        ctx["base"],
        ctx["data"],
        out / "fisher.safetensors",
        device=device,
        scope=[f"language.layers[{ctx['last']}]"],
        force=True,
        log=None,
        progress=False,
    )
    return out / "fisher.safetensors"


def step_gram(ctx: dict, device: str, out: Path) -> Path:
    from forgetless.stats.run import compute_statistics

    acc = "float64" if device == "cpu" else "float32"
    compute_statistics(
        "gram",
        ctx["base"],
        ctx["data"],
        out / "gram.safetensors",
        device=device,
        accumulate=acc,
        force=True,
        log=None,
        progress=False,
    )
    ctx.setdefault("gram", out / "gram.safetensors")  # the CPU's, for the steps that take a Gram
    return out / "gram.safetensors"


def step_cgm(ctx: dict, device: str, out: Path) -> Path:
    from forgetless.chains.cgm import cgm_chain

    cgm_chain(
        ctx["base"],
        ctx["finetuned"],
        general_data=ctx["data"],
        task_data=ctx["data"],
        out=out / "cgm",
        device=device,
        n=ctx["samples"],
        stats_dir=out / "cgm-stats",
        force=True,
        log=None,
    )
    return out / "cgm"


def step_continual(ctx: dict, device: str, out: Path) -> Path:
    import shutil

    from forgetless.chains.continual import add_task

    shutil.rmtree(out / "state", ignore_errors=True)  # a fresh state: one task, whatever ran before
    add_task(
        out / "state",
        adapter=ctx["adapters"][0],
        gram=ctx["gram"],
        out=out / "continual",
        base=ctx["base"],
        device=device,
        force=True,
        log=None,
    )
    return out / "continual"


def step_regmean(ctx: dict, device: str, out: Path) -> Path:
    import forgetless

    models = [
        {"model": str(m), "statistics": {"gram": str(ctx["gram"])}} for m in (ctx["base"], ctx["finetuned"])
    ]
    forgetless.merge(
        {"method": "regmean", "base": str(ctx["base"]), "models": models, "device": device},
        out=out / "regmean",
        force=True,
        progress=False,
    )
    return out / "regmean"


def step_svd(ctx: dict, device: str, out: Path) -> Path:
    import forgetless

    forgetless.merge(
        {
            "method": "lora_ties",
            "base": str(ctx["base"]),
            "models": [str(a) for a in ctx["adapters"]],
            "parameters": {"density": 0.5, "rank": 16, "svd": "randomized"},
            "device": device,
        },
        out=out / "svd",
        force=True,
        progress=False,
    )
    return out / "svd"


def step_finetune(ctx: dict, device: str, out: Path) -> Path:
    from forgetless.train.loop import LoraSpec, finetune

    finetune(
        ctx["base"],
        ctx["data"],
        out / "finetune",
        lora=LoraSpec(r=8, alpha=16, dropout=0.0),
        steps=4,
        batch_size=4,
        lr=1e-3,
        device=device,
        seed=0,
        tensorboard=False,
        force=True,
        log=None,
    )
    return out / "finetune"


def step_eval(ctx: dict, device: str, out: Path) -> Path:
    from forgetless.eval.harness import evaluate
    from forgetless.eval.report import write_json

    out.mkdir(parents=True, exist_ok=True)
    res = evaluate(ctx["base"], {"mc": ctx["mc"]}, device=device, progress=False, log=None)
    write_json(out / "eval.json", res)
    return out / "eval.json"


def step_torchrun(ctx: dict, device: str, out: Path) -> Path:
    """The CPU's reference is the in-process chain; the device's run is the command under torchrun."""
    import subprocess

    if out.name == "cpu":  # the reference run (check_model's first call)
        return step_cgm(ctx, "cpu", out / "torchrun-ref")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "forgetless.cli",
        "cgm",
        str(ctx["base"]),
        str(ctx["finetuned"]),
        "--general-data",
        str(ctx["data"]),
        "--task-data",
        str(ctx["data"]),
        "--out",
        str(out / "cgm-torchrun"),
        "-n",
        str(ctx["samples"]),
        "--device",
        device,
        "--stats-dir",
        str(out / "cgm-torchrun-stats"),
        "--force",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out / "cgm-torchrun"


def step_fsdp(ctx: dict, device: str, out: Path) -> Path:
    """The CPU's reference is the plain fine-tune in this process; the device's is `finetune --fsdp` under torchrun."""
    import subprocess

    from forgetless.train.loop import finetune

    train = f"language.layers[{ctx['last']}]"
    if out.name == "cpu":  # the reference run (check_model's first call)
        finetune(
            ctx["base"],
            ctx["data"],
            out / "fsdp-ref",
            train=[train],
            steps=1,
            batch_size=4,
            lr=1e-4,
            device="cpu",
            tensorboard=False,
            force=True,
            log=None,
        )
        return out / "fsdp-ref"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "forgetless.cli",
        "finetune",
        str(ctx["base"]),
        "--data",
        str(ctx["data"]),
        "--out",
        str(out / "fsdp"),
        "--train",
        train,
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--lr",
        "1e-4",
        "--device",
        device,
        "--fsdp",
        "--no-tf32",
        "--no-tensorboard",
        "--force",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out / "fsdp"


STEPS: dict[str, Callable[[dict, str, Path], Path]] = {
    "fisher": step_fisher,
    "gram": step_gram,
    "cgm": step_cgm,
    "continual": step_continual,
    "regmean": step_regmean,
    "svd": step_svd,
    "finetune": step_finetune,
    "eval": step_eval,
    "torchrun": step_torchrun,
    "fsdp": step_fsdp,
}


# ------------------------------------------------------------------------------------------------ comparison
def relative_error(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> float:
    """‖b − a‖ / ‖a − base‖ over the common tensors (base: zeros for statistics, the base model for merges)."""
    if a.keys() != b.keys():
        raise AssertionError(f"the device wrote other tensors: {sorted(a.keys() ^ b.keys())[:3]}")
    num = sum(float((b[k] - a[k]).square().sum()) for k in a)
    den = sum(float((a[k] - base.get(k, torch.zeros(()))).square().sum()) for k in a)
    return (num / den) ** 0.5 if den else num**0.5


def timed(fn: Callable[[], Path], device: str) -> tuple[Path, float, int]:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    path = fn()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return path, time.perf_counter() - t0, peak


def check_model(label: str, ctx: dict, device: str, root: Path, say: Callable[[str], None]) -> list[dict]:
    base_tensors = read_all(Path(ctx["base"]))
    rows = []
    for name, step in STEPS.items():
        ref, t_cpu, _ = timed(lambda s=step: s(ctx, "cpu", root / label / "cpu"), "cpu")
        got, t_dev, peak = timed(lambda s=step: s(ctx, device, root / label / "device"), device)
        merged = name in ("cgm", "continual", "regmean", "svd", "torchrun", "fsdp")
        err = relative_error(read_all(ref), read_all(got), base_tensors if merged else {})
        row = {
            "model": label,
            "step": name,
            "rel_error": err,
            "tolerance": TOLERANCES[name],
            "ok": err <= TOLERANCES[name],
            "cpu_s": round(t_cpu, 2),
            "device_s": round(t_dev, 2),
            "device_peak_gib": round(peak / 2**30, 2),
        }
        say(
            f"{label:10} {name:9} error {err:.2e} (≤ {TOLERANCES[name]:.0e}) {'ok' if row['ok'] else 'FAILED'}  "
            f"cpu {t_cpu:7.1f} s  {device} {t_dev:7.1f} s  peak {row['device_peak_gib']:.2f} GiB"
        )
        rows.append(row)
    return rows


def prepare(label: str, base: Path, root: Path, samples: int) -> dict:
    from forgetless.checkpoint.reader import CheckpointReader

    with CheckpointReader(base) as r:
        layers = r.config.get("num_hidden_layers", 1)
    work = root / label
    work.mkdir(parents=True, exist_ok=True)
    return {
        "base": base,
        "finetuned": finetuned_copy(base, work / "finetuned"),
        "samples": samples,
        "data": write_data(work / "data.jsonl", samples),
        "last": layers - 1,
        "mc": write_data(work / "mc.jsonl", samples, options=True),
        "adapters": [write_adapter(base, work / f"adapter{i}", seed=i) for i in range(8)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("/tmp/forgetless-gpu-check"))
    ap.add_argument(
        "--quick", action="store_true", help="the 7B-shaped model at 1/16 of its sizes, no SmolLM2"
    )
    args = ap.parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()
    if args.device is None:
        print("no CUDA device here: nothing to check (--device cpu runs the script against itself)")
        return 2
    from forgetless.embedded import export_smollm2

    args.out.mkdir(parents=True, exist_ok=True)
    models = {} if args.quick else {"smollm2": export_smollm2()}
    models["7b-shaped"] = shaped_model(args.out / "shaped", args.layers, args.quick)
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    rows = []
    for label, base in models.items():
        ctx = prepare(label, base, args.out, args.samples)
        rows += check_model(label, ctx, args.device, args.out, print)
    (args.out / "gpu_check.json").write_text(
        json.dumps({"device": args.device, "rows": rows}, indent=1) + "\n"
    )
    failed = [f"{r['model']}/{r['step']}" for r in rows if not r["ok"]]
    print("all steps within tolerance" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
