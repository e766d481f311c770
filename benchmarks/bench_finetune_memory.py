"""A 7B fine-tune's memory per rank: accounted for LLaVA-1.5-7B on the meta device, and measured on a two-layer
model of its sizes.

    .venv/bin/python benchmarks/bench_finetune_memory.py

Accounted (`forgetless finetune --dry-run`'s `train.memory.account`): docs/finetune.md's example — LLaVA-1.5-7B,
``language.layers[18:30]`` + projector trained, ``--keep spider`` (θ₀ held in the checkpoint's fp16), 8 samples
of 640 tokens per micro-batch — in float32, with ``--dtype bfloat16``, with ``--gradient-checkpointing``, and with
``--fsdp`` on 4 ranks (2 samples each; the vision tower in FSDP2's root group, as where some samples are
text-only).

Measured, each in a fresh process (peak RSS: the kernel's high-water mark of the process, ``VmHWM``), on a Llama of
LLaVA-1.5-7B's sizes (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000; SmolLM2's tokenizer, whose ids in
these samples are all below 32000) with two decoder layers, stored in bf16, under ``--dtype bfloat16``:

- ``load-fp32`` / ``load-bf16``: the load path, the model loaded in float32 and its frozen weights cast to bf16
  after (as before), or loaded in bf16 and its trainable tensors read in float32 from the checkpoint (now); the run
  trains the final norm only, so that its peak is the load's.
- ``train``: layer 1 trained with SPIDER for 2 steps on one process, against its ``--dry-run`` accounting.
- ``fsdp``: the same under ``torchrun --nproc-per-node 2 … --fsdp`` (gloo), each rank's peak against its accounting.
- ``baseline``: the runtime and the data, no model (``baseline-2``: a rank of two, its process group joined).

Results: benchmarks/bench_finetune_memory_results.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
WORK = Path("/tmp/forgetless-bench-ft-memory")
LAYERS, VOCAB = 2, 32000
RECIPE = {
    "steps": 2,
    "batch_size": 4,
    "dtype": "bfloat16",
    "device": "cpu",
    "tensorboard": False,
    "force": True,
}


# ------------------------------------------------------------------------------------------------ accounted
def readme_example() -> dict:
    """docs/finetune.md's 7B example, accounted per GPU, five ways."""
    import torch
    from bench_lora_merge import llava7b_config
    from transformers import LlavaForConditionalGeneration

    from forgetless.train.memory import account, gathered_bytes

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava7b_config())
    total = sum(p.numel() for p in model.parameters())
    layers = model.model.language_model.layers
    trained = {id(p) for p in [*layers[18:30].parameters(), *model.model.multi_modal_projector.parameters()]}
    trainable = sum(p.numel() for p in model.parameters() if id(p) in trained)

    def values(params) -> tuple[int, int]:
        params = list(params)
        n = sum(p.numel() for p in params if id(p) in trained)
        return n, sum(p.numel() for p in params) - n

    units = [values(layer.parameters()) for layer in layers]
    root = (trainable - sum(u[0] for u in units), total - trainable - sum(u[1] for u in units))
    out = {}
    for label, dtype, ckpt, ranks, micro in (
        ("float32", "float32", False, 1, 8),
        ("bf16", "bfloat16", False, 1, 8),
        ("bf16 + checkpointing", "bfloat16", True, 1, 8),
        ("bf16 + checkpointing, batch 4 x accumulation 2", "bfloat16", True, 1, 4),
        ("bf16 + checkpointing, --fsdp on 4 ranks", "bfloat16", True, 4, 8),
    ):
        fp = account(
            trainable,
            total - trainable,
            dtype=dtype,
            keep="spider",
            tokens=micro // ranks * 640,
            hidden=4096,
            layers=32,
            checkpointing=ckpt,
            theta0_bytes=2,  # LLaVA-1.5-7B is stored in fp16: θ₀ held in fp16
            world=ranks,
            fsdp=ranks > 1,
            gathered=gathered_bytes(root, units, half=dtype == "bfloat16"),
        )
        out[label] = {k: round(v / 2**30, 2) for k, v in {**fp.__dict__, "total": fp.total}.items()}
    return {"trainable": trainable, "total": total, "gib": out}


