"""Adapter-space merging at LLaVA-1.5-7B scale: forgetless `copa` against PEFT's `add_weighted_adapter` (`ties_svd`).

    .venv/bin/python benchmarks/bench_lora_merge.py [--runs 3] [--adapters 8] [--rank 16] [--bench-dir DIR]

Inputs, synthetic and never a model in memory:
- the base: a LLaVA-1.5-7B-hf-shaped folder (config, and every tensor's name and shape in one safetensors header:
  the file is sparse, it takes no disk; an adapter-space merge reads only the base's names and shapes);
- `--adapters` rank-`--rank` PEFT adapters on q, k, v, o, gate, up and down of all 32 decoder layers (fp32, as PEFT
  saves LoRA weights), written tensor by tensor with forgetless's streaming writer.

Measured, each command in a fresh child process (wall time, kernel peak RSS: see bench_merge.py's `launch`):
1. `forgetless merge` with `copa` (published defaults) on the full adapters, `--runs` times: the issue's floor is
   < 60 s and < 2 GiB.
2. The same merge with PEFT's `add_weighted_adapter(combination_type="ties_svd")`: on 2 cores one SVD of a
   4096 × 11008 update takes minutes, so the full 224-module run would take hours. PEFT, forgetless `lora_ties`
   (the same rule) and forgetless `copa` therefore each run once on the adapters cut to two modules of layer 0 —
   q_proj (4096 × 4096) and down_proj (4096 × 11008) — and the full-model time is extrapolated as
   32 × (4 × t(q_proj) + 3 × t(down_proj)) from per-module times taken inside each child. PEFT runs on a module
   tree holding only those two Linear layers (its base weights left uninitialised: PEFT's merge reads only the
   adapters).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

from bench_merge import median_of, run_measured

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUBSET = ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.mlp.down_proj")
HERE = Path(__file__).resolve()


def llava7b_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        vision_feature_layer=-2,
        dtype="float16",
    )


def write_base(path: Path) -> dict[str, tuple[int, ...]]:
    """A sparse LLaVA-1.5-7B-shaped folder: every tensor planned, none written (holes read as zeros)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from forgetless.checkpoint.writer import Entry, StreamingWriter

    cfg = llava7b_config()
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if not (path / "config.json").is_file():
        w = StreamingWriter(
            path, [Entry(n, s, torch.float16) for n, s in shapes.items()], shard_size=1 << 62, force=True
        )
        w._pending.clear()  # the tensors stay holes: only names and shapes matter to an adapter-space merge
        w.commit(extra_files={"config.json": cfg.to_json_string()})
    return shapes


