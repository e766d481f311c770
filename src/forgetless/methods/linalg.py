"""Where and in which precision the linear algebra of LPM, RegMean and the adapter SVDs runs.

A device is named as everywhere in forgetless: ``auto`` (the current CUDA device when there is one, else the CPU),
``cpu``, ``cuda`` or ``cuda:N``. The solves x·A = b (A symmetric positive definite) are Cholesky factorisations in
float64 on the CPU and on GPUs that do float64 at half their float32 rate; elsewhere A is factorised in float32 and
each row refined by conjugate gradients with float64 residuals. ``precision`` forces a choice. Why conjugate
gradients, and when the refinement gives up: docs/methods-notes.md, "Solves on a device".
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import Tensor

Precision = Literal["auto", "float64", "float32"]
PRECISIONS = ("auto", "float64", "float32")
FP64_CAPABILITIES = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})  # half-rate float64: P100 … B200
REFINE_TOL = 1e-8  # stop refining when the estimated relative error of the solution is below this
MAX_REFINE = 10  # refinement steps before falling back to a float64 factorisation
DEVICES = "auto, cpu, cuda or cuda:N"


def thin_svd(x: Tensor, full_matrices: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """U, S, Vᵀ of `x` (``torch.linalg.svd``). Where LAPACK's divide and conquer does not converge in float32 —
    a matrix whose singular values are float32 noise beyond its low rank, as a sum of LoRA updates is — the SVD
    is taken again in float64 and returned in `x`'s dtype; otherwise the result is torch's, unchanged."""
    try:
        return torch.linalg.svd(x, full_matrices=full_matrices)
    except torch.linalg.LinAlgError:
        if x.dtype == torch.float64:
            raise
        U, S, Vh = torch.linalg.svd(x.double(), full_matrices=full_matrices)
        return U.to(x.dtype), S.to(x.dtype), Vh.to(x.dtype)


def device_problem(device: object) -> str | None:
    """What is wrong with the form of a device name (not whether this machine has it), or None."""
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        return None
    return f"{device!r} is not a device ({DEVICES})"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device a name stands for (``cuda`` with its index). ValueError saying why for a malformed
    name or a CUDA device this machine does not have."""
    bad = device_problem(device)
    if bad is not None:
        raise ValueError(bad)
    text = str(device)
    if text == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    dev = torch.device(text)
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"{text!r}: CUDA is not available here (no GPU, or a torch built without CUDA)")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    return torch.device("cuda", index)


def fp64_capable(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability does float64 at full rate (half its float32 rate)."""
    return tuple(capability) in FP64_CAPABILITIES


def solve_dtype(device: torch.device, precision: Precision = "auto") -> torch.dtype:
    """The dtype of the factorisation: float64 on the CPU and on full-rate float64 GPUs, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return torch.float64 if precision == "float64" else torch.float32
    if device.type != "cuda":
        return torch.float64
    return torch.float64 if fp64_capable(torch.cuda.get_device_capability(device)) else torch.float32


def _factorise(m: Tensor) -> tuple[Tensor, bool]:
    """The lower Cholesky factor of `m` (written over `m` on the CPU) and whether `m` is positive definite."""
    if m.device.type == "cpu":
        factor, info = torch.linalg.cholesky_ex(m, out=(m, torch.empty((), dtype=torch.int32)))
    else:
        factor, info = torch.linalg.cholesky_ex(m)
    return factor, int(info) == 0


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """The dot product of each row of `a` with the same row of `b`, as a column [m, 1]."""
    return (a * b).sum(dim=1, keepdim=True)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den is 0 (a row that is already solved: its residual is 0)."""
    return torch.where(den != 0, num / den, torch.zeros_like(num))


class Cholesky:
    """x ↦ x·A⁻¹ for a symmetric positive definite A [n, n] and rows x [m, n], A factorised once, on a device
    and in a precision (module docstring). Used by LPM and RegMean alike.

    ``shift`` is added to A's diagonal before the factorisation (a ridge). ``overwrite=True`` lets a float64
    `a` that is already on the device become the factor (one [n, n] matrix less at peak; the caller must not
    use it afterwards). ``ok`` is False when A + shift is not numerically positive definite; :meth:`solve`
    needs it True.
    """

    def __init__(
        self,
        a: Tensor,
        *,
        shift: float = 0.0,
        device: str | torch.device = "cpu",
        precision: Precision = "auto",
        overwrite: bool = False,
    ):
        self.device = resolve_device(device)
        self.dtype = solve_dtype(self.device, precision)
        fresh = not (overwrite and a.dtype == torch.float64 and a.device == self.device)
        m = a.to(self.device, torch.float64, copy=True) if fresh else a
        m.diagonal().add_(shift)
        self.a: Tensor | None = None  # A in float64 for the refined solve's residuals; None: a float64 factor
        if self.dtype == torch.float32:
            factor, ok = _factorise(m.float())
            if ok:
                self.a, self.factor, self.ok = m, factor, True
                return
        self._float64(m)

    def _float64(self, m: Tensor) -> None:
        """Factorise `m` (float64, on the device) in float64, over itself where it can."""
        self.factor, self.ok = _factorise(m)
        self.dtype, self.a = torch.float64, None

    def solve(self, x: Tensor) -> Tensor:
        """x·A⁻¹ for x [m, n], float64 on the factor's device (x is moved there)."""
        x = x.to(self.device, torch.float64)
        if self.a is None:  # a float64 factor
            return torch.cholesky_solve(x.T, self.factor).T  # A symmetric: solve A·yᵀ = xᵀ
        y = self._refined(x, self.a)
        if y is None:  # not settled: float64 from now on
            self._float64(self.a)
            if not self.ok:
                raise ValueError("the matrix is not positive definite in float64 (its float32 rounding was)")
            return self.solve(x)
        return y

    def _solve32(self, r: Tensor) -> Tensor:
        return torch.cholesky_solve(r.T.float(), self.factor).T.double()

    def _refined(self, b: Tensor, a: Tensor) -> Tensor | None:
        """Conjugate gradients on each row of x·A = b, preconditioned by the float32 factor, every product
        with `a` (A in float64) in float64; None when :data:`MAX_REFINE` steps leave the estimated error above
        tolerance."""
        x = self._solve32(b)
        r = b - x @ a
        z = self._solve32(r)
        p, rz = z, _rowdot(r, z)
        for _ in range(MAX_REFINE):
            if float(z.norm()) <= REFINE_TOL * float(x.norm()):  # z ≈ A⁻¹r: the error left in x
                return x
            q = p @ a
            alpha = _ratio(rz, _rowdot(p, q))
            x.add_(alpha * p)
            r.sub_(alpha * q)
            z = self._solve32(r)
            rz, rz_old = _rowdot(r, z), rz
            p = z + _ratio(rz, rz_old) * p
        return x if float(z.norm()) <= REFINE_TOL * float(x.norm()) else None


__all__ = [
    "DEVICES",
    "FP64_CAPABILITIES",
    "MAX_REFINE",
    "PRECISIONS",
    "REFINE_TOL",
    "Cholesky",
    "Precision",
    "device_problem",
    "fp64_capable",
    "resolve_device",
    "solve_dtype",
]
