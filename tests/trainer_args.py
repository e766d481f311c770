"""The transformers ``TrainingArguments`` the Trainer-callback tests share: constant learning rate, AdamW without
weight decay, nothing saved, logged or shown; the step count, learning rate, batch, clipping and device vary."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def quiet_args(
    out: str | Path, *, steps: int, lr: float, batch: int, clip: float, cpu: bool = True, **extra: Any
):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        learning_rate=lr,
        per_device_train_batch_size=batch,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=clip,
        optim="adamw_torch",
        use_cpu=cpu,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        **extra,
    )
