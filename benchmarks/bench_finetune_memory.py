"""A 7B fine-tune's memory per rank: accounted for LLaVA-1.5-7B on the meta device, and measured on one real-shaped
decoder layer.

    .venv/bin/python benchmarks/bench_finetune_memory.py

Accounted (`forgetless finetune --dry-run`'s `train.memory.account`): the README's example — LLaVA-1.5-7B,
``language.layers[18:30]`` + projector trained, ``--keep spider`` (θ₀ held in the checkpoint's fp16), 8 samples
of 640 tokens per micro-batch — in float32 and with ``--dtype bfloat16`` and ``--gradient-checkpointing``.

Measured: a Llama of LLaVA-1.5-7B's sizes with one decoder layer (SmolLM2's tokenizer and vocabulary), that layer
fully trained with SPIDER for 2 steps in a fresh process (bench_merge's `run_measured`: peak RSS), against the
same accounting of that model plus a baseline process's peak (the runtime and the data, no model). Results:
benchmarks/bench_finetune_memory_results.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_merge import run_measured

HERE = Path(__file__).resolve()
WORK = Path("/tmp/forgetless-bench-ft-memory")


def readme_example() -> dict:
    """The README's 7B example, accounted per GPU, three ways."""
    import torch
    from bench_lora_merge import llava7b_config
    from transformers import LlavaForConditionalGeneration

    from forgetless.train.memory import account

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava7b_config())
    total = sum(p.numel() for p in model.parameters())
    layers = model.model.language_model.layers[18:30]
    trainable = sum(p.numel() for p in layers.parameters())
    trainable += sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    out = {}
    for label, dtype, ckpt in (("float32", "float32", False), ("bf16", "bfloat16", False),
                               ("bf16 + checkpointing", "bfloat16", True)):
        fp = account(trainable, total - trainable, dtype=dtype, keep="spider", tokens=8 * 640, hidden=4096, layers=32,
                     checkpointing=ckpt, theta0_bytes=2)  # LLaVA-1.5-7B is stored in fp16: θ₀ held in fp16
        out[label] = {k: round(v / 2**30, 2) for k, v in {**fp.__dict__, "total": fp.total}.items()}
    return {"trainable": trainable, "total": total, "gib": out}


def shaped_model() -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from forgetless.embedded import export_smollm2

    path = WORK / "model"
    if not (path / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(export_smollm2())
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                          num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
        tok.save_pretrained(path)
    data = WORK / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"Question {i}: what is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(8)))
    return path


def child(mode: str) -> None:
    from forgetless.train.loop import finetune

    model, data = WORK / "model", WORK / "data.jsonl"
    kw = {"train": ["language.layers[0]"], "steps": 2, "batch_size": 4, "keep": "spider", "dtype": "bfloat16",
          "device": "cpu", "tensorboard": False, "force": True}
    if mode == "baseline":
        from forgetless.stats.data import Encoder, load_samples

        enc = Encoder(model)
        print(json.dumps({"samples": [enc(s)["input_ids"].numel() for s in load_samples(data)]}))
        return
    said: list[str] = []
    finetune(model, data, WORK / "dry", dry_run=True, log=said.append, **kw)
    finetune(model, data, WORK / "out", log=None, **kw)
    print(json.dumps({"accounting": said}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    WORK.mkdir(parents=True, exist_ok=True)
    result = {"readme_example": readme_example()}
    print(json.dumps(result["readme_example"], indent=1), flush=True)
    shaped_model()
    runs = {m: run_measured([sys.executable, str(HERE), "--child", m], WORK / f"{m}.log", 20.0)
            for m in ("baseline", "train")}
    said = json.loads((WORK / "train.log").read_text().strip().splitlines()[-1])["accounting"]
    result["one_layer"] = {"accounting": said, "peak_rss_mib": {m: r["peak_rss_mib"] for m, r in runs.items()},
                           "over_baseline_mib": round(runs["train"]["peak_rss_mib"] - runs["baseline"]["peak_rss_mib"],
                                                      1)}
    print(json.dumps(result["one_layer"], indent=1))
    HERE.with_name("bench_finetune_memory_results.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
