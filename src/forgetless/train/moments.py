"""The optimizer's accumulated squared gradients as a task Fisher that costs nothing: a fine-tuning hook.

AdamW keeps, per weight, v_t = β₂·v_{t−1} + (1 − β₂)·g_t², an exponential average of the squared (clipped)
mini-batch gradients g_t it saw. Bias-corrected, v̂ = v_T / (1 − β₂^T) is a weighted mean of g_t² over the whole
run — over the path from θ₀ to θ_ft, not at one end of it — with weights β₂^(T−t) (at β₂ = 0.999 and 120 steps,
the first step weighs 0.89 of the last). Where the empirical Fisher at θ_ft vanishes (a fine-tune that fits its
task has small gradients) and the one at θ₀ is dominated by the task the base cannot do yet, this one is the
curvature the task loss had on the way.

Scale: g_t is the mean gradient of B = batch_size × grad_accum samples, so E[g_t²] = F/B + (B − 1)/B·(E g)²
(F the per-sample empirical Fisher). :meth:`OptimizerFisher.save` stores B·v̂, which estimates F where the
per-sample gradients' mean is small against their spread, and over-weights the consistent directions otherwise.
Only ratios between a weight's task Fisher and its general Fisher matter to CGM and Fisher merging, and their
α / base weight sets the overall scale, so a constant factor is absorbed by the knob.

Use: ``finetune(..., hook=OptimizerFisher())`` then ``hook.save(path, out)``; ``forgetless finetune
--optimizer-fisher PATH``. A full fine-tune only (a LoRA adapter's moments are not the weights'), on one process
or under DDP (every rank holds the whole optimizer state; rank 0's is saved), not under FSDP (sharded state).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ForgetlessError
from .hooks import StepInfo


class OptimizerFisher:
    """A :class:`.hooks.StepHook` that keeps AdamW's bias-corrected second moments at the last step."""

    def __init__(self) -> None:
        self.moments: dict[str, torch.Tensor] | None = None

    def after_step(self, info: StepInfo) -> None:
        if info.step == 1:
            if hasattr(info.model, "peft_config"):
                raise ForgetlessError(
                    "the optimizer's squared gradients are those of the LoRA factors, not of the weights",
                    remedy="drop --optimizer-fisher for a LoRA run, or fine-tune the weights themselves",
                )
            if any(type(p).__name__ == "DTensor" for p in info.params.values()):
                raise ForgetlessError(
                    "under FSDP the optimizer state is sharded across ranks",
                    remedy="run without FSDP (DDP or one process), or compute the Fisher with "
                    "`forgetless stats fisher`",
                )
        if info.step != info.steps:
            return
        beta2 = {id(p): group["betas"][1] for group in info.optimizer.param_groups for p in group["params"]}
        moments = {}
        for name, p in info.params.items():
            state = info.optimizer.state.get(p)
            if not state or "exp_avg_sq" not in state:
                continue  # never got a gradient: no curvature was seen
            t = float(state["step"])
            moments[name] = state["exp_avg_sq"].detach().to("cpu", torch.float32, copy=True) / (
                1 - beta2[id(p)] ** t
            )
        self.moments = moments

    def save(self, path: str | os.PathLike, finetuned: str | os.PathLike) -> Path:
        """Write B·v̂ (module docstring) as a Fisher statistics file for the fine-tuned model folder `finetuned`
        (its ``finetune.json`` gives B, the steps and the training data's fingerprint)."""
        from ..stats.store import model_fingerprints, save_statistics

        if self.moments is None:
            raise ForgetlessError(
                "no optimizer state was kept: the fine-tune did not reach its last step",
                file=path,
                remedy="pass the hook to finetune(...) and let it finish",
            )
        meta = json.loads((Path(finetuned) / "finetune.json").read_text())
        recipe = meta["recipe"]
        per_step = recipe["batch_size"] * recipe["grad_accum"]
        return save_statistics(
            path,
            {n: v * per_step for n, v in self.moments.items()},
            kind="fisher",
            num_samples=per_step * recipe["steps"],
            data_fingerprint=meta["data_fingerprint"],
            **model_fingerprints(finetuned),
            extra={
                "variant": "optimizer",
                "betas": recipe["optimizer"]["betas"],
                "steps": recipe["steps"],
                "samples_per_step": per_step,
            },
        )
