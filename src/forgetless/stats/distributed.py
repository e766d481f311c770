"""Data-parallel statistics under ``torchrun --nproc-per-node K`` (and the process group of ``forgetless finetune``'s
DDP, :mod:`forgetless.train.loop`).

Each rank takes an interleaved shard of the samples (``samples[rank::world]``), accumulates its sums, then the
sums are reduced onto rank 0 (gloo on CPU, nccl on CUDA), which writes. A split run (:func:`collect_owned`)
instead gives each rank every sample and a share of the modules, and sends each share to rank 0. Sums are additive, so the result
equals the single-process one up to the order of floating-point additions. The sampled Fisher seeds its labels
per sample index, so it too is independent of the sharding.

A process group ends before the interpreter does (:func:`end_process_group`): gloo's worker threads drop a finished
collective's tensors a moment after it returns, and one doing so while the interpreter finalizes cannot take the GIL
and aborts the process ("terminate called without an active exception").
"""

from __future__ import annotations

import gc
import importlib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_OWNED = False  # whether init_distributed created the process group (and so finish_distributed may end it)
_GROUPS = 0  # process groups init_distributed has created in this process


def dist_info() -> tuple[int, int]:
    """(rank, world size): from the initialized process group, else from torchrun's environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | torch.device | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (no-op for a single process). Returns (rank, world)."""
    global _OWNED, _GROUPS
    rank, world = dist_info()
    if world > 1 and not dist.is_initialized():
        cuda = (torch.device(device).type == "cuda") if device is not None else torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        importlib.import_module(
            "torch._dynamo"
        )  # imported after the group exists, it would keep references to it

        # each group under its own prefix of torchrun's store: a later group (the cgm chain's next statistics)
        # must not read the addresses the ended one left there
        store, rank, world = next(dist.rendezvous("env://"))
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            store=dist.PrefixStore(f"forgetless{_GROUPS}", store),
        )
        _OWNED, _GROUPS = True, _GROUPS + 1
    return rank, world


def finish_distributed(ok: bool = True) -> None:
    """End the process group that :func:`init_distributed` created (a group the caller made is left alone),
    by :func:`end_process_group`: after the others when ``ok``, at once after a failure."""
    global _OWNED
    if _OWNED:
        _OWNED = False
        end_process_group(wait=ok)


def end_process_group(wait: bool = True) -> None:
    """End this process's process group, whoever created it (accelerate's, under the Trainer), and join its threads.

    With ``wait`` every rank first waits for the others (rank 0 may still be writing), so no rank leaves while a
    peer still needs it; after a failure it does not wait for a rank that may be gone. The group is then destroyed
    and collected, so that gloo's threads end now rather than while the interpreter finalizes. Whoever holds
    the group (a DDP wrapper) must have dropped it before.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()  # a holder of the group in a reference cycle


@contextmanager
def process_group(device: str | torch.device | None = None) -> Iterator[tuple[int, int]]:
    """``with process_group(device) as (rank, world):`` :func:`init_distributed` on entry, and on exit the group's
    end: after the others (rank 0 may still be writing) when the block ended normally, at once when it raised. A
    group that already exists (an enclosing block's, as the cgm chain holds one over its statistics, or the
    caller's) is used and left to its owner."""
    existed = dist.is_available() and dist.is_initialized()
    rank, world = init_distributed(device)
    ok = False
    try:
        yield rank, world
        ok = True
    finally:
        if not existed:
            finish_distributed(ok)


def shard_samples(samples: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's samples: a deterministic interleave (every world-th sample from ``rank``)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    return list(samples[rank::world])


def all_reduce_sums(
    sums: Mapping[str, torch.Tensor], counts: Mapping[str, int] | int | None = None
) -> Mapping[str, int] | int | None:
    """Sum ``sums`` over all ranks, in place (every rank gets the total), and return the summed counts.

    Tensors are reduced in sorted name order so that every rank issues the same collectives. A single process
    (no process group) returns its inputs unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    for name in sorted(sums):
        dist.all_reduce(sums[name], op=dist.ReduceOp.SUM)
    if counts is None:
        return None
    dev = next(iter(sums.values())).device if sums else torch.device("cpu")
    if isinstance(counts, int):
        t = torch.tensor([counts], dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())
    keys = sorted(counts)
    t = torch.tensor([int(counts[k]) for k in keys], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def reduce_to(sums: Mapping[str, torch.Tensor], dst: int = 0) -> None:
    """Sum ``sums`` over all ranks onto rank ``dst`` only, in place (the writer; other ranks' copies are left
    partial): the collective moves each tensor once, rather than giving every rank the total."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for name in sorted(sums):
        dist.reduce(sums[name], dst=dst, op=dist.ReduceOp.SUM)


def collect_owned(tensors: Mapping[str, torch.Tensor], dst: int = 0) -> dict[str, torch.Tensor]:
    """Every rank's own tensors (disjoint names) onto rank ``dst``'s CPU, one at a time and point to point, so no
    rank ever holds another's share on its device. Other ranks get {}."""
    rank, world = dist_info()
    if world == 1 or not dist.is_initialized():
        return {k: v.cpu() for k, v in tensors.items()}
    shapes = {k: (tuple(v.shape), v.dtype, rank) for k, v in tensors.items()}
    everything = {k: v for part in gather_objects(shapes) for k, v in part.items()}
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out: dict[str, torch.Tensor] = {}
    for name in sorted(everything):
        shape, dtype, src = everything[name]
        if src == dst and rank == dst:
            out[name] = tensors[name].cpu()
        elif rank == src:
            dist.send(tensors[name].contiguous(), dst)
        elif rank == dst:
            buf = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(buf, src)
            out[name] = buf.cpu()
    return out


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def from_rank0(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (a decision all ranks must take alike, such as what a cache holds)."""
    return gather_objects(obj)[0]


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (e.g. lists of skipped samples), in rank order; ``[obj]`` in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