def lora_modules(
    shapes: dict[str, tuple[int, ...]], only: tuple[str, ...] | None = None
) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) of every targeted decoder Linear (or of `only`)."""
    out = {}
    for n, s in shapes.items():
        mod = n.removesuffix(".weight")
        if (
            ".language_model.layers." in n
            and mod.rsplit(".", 1)[-1] in TARGETS
            and (only is None or mod in only)
        ):
            out[mod] = s
    return out


def write_adapter(path: Path, modules: dict[str, tuple[int, int]], rank: int, seed: int) -> None:
    """One PEFT adapter folder, its tensors generated and written one at a time (fp32; B ≠ 0 as after training)."""
    import torch

    from forgetless.checkpoint.writer import Entry, StreamingWriter

    if (path / "adapter_model.safetensors").is_file():
        return
    entries = []
    for mod, (o, i) in modules.items():
        entries += [
            Entry(f"base_model.model.{mod}.lora_A.weight", (rank, i), torch.float32),
            Entry(f"base_model.model.{mod}.lora_B.weight", (o, rank), torch.float32),
        ]
    w = StreamingWriter(
        path, entries, shard_size=1 << 62, force=True, single_name="adapter_model.safetensors"
    )
    g = torch.Generator().manual_seed(seed)
    for e in entries:
        w.write(e.name, torch.randn(e.shape, generator=g) * (0.02 if "lora_A" in e.name else 0.01))
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS),
        "lora_dropout": 0.05,
        "bias": "none",
        "base_model_name_or_path": "llava-hf/llava-1.5-7b-hf",
        "task_type": None,
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    w.commit(extra_files={"adapter_config.json": json.dumps(cfg, indent=2)})


# ----------------------------------------------------------------------------------------------- children
def child_forgetless(method: str, base: str, out: str, params: str, *adapters: str) -> None:
    """One merge, with the time spent in the method per module written beside (for the extrapolation)."""
    import forgetless
    from forgetless.methods import METHODS

    spec = METHODS[method]
    times: dict[str, float] = {}
    fn = spec.fn

    @functools.wraps(fn)  # the engine reads the keyword names from the signature
    def timed(loras, **kw):
        t = time.perf_counter()
        res = fn(loras, **kw)
        times[f"{loras[0][1].shape[0]}x{loras[0][0].shape[1]}"] = time.perf_counter() - t
        return res

    object.__setattr__(spec, "fn", timed)
    forgetless.merge(
        {"method": method, "base": base, "models": list(adapters), "parameters": json.loads(params)},
        out=out,
        force=True,
        progress=False,
    )
    Path(out, "module_seconds.json").write_text(json.dumps(times))


def child_peft(out: str, *adapters: str) -> None:
    """PEFT's ties_svd on a module tree that holds only the adapted Linear layers (uninitialised fp16 weights)."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open

    with safe_open(str(Path(adapters[0]) / "adapter_model.safetensors"), "pt") as f:
        shapes = {
            k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): None
            for k in f.keys()  # noqa: SIM118
            if k.endswith("lora_A.weight")
        }
        for mod in shapes:
            o = f.get_slice(f"base_model.model.{mod}.lora_B.weight").get_shape()[0]
            i = f.get_slice(f"base_model.model.{mod}.lora_A.weight").get_shape()[1]
            shapes[mod] = (o, i)
    root = torch.nn.Module()
    for mod, (o, i) in shapes.items():
        parent = root
        *path, leaf = mod.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(
            leaf, torch.nn.Linear(i, o, bias=False, dtype=torch.float16, device="meta").to_empty(device="cpu")
        )
    model = PeftModel.from_pretrained(root, adapters[0], adapter_name="t0")
    for k, a in enumerate(adapters[1:], 1):
        model.load_adapter(a, adapter_name=f"t{k}")
    times: dict[str, float] = {}
    orig = type(model.base_model)._svd_generalized_task_arithmetic_weighted_adapter

    def timed(self, combination_type, adapters_, weights, new_rank, target, *a, **kw):
        t = time.perf_counter()
        res = orig(self, combination_type, adapters_, weights, new_rank, target, *a, **kw)
        times[f"{target.out_features}x{target.in_features}"] = time.perf_counter() - t
        return res

    type(model.base_model)._svd_generalized_task_arithmetic_weighted_adapter = timed
    names = [f"t{k}" for k in range(len(adapters))]
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type="ties_svd", density=0.2)
    model.save_pretrained(out, selected_adapters=["merged"])
    Path(out, "module_seconds.json").write_text(json.dumps(times))


