"""The fine-tune's data: samples checked before the first step, then each rank's micro-batches encoded off the loop.

    feed = Feed(samples, encoder, on_bad_sample="skip", batch_size=4, micro_batches=200, seed=0, rank=0, world=2)
    batches = feed.batches(device)   # micro-batch 0, 1, …: this rank's share, collated, on the device

**Order.** Samples are drawn as one endless stream: epoch ``e`` is :func:`epoch_order`, a permutation seeded with
``seed + e``; micro-batch ``k`` is the stream's items ``k·B .. (k+1)·B − 1`` and rank ``r`` of ``world`` takes
``items[r::world]`` of it. ``B`` is a multiple of ``world``, so rank ``r`` takes exactly the stream positions
``≡ r (mod world)``.

**Replay.** With ``replay`` samples and ``replayed = ρ`` of them per micro-batch, the task stream fills the slots
``0 .. B − ρ − 1`` of every micro-batch (its items ``k·(B − ρ) .. (k+1)·(B − ρ) − 1``) and a second stream of the
replay samples, seeded with ``seed +`` :data:`REPLAY_SEED` (epoch ``e``: ``+ e``), the last ``ρ`` slots (its items
``k·ρ .. (k+1)·ρ − 1``). Each is a :class:`Source`; rank ``r`` still takes the slots ``r, r + world, …``. Without
replay the task stream fills every slot: the order above, unchanged.

**Checking.** Every sample is encoded once before the first step, by one rank: rank ``r`` checks :func:`share`,
the samples it takes in the first epoch when none is dropped (``epoch_order(n, seed, 0)[r::world]`` without
replay), a partition of the list among the ranks; the replay samples likewise, after the task's. The ranks'
findings are gathered (:func:`~forgetless.stats.distributed.gather_objects`), so that every rank drops the same
bad samples, in list order (``on_bad_sample="skip"``), or raises the same error before any step: the first bad
sample of the list, the one a single process names. Later epochs (and the first, once a sample is dropped) give a
rank samples another rank checked; the encoder is deterministic, so they encode here as they did there. The encodings a rank made are kept while they fit in :data:`CACHE_BYTES`.

**Loading.** A :class:`torch.utils.data.DataLoader` over the micro-batch numbers. Micro-batch ``k`` is a function
of ``k`` alone (the seeded orders, the kept encodings, the encoder), so the batches are the same, bit for bit,
whatever the number of workers: ``workers > 0`` processes encode and collate ahead of the training loop
(:data:`PREFETCH` micro-batches each), ``0`` does it in the main process when the loop asks.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ForgetlessError
from ..stats.data import Encoder, Sample, collate, encode_or_skip
from ..stats.distributed import gather_objects

CACHE_BYTES = 1 << 30  # encodings kept in memory per rank (token ids, pixel tensors)
MAX_AUTO_WORKERS = 2  # loader workers per rank when not given: encoding is light beside a training step
PREFETCH = 2  # micro-batches each worker encodes ahead
# the replay stream's seed, added to the run's: its epochs' seeds stay apart from the task stream's seed + epoch
REPLAY_SEED = 1 << 32
MAX_LISTED = 100_000  # replayed items finetune.json lists in order; beyond, their counts per id


# ------------------------------------------------------------------------------------------------ the order
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample positions of epoch ``epoch``: a permutation of ``range(n)`` seeded with ``seed + epoch``."""
    order = list(range(n))
    random.Random(seed + epoch).shuffle(order)
    return order


def sample_stream(n: int, seed: int) -> Iterator[int]:
    """Sample positions, epoch after epoch (:func:`epoch_order`)."""
    epoch = 0
    while True:
        yield from epoch_order(n, seed, epoch)
        epoch += 1


def share(n: int, seed: int, rank: int, world: int, slots: range | None = None) -> list[int]:
    """The positions rank ``rank`` checks, in list order: its items of the first epoch when none is dropped, the
    stream filling ``slots`` of every micro-batch (None: all of them, a multiple of ``world``)."""
    order = epoch_order(n, seed, 0)
    if slots is None:
        return sorted(order[rank::world])
    return sorted(order[p] for p in range(n) if slots[p % len(slots)] % world == rank)


