"""A fine-tune on several processes: torchrun's process group, FSDP2's sharding of the model, and the collectives
a step needs (gradient sync, clipping over the pieces, the whole tensors gathered for the output)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import layout as layouts
from ..stats.distributed import all_reduce_sums, end_process_group, process_group
from .spider import DTensor


@contextlib.contextmanager
def ranks(dev_name: str, fsdp: bool) -> Iterator[tuple[int, int]]:
    """``(rank, world)`` in torchrun's process group (:func:`stats.distributed.process_group`); with ``fsdp`` on one
    process, in a group of this process alone, so that FSDP2 shards over one rank by the code that shards over
    several."""
    with process_group(dev_name) as (rank, world):
        if not fsdp or dist.is_initialized():
            yield rank, world
            return
        importlib.import_module(
            "torch._dynamo"
        )  # as init_distributed does: imported after the group, it pins it
        backend = "nccl" if torch.device(dev_name).type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        ok = False
        try:
            yield 0, 1
            ok = True
        finally:
            end_process_group(wait=ok)


def shard_units(
    model: nn.Module, stored: dict[str, str], layout: layouts.Layout, images: bool
) -> list[nn.Module]:
    """The modules FSDP2 shards one by one, each gathered whole only for its own forward and backward: every decoder
    layer of the language model, and the vision tower's layers when every sample has an image. A unit some rank's
    micro-batch skips would leave the others waiting in its all-gather, so a vision tower that text-only samples
    skip stays in the root group, with the embeddings, norms, lm_head and projector (gathered for the whole step)."""
    parts = {"language.layers", *(["vision"] if images else [])}
    units: list[nn.Module] = []
    inside: list[str] = []  # the units' names: a ModuleList within one (experts) is part of it
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or any(name.startswith(u + ".") for u in inside):
            continue
        for i, child in enumerate(mod):
            first = next((f"{name}.{i}.{n}" for n, _ in child.named_parameters()), None)
            if first in stored and layouts.part_of(layout, stored[first]) in parts:
                units.append(child)
                inside.append(f"{name}.{i}")
    return units


def group_values(
    model: nn.Module, units: list[nn.Module], trainable: set[int]
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """``(trainable, frozen)`` values of FSDP2's root group (what no unit holds) and of each unit; ``trainable``:
    the ids of the trainable parameters."""

    def values(params: list[nn.Parameter]) -> tuple[int, int]:
        n = sum(p.numel() for p in params if id(p) in trainable)
        return n, sum(p.numel() for p in params) - n

    inside = {id(p) for u in units for p in u.parameters()}
    return values([p for p in model.parameters() if id(p) not in inside]), [
        values(list(u.parameters())) for u in units
    ]


def shard(
    root: nn.Module,
    net: nn.Module,
    units: list[nn.Module],
    params: dict[str, nn.Parameter],
    dev: torch.device,
) -> tuple[Any, dict[str, nn.Parameter]]:
    """FSDP2 (``fully_shard``) over the process group's ranks: each unit, then ``root`` (the rest). Returns the
    device mesh and ``params`` (keys as given, of ``net``'s parameters) as the sharded parameters that replace them.
    A tensor a rank's samples do not reach (the projector, text-only) gets a zero gradient there, so that every
    rank reduce-scatters the same tensors (:class:`Reached` puts None back where no rank reached it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in net.named_parameters()}
    order = [(key, names[id(p)]) for key, p in params.items()]
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(root, mesh=mesh)
    root.set_reduce_scatter_unused_params(True)
    sharded = dict(net.named_parameters())
    return mesh, {key: sharded[name] for key, name in order}


def forget_group(mesh: Any) -> None:
    """Let the device mesh drop the process group: torch's DTensor dispatch cache keeps the mesh for good, and the
    group's threads end only once nothing holds it."""
    getattr(mesh, "_pg_registry", {}).clear()


class Reached:
    """Whether the modules of FSDP2's root group that own trainable tensors ran in a step, on any rank. Where no
    rank's samples reached one (no image in the step), FSDP2 still reduce-scatters a zero gradient for its
    tensors, where one process leaves them none and AdamW skips them: :meth:`settle` takes the zeros away."""

    def __init__(self, root: nn.Module, units: list[nn.Module]) -> None:
        inside = {id(m) for u in units for m in u.modules()}
        self.modules = [
            m
            for m in root.modules()
            if id(m) not in inside and any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        self.runs = [0] * len(self.modules)
        for i, m in enumerate(self.modules):
            m.register_forward_pre_hook(functools.partial(self._ran, i))

    def _ran(self, i: int, *_: Any) -> None:
        self.runs[i] += 1

    def settle(self, device: torch.device) -> None:
        """After the step's backward passes, on every rank (an all-reduce): no gradient where no rank ran."""
        runs = torch.tensor(self.runs, dtype=torch.float64, device=device)
        all_reduce_sums({"runs": runs})
        for m, n in zip(self.modules, runs.tolist(), strict=True):
            for p in m.parameters(recurse=False) if n == 0 else []:
                p.grad = None
        self.runs = [0] * len(self.modules)


def syncing(losses: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Gradients reduced over the ranks after the step's last micro-batch only: DDP's ``no_sync`` and FSDP2's
    ``set_requires_gradient_sync`` keep the others' unreduced, whole, for the next micro-batch to add to."""
    if isinstance(losses, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if last else losses.no_sync()
    if hasattr(losses, "set_requires_gradient_sync"):
        losses.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def clip_gradients(params: list[nn.Parameter], clip: float | None) -> float:
    """Scale the gradients to a total 2-norm of at most ``clip`` (None: leave them); returns the norm before. With
    FSDP2's sharded gradients the pieces' norms are reduced over the ranks first (a collective)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, clip if clip is not None else math.inf, norm)
    return float(norm)


def gather_whole(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Every tensor whole, on rank 0's CPU (the other ranks get {}): a DTensor gathered from its pieces, one at a
    time, once however many names it has. A collective: every rank calls it, with the same tensors in order."""
    seen: set[int] = set()
    whole: dict[int, torch.Tensor] = {}
    for t in tensors.values():
        if id(t) not in seen:
            seen.add(id(t))
            full = (t.full_tensor() if isinstance(t, DTensor) else t).detach()
            if rank == 0:
                whole[id(t)] = full.to("cpu")
    return {name: whole[id(t)] for name, t in tensors.items() if id(t) in whole}