# ------------------------------------------------------------------------------------------------ measured
def shaped_model() -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from forgetless.embedded import export_smollm2

    path = WORK / f"model-{LAYERS}"
    if not (path / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(export_smollm2())
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=LAYERS,
            num_attention_heads=32,
            num_key_value_heads=32,
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
        tok.save_pretrained(path)
    data = (
        WORK / "data.jsonl"
    )  # a system turn of our own: SmolLM2's default one names it, with a token ≥ 32000
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": str(i),
                    "conversations": [
                        {"from": "system", "value": "You are a helpful assistant."},
                        {"from": "human", "value": f"Question {i}: what is {i} + {i}?"},
                        {"from": "gpt", "value": str(2 * i)},
                    ],
                }
            )
            + "\n"
            for i in range(8)
        )
    )
    return path


def peak_mib() -> float:
    """This process's peak RSS since its start (VmHWM: the address space's, so not the launcher's before exec)."""
    status = Path("/proc/self/status").read_text()
    return round(
        int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024, 1
    )


def child(mode: str) -> None:
    """One measured run; writes WORK/MODE-rankR.json (peak RSS, and the dry run's lines where it trains)."""
    from forgetless.stats.data import Encoder, load_samples
    from forgetless.stats.distributed import dist_info, process_group
    from forgetless.train import loop

    model, data = WORK / f"model-{LAYERS}", WORK / "data.jsonl"
    rank = dist_info()[0]
    result: dict = {}
    if mode.startswith("baseline"):
        enc = Encoder(model)
        ids = [enc(s)["input_ids"] for s in load_samples(data)]
        assert max(int(i.max()) for i in ids) < VOCAB, "a token id past the model's vocabulary"
        with process_group("cpu"):
            result["tokens"] = [i.numel() for i in ids]
    else:
        kw = dict(RECIPE, train=["language.layers[1]"], keep="spider", fsdp=mode == "fsdp")
        if mode.startswith("load"):
            kw.update(train=["language.norm"], keep="none", steps=1)
        if mode == "load-fp32":  # the former path: a float32 load, frozen weights cast to bf16 after it
            real = loop.load_model
            loop.load_model = lambda d, dev, dt: real(d, dev, "float32")
        said: list[str] = []
        loop.finetune(model, data, WORK / "dry", dry_run=True, log=said.append, **kw)
        loop.finetune(model, data, WORK / f"out-{mode}", log=None, **kw)
        result["accounting"] = said
    result["peak_rss_mib"] = peak_mib()
    (WORK / f"{mode}-rank{rank}.json").write_text(json.dumps(result))


def measure(mode: str, ranks: int = 1) -> list[dict]:
    """``mode`` in fresh processes (under torchrun with ``ranks`` > 1): each rank's result."""
    cmd = [sys.executable, str(HERE), "--child", mode]
    if ranks > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(ranks),
            *cmd[1:],
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return [json.loads((WORK / f"{mode}-rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    WORK.mkdir(parents=True, exist_ok=True)
    result = {"readme_example": readme_example()}
    print(json.dumps(result["readme_example"], indent=1), flush=True)
    shaped_model()
    runs = {m: measure(m) for m in ("baseline", "load-fp32", "load-bf16", "train")}
    runs |= {"baseline-2": measure("baseline-2", 2), "fsdp": measure("fsdp", 2)}
    base = {1: runs["baseline"][0]["peak_rss_mib"], 2: max(r["peak_rss_mib"] for r in runs["baseline-2"])}
    result["measured"] = {
        "model": f"{LAYERS} layers, hidden 4096, intermediate 11008, vocabulary {VOCAB}, bf16 on disk",
        "peak_rss_mib": {m: [r["peak_rss_mib"] for r in rs] for m, rs in runs.items()},
        "over_baseline_mib": {
            m: [round(r["peak_rss_mib"] - base[len(rs)], 1) for r in rs]
            for m, rs in runs.items()
            if not m.startswith("baseline")
        },
        "accounting": {m: rs[0]["accounting"] for m, rs in runs.items() if "accounting" in rs[0]},
    }
    print(json.dumps(result["measured"], indent=1))
    HERE.with_name("bench_finetune_memory_results.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
