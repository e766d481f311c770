"""`forgetless inspect`: what a model folder holds, as the engine sees it."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import layout as layouts
from .checkpoint.lora import open_model, parse_model_ref
from .checkpoint.writer import human_bytes


def find_adapters(folder: Path) -> list[Path]:
    """PEFT adapters in the folder or one level below (the usual `checkpoint-*/` and `adapter/` places)."""
    found = [p.parent for p in sorted(folder.glob("adapter_config.json"))]
    found += [p.parent for p in sorted(folder.glob("*/adapter_config.json"))]
    return found


def inspect_model(ref: str, layout: str | None = None) -> dict:
    reader = open_model(ref)
    try:
        lay = layouts.detect_layout(reader.config, reader.names(), layout)
        parts = layouts.describe(lay, reader)
        folder = parse_model_ref(ref)[0]
        info = {
            "model": ref,
            "format": getattr(reader, "format", "?"),
            "architectures": reader.config.get("architectures"),
            "layout": lay.family,
            "decoder_layers": lay.num_layers,
            "tensors": len(reader.names()),
            "parameters": sum(reader.info(n).numel for n in reader.names()),
            "bytes": sum(reader.info(n).nbytes for n in reader.names()),
            "parts": parts,
            "adapters": [str(p) for p in find_adapters(folder)],
            "fingerprint": reader.fingerprint(),
            "tied_embeddings": bool(reader.config.get("tie_word_embeddings", False)),
        }
        adapter = getattr(reader, "adapter", None)
        if adapter is not None:
            info["folded_adapter"] = {"path": str(adapter.path), "targets": len(adapter.targets())}
        return info
    finally:
        reader.close()


def format_inspection(info: dict) -> str:
    lines = [
        f"{info['model']}",
        (
            f"  architecture  {', '.join(info['architectures'] or ['?'])}   layout {info['layout']} "
            f"({info['decoder_layers']} decoder layers)   format {info['format']}"
        ),
        (
            f"  {info['tensors']} tensors, {info['parameters']:,} parameters, {human_bytes(info['bytes'])}"
            f"   fingerprint {info['fingerprint']}"
        ),
        "",
        f"  {'part':<18} {'tensors':>8} {'parameters':>15}  dtypes",
    ]
    for p in info["parts"]:
        if not p["tensors"]:
            continue
        lines.append(
            f"  {p['part']:<18} {p['tensors']:>8} {p['params']:>15,}  {', '.join(map(str, p['dtypes']))}"
        )
    if info["tied_embeddings"]:
        lines.append("  (lm_head is tied to the input embeddings: merging the embedding merges both)")
    if info.get("folded_adapter"):
        fa = info["folded_adapter"]
        lines.append(f"\n  folded adapter {fa['path']} ({fa['targets']} tensors changed)")
    lines.append("\n  adapters found: " + (", ".join(info["adapters"]) if info["adapters"] else "none"))
    return "\n".join(lines)


def inspect_json(info: dict) -> str:
    return json.dumps(info, indent=2, default=str)
