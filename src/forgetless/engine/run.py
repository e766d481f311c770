"""Running a plan: units read ahead on two threads, merged side by side, each result written at its offset as soon
as it is done; the output folder appears only once everything is written, and nothing is left on any failure.

    report = execute(build_plan(recipe, out="merged"))    # what merge(recipe, out="merged") does
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple, Self

import torch

from .. import __version__
from ..checkpoint.lora import parse_model_ref
from ..checkpoint.reader import row_bytes
from ..checkpoint.writer import StreamingWriter, parse_size
from ..errors import ForgetlessError
from ..methods.registry import Rows
from ..recipe import Recipe
from . import budget
from .card import MergeReport, model_card
from .plan import Job, Plan, Route, Unit, build_plan
from .runner import Runner

MERGERS = 2  # units merged at once, each on its own thread with few torch threads (see merge_threads)


def merge(
    recipe: Recipe | dict | str | Path,
    *,
    out: str | Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    memory: str | int | None = None,
) -> MergeReport:
    """Plan, check and run a merge. The CLI's `forgetless merge` is this function. ``memory``: the peak memory
    budget (a size or "auto"), overriding the recipe's ``memory:``."""
    plan = build_plan(recipe, out=out, force=force, memory=memory)
    require_output(plan)  # by the dry run too: it checks what the run would
    if dry_run:
        if log:
            log(plan.describe())
        return MergeReport(plan.out, plan, dry_run=True)
    try:
        return execute(plan, progress=progress, log=log)
    finally:
        for rd in [plan.base, *plan.models]:
            getattr(rd, "close", lambda: None)()


def require_output(plan: Plan) -> None:
    """Refuse a plan without an output folder."""
    if plan.out is None:
        raise ForgetlessError(
            "no output folder",
            file=plan.recipe.source or "recipe",
            remedy="set `out:` in the recipe or pass --out",
        )


def execute(plan: Plan, *, progress: bool = True, log: Callable[[str], None] | None = None) -> MergeReport:
    """Write the plan's output: every unit read, merged and written, then the folder committed."""
    require_output(plan)
    if plan.spec.space == "adapter":
        from .adapter import execute_adapter  # it builds on this module

        return execute_adapter(plan, progress=progress, log=log)
    started = time.perf_counter()
    writer = StreamingWriter(
        plan.out,
        plan.entries(),
        shard_size=parse_size(plan.recipe.shard_size),
        force=plan.force,
        metadata=writer_metadata(plan),
    )
    runner = Runner(plan)
    units = plan.units()
    if plan.block_rows:
        release_freed_memory()

    def write() -> Written:
        prepare_model(plan, runner, units, log)
        with Progress(plan, progress) as bar:
            pipeline(plan, runner, writer, bar, units)
        return Written(
            {"README.md": model_card(plan, runner.counts)},
            side_dir(plan.recipe.base),
            config_updates(plan),
            dict(runner.counts),
        )

    return commit_or_abort(plan, writer, write, started=started, log=log)


class Written(NamedTuple):
    """What the commit adds once every tensor is written, and the method's element counts for the report."""

    extra_files: dict[str, str]  # file name -> text (the model card, adapter_config.json)
    side_files_from: Path | None  # the folder whose tokenizer and config files are copied beside the weights
    config_updates: dict | None  # keys changed in the copied config.json
    counts: dict[str, Counter]


def commit_or_abort(
    plan: Plan,
    writer: StreamingWriter,
    write: Callable[[], Written],
    *,
    started: float,
    log: Callable[[str], None] | None,
) -> MergeReport:
    """The one way a merge's output appears: `write` writes every tensor, then the folder is committed (synced
    and renamed into place); any failure or signal on the way removes the writer's temporary folder instead."""
    try:
        done = write()
        writer.commit(
            side_files_from=done.side_files_from,
            config_updates=done.config_updates,
            extra_files=done.extra_files,
        )
    except BaseException:
        writer.abort()
        raise
    report = MergeReport(plan.out, plan, time.perf_counter() - started, counts=done.counts)
    if log:
        log(report.summary())
    return report


