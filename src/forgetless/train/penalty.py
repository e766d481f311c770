"""Keep rules that are a penalty in the loss: EWC and L2-SP.

    R(θ) = λ/2 · Σ F ⊙ (θ − θ₀)²        EWC (Kirkpatrick et al. 2017): F the general Fisher at θ₀
                                        L2-SP (Li et al. 2018): F = 1

θ₀ is captured before the first step. The penalty's gradient λ F ⊙ (θ − θ₀) joins each step's gradient of the
mean sample loss before clipping, as if R were in the loss; the reported loss stays the data's, and R is recorded
per step.

**LoRA**: θ − θ₀ of a targeted Linear is its folded update ΔW = s·B·A (s = alpha / r, PEFT's scaling), so
R = λ/2 Σ F_W ⊙ (s B A)², F_W the Fisher of the base weight W; its gradients are the closed forms
s·Bᵀ(λ F_W ⊙ ΔW) for A and s·(λ F_W ⊙ ΔW)·Aᵀ for B, one module's ΔW at a time. θ₀ is the base model, also when
the adapter is continued (its own update is penalised whole).

**FSDP2**: the trainable tensors are DTensors; θ₀ and F are held as this rank's pieces (F cut as the parameter is
placed), each gradient is added to the local piece, and R is the all-reduced sum of the pieces'. A LoRA module
gathers its A whole (r × in), computes the rows of ΔW its piece of B gives, and all-reduces Bᵀ(λ F ⊙ ΔW) before
keeping A's piece of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ForgetlessError, require_all
from .hooks import built_on_first_use
from .spider import DTensor, local_part, lossless_copy, sharding_of, trainer_params

PENALTIES = ("ewc", "l2sp")


@dataclass(frozen=True)
class LoraPair:
    """A LoRA module the penalty covers: ``weight`` its base weight's checkpoint name (F's key), ``a`` and ``b``
    the keys of lora_A (r × in) and lora_B (out × r) among the trained tensors, ``scaling`` PEFT's s."""

    weight: str
    a: str
    b: str
    scaling: float


def lora_pairs(
    model: nn.Module, params: Mapping[str, nn.Parameter], weight_name: Callable[[str], str]
) -> list[LoraPair]:
    """Every PEFT LoRA module of ``model`` whose A and B are among ``params`` (matched by identity: after FSDP2's
    sharding, the DTensors); ``weight_name``: a LoRA module's name → its base weight's checkpoint name."""
    from peft.tuners.lora import LoraLayer

    keys = {id(p): k for k, p in params.items()}
    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        for adapter, a in mod.lora_A.items():
            a, b = a.weight, mod.lora_B[adapter].weight
            if id(a) in keys and id(b) in keys:
                pairs.append(
                    LoraPair(weight_name(name), keys[id(a)], keys[id(b)], float(mod.scaling[adapter]))
                )
    return pairs


