"""What a statistics run holds per device — the model in its dtype and the accumulators — accounted on the meta
device before any weight is read, and the refusal when it does not fit.

Under torchrun the accumulators are either on every rank (data-parallel, the default) or split: each rank owns a
share of the modules (``owners``), balanced by bytes, with the modules that share a Gram kept together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import layout as layouts
from ..checkpoint import original
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.space import available_memory
from ..checkpoint.writer import human_bytes
from ..errors import ForgetlessError
from .fisher import DEFAULT_CHUNK_BYTES, checkpoint_names, fisher_memory, linear_modules
from .gram import expected_shares, gram_memory

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Footprint:
    """Bytes per device: the model's weights and this run's largest share of accumulators."""

    model_bytes: int
    accumulator_bytes: int
    shared: dict[str, str] = field(default_factory=dict)
    owners: dict[str, int] | None = None  # module → the rank that accumulates it (split runs)

    @property
    def per_device(self) -> int:
        return self.model_bytes + self.accumulator_bytes

    def describe(self, device: str, world: int) -> str:
        how = "split over" if self.owners else "on each of"
        ranks = f", {how} {world} ranks" if world > 1 else ""
        return (
            f"memory per device ({device}{ranks}): model {human_bytes(self.model_bytes)} + accumulators "
            f"{human_bytes(self.accumulator_bytes)} = {human_bytes(self.per_device)}, plus activations"
        )


def model_class(model_dir: Path):
    """The transformers class that loads the folder: image-text-to-text when it has a vision config."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = json.loads((model_dir / "config.json").read_text())
    return AutoModelForImageTextToText if "vision_config" in cfg else AutoModelForCausalLM


def meta_model(model_dir: Path, dtype: str) -> nn.Module:
    """The model built from its config on the meta device: shapes and names, no memory, no weights read."""
    from transformers import AutoConfig

    if original.is_original(model_dir):
        return original.build_meta(model_dir, TORCH_DTYPES[dtype])
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return model_class(model_dir).from_config(config, dtype=TORCH_DTYPES[dtype])


def scoped_targets(
    model: nn.Module, model_dir: Path, scope: list[str] | None, kind: str, all_params: bool
) -> dict[str, Any]:
    """checkpoint name → parameter (Fisher) or Linear module (Gram) in scope. Default: every Linear weight."""
    with CheckpointReader(model_dir) as reader:
        names = reader.names()
        selected = set(names)
        if scope:
            lay = layouts.detect_layout(reader.config, names)
            selected = layouts.select(lay, names, scope)
    linears = {k: m for k, m in linear_modules(model).items() if k in selected}
    if kind == "gram":
        return linears
    if not all_params:
        return {k: m.weight for k, m in linears.items()}
    to_ckpt = checkpoint_names(model)
    params = dict(model.named_parameters())
    return {to_ckpt[n]: p for n, p in params.items() if to_ckpt.get(n) in selected}


def tensor_bytes(kind: str, name: str, target: Any, acc_dtype: torch.dtype) -> int:
    """One module's accumulator: in² entries (Gram) or one fp32 value per parameter (Fisher)."""
    if kind == "gram":
        return gram_memory({name: target}, acc_dtype)
    return fisher_memory({name: target})


def assign_owners(sizes: dict[str, int], shared: dict[str, str], world: int) -> dict[str, int]:
    """module → rank, largest first onto the least-loaded rank; modules that share a Gram go where it goes."""
    load = [0] * world
    owners: dict[str, int] = {}
    for name in sorted((n for n in sizes if n not in shared), key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    owners.update({m: owners[r] for m, r in shared.items() if r in owners})
    return owners


def account(
    kind: str,
    model: nn.Module,
    targets: dict[str, Any],
    acc_dtype: torch.dtype,
    *,
    world: int,
    split: bool,
    share: bool,
) -> Footprint:
    """The footprint of a run over ``targets`` of ``model`` (meta or real)."""
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shared = expected_shares(list(targets)) if kind == "gram" and share else {}
    sizes = {n: 0 if n in shared else tensor_bytes(kind, n, t, acc_dtype) for n, t in targets.items()}
    fixed = DEFAULT_CHUNK_BYTES if kind == "fisher" else 0
    if not (split and world > 1):
        return Footprint(model_bytes, sum(sizes.values()) + fixed, shared)
    owners = assign_owners(sizes, shared, world)
    per_rank = [sum(s for n, s in sizes.items() if owners[n] == r) for r in range(world)]
    return Footprint(model_bytes, max(per_rank) + fixed, shared, owners)


def free_memory(device: str) -> tuple[int, str]:
    """(bytes free on the device, what they are): CUDA's free memory, else the host's available memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free), f"free on {dev}"
    return available_memory(), "available host memory"


def check_fits(footprint: Footprint, device: str, memory: int | None, model_dir: Path) -> None:
    """Refuse, before any weight is read, a run whose footprint exceeds ``memory`` or the device."""
    need = footprint.per_device
    remedy = (
        "--accumulate float32, fewer modules per run (--scope; the files complete each other), "
        "--split modules under torchrun, or --dtype bfloat16"
    )
    if memory is not None and need > memory:
        raise ForgetlessError(
            f"the run needs {human_bytes(need)} per device, over --memory {human_bytes(memory)}",
            file=model_dir,
            remedy=remedy,
        )
    free, what = free_memory(device)
    if need > free:
        raise ForgetlessError(
            f"the run needs {human_bytes(need)} per device, {human_bytes(free)} {what}",
            file=model_dir,
            remedy=remedy,
        )
