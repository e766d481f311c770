"""One unit at a time: its inputs read (statistics checked as they are), and its output computed — a copy as
stored, or the method's result with the context arguments it asks for, checked for NaN/Inf. :mod:`.run` drives
many of these at once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ForgetlessError
from ..methods.registry import RowBlock, Rows
from ..stats.store import Statistics
from .parts import tensor_params
from .plan import Job, Plan, Route, Unit


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the recipe's seed and a tensor's name: a tensor's draws do not depend on the merge order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def tensor_generators(seed: int, name: str, n: int) -> list[torch.Generator]:
    """One generator per merged model for a tensor: model 0's seeded from (seed, name) as a one-model method's
    generator is, model k's from (seed, name, k); so each model's random draws depend neither on the other
    models nor on how the tensor is split into row blocks."""
    return [
        torch.Generator().manual_seed(tensor_seed(seed, name if k == 0 else f"{name}#{k}")) for k in range(n)
    ]


def read_statistic(
    reader: Statistics, name: str, kind: str, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """One statistics tensor (``rows``: its rows start:stop) in float32, checked as it is read: finite, and
    non-negative for a (diagonal) Fisher — a NaN would otherwise turn into a silent fallback or a traceback deep
    inside a method."""
    t = reader.get(name, rows).float()
    bad = None
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        bad = f"{int((~torch.isfinite(t)).sum())} NaN/Inf entries"
    elif kind.startswith("fisher") and bool((t < 0).any()):
        bad = f"{int((t < 0).sum())} negative entries (a diagonal Fisher is a mean of squares)"
    if bad is not None:
        raise ForgetlessError(
            f"{kind} statistics with {bad}",
            file=reader.file_of(name),
            tensor=name,
            remedy="recompute the statistics (`forgetless stats`); check the model and data for "
            "NaN/Inf (a bf16 overflow, a diverged fine-tune)",
        )
    return t


def copyable(reader, name: str, job: Job) -> bool:
    """True when the stored bytes are the output bytes: stored in the output dtype by this reader (a bf16
    fine-tune beside an fp32 base is not), not changed by an adapter."""
    return reader.info(name).dtype == job.out_dtype and getattr(reader, "is_untouched", lambda n: True)(name)


class Runner:
    """Reads and computes units. ``load`` runs on the reader threads; ``compute`` on the merge threads, whole
    tensors several at once, a tensor's row blocks one after the other and alone (its pre-pass result and its
    generators are kept from its first block to its last)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.method_kwargs = dict(plan.params)
        self.counts: dict[str, Counter] = defaultdict(Counter)  # part -> element counts the method reports
        self._tensor: tuple[str, dict[str, Any]] | None = None  # (name, state) of the tensor in row blocks
        self._lock = threading.Lock()

    def load(self, unit: Unit) -> Any:
        """A copy's bytes (or tensor), or a method's inputs: (base, fine-tuned tensors, statistics) in float32."""
        p, job, rows = self.plan, unit.job, unit.rows
        if not job.route.merged:
            src = p.models[0] if job.route == Route.FINETUNED else p.base
            return src.raw(job.name, rows) if copyable(src, job.name, job) else src.get(job.name, rows)
        base = p.base.get(job.name, rows).float()
        # a method that only reads its fine-tuned tensors gets them mapped from the files: no copy
        views = p.spec.streaming.reads_finetuned
        fts = [(getattr(m, "view", m.get) if views else m.get)(job.name, rows).float() for m in p.models]
        if job.route == Route.NO_STATS:
            return base, fts, {}

        def read(r, k):  # statistics shaped like the weight come in the same rows; others (a Gram) whole
            return read_statistic(r, job.name, k, rows if p.spec.stat_in_rows(k, job.shape) else None)

        stats = {
            k: ([read(r, k) for r in v] if isinstance(v, list) else read(v, k)) for k, v in p.stats.items()
        }
        return base, fts, stats

    def rows_of(self, unit: Unit, loaded: Any) -> Rows:
        base, fts, stats = loaded
        return Rows(
            unit.job.name, base, fts[0] if self.plan.spec.models == "one" else fts, stats, unit.offset
        )

    def _state(self, unit: Unit) -> dict[str, Any]:
        """Per-tensor state of a tensor merged in row blocks: its generators and its pre-pass result."""
        job = unit.job
        if self._tensor is None or self._tensor[0] != job.name:
            self._tensor = (job.name, {})
        return self._tensor[1]

    def _generator(self, job: Job) -> torch.Generator | list[torch.Generator]:
        gens = tensor_generators(self.plan.recipe.seed, job.name, len(self.plan.models))
        return gens[0] if self.plan.spec.models == "one" else gens

    def needs_prepare(self, unit: Unit) -> bool:
        """The first block of a tensor whose method has a pre-pass over its blocks, before that pass has run."""
        return (
            unit.rows is not None
            and unit.rows[0] == 0
            and self.plan.spec.streaming.tensor_prepare is not None
            and unit.job.route.merged
            and not (
                self._tensor is not None
                and self._tensor[0] == unit.job.name
                and "prepared" in self._tensor[1]
            )
        )

    def prepare(self, unit: Unit) -> None:
        """The method's pre-pass over every block of this tensor, at its first block (before any of its blocks is
        read ahead, so that the pass's reads are the only ones of this tensor in memory)."""
        job = unit.job

        def stream() -> Iterator[Rows]:
            for u in self.plan.units_of(job):
                yield self.rows_of(u, self.load(u))

        prepare = self.plan.spec.streaming.tensor_prepare
        params = tensor_params(self.method_kwargs, job.name)
        if "generator" in self.plan.spec.context:  # generators equal to the ones the blocks will draw from
            params["generator"] = self._generator(job)
        self._state(unit)["prepared"] = prepare(params, stream, job.shape) or {}

    def compute(self, unit: Unit, loaded: Any) -> torch.Tensor | bytes:
        """The unit's output: a copy as it was read (cast if need be), or the method's result, checked."""
        job = unit.job
        if isinstance(loaded, bytes | bytearray):
            return loaded
        if isinstance(loaded, torch.Tensor):
            return loaded.to(job.out_dtype)
        base, fts, stats = loaded
        spec = self.plan.spec
        counts: Counter = Counter()  # this call's own: units are merged on several threads
        kwargs = {**tensor_params(self.method_kwargs, job.name), **stats, **self._context(unit, counts)}
        if unit.last and unit.rows is not None:
            self._tensor = None
        result = spec.fn(base, fts[0] if spec.models == "one" else fts, **kwargs)
        if counts:
            with self._lock:
                self.counts[job.part].update(counts)
        if result.shape != base.shape:
            raise AssertionError(f"method {spec.name} returned shape {tuple(result.shape)} for {job.name}")
        if (
            not torch.isfinite(result.sum()) and not torch.isfinite(result).all()
        ):  # a sum is NaN/Inf if any is
            raise ForgetlessError(
                f"method {spec.name!r} produced NaN or Inf",
                tensor=job.name,
                remedy="check the inputs (and statistics) of this tensor for NaN/Inf",
            )
        return result.to(job.out_dtype)

    def _context(self, unit: Unit, counts: Counter) -> dict[str, Any]:
        """The context arguments the method's signature asks for: name, counts, generator, block."""
        job, context = unit.job, self.plan.spec.context
        state = self._state(unit) if unit.rows is not None else {}
        kwargs: dict[str, Any] = {}
        if "name" in context:
            kwargs["name"] = job.name
        if "counts" in context:
            kwargs["counts"] = counts
        if "generator" in context:
            if "generator" not in state:  # a tensor in row blocks keeps its generators from block to block
                state["generator"] = self._generator(job)
            kwargs["generator"] = state["generator"]
        if "block" in context and unit.rows is not None:
            kwargs["block"] = RowBlock(unit.offset, job.shape, state.get("prepared", {}))
        return kwargs