def _piece(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (a whole tensor of ``like``'s shape) as ``like`` holds it: this rank's piece of a DTensor (cut
    locally, no broadcast), else ``t`` on its device."""
    if not isinstance(like, DTensor):
        return t.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    whole = t.to(local_part(like).device)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _add_grad(p: nn.Parameter, g: torch.Tensor) -> None:
    """Add ``g`` (``p``'s local shape) to ``p``'s gradient: its local piece for a DTensor."""
    g = g.to(p.dtype)
    if p.grad is None and not isinstance(p, DTensor):
        p.grad = g
        return
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    local_part(p.grad).add_(g)


class Penalty:
    """λ/2 Σ F (θ − θ₀)² over ``params`` (name → trainable tensor, or a DTensor of FSDP2); ``fisher``: name → F,
    None for L2-SP. ``lora``: the LoRA modules among ``params``, penalised on their folded update (F keyed by
    their base weights' names); the other tensors are penalised themselves."""

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        strength: float,
        fisher: Mapping[str, torch.Tensor] | None,
        lora: Iterable[LoraPair] = (),
    ) -> None:
        self.params, self.strength, self.lora = dict(params), float(strength), list(lora)
        adapters = {k for pair in self.lora for k in (pair.a, pair.b)}
        self.full = [k for k in self.params if k not in adapters]
        self.groups = {k: _group(p, k) for k, p in self.params.items()}
        self.theta0 = {k: lossless_copy(local_part(self.params[k].detach())) for k in self.full}
        self.fisher = None
        if fisher is not None:  # as the pieces: F of a LoRA module cut as its B's rows
            self.fisher = {k: _piece(fisher[k], self.params[k]) for k in self.full}
            self.fisher.update(
                {pair.weight: _piece(fisher[pair.weight], self.params[pair.b]) for pair in self.lora}
            )
        self.history: list[float] = []

    def extra_bytes(self) -> int:
        """θ₀ and F, on this rank (its pieces under FSDP2)."""
        held = [*self.theta0.values(), *(self.fisher or {}).values()]
        return sum(t.numel() * t.element_size() for t in held)

    @torch.no_grad()
    def add_gradients(self) -> float:
        """Add λ F (θ − θ₀) to every tensor's gradient (the closed forms for LoRA); returns R(θ), the whole
        tensors' on every rank (the pieces' sums all-reduced: a collective under FSDP2)."""
        parts: dict[Any, torch.Tensor] = {}  # process group of the pieces (None: whole tensors) → Σ
        for k in self.full:
            parts[self.groups[k]] = parts.get(self.groups[k], 0.0) + self._full_one(k).double()
        for pair in self.lora:
            parts[self.groups[pair.b]] = parts.get(self.groups[pair.b], 0.0) + self._lora_one(pair).double()
        for group, part in parts.items():
            if group is not None:
                dist.all_reduce(part, group=group)
        value = 0.5 * self.strength * sum(float(t) for t in parts.values())
        self.history.append(value)
        return value

    def _weighted(self, key: str, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ F ⊙ d, Σ F ⊙ d²) of a difference ``d`` from θ₀."""
        w = d if self.fisher is None else self.fisher[key] * d
        return w.mul(self.strength), (d * w).sum()

    def _full_one(self, k: str) -> torch.Tensor:
        p = self.params[k]
        grad, part = self._weighted(k, local_part(p.detach()).float() - self.theta0[k].float())
        _add_grad(p, grad)
        return part

    def _lora_one(self, pair: LoraPair) -> torch.Tensor:
        """ΔW = s B A (this rank's rows of it), and the closed-form gradients of A and B."""
        a, b, s = self.params[pair.a], self.params[pair.b], pair.scaling
        a_whole = (a.full_tensor() if isinstance(a, DTensor) else a).detach().float()
        b_rows = local_part(b.detach()).float()
        grad, part = self._weighted(pair.weight, (b_rows @ a_whole).mul_(s))
        grad_a = (b_rows.T @ grad).mul_(s)  # a sum over ΔW's rows: over the ranks' pieces when B is sharded
        if self.groups[pair.b] is not None:
            dist.all_reduce(grad_a, group=self.groups[pair.b])
        _add_grad(b, (grad @ a_whole.T).mul_(s))
        _add_grad(a, _piece(grad_a, a))
        return part

    def summary(self, rule: str) -> dict[str, Any]:
        return {
            "rule": rule,
            "strength": self.strength,
            "extra_bytes": self.extra_bytes(),
            "lora_modules": len(self.lora),
            "penalty": self.history,
        }


def _group(p: torch.Tensor, name: str) -> Any:
    """The process group of ``p``'s pieces (FSDP2), None for a whole tensor."""
    sharding = sharding_of(p, name)
    return None if sharding is None else sharding.group


def read_fisher(
    source: str | Path | Mapping[str, torch.Tensor],
    names: list[str],
    shapes: Mapping[str, torch.Size],
    base: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """The Fisher of every tensor of ``names`` from a `forgetless stats fisher` file (or a dict: name → F), float32.
    Refused before any work: a file recorded as taken on another model or at other weights than θ₀ (``base``: the
    model's ``fingerprint`` and ``weights_fingerprint``; None: not checked), and a missing, misshapen, negative or
    non-finite entry."""
    from ..stats.store import Statistics

    if isinstance(source, Mapping):
        path = None
        out = _covered(source, names, path)
    else:
        path = Path(source)
        if not path.is_file():
            raise ForgetlessError(
                "Fisher file not found", file=path, remedy="compute it with `forgetless stats fisher`"
            )
        with Statistics(path, strict=False) as stats:
            if base is not None:
                _check_taken_at(stats.meta, base, path)
            out = _covered(stats, names, path)
    for n, f in out.items():
        if f.shape != shapes[n] or not torch.isfinite(f).all() or bool((f < 0).any()):
            raise ForgetlessError(
                f"the Fisher of {n} is not a finite, non-negative tensor of shape {list(shapes[n])}",
                file=path,
                tensor=n,
                remedy="recompute it with `forgetless stats fisher` on this model",
            )
    return out


def _covered(stats: Any, names: list[str], path: Path | None) -> dict[str, torch.Tensor]:
    """F of every name, float32; the first name without one refused."""
    require_all(
        names,
        stats,
        "Fisher",
        "trained tensor(s)",
        file=path,
        remedy="compute the Fisher over the --train scope, with LoRA over its targets' weights "
        "(forgetless stats fisher --scope …)",
    )
    return {n: (stats[n] if isinstance(stats, Mapping) else stats.get(n)).float() for n in names}


def fisher_names(model_dir: Path, names: list[str], selected: set[str], layout: Any, lora: Any) -> list[str]:
    """The tensors whose Fisher a run reads: the trained ones; with LoRA the targeted Linear layers' weights (found
    on the model built on the meta device: no weight read)."""
    if lora is None:
        return sorted(selected)
    from ..stats.footprint import meta_model
    from .targets import lora_modules, stored_names

    model = meta_model(model_dir, "float32")
    stored = stored_names(model, set(names))
    return sorted(lora_modules(model, stored, selected, lora, layout, names, model_dir).values())


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


# ---------------------------------------------------------------------------------------------- transformers
def _checkpoint_name(model: nn.Module) -> Callable[[str], str]:
    """An in-memory parameter name → the name the Fisher file keys it by: PEFT's ``base_model.model.`` dropped,
    the name ``save_pretrained`` writes (:func:`stats.fisher.checkpoint_names`: LLaVA's ``model.language_model.``
    is ``language_model.model.`` on disk), then PEFT's ``.base_layer`` dropped."""
    from ..stats.fisher import checkpoint_names

    saved = checkpoint_names(model.get_base_model() if hasattr(model, "get_base_model") else model)

    def name(n: str) -> str:
        n = n.removeprefix("base_model.model.")
        return saved.get(n, n).replace(".base_layer.", ".")

    return name


def _callback_class() -> type:
    """Build :class:`PenaltyCallback` on first use, so that this module imports without transformers."""
    from transformers import TrainerCallback

    class PenaltyCallback(TrainerCallback):
        """EWC or L2-SP inside a transformers ``Trainer``: λ/2 Σ F (θ − θ₀)² over the model's parameters with
        ``requires_grad``, θ₀ captured at ``on_train_begin``; a PEFT LoRA model's adapters on their folded update
        s·B·A (F of the base weight). ``fisher`` (EWC): a `forgetless stats fisher` file or a dict, keyed by the
        checkpoint's tensor names (PEFT's wrapper names stripped).

        Where the gradient goes: the Trainer clips before ``on_pre_optimizer_step``, so the callback adds
        λ F ⊙ (θ − θ₀) at ``on_step_begin`` instead — after the previous step's ``zero_grad``, before the step's
        first backward, at the weights the step's optimizer update starts from. The backward passes accumulate onto
        it (DDP averages, FSDP2 adds its reduce-scattered gradients to the sharded ``.grad``; every rank adds the
        same penalty gradient), so it is clipped with the data's gradient, as if R were in the loss. The penalty per
        step is in ``.penalty.history``. Refused: DeepSpeed and FSDP1 (gradients outside ``.grad``), ``fp16`` (loss
        scaling would unscale the added gradient; use ``bf16``), resuming (θ₀ is not in the checkpoint).
        """

        def __init__(
            self,
            rule: str = "ewc",
            strength: float = 1.0,
            fisher: str | Path | Mapping[str, torch.Tensor] | None = None,
        ) -> None:
            if rule not in PENALTIES:
                raise ForgetlessError(f"unknown penalty {rule!r}", remedy="use 'ewc' or 'l2sp'")
            bad = check_strength(strength)
            if bad is not None:
                raise ForgetlessError(bad, remedy="pass strength=λ (e.g. 1e3 for EWC, 1e-2 for L2-SP)")
            if (fisher is None) != (rule == "l2sp"):
                raise ForgetlessError(
                    "EWC needs the general Fisher at θ₀; L2-SP takes none",
                    remedy="pass fisher=FILE (forgetless stats fisher) with 'ewc', none with 'l2sp'",
                )
            self.rule_name, self.strength, self.fisher = rule, float(strength), fisher
            self.penalty: Penalty | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if getattr(args, "fp16", False):
                raise ForgetlessError(
                    "PenaltyCallback's gradient would be unscaled by fp16's loss scaler",
                    remedy="train with bf16=True, or in float32",
                )
            found = trainer_params(args, state, model, "PenaltyCallback", "θ₀ is")
            name = _checkpoint_name(model)
            pairs = lora_pairs(model, found, lambda m: name(f"{m}.base_layer.weight"))
            adapters = {k for pair in pairs for k in (pair.a, pair.b)}
            params = {k if k in adapters else name(k): p for k, p in found.items()}
            fisher = None
            if self.fisher is not None:
                keys = [k for k in params if k not in adapters] + [pair.weight for pair in pairs]
                shapes = {k: params[k].shape for k in params if k not in adapters}
                shapes.update({pair.weight: _folded_shape(params, pair) for pair in pairs})
                fisher = read_fisher(self.fisher, keys, shapes)
            self.penalty = Penalty(params, self.strength, fisher, pairs)

        def on_step_begin(self, args, state, control, **kwargs):
            self.penalty.add_gradients()

    return PenaltyCallback


def _folded_shape(params: Mapping[str, torch.Tensor], pair: LoraPair) -> torch.Size:
    return torch.Size([params[pair.b].shape[0], params[pair.a].shape[1]])


__getattr__ = built_on_first_use(globals(), "PenaltyCallback", _callback_class)