# ------------------------------------------------------------------------------------------------ the ratio
def replay_share(batch_size: int, ratio: float) -> float:
    """Replayed samples in a micro-batch of ``batch_size`` at ``ratio`` replayed : task samples."""
    return batch_size * ratio / (1 + ratio)


def ratio_problem(batch_size: int, ratio: float) -> tuple[str, str] | None:
    """What is wrong with ``ratio`` for micro-batches of ``batch_size``, and its remedy (the nearest ratios that
    put a whole number of replayed samples, 1 .. ``batch_size − 1``, in each); None when it is exact."""
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        return f"--replay-ratio must be a positive number, got {ratio!r}", "pass e.g. --replay-ratio 1"
    if batch_size < 2:
        return "a micro-batch of 1 sample cannot mix task and replayed samples", "pass --batch-size 2 or more"
    r = replay_share(batch_size, ratio)
    if abs(r - round(r)) <= 1e-9 and 1 <= round(r) <= batch_size - 1:
        return None
    near = sorted({min(max(f(r), 1), batch_size - 1) for f in (math.floor, math.ceil)})
    exact = " or ".join(f"{k / (batch_size - k):.12g} ({k} of {batch_size} replayed)" for k in near)
    problem = (
        f"--replay-ratio {ratio:g} puts {r:.4g} replayed samples in each micro-batch of {batch_size}; it must "
        f"hold a whole number of them, 1 to {batch_size - 1}"
    )
    return problem, f"pass --replay-ratio {exact}, or another --batch-size"


# ------------------------------------------------------------------------------------------------ checking
@dataclass
class Findings:
    """What a rank found in its share: ``(position, id, reason)`` of each skipped sample, the first error as
    ``(position, ForgetlessError fields)``, and the longest encoding in tokens. Plain data: it is gathered."""

    bad: list[tuple[int, str, str]] = field(default_factory=list)
    failure: tuple[int, dict[str, Any]] | None = None
    longest: int = 0


def _fields(e: Exception, sample: Sample, rank: int) -> dict[str, Any]:
    if isinstance(e, ForgetlessError):
        return {"problem": e.problem, "file": e.file, "tensor": e.tensor, "remedy": e.remedy}
    return {
        "problem": f"rank {rank} failed to encode sample {sample.id!r} ({type(e).__name__}: {e})",
        "file": sample.source,
        "remedy": "see that rank's output",
    }


def _nbytes(enc: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in enc.values())


def check_share(
    samples: list[Sample],
    encoder: Encoder,
    on_bad_sample: str,
    positions: list[int],
    rank: int = 0,
    room: int | None = None,
) -> tuple[Findings, dict[int, dict[str, torch.Tensor]], Exception | None]:
    """Encode the samples at ``positions``, in order, up to the first error. Returns the findings, the encodings
    kept (by position, up to ``room`` bytes, default :data:`CACHE_BYTES`) and the error itself (None without
    one)."""
    found, cache, used = Findings(), {}, 0
    limit = CACHE_BYTES if room is None else room
    for p in positions:
        skipped: list[tuple[str, str]] = []
        try:
            enc = encode_or_skip(encoder, samples[p], on_bad_sample, skipped)
        except Exception as e:  # noqa: BLE001 — kept for the gather: a rank raising alone leaves the others waiting
            found.failure = (p, _fields(e, samples[p], rank))
            return found, cache, e
        if enc is None:
            found.bad.append((p, *skipped[0]))
            continue
        found.longest = max(found.longest, enc["input_ids"].numel())
        if used + _nbytes(enc) <= limit:
            cache[p] = enc
            used += _nbytes(enc)
    return found, cache, None


def _raise_first(everyone: list[Findings], error: Exception | None, rank: int) -> None:
    """The error of the first failing position on any rank, raised alike on every rank (the failing rank re-raises
    its own exception when it is not a ForgetlessError, so that its traceback is kept)."""
    failures = [(f.failure[0], r, f.failure[1]) for r, f in enumerate(everyone) if f.failure is not None]
    if not failures:
        return
    _, who, fields = min(failures, key=lambda f: f[0])  # the ranks' positions are disjoint
    if who == rank and error is not None and not isinstance(error, ForgetlessError):
        raise error
    raise ForgetlessError(**fields)


