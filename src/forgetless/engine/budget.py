"""The memory budget of a merge: what its peak is estimated from, and which tensors go in blocks of rows.

The peak is the runtime plus the units in flight: those being merged (every input in float32, the method's
temporaries, its result) and the read-ahead (:data:`PREFETCH` units within :data:`PREFETCH_BYTES`, or one). A
tensor whose unit would not fit the budget (``memory:`` / ``--memory``, default :data:`AUTO_MEMORY` of the
available memory) is merged in blocks of its rows. Where the constants come from: BENCHMARKS.md, "Merge engine
constants".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from ..checkpoint.space import available_memory
from ..checkpoint.writer import human_bytes
from ..errors import ForgetlessError
from ..recipe import check_size

if TYPE_CHECKING:
    from .plan import Plan

PREFETCH = 2  # units (tensors or row blocks) read ahead of those being merged …
PREFETCH_BYTES = (
    256 * 2**20
)  # … while their inputs take at most this much (the next one is always read ahead)
RUNTIME_BYTES = 400 * 2**20  # python + torch + forgetless after import, and the threads' malloc arenas
AUTO_MEMORY = 0.5  # memory: auto = this fraction of the memory available when the merge is planned


class Cost(NamedTuple):
    """The bytes a unit holds while it is merged."""

    inputs: int  # every input in float32 for a method (the stored bytes for a copy)
    temporaries: int  # the method's own float32 copies
    output: int  # the result in the output dtype

    @property
    def total(self) -> int:
        return self.inputs + self.temporaries + self.output


def peak(costs: list[Cost]) -> int:
    """The peak-memory estimate of units with these costs: the runtime, the largest unit whole, and the read-ahead
    (:data:`PREFETCH_BYTES`, or the largest unit's inputs)."""
    costs = costs or [Cost(0, 0, 0)]
    return RUNTIME_BYTES + max(c.total for c in costs) + max(PREFETCH_BYTES, max(c.inputs for c in costs))


def in_flight_allowance(estimate: int) -> int:
    """What the units read or being merged may hold together: the estimate beyond the runtime."""
    return estimate - RUNTIME_BYTES


def resolve_memory(value: str | int, where: str) -> tuple[int, str]:
    """The memory budget in bytes and how it was set: a size, or ``auto`` (:data:`AUTO_MEMORY` of the available
    memory). A budget the runtime and the read-ahead alone exceed is refused."""
    if value == "auto":
        avail = available_memory()
        n, how = int(avail * AUTO_MEMORY), f"auto: {AUTO_MEMORY:.0%} of the {human_bytes(avail)} available"
    else:
        try:
            n, how = check_size(value, "a memory budget"), "set"
        except ValueError as e:
            raise ForgetlessError(
                f"memory: {e}", file=where, remedy="give a size such as 8GiB or 500MB, or auto"
            ) from None
    floor = RUNTIME_BYTES + PREFETCH_BYTES
    if n <= floor:
        raise ForgetlessError(
            f"memory: {value} ({human_bytes(n)}) is below what the merge needs before any tensor "
            f"(runtime and read-ahead, {human_bytes(floor)})",
            file=where,
            remedy="give a larger budget (e.g. memory: 2GiB, or --memory 2GiB)",
        )
    return n, how


def unit_cap(memory: int) -> int:
    """The most one unit (inputs + temporaries + result) may take for :func:`peak` to stay within `memory`: the
    read-ahead is PREFETCH_BYTES or, when units are larger, one more unit's inputs."""
    free = memory - RUNTIME_BYTES
    return free // 2 if free // 2 > PREFETCH_BYTES else min(PREFETCH_BYTES, free - PREFETCH_BYTES)


def block_rows(plan: Plan, where: str) -> dict[str, int]:
    """Rows per block for every job too large for the budget whole; an error naming the tensor when one cannot
    be split (the method merges whole tensors only) or one row already exceeds the budget."""
    cap = unit_cap(plan.memory)
    out: dict[str, int] = {}
    for j in plan.jobs:
        whole = plan.cost(j).total
        if whole <= cap:
            continue
        if j.route.merged and plan.spec.streaming.rows != "blocks":
            raise ForgetlessError(
                f"{plan.spec.name!r} merges whole tensors, and this one needs {human_bytes(whole)} "
                f"at once, more than the memory budget {human_bytes(plan.memory)} allows one "
                f"tensor ({human_bytes(cap)})",
                file=where,
                tensor=j.name,
                remedy="raise memory: (or --memory), or leave this tensor out of the scope",
            )
        n = num_rows(j.shape)
        fixed = plan.cost(j, 0).total
        per_row = (plan.cost(j, n).total - fixed) / n
        rows = min(n, int((cap - fixed) // per_row)) if len(j.shape) and cap > fixed else 0
        if rows < 1:
            raise ForgetlessError(
                f"one row of this tensor needs {human_bytes(fixed + per_row)}, more than the "
                f"memory budget {human_bytes(plan.memory)} allows a block ({human_bytes(cap)})",
                file=where,
                tensor=j.name,
                remedy="raise memory: (or --memory)",
            )
        if rows < n:
            out[j.name] = rows
    return out


def num_rows(shape: tuple[int, ...]) -> int:
    """Rows along dim 0 (a 1-D tensor's entries); a scalar is one row."""
    return shape[0] if shape else 1
