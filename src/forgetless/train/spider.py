"""SPIDER and MagnitudeMask: rules that pull fine-tuned weights back towards the pre-trained ones after every step.

Both rules act on a dict of named trainable tensors, between the optimizer's step and the clearing of the
gradients; the optimizer itself is unchanged. With ``θ₀`` the weights when the rule starts (captured once, before
the first optimizer step), per trainable tensor:

**SPIDER** (``Spider``)::

    R(x)  = sigmoid((|x| − mean|x|) / std|x|)        per tensor, unbiased std (see :func:`importance`)
    I_pre = R(θ₀)                                     frozen: recomputed from θ₀ (and its two cached moments)
                                                      at every step, never stored
    G    += g_t                                       signed sum of every step's gradients, after clipping
    I_ft  = R(G)
    c     = I_ft / (I_pre + I_ft) where I_ft > I_pre, else 0
    c     = min(1, c / mean(c[c ≠ 0]))                (no nonzero c: c stays all zero)
    θ    ← (1 − c) ⊙ θ₀ + c ⊙ θ                       (torch.lerp: exactly θ₀ where c = 0, exactly θ where c = 1)

**MagnitudeMask** (``MagnitudeMask``, the baseline of the same published code): the ``⌊numel / 2⌋`` entries of
largest ``|θ₀|`` of each tensor (ties: the lower flat index first) are reset to ``θ₀`` after every step; the other
entries move freely.

Where the gradients are read, the memory, several processes (DDP, FSDP2), mixed precision and the recorded
statistics: docs/keep-rules.md.

Plain PyTorch loop::

    rule = Spider(dict(model.named_parameters()))        # θ₀ captured now, before any step
    for batch in batches:
        loss_of(batch).backward()                        # (several micro-batches: gradients accumulate)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        rule.accumulate()                                # G += clipped gradients
        optimizer.step()
        rule.apply()                                     # θ ← (1 − c) θ₀ + c θ
        optimizer.zero_grad()

forgetless finetune: ``finetune(..., keep="spider")`` (or ``hook=Spider()``: the rule captures ``θ₀`` from the
step's tensors at the first ``before_step``). transformers: ``Trainer(..., callbacks=[SpiderCallback("spider")])``
(``on_pre_optimizer_step`` after clipping → ``accumulate``; ``on_optimizer_step`` before ``zero_grad`` →
``apply``), under DDP and FSDP2; not under DeepSpeed or FSDP1, whose gradients are kept outside the parameters'
``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ForgetlessError
from .hooks import StepInfo, built_on_first_use

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support: no tensor is ever sharded
    DTensor = ()

KEEP_RULES = ("none", "spider", "magnitude_mask")
MASK_RATIO = 0.5
ORDER_REMEDY = (
    "call rule.accumulate() after clipping and before optimizer.step(), and rule.apply() after "
    "optimizer.step() and before the gradients are cleared"
)


# ---------------------------------------------------------------------------------------------- pure functions
def lossless_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` in the narrowest of bfloat16, float16 and float32 that holds every value exactly: θ₀ loaded
    from an fp16 or bf16 checkpoint keeps half the memory and loses nothing (every use reads it in float32)."""
    for dtype in (torch.bfloat16, torch.float16):
        narrow = x.to(dtype, copy=True)  # a copy even in x's own dtype: θ₀ must not follow the parameter
        if torch.equal(narrow.to(x.dtype), x):
            return narrow
    return x.to(torch.float32, copy=True)