def check(
    samples: list[Sample],
    encoder: Encoder,
    on_bad_sample: str,
    *,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    slots: range | None = None,
    room: int | None = None,
) -> tuple[list[Sample], list[tuple[str, str]], dict[int, dict[str, torch.Tensor]], int]:
    """Check every sample once, this rank its :func:`share` (of the stream filling ``slots``), keeping up to
    ``room`` bytes of encodings, and gather the findings (a collective under a process group: every rank calls
    it). Returns the usable samples (the same list on every rank), ``(id, reason)`` of the skipped ones in list
    order, this rank's kept encodings by position in the usable list, and the longest encoding in tokens."""
    positions = share(len(samples), seed, rank, world, slots)
    found, mine, error = check_share(samples, encoder, on_bad_sample, positions, rank, room)
    everyone: list[Findings] = gather_objects(found)
    _raise_first(everyone, error, rank)
    bad = sorted(b for f in everyone for b in f.bad)
    dropped = {p for p, _, _ in bad}
    kept = [p for p in range(len(samples)) if p not in dropped]
    if not kept:
        _, sid, why = bad[0]
        raise ForgetlessError(
            f"all {len(samples)} samples were skipped as bad (first: {sid!r}: {why})",
            file=samples[0].source,
            remedy="fix the data",
        )
    where = {p: i for i, p in enumerate(kept)}
    cache = {where[p]: enc for p, enc in mine.items()}
    return (
        [samples[p] for p in kept],
        [(sid, why) for _, sid, why in bad],
        cache,
        max(f.longest for f in everyone),
    )


# ------------------------------------------------------------------------------------------------ loading
class Source:
    """A sample list drawn as an endless stream (epoch ``e``: :func:`epoch_order` seeded with ``seed + e``) into
    the ``slots`` of every micro-batch, and this rank's kept encodings by position."""

    def __init__(
        self, samples: list[Sample], cache: dict[int, dict[str, torch.Tensor]], seed: int, slots: range
    ) -> None:
        self.samples, self.cache, self.seed, self.slots = samples, cache, seed, slots
        self._order: tuple[int, list[int]] = (-1, [])  # one epoch's order at a time

    def item(self, position: int) -> int:
        """The sample at stream position ``position``."""
        epoch, j = divmod(position, len(self.samples))
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.samples), self.seed, epoch))
        return self._order[1][j]

    def items(self, k: int, rank: int = 0, world: int = 1) -> list[int]:
        """Its samples in rank ``rank``'s slots (``≡ rank mod world``) of micro-batch ``k``."""
        first = k * len(self.slots)
        return [self.item(first + i) for i, slot in enumerate(self.slots) if slot % world == rank]

    def encoded(self, i: int, encoder: Encoder) -> dict[str, torch.Tensor]:
        return self.cache[i] if i in self.cache else encoder(self.samples[i])


class MicroBatches(Dataset):
    """Micro-batch ``k`` of one rank, collated: its slots ``[rank::world]``, each source's samples in them (the
    task's, then the replayed), from the kept encodings or encoded now."""

    def __init__(self, sources: list[Source], encoder: Encoder, *, rank: int = 0, world: int = 1) -> None:
        self.sources, self.encoder, self.rank, self.world = sources, encoder, rank, world

    def items(self, k: int, source: int = 0) -> list[int]:
        """The samples of source ``source`` (0: the task's, 1: the replayed) in this rank's share of ``k``."""
        return self.sources[source].items(k, self.rank, self.world)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        encoded = [
            s.encoded(i, self.encoder) for s in self.sources for i in s.items(k, self.rank, self.world)
        ]
        return collate(encoded, self.encoder.pad_token_id)


