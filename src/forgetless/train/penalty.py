"""Keep rules that are a penalty in the loss: EWC and L2-SP.

    R(θ) = λ/2 · Σ F ⊙ (θ − θ₀)²        EWC (Kirkpatrick et al. 2017): F the general Fisher at θ₀
                                        L2-SP (Li et al. 2018): F = 1

θ₀ is captured before the first step. The penalty's gradient λ F ⊙ (θ − θ₀) joins each step's gradient of the
mean sample loss before clipping, as if R were in the loss; the reported loss stays the data's, and R is recorded
per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ForgetlessError
from .spider import lossless_copy

PENALTIES = ("ewc", "l2sp")


class Penalty:
    """λ/2 Σ F (θ − θ₀)² over ``params`` (name → trainable tensor); ``fisher``: name → F, None for L2-SP."""

    def __init__(
        self, params: Mapping[str, nn.Parameter], strength: float, fisher: Mapping[str, torch.Tensor] | None
    ) -> None:
        self.params, self.strength = dict(params), float(strength)
        self.theta0 = {k: lossless_copy(p.detach()) for k, p in self.params.items()}
        self.fisher = None if fisher is None else {k: fisher[k].to(p.device) for k, p in self.params.items()}
        self.history: list[float] = []

    def add_gradients(self) -> float:
        """Add λ F (θ − θ₀) to every tensor's gradient; returns R(θ)."""
        total = 0.0
        for k, p in self.params.items():
            d = p.detach().float() - self.theta0[k].float()
            w = d if self.fisher is None else self.fisher[k] * d
            grad = w.mul(self.strength).to(p.dtype)
            p.grad = grad if p.grad is None else p.grad.add_(grad)
            total += float((d * w).sum())
        value = 0.5 * self.strength * total
        self.history.append(value)
        return value

    def summary(self, rule: str) -> dict[str, Any]:
        return {"rule": rule, "strength": self.strength, "penalty": self.history}


def read_fisher(
    path: str | Path, names: list[str], shapes: Mapping[str, torch.Size], base: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """The Fisher of every trainable tensor from a `forgetless stats fisher` file, float32. Refused before any
    work: a file recorded as taken on another model or at other weights than θ₀ (``base``: the model's
    ``fingerprint`` and ``weights_fingerprint``), and a missing, misshapen, negative or non-finite entry."""
    from ..stats.store import Statistics

    path = Path(path)
    if not path.is_file():
        raise ForgetlessError(
            "Fisher file not found", file=path, remedy="compute it with `forgetless stats fisher`"
        )
    with Statistics(path, strict=False) as stats:
        _check_taken_at(stats.meta, base, path)
        missing = [n for n in names if n not in stats]
        if missing:
            raise ForgetlessError(
                f"no Fisher for {len(missing)} trained tensor(s), e.g. {missing[0]}",
                file=path,
                remedy="compute the Fisher over the --train scope (forgetless stats fisher --scope …)",
            )
        out = {n: stats.get(n).float() for n in names}
    for n, f in out.items():
        if f.shape != shapes[n] or not torch.isfinite(f).all() or bool((f < 0).any()):
            raise ForgetlessError(
                f"the Fisher of {n} is not a finite, non-negative tensor of shape {list(shapes[n])}",
                file=path,
                tensor=n,
                remedy="recompute it with `forgetless stats fisher` on this model",
            )
    return out


def _check_taken_at(meta: Mapping[str, Any], base: Mapping[str, str], path: Path) -> None:
    for key, what in (
        ("model_fingerprint", "another model"),
        ("model_weights_fingerprint", "other weights than θ₀"),
    ):
        recorded, own = meta.get(key), base[key.removeprefix("model_")]
        if recorded is not None and recorded != own:
            raise ForgetlessError(
                f"the Fisher was computed on {what} ({key} {recorded}, this model's is {own})",
                file=path,
                remedy="compute it on the model being fine-tuned: forgetless stats fisher BASE --data GENERAL …",
            )


def check_strength(strength: float | None) -> str | None:
    """What is wrong with a penalty's λ, or None."""
    if strength is None or not (
        isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0
    ):
        return f"the penalty's strength must be a finite number ≥ 0, got {strength!r}"
    return None
