"""What a fine-tuning loop shows its per-step hooks (:mod:`.loop` calls them, :mod:`.spider`'s rules are hooks):
a module of its own so that the loop and the rules import it, and not each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class StepInfo:
    """What a hook sees at optimizer step ``step`` (1-based).

    ``params`` maps the trainable tensors' names to the parameters themselves: checkpoint names for a full
    fine-tune, adapter tensor names (as saved in ``adapter_model.safetensors``) for LoRA. ``loss`` is the mean
    answer loss of the step's samples; ``grad_norm`` the total gradient 2-norm before clipping; ``lr`` the learning
    rate of this step. ``model`` is the module being trained (a PEFT model for LoRA).
    """

    step: int
    steps: int
    lr: float
    loss: float
    grad_norm: float
    model: nn.Module
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer

    @property
    def grads(self) -> dict[str, torch.Tensor | None]:
        """The current gradient of every trainable tensor (None where it got no gradient)."""
        return {n: p.grad for n, p in self.params.items()}


class StepHook(Protocol):
    """Both methods are optional; either receives the same :class:`StepInfo`."""

    def before_step(self, info: StepInfo) -> None: ...  # after clipping, before optimizer.step()

    def after_step(
        self, info: StepInfo
    ) -> None: ...  # after optimizer.step(), before the gradients are cleared


def built_on_first_use(
    namespace: dict[str, Any], name: str, build: Callable[[], type]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` that builds the class `name` on first use and keeps it in `namespace` (the module's
    globals): a Trainer callback subclasses transformers' ``TrainerCallback``, which need not be installed to
    import the module."""

    def getattr_(attr: str) -> Any:
        if attr != name:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {attr!r}")
        namespace[name] = build()
        return namespace[name]

    return getattr_