def _abs(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``|x|`` in float32: a new tensor, or written into ``out`` (a float32 tensor of ``x``'s shape)."""
    x = x.detach()
    if out is None:
        return x.float().abs()
    return torch.abs(x, out=out) if x.dtype == torch.float32 else out.copy_(x).abs_()


@dataclass(frozen=True)
class Sharding:
    """A tensor split across the ranks of ``group`` (FSDP2's ``fully_shard``: a DTensor with one ``Shard``
    placement): each rank holds a disjoint piece, ``numel`` is the whole tensor's size, and a whole-tensor sum is
    the all-reduced sum of the pieces'. Every rank must reduce the same tensors in the same order."""

    group: Any
    numel: int

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t


def local_part(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local piece (a view of its storage: writing into it writes the parameter); any other tensor as
    it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def sharding_of(p: torch.Tensor, name: str = "?") -> Sharding | None:
    """How ``p`` is split across ranks: None for a plain tensor or a replicated DTensor; for a DTensor sharded
    along one mesh dimension (FSDP2, HSDP: other dimensions replicated), that dimension's process group."""
    if not isinstance(p, DTensor):
        return None
    sharded = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
    if len(sharded) > 1 or any(not (pl.is_shard() or pl.is_replicate()) for pl in p.placements):
        raise ForgetlessError(
            f"tensor {name} is a DTensor placed as {p.placements}",
            tensor=name,
            remedy="keep rules support FSDP2's sharding along one mesh dimension "
            "(fully_shard, HSDP), not tensor parallelism or partial tensors",
        )
    return Sharding(p.device_mesh.get_group(sharded[0]), p.numel()) if sharded else None


def abs_moments(
    x: torch.Tensor, work: torch.Tensor | None = None, sharding: Sharding | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean|x|, std|x|)`` over the whole tensor as float32 scalars, with ``std`` replaced by 1 where it is 0
    (a constant ``|x|``, or a single entry): the scale :func:`importance` divides by. ``work``: a float32 tensor
    of ``x``'s shape to use as scratch (overwritten) instead of allocating one. ``sharding``: ``x`` is this rank's
    piece of a tensor split across ranks (:class:`Sharding`); the moments are the whole tensor's."""
    a = _abs(x, work)
    return _moments_of(a, a, sharding)


def _moments_of(
    a: torch.Tensor, work: torch.Tensor, sharding: Sharding | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`abs_moments` of ``a = |x|``; ``work`` (a float32 tensor of ``a``'s shape, or ``a`` itself) is
    overwritten.

    The corrected two-pass algorithm (Chan, Golub & LeVeque): ``mean = Σa / n``, ``d = a − mean``,
    ``var = (Σd² − (Σd)²/n) / (n − 1)``, with torch's float32 cascade sums; about 10× faster than
    ``torch.std_mean`` on CPU and as accurate. A constant ``a`` (its min equals its max) gets its value as the mean
    and a std of exactly 0, free of the rounding residue a float32 mean would leave. No host synchronisation.

    ``sharding``: ``a`` is this rank's piece of a tensor split across ranks; the sums, min and max are all-reduced,
    so every rank gets the whole tensor's moments — the single-process ones up to the order of the float32
    additions (about 1e-7 relative).
    """
    n = a.numel() if sharding is None else sharding.numel
    return _moments_many(lambda _i: (a, work), [n], None if sharding is None else sharding.group)[0]


def _moments_many(
    load: Callable[[int], tuple[torch.Tensor, torch.Tensor]], numels: list[int], group: Any
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_moments_of` of ``k = len(numels)`` tensors at once: ``load(i)`` gives ``|x_i|`` (or this rank's piece
    of it, ``numels[i]`` entries whole) and a scratch tensor of its shape, and is called twice per tensor, once per
    pass, so that both may live in reused scratch. With ``group`` (the ranks holding the pieces) each pass ends in
    all-reduces of all ``k`` tensors' sums together: three per call, whatever ``k``."""
    first = []  # per tensor [Σa, max a, −min a]; an empty piece gives the neutral elements
    for i in range(len(numels)):
        a = load(i)[0]
        if a.numel():
            lo, hi = torch.aminmax(a)
            first.append(torch.stack([a.sum(), hi, -lo]))
        else:
            first.append(torch.tensor([0.0, -torch.inf, -torch.inf], device=a.device))
    sums, extremes = (torch.stack(first)[:, cols].contiguous() for cols in (0, slice(1, 3)))
    if group is not None:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    second = []  # per tensor [Σd, Σd²], d = a − mean
    for i, n in enumerate(numels):
        a, work = load(i)
        d = torch.sub(a, sums[i] / max(n, 1), out=work)
        second.append(torch.stack([d.sum(), d.square_().sum()]))
    dev = sums.device
    deviations = torch.stack(second) if second else torch.zeros((0, 2), device=dev)
    if group is not None:
        dist.all_reduce(deviations, group=group)
    out = []
    for i, n in enumerate(numels):
        if n == 0:
            out.append((torch.zeros((), device=dev), torch.ones((), device=dev)))
            continue
        mean, hi, lo = sums[i] / n, extremes[i, 0], -extremes[i, 1]
        s1, s2 = deviations[i]
        var = s2.sub(s1 * s1 / n).clamp_min_(0).div_(n - 1) if n > 1 else torch.zeros((), device=dev)
        constant = hi == lo
        mean = torch.where(constant, hi, mean)
        out.append((mean, torch.where(constant | (var == 0), torch.ones_like(var), var.sqrt_())))
    return out


def importance(
    x: torch.Tensor,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """``R(x) = sigmoid((|x| − mean|x|) / std|x|)`` over the whole tensor (unbiased std), in float32.

    Degenerate tensors: all entries zero → all 0 (as the published code); ``|x|`` constant and nonzero (std = 0,
    or a single entry) → all 0.5, the sigmoid of a zero z-score. ``moments``: ``abs_moments(x)`` when the caller
    keeps them (SPIDER does for ``θ₀``, whose moments never change); ``out`` (``R`` is written there) and ``work``
    (scratch): float32 tensors of ``x``'s shape, to reuse memory instead of allocating it. No host
    synchronisation.
    """
    a = _abs(x, out)
    if moments is None:
        moments = _moments_of(a, torch.empty_like(a) if work is None else work)
    return _importance_(a, moments)


def _importance_(a: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """:func:`importance` in place on ``a = |x|`` (float32), given the moments of the whole tensor."""
    mean, scale = moments
    a = a.sub_(mean).div_(scale).sigmoid_()  # std = 0: every entry equals the mean: z = 0, R = 0.5
    return a.mul_((mean > 0).to(a.dtype))  # all zero → 0


def spider_coefficients(i_pre: torch.Tensor, i_ft: torch.Tensor) -> torch.Tensor:
    """SPIDER's per-entry weight of the fine-tuned value: ``I_ft / (I_pre + I_ft)`` where ``I_ft > I_pre`` (else
    0), divided by the mean of its nonzero entries and capped at 1. Values in ``[0, 1]``; all zero when no entry
    has ``I_ft > I_pre``."""
    f32 = torch.float32
    return _coefficients_(
        i_pre.to(f32, copy=True), i_ft.to(f32, copy=True), torch.empty_like(i_ft, dtype=f32)
    )[0]


def _coefficients_(
    i_pre: torch.Tensor, i_ft: torch.Tensor, grow: torch.Tensor, sharding: Sharding | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`spider_coefficients` in place: returns ``c`` (written over ``i_ft``; ``i_pre`` and ``grow``, a
    float32 tensor of the same shape, are overwritten as scratch) and the number of nonzero ``c`` in it (a float32
    scalar): where ``I_ft > I_pre`` the unnormalised ``c`` exceeds 1/2, so ``c ≠ 0`` exactly there. ``sharding``:
    the inputs are this rank's piece of a split tensor; the mean of the nonzero ``c`` is the whole tensor's (its
    sum and count all-reduced), the count returned this piece's."""
    torch.gt(i_ft, i_pre, out=grow)  # 1.0 / 0.0: float masks are faster than bool ones on CPU
    den = i_pre.add_(i_ft).clamp_min_(torch.finfo(torch.float32).tiny)  # 0 only where I_ft = I_pre = 0: c = 0
    c = i_ft.div_(den).mul_(grow)
    count = grow.sum()  # float32 cascade sum: exact to 2**24 entries, and to about 1e-7 beyond
    c_sum, n_sum = c.sum(), count
    if sharding is not None:
        c_sum, n_sum = sharding.sum_(torch.stack([c_sum, count]))
    mean = c_sum / n_sum.clamp_min(1)
    return c.div_(torch.where(n_sum > 0, mean, torch.ones_like(mean))).clamp_max_(1.0), count


def magnitude_mask(theta0: torch.Tensor, ratio: float = MASK_RATIO) -> torch.Tensor:
    """Bool mask of the ``int(numel · ratio)`` entries of largest ``|θ₀|`` (ties: lower flat index first)."""
    flat = theta0.detach().abs().flatten()
    k = int(flat.numel() * ratio)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return mask.view(theta0.shape)


# ---------------------------------------------------------------------------------------------- the rules
class _KeepRule:
    """Common part: the tensors (each once, by identity), their ``θ₀`` (held losslessly), the step protocol,
    statistics."""

    name = "?"

    def __init__(self, params: dict[str, torch.nn.Parameter] | None = None) -> None:
        self.params: dict[str, torch.nn.Parameter] = {}
        self.theta0: dict[str, torch.Tensor] = {}
        self.shards: dict[str, Sharding | None] = {}
        self._by_group: dict[Any, list[str]] = {}  # process group of the pieces (None: whole tensors) → names
        self.history: list[dict[str, float]] = []
        self._pending = False
        if params is not None:
            self.capture(params)

    # -- setup
    def capture(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Take ``θ₀`` (copies on each tensor's device, in the narrowest dtype that holds them exactly:
        :func:`lossless_copy`; of its local piece for a sharded DTensor) and
        whatever else the rule keeps. Called once, before the first optimizer step, on every rank alike; a tensor
        listed under two names is kept under the first."""
        if self.params:
            raise ForgetlessError(
                f"the {self.name} rule already holds its θ₀", remedy="make a new rule per run"
            )
        seen: set[int] = set()
        for n, p in params.items():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.is_floating_point():
                raise ForgetlessError(
                    f"{self.name}: tensor {n} is not floating point ({p.dtype})",
                    tensor=n,
                    remedy="give the rule the trainable (floating point) parameters only",
                )
            self.params[n] = p
            self.shards[n] = sharding_of(p, n)
            with torch.no_grad():
                self.theta0[n] = lossless_copy(local_part(p.detach()))
        if not self.params:
            raise ForgetlessError(
                f"the {self.name} rule got no tensor", remedy="pass the trainable parameters"
            )
        for n, sharding in self.shards.items():
            self._by_group.setdefault(None if sharding is None else sharding.group, []).append(n)
        self._setup()

    def _setup(self) -> None:
        """Per-rule state beyond θ₀."""

    @property
    def numel(self) -> int:
        """Entries of the whole tensors (all ranks' pieces together)."""
        return sum(p.numel() for p in self.params.values())

    def extra_bytes(self) -> int:
        """Bytes the rule keeps beside the model (θ₀; G and the scratch, or the mask), all devices together: on
        this rank only, which for sharded tensors is its pieces' share."""
        return sum(t.numel() * t.element_size() for t in self._state())

    def _state(self) -> list[torch.Tensor]:
        return list(self.theta0.values())

    # -- the step
    def accumulate(self) -> None:
        """Read the current gradients (after clipping, before ``optimizer.step()``)."""
        if not self.params:
            raise ForgetlessError(
                f"the {self.name} rule has no θ₀ yet",
                remedy="pass the parameters to the rule (or use it as a finetune hook) before the first step",
            )
        if self._pending:
            raise ForgetlessError(
                f"{self.name}: accumulate() called twice without apply()", remedy=ORDER_REMEDY
            )
        if all(p.grad is None for p in self.params.values()):
            raise ForgetlessError(
                f"{self.name}: no trainable tensor has a gradient (cleared already, or kept outside .grad as "
                "under DeepSpeed ZeRO / FSDP)",
                remedy=ORDER_REMEDY,
            )
        self._read_grads()
        self._pending = True

    def _read_grads(self) -> None:
        """Per-rule use of the gradients."""

    @torch.no_grad()
    def apply(self) -> dict[str, float]:
        """Rewrite the weights in place (after ``optimizer.step()``); returns and records this step's statistics:
        ``updated_fraction`` (entries with ``c ≠ 0``) and ``mean_c`` (over all entries)."""
        if not self._pending:
            raise ForgetlessError(
                f"{self.name}: apply() without accumulate() since the last step", remedy=ORDER_REMEDY
            )
        self._pending = False
        self._prepare()
        totals = []  # per process group: [Σ nonzero c, Σ c] in float64, all-reduced over the group's ranks
        for group, names in self._by_group.items():
            part = sum(torch.stack(self._apply_one(n, local_part(self.params[n]))) for n in names)
            if group is not None:
                dist.all_reduce(part, group=group)
            totals.append(part)
        nonzero, c_sum = (float(x) for x in sum(totals))
        total = self.numel
        stats = {"updated_fraction": nonzero / total, "mean_c": c_sum / total}
        self.history.append(stats)
        return stats

    def _prepare(self) -> None:
        """What a step computes over all tensors before rewriting them one by one."""

    def _apply_one(self, name: str, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewrite ``p`` (the parameter, or its local piece) in place; return its number of entries with ``c ≠ 0``
        and its sum of ``c``, as float64 scalars (summed over tensors in float64: past 2**24 float32 rounds)."""
        raise NotImplementedError

    # -- forgetless finetune hook protocol
    def before_step(self, info: StepInfo) -> None:
        """Hook: capture θ₀ from ``info.params`` on the first call if not given, then :meth:`accumulate`."""
        if not self.params:
            self.capture(info.params)
        self.accumulate()

    def after_step(self, info: StepInfo) -> None:
        """Hook: :meth:`apply`."""
        self.apply()

    def summary(self) -> dict[str, Any]:
        """What finetune.json records: the rule, its memory and its per-step statistics."""
        return {
            "rule": self.name,
            "extra_bytes": self.extra_bytes(),
            "tensors": len(self.params),
            "entries": self.numel,
            "updated_fraction": [h["updated_fraction"] for h in self.history],
            "mean_c": [h["mean_c"] for h in self.history],
        }


class Spider(_KeepRule):
    """SPIDER (see the module notes). Keeps ``θ₀`` (losslessly) and ``G`` (float32) on each tensor's device, the
    two moments of ``|θ₀|`` per tensor, and on each device three float32 scratch vectors the size of its largest
    trainable tensor, reused at every step (allocating the temporaries afresh costs more than the arithmetic on CPU). For a
    sharded tensor all of it is the local piece's."""

    name = "spider"
    SCRATCH = 3

    def __init__(self, params: dict[str, torch.nn.Parameter] | None = None) -> None:
        self.grad_sum: dict[str, torch.Tensor] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}
        super().__init__(params)

    def _setup(self) -> None:
        self.grad_sum = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in self.theta0.items()}
        largest: dict[torch.device, int] = {}
        for t in self.theta0.values():
            largest[t.device] = max(largest.get(t.device, 0), t.numel())
        self._scratch = {d: torch.empty((self.SCRATCH, n), device=d) for d, n in largest.items()}
        self._moments0 = self._whole_moments(self.theta0, self._by_group)
        self._g_moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _views(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three scratch vectors of tensor ``name``'s device, viewed in its (local) shape."""
        t = self.theta0[name]
        a, b, c = (w[: t.numel()].view(t.shape) for w in self._scratch[t.device])
        return a, b, c

    def _whole_moments(
        self, tensors: dict[str, torch.Tensor], groups: dict[Any, list[str]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The moments of ``|tensors[n]|`` over each whole tensor, for the names in ``groups``: per process group
        at once (three all-reduces per group, whatever the number of tensors), computed in the scratch."""
        out = {}
        for group, names in groups.items():

            def load(i: int, names: list[str] = names) -> tuple[torch.Tensor, torch.Tensor]:
                a, _, work = self._views(names[i])
                return _abs(tensors[names[i]], a), work

            out.update(
                zip(names, _moments_many(load, [self.params[n].numel() for n in names], group), strict=True)
            )
        return out

    def _prepare(self) -> None:
        """The moments of ``|G|`` of the sharded tensors, all at once (those of a whole tensor are computed where
        its ``c`` is, from the ``|G|`` already in the scratch)."""
        self._g_moments = self._whole_moments(
            self.grad_sum, {g: ns for g, ns in self._by_group.items() if g is not None}
        )

    def _state(self) -> list[torch.Tensor]:
        return [*self.theta0.values(), *self.grad_sum.values(), *self._scratch.values()]

    def _read_grads(self) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                self.grad_sum[n].add_(local_part(p.grad))

    def coefficients(self, name: str) -> torch.Tensor:
        """``c`` of tensor ``name`` from the current ``θ₀`` and ``G`` (the last step's ``c`` after ``apply()``); of
        the local piece for a sharded tensor (collectives: call it on every rank)."""
        sharding = self.shards[name]
        if sharding is not None:
            self._g_moments.update(self._whole_moments(self.grad_sum, {sharding.group: [name]}))
        return self._coefficients(name)[0].clone()

    def _coefficients(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``c`` (a view of this device's scratch, valid until the next call) and its number of nonzero entries."""
        theta0, sharding = self.theta0[name], self.shards[name]
        a, b, grow = self._views(name)
        i_pre = importance(theta0, self._moments0[name], out=a)
        g = _abs(self.grad_sum[name], b)
        i_ft = _importance_(g, _moments_of(g, grow) if sharding is None else self._g_moments[name])
        return _coefficients_(i_pre, i_ft, grow, sharding)

    def _apply_one(self, name: str, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, nonzero = self._coefficients(name)
        theta0 = self.theta0[name]
        if theta0.dtype != torch.float32:  # θ₀ in float32, in the scratch vector c no longer needs
            theta0 = self._views(name)[0].copy_(theta0)
        if p.dtype == torch.float32:
            torch.lerp(theta0, p, c, out=p)  # elementwise, so the full overlap of out and end is safe
        else:
            p.copy_(torch.lerp(theta0, p.float(), c))
        return nonzero.double(), c.sum().double()


class MagnitudeMask(_KeepRule):
    """MagnitudeMask (see the module notes). Keeps ``θ₀`` (losslessly) and a bool mask of the reset entries. For a
    sharded tensor both are the local piece's; the mask is still the whole tensor's top half (ties to the lower flat
    index): at capture every rank gathers the whole tensor once, ranks its entries and keeps its piece of the mask
    (a transient copy of one tensor at a time, as in one process)."""

    name = "magnitude_mask"

    def __init__(
        self, params: dict[str, torch.nn.Parameter] | None = None, ratio: float = MASK_RATIO
    ) -> None:
        self.ratio = ratio
        self.mask: dict[str, torch.Tensor] = {}
        self._free: dict[str, torch.Tensor] = {}
        super().__init__(params)

    def _setup(self) -> None:
        for n, t in self.theta0.items():
            if self.shards[n] is None:
                self.mask[n] = magnitude_mask(t, self.ratio)
            else:  # the whole tensor's mask, cut as the parameter is (src_data_rank=None: no broadcast)
                p = self.params[n]
                whole = magnitude_mask(p.detach().full_tensor(), self.ratio)
                self.mask[n] = distribute_tensor(
                    whole, p.device_mesh, p.placements, src_data_rank=None
                ).to_local()
                del whole
            m = self.mask[n]
            self._free[n] = torch.tensor(m.numel() - int(m.sum()), dtype=torch.float64, device=m.device)

    def _state(self) -> list[torch.Tensor]:
        return [*self.theta0.values(), *self.mask.values()]

    def _apply_one(self, name: str, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask, theta0 = self.mask[name], self.theta0[name].float()  # no copy when θ₀ is held in float32
        if p.dtype == torch.float32:
            torch.where(mask, theta0, p, out=p)
        else:
            p.copy_(torch.where(mask, theta0, p.float()))
        return self._free[name], self._free[name]  # c = 1 on the free entries, 0 on the reset ones


def make_rule(keep: str, params: dict[str, torch.nn.Parameter] | None = None) -> _KeepRule | None:
    """The rule called ``keep`` (``"none"`` → None) over ``params``."""
    if keep not in KEEP_RULES:
        raise ForgetlessError(f"unknown keep rule {keep!r}", remedy=f"use one of {', '.join(KEEP_RULES)}")
    if keep == "none":
        return None
    return Spider(params) if keep == "spider" else MagnitudeMask(params)


# ---------------------------------------------------------------------------------------------- transformers
def _all_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every entry of ``grads`` is finite; with sharded (DTensor) gradients, on all ranks' pieces (an
    all-reduce, so that every rank takes the same decision)."""
    flag = torch.stack([torch.isfinite(local_part(g)).all() for g in grads]).all().float()
    if any(isinstance(g, DTensor) for g in grads):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def trainer_params(args: Any, state: Any, model: Any, who: str, kept: str) -> dict[str, torch.nn.Parameter]:
    """The parameters with ``requires_grad`` a Trainer callback (``who``) works on, refusing what it cannot: DeepSpeed
    and FSDP1 (gradients outside the parameters' ``.grad``), resuming (``kept``: its state, not in the checkpoint)."""
    if getattr(args, "deepspeed", None):
        raise ForgetlessError(
            f"{who} cannot reach the gradients under DeepSpeed (they are sharded outside .grad)",
            remedy="train without DeepSpeed, or with FSDP2",
        )
    if state.global_step > 0:
        raise ForgetlessError(
            f"{who} cannot resume: {kept} not in the checkpoint", remedy="start the fine-tune from step 0"
        )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if getattr(args, "fsdp", None) and not all(isinstance(p, DTensor) for p in params.values()):
        raise ForgetlessError(
            f"{who} under FSDP needs FSDP2's parameters (DTensors); these are plain tensors: FSDP1 "
            "(flat parameters, gradients outside .grad), or FSDP not in effect (accelerate applies it on "
            "GPUs only)",
            remedy='use FSDP2: fsdp_config={"version": 2} (accelerate: fsdp_version: 2)',
        )
    return params


def _callback_class() -> type:
    """Build :class:`SpiderCallback` on first use, so that this module imports without transformers."""
    from transformers import TrainerCallback

    class SpiderCallback(TrainerCallback):
        """SPIDER or MagnitudeMask inside a transformers ``Trainer``.

        ``on_train_begin`` captures ``θ₀`` over the model's parameters with ``requires_grad``;
        ``on_pre_optimizer_step`` (after clipping, before ``optimizer.step()``) accumulates the gradients;
        ``on_optimizer_step`` (after the step, before ``zero_grad``) rewrites the weights. With ``fp16`` loss
        scaling a step whose gradients are not finite is skipped by the optimizer, and by the rule too (on every
        rank alike). The rule (``.rule``, with its ``history``) is kept for inspection.

        Several processes: under DDP every rank keeps the whole rule and reads the same all-reduced gradients;
        under FSDP2 (``fsdp_config={"version": 2}``; accelerate's ``fsdp_version: 2``) the parameters are DTensors
        and every rank keeps the rule for its own pieces, the whole-tensor moments all-reduced. Refused: DeepSpeed
        and FSDP1 (gradients and parameters outside the tensors the rule sees), resuming.
        """

        def __init__(self, rule: str = "spider") -> None:
            if rule not in KEEP_RULES[1:]:
                raise ForgetlessError(f"unknown rule {rule!r}", remedy="use 'spider' or 'magnitude_mask'")
            self.rule_name = rule
            self.rule: _KeepRule | None = None
            self._skip = False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.rule = make_rule(
                self.rule_name, trainer_params(args, state, model, "SpiderCallback", "θ₀ and G are")
            )

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if args.fp16:
                grads = [p.grad for p in self.rule.params.values() if p.grad is not None]
                self._skip = bool(grads) and not _all_finite(grads)
                if self._skip:
                    return
            self.rule.accumulate()

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self._skip:
                self._skip = False
                return
            self.rule.apply()

    return SpiderCallback


__getattr__ = built_on_first_use(globals(), "SpiderCallback", _callback_class)