def writer_metadata(plan: Plan) -> dict[str, str]:
    """The safetensors header metadata of every output file: who wrote it, with which method."""
    return {"forgetless_version": __version__, "method": plan.spec.name}


def side_dir(ref: str) -> Path:
    """The folder of a model reference (without its +ADAPTER), whose side files the output copies."""
    return parse_model_ref(ref)[0]


def config_updates(plan: Plan) -> dict:
    """The config.json keys that name the output dtype, when it differs from the base's."""
    if plan.recipe.dtype == "base":
        return {}
    cfg = plan.base.config
    return {k: plan.recipe.dtype for k in ("torch_dtype", "dtype") if k in cfg} or {
        "dtype": plan.recipe.dtype
    }


def prepare_model(plan: Plan, runner: Runner, units: list[Unit], log: Callable[[str], None] | None) -> None:
    """The method's pre-pass over every tensor it merges (CGM†'s global budget), when it has one: what it
    returns joins the method's keyword arguments."""
    prepare = plan.spec.streaming.prepare
    if prepare is None:
        return
    method_units = [u for u in units if u.job.route == Route.METHOD]

    def stream() -> Iterator[Rows]:
        for u in method_units:
            yield runner.rows_of(u, runner.load(u))

    numel = sum(math.prod(j.shape) for j in plan.jobs if j.route == Route.METHOD)
    extra = prepare(dict(plan.params), stream, numel)
    runner.method_kwargs.update(extra or {})
    if extra and log:
        log(
            f"{plan.spec.name} pre-pass: "
            + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
        )