def auto_workers(dataset: MicroBatches, micro_batches: int) -> int:
    """Loader workers when not given: none when every sample this rank takes is kept encoded (nothing to encode in
    the loop), else up to :data:`MAX_AUTO_WORKERS`, leaving a core of the rank's share for training."""
    if all(
        i in s.cache
        for s in dataset.sources
        for k in range(micro_batches)
        for i in s.items(k, dataset.rank, dataset.world)
    ):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(MAX_AUTO_WORKERS, per_rank - 1))


class Feed:
    """The fine-tune's usable samples (checked on construction: see the module's notes) and this rank's
    ``micro_batches`` micro-batches, from a DataLoader of ``workers`` processes (None: :func:`auto_workers`);
    with ``replay``, ``replayed`` of each micro-batch's samples from them (the last slots)."""

    def __init__(
        self,
        samples: list[Sample],
        encoder: Encoder,
        *,
        on_bad_sample: str,
        batch_size: int,
        micro_batches: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        workers: int | None = None,
        replay: list[Sample] | None = None,
        replayed: int = 0,
    ) -> None:
        if workers is not None and workers < 0:
            raise ForgetlessError(
                f"workers must be ≥ 0, got {workers}", remedy="pass --workers N (0: no workers)"
            )
        replayed = replayed if replay is not None else 0
        if replay is not None and not 1 <= replayed < batch_size:
            raise ValueError(f"replay takes 1 .. {batch_size - 1} samples of a micro-batch, not {replayed}")
        task = range(batch_size - replayed)
        self.samples, self.skipped, self.cache, self.longest = check(
            samples, encoder, on_bad_sample, seed=seed, rank=rank, world=world, slots=task
        )
        sources = [Source(self.samples, self.cache, seed, task)]
        self.replay: Source | None = None
        self.replay_skipped: list[tuple[str, str]] = []
        if replay is not None:
            room = CACHE_BYTES - sum(_nbytes(e) for e in self.cache.values())
            slots = range(task.stop, batch_size)
            kept, self.replay_skipped, cache, longest = check(
                replay,
                encoder,
                on_bad_sample,
                seed=seed + REPLAY_SEED,
                rank=rank,
                world=world,
                slots=slots,
                room=room,
            )
            self.replay = Source(kept, cache, seed + REPLAY_SEED, slots)
            self.longest = max(self.longest, longest)
            sources.append(self.replay)
        self.dataset = MicroBatches(sources, encoder, rank=rank, world=world)
        self.micro_batches = micro_batches
        self.workers = auto_workers(self.dataset, micro_batches) if workers is None else workers

    @property
    def images(self) -> bool:
        """Whether every sample, task and replayed, shows an image."""
        return all(s.image is not None for src in self.dataset.sources for s in src.samples)

    def epochs(self, micro_batches: int) -> float:
        """Epochs of the task samples that ``micro_batches`` micro-batches go through."""
        return micro_batches * len(self.dataset.sources[0].slots) / len(self.samples)

    def replayed_items(self) -> dict[str, Any]:
        """The replayed samples of the whole run, every rank's, in the order used: ``{"items": [ids]}``, or beyond
        :data:`MAX_LISTED` of them ``{"counts": {id: times}}`` (ids in order of first use)."""
        if self.replay is None:
            return {}
        total = self.micro_batches * len(self.replay.slots)
        ids = (self.replay.samples[self.replay.item(p)].id for p in range(total))
        if total <= MAX_LISTED:
            return {"items": list(ids)}
        counts: dict[str, int] = {}
        for sid in ids:
            counts[sid] = counts.get(sid, 0) + 1
        return {"counts": counts}

    def batches(self, device: str | torch.device = "cpu") -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches ``0 .. micro_batches − 1``, on ``device``. Its ``close()`` ends the workers."""
        pinned = torch.device(device).type == "cuda"
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            sampler=range(self.micro_batches),
            num_workers=self.workers,
            persistent_workers=self.workers > 0,
            prefetch_factor=PREFETCH if self.workers else None,
            pin_memory=pinned,
        )
        it = iter(loader)
        try:
            for batch in it:
                yield {k: v.to(device, non_blocking=pinned) for k, v in batch.items()}
        finally:
            getattr(it, "_shutdown_workers", lambda: None)()  # now, not whenever the iterator is collected