def same_update(a: Path, b: Path, modules: tuple[str, ...]) -> float:
    """The largest relative difference between two adapters' updates B·A·scale over `modules`."""
    from safetensors.torch import load_file

    out = 0.0
    sd_a, sd_b = (
        load_file(str(a / "adapter_model.safetensors")),
        load_file(str(b / "adapter_model.safetensors")),
    )
    ca, cb = (json.loads((p / "adapter_config.json").read_text()) for p in (a, b))
    for mod in modules:
        k = f"base_model.model.{mod}"
        da = sd_a[f"{k}.lora_B.weight"] @ sd_a[f"{k}.lora_A.weight"] * (ca["lora_alpha"] / ca["r"])
        db = sd_b[f"{k}.lora_B.weight"] @ sd_b[f"{k}.lora_A.weight"] * (cb["lora_alpha"] / cb["r"])
        out = max(out, float((da - db).abs().max() / da.abs().max()))
    return out


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bench-dir", type=Path, default=Path("/tmp/forgetless-bench-lora"))
    ap.add_argument("--poll-ms", type=float, default=50.0)
    ap.add_argument("--json", type=Path, default=HERE.parent / "bench_lora_merge_results.json")
    args = ap.parse_args()
    d = args.bench_dir
    d.mkdir(parents=True, exist_ok=True)
    shapes = write_base(d / "base")
    full, subset = lora_modules(shapes), lora_modules(shapes, SUBSET)
    assert len(full) == 7 * 32 and len(subset) == 2
    fulls = [d / f"adapter-{k}" for k in range(args.adapters)]
    subs = [d / f"subset-{k}" for k in range(args.adapters)]
    for k, (f, s) in enumerate(zip(fulls, subs)):
        write_adapter(f, full, args.rank, seed=k)
        write_adapter(s, subset, args.rank, seed=100 + k)
    size = sum((f / "adapter_model.safetensors").stat().st_size for f in fulls)
    print(f"{args.adapters} adapters, {len(full)} modules each, {size / 2**30:.2f} GiB on disk", flush=True)

    me = [sys.executable, str(HERE)]

    def forgetless_cmd(method, base, out, params, adapters):
        return [
            *me,
            "--child-forgetless",
            method,
            str(base),
            str(out),
            json.dumps(params),
            *map(str, adapters),
        ]

    runs = []
    for r in range(args.runs):
        res = run_measured(
            forgetless_cmd("copa", d / "base", d / "out-copa", {}, fulls), d / f"copa-{r}.log", args.poll_ms
        )
        runs.append(res)
        print(f"copa, full: {res['wall_s']:.1f} s, peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    copa_full = median_of(runs)

    small = {}
    for label, cmd in (
        ("peft ties_svd", [*me, "--child-peft", str(d / "out-peft"), *map(str, subs)]),
        (
            "forgetless lora_ties",
            forgetless_cmd("lora_ties", d / "base", d / "out-ties", {"density": 0.2}, subs),
        ),
        ("forgetless copa", forgetless_cmd("copa", d / "base", d / "out-copa-sub", {}, subs)),
    ):
        res = run_measured(cmd, d / f"{label.replace(' ', '-')}.log", args.poll_ms)
        out = (
            d
            / {
                "peft ties_svd": "out-peft/merged",
                "forgetless lora_ties": "out-ties",
                "forgetless copa": "out-copa-sub",
            }[label]
        )
        per = json.loads(
            (out.parent if label.startswith("peft") else out).joinpath("module_seconds.json").read_text()
        )
        attn, mlp = per["4096x4096"], per["4096x11008"]
        res["module_seconds"] = per
        res["extrapolated_full_s"] = round(32 * (4 * attn + 3 * mlp), 1)
        small[label] = res
        print(
            f"{label}, 2 modules: {res['wall_s']:.1f} s (q_proj {attn:.2f} s, down_proj {mlp:.2f} s; "
            f"224 modules ≈ {res['extrapolated_full_s']:.0f} s), peak RSS {res['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    peft_full = small["peft ties_svd"]["extrapolated_full_s"]
    agreement = same_update(d / "out-peft" / "merged", d / "out-ties", SUBSET)
    print(f"PEFT ties_svd vs forgetless lora_ties, largest relative difference of ΔW: {agreement:.2e}")
    result = {
        "adapters": args.adapters,
        "rank": args.rank,
        "modules": len(full),
        "adapter_bytes": size,
        "copa_full": copa_full,
        "copa_full_runs": runs,
        "two_modules": small,
        "ratio_peft_ties_svd_over_copa": round(peft_full / copa_full["wall_s"], 1),
        "ratio_peft_ties_svd_over_lora_ties": round(
            peft_full / small["forgetless lora_ties"]["extrapolated_full_s"], 2
        ),
        "peft_vs_lora_ties_max_rel_diff": agreement,
        "cores": os.cpu_count(),
    }
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("runs")}, indent=1))
    print(
        f"copa median {copa_full['wall_s']:.1f} s, {copa_full['peak_rss_mib']:.0f} MiB peak RSS; PEFT ties_svd "
        f"≈ {peft_full:.0f} s for the same adapters: {result['ratio_peft_ties_svd_over_copa']}× copa"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-forgetless":
        child_forgetless(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-peft":
        child_peft(*sys.argv[2:])
    else:
        main()