# ------------------------------------------------------------------------------------------------ all units
def release_freed_memory() -> None:
    """Make glibc return freed blocks of 4 MiB and more to the system at once (a fixed mmap threshold), when
    tensors are merged in row blocks. By default glibc raises that threshold as large blocks are freed and then
    keeps freed blocks below it in its per-thread arenas: each row block's masks and temporaries are such blocks,
    and the process would grow block after block beyond the budget (BENCHMARKS.md, "Merge memory bounded whatever
    the largest tensor"). Process-wide and lasting; a no-op where glibc's ``mallopt`` is missing."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def merge_threads() -> tuple[int, int]:
    """(units merged at once, torch intra-op threads for each). Elementwise merges on a few cores gain more from
    merging :data:`MERGERS` units side by side, each on one thread, than from torch's OpenMP threads: those meet
    at a barrier after every operation, and on a machine whose cores are busy with the merge's own reads and writes
    (or anything else) a thread waiting there for a core spins (BENCHMARKS.md, "Merge engine constants"). Cores
    beyond those go to torch's threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    mergers = max(1, min(MERGERS, cores))
    return mergers, max(1, cores // mergers - 1)


def pipeline(plan: Plan, runner: Runner, writer: StreamingWriter, bar: Progress, units: list[Unit]) -> None:
    """Read, merge and write every unit: reads on two threads, merges on :func:`merge_threads` threads (each writes
    its result at its offset as soon as it is done; the writer syncs shards in the background), torch's thread
    count set for the merge and restored after it."""
    mergers, threads = merge_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with (
            ThreadPoolExecutor(2, thread_name_prefix="forgetless-read") as readers,
            ThreadPoolExecutor(mergers, thread_name_prefix="forgetless-merge") as pool,
        ):
            InFlight(plan, runner, writer, bar, readers, pool, mergers).run(units)
    finally:
        torch.set_num_threads(previous)


class InFlight:
    """The units read or being merged, and the bytes they hold, each counted whole (inputs, temporaries, result)
    from the start of its read to the end of its write. A unit's read starts only while they stay within what the
    peak-memory estimate allows beyond the runtime — one unit, however large, always may. Row blocks of a tensor
    are merged one after the other, alone; a tensor's pre-pass runs with nothing else in flight, before any of its
    blocks is read ahead."""

    def __init__(
        self,
        plan: Plan,
        runner: Runner,
        writer: StreamingWriter,
        bar: Progress,
        readers: ThreadPoolExecutor,
        pool: ThreadPoolExecutor,
        mergers: int,
    ):
        self.plan, self.runner, self.writer, self.bar = plan, runner, writer, bar
        self.readers, self.pool, self.mergers = readers, pool, mergers
        self.allowance = budget.in_flight_allowance(plan.peak_memory_estimate())
        self.units: list[Unit] = []
        self.reads: dict[int, Future] = {}  # unit index -> its read
        self.running: dict[Future, int] = {}  # merge -> bytes it holds
        self.held = 0  # bytes of the units read or being merged
        self.next = 0  # the next unit to read
        self.lock = threading.Lock()

    def run(self, units: list[Unit]) -> None:
        self.units = units
        self.read_ahead()
        for i, unit in enumerate(units):
            alone = unit.rows is not None
            if self.runner.needs_prepare(unit):
                self.settle(every=True)
                self.runner.prepare(unit)
                self.read_ahead()
            if alone:
                self.settle(every=True)
            while i not in self.reads or len(self.running) >= self.mergers:
                self.settle()
                if not self.running:
                    self.read_ahead()  # nothing held by merges: this unit's read is admitted
            self.running[self.pool.submit(self.merge, unit, self.reads.pop(i))] = self.plan.unit_cost(
                unit
            ).total
            if alone:
                self.settle(every=True)
            self.read_ahead()
        self.settle(every=True)

    def read_ahead(self) -> None:
        """Start the next units' reads while the window and the allowance admit them."""
        units = self.units
        while (
            self.next < len(units)
            and len(self.reads) < budget.PREFETCH
            and not self.runner.needs_prepare(units[self.next])
        ):
            cost = self.plan.unit_cost(units[self.next]).total
            if self.held and self.held + cost > self.allowance:
                break
            self.reads[self.next] = self.readers.submit(self.runner.load, units[self.next])
            self.held += cost
            self.next += 1

    def settle(self, every: bool = False) -> None:
        """Wait for one merge to finish (`every`: for all), free what it held, read ahead."""
        while self.running:
            done, _ = wait(list(self.running), return_when=FIRST_COMPLETED)
            for f in done:
                self.held -= self.running.pop(f)
                f.result()  # a merge's error stops the run here
            self.read_ahead()
            if not every:
                return

    def merge(self, unit: Unit, read: Future) -> None:
        """On a merge thread: compute the unit and write it at its offset."""
        result = self.runner.compute(unit, read.result())
        at = 0 if unit.rows is None else unit.rows[0] * row_bytes(unit.job.shape, unit.job.out_dtype)
        self.writer.write(unit.job.name, result, at)
        with self.lock:
            self.bar.update(unit, self.plan.unit_cost(unit).output)


class Progress:
    """Tensors and bytes done, MB/s and ETA on stderr (tqdm); closed on leaving its ``with`` block."""

    def __init__(self, plan: Plan, enabled: bool):
        from tqdm import tqdm

        self.n = len(plan.jobs)
        self.done = 0
        self.bar = tqdm(
            total=sum(j.out_bytes for j in plan.jobs),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"merge {plan.spec.name}",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def update(self, unit: Job | Unit, nbytes: int | None = None) -> None:
        """A job done, or a unit of one (`nbytes` its output bytes): the tensor counts when its last unit is."""
        if isinstance(unit, Job):
            unit, nbytes = Unit(unit), unit.out_bytes
        if unit.last:
            self.done += 1
            self.bar.set_postfix_str(f"{self.done}/{self.n} tensors", refresh=False)
        self.bar.update(nbytes)
