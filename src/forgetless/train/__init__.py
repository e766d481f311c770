"""Fine-tuning: the training loop (:mod:`.loop`, ``forgetless finetune``) and the keep rules that run inside it
after every optimizer step (:mod:`.spider`: SPIDER and its MagnitudeMask baseline, also usable from a plain
PyTorch loop and as a transformers ``TrainerCallback``)."""

from typing import Any

from .config import FinetuneConfig, LoraSpec
from .hooks import StepHook, StepInfo
from .loop import FinetuneReport, answer_losses, finetune, lr_at
from .spider import (
    KEEP_RULES,
    MagnitudeMask,
    Spider,
    abs_moments,
    importance,
    magnitude_mask,
    make_rule,
    spider_coefficients,
)

__all__ = [
    "KEEP_RULES",
    "FinetuneConfig",
    "FinetuneReport",
    "LoraSpec",
    "MagnitudeMask",
    "PenaltyCallback",
    "Spider",
    "SpiderCallback",
    "StepHook",
    "StepInfo",
    "abs_moments",
    "answer_losses",
    "finetune",
    "importance",
    "lr_at",
    "magnitude_mask",
    "make_rule",
    "spider_coefficients",
]


def __getattr__(name: str) -> Any:
    if (
        name == "SpiderCallback"
    ):  # built on first use, so that importing forgetless.train needs no transformers
        from . import spider

        return spider.SpiderCallback
    if name == "PenaltyCallback":  # as SpiderCallback
        from . import penalty

        return penalty.PenaltyCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
