"""What a fine-tune is asked to do: :class:`FinetuneConfig` (checked once, before any work; the recipe that
``finetune.json`` records is its dump) and :class:`LoraSpec`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ForgetlessError
from ..stats.data import ON_BAD_SAMPLE
from .feed import ratio_problem, replay_share
from .penalty import PENALTIES, check_strength
from .spider import KEEP_RULES

SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "bfloat16")  # bfloat16: autocast, frozen weights held in bf16
BETAS, EPS = (0.9, 0.999), 1e-8  # AdamW's


@dataclass
class LoraSpec:
    """A LoRA fine-tune through PEFT: ``W + (alpha / r) · B A`` on the chosen Linear layers.

    ``targets`` picks the modules inside the fine-tune's ``train`` scope: each entry is a module name (``q_proj``:
    every Linear whose name ends with it) or a layout selector (``language.layers[20:]``, ``lm_head``, ``re:…``).
    None: every Linear layer in scope.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] | None = None


@dataclass
class FinetuneConfig:
    """The options of a fine-tune (see :func:`forgetless.train.finetune` for each one's meaning)."""

    train: list[str] | None = None
    lora: LoraSpec | None = None
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    clip: float | None = 1.0
    seed: int = 0
    n: int | None = None
    dtype: str = "float32"
    max_length: int | None = None
    on_bad_sample: str = "error"
    keep: str = "none"
    init_adapter: str | os.PathLike | None = None
    gradient_checkpointing: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    workers: int | None = None
    fsdp: bool = False
    fisher: str | os.PathLike | None = None
    strength: float | None = None
    replay: str | os.PathLike | None = None
    replay_images: str | os.PathLike | None = None
    replay_ratio: float | None = None

    @property
    def per_step(self) -> int:
        """Samples per optimizer step."""
        return self.batch_size * self.grad_accum

    @property
    def replayed(self) -> int:
        """Replayed samples in every micro-batch (0 without replay; :meth:`check` refuses an inexact ratio)."""
        return 0 if self.replay_ratio is None else round(replay_share(self.batch_size, self.replay_ratio))

    def check(self, model_dir: Path, world: int = 1) -> None:
        """Refuse a value out of range, naming the option and its remedy (``world``: the processes sharing a batch)."""
        for ok, problem, remedy in self._checks(world):
            if not ok:
                raise ForgetlessError(problem, remedy=remedy)
        if self.init_adapter is not None and self.lora is None:
            raise ForgetlessError(
                "init_adapter continues a LoRA adapter; this run is a full fine-tune",
                file=self.init_adapter,
                remedy="pass --lora with the adapter's rank and targets, or drop --init-adapter",
            )
        if not (model_dir / "config.json").is_file():
            raise ForgetlessError(
                "not a model folder (no config.json)",
                file=model_dir,
                remedy="give the Hugging Face folder of the model to fine-tune",
            )

    def _checks(self, world: int) -> list[tuple[bool, str, str]]:
        checks = [
            (self.steps >= 1, f"steps must be ≥ 1, got {self.steps}", "pass --steps N"),
            (self.batch_size >= 1, f"batch size must be ≥ 1, got {self.batch_size}", "pass --batch-size N"),
            (
                self.batch_size % world == 0,
                f"batch size {self.batch_size} is not divisible by the {world} processes",
                f"pass a --batch-size that is a multiple of {world}: each process takes an equal share of every batch",
            ),
            (self.grad_accum >= 1, f"grad_accum must be ≥ 1, got {self.grad_accum}", "pass --grad-accum N"),
            (self.lr > 0, f"the learning rate must be positive, got {self.lr}", "pass --lr"),
            (
                0 <= self.warmup < self.steps,
                f"warmup must be in 0..steps-1, got {self.warmup} for {self.steps} steps",
                "lower --warmup",
            ),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}", f"use one of {SCHEDULES}"),
            (
                0 <= self.min_lr_ratio <= 1,
                f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}",
                "pass 0.1 or 0",
            ),
            (
                self.clip is None or self.clip > 0,
                f"clip must be positive, got {self.clip}",
                "pass --clip 1.0, or no --clip",
            ),
            (self.dtype in DTYPES, f"unknown dtype {self.dtype!r}", f"use one of {DTYPES}"),
            (
                self.on_bad_sample in ON_BAD_SAMPLE,
                f"unknown on_bad_sample {self.on_bad_sample!r}",
                f"use one of {ON_BAD_SAMPLE}",
            ),
            (
                self.keep in (*KEEP_RULES, *PENALTIES),
                f"unknown keep rule {self.keep!r}",
                f"use one of {', '.join((*KEEP_RULES, *PENALTIES))}",
            ),
            (
                self.workers is None or self.workers >= 0,
                f"workers must be ≥ 0, got {self.workers}",
                "pass --workers N (0: no workers)",
            ),
        ]
        lora = self.lora
        if lora is not None:
            checks += [
                (lora.r >= 1, f"LoRA rank must be ≥ 1, got {lora.r}", "pass --lora-r N"),
                (lora.alpha > 0, f"LoRA alpha must be positive, got {lora.alpha}", "pass --lora-alpha"),
                (0 <= lora.dropout < 1, f"LoRA dropout must be in [0, 1), got {lora.dropout}", "pass 0.05"),
                (
                    self.keep in ("none", *PENALTIES),  # EWC / L2-SP: on the folded update B A
                    f"keep={self.keep!r} applies to a full fine-tune, not to LoRA",
                    "drop --lora to fine-tune the weights themselves with --keep, or drop --keep for the LoRA run",
                ),
            ]
        return checks + self._penalty_checks() + self._replay_checks()

    def _replay_checks(self) -> list[tuple[bool, str, str]]:
        """Replay takes a data file and its ratio together, the ratio exact for the micro-batch."""
        data, ratio = self.replay is not None, self.replay_ratio is not None
        bad_ratio = ratio_problem(self.batch_size, self.replay_ratio) if ratio else None
        return [
            (data or not ratio, "--replay-ratio is the share of --replay samples", "pass --replay DATA too"),
            (
                ratio or not data,
                "--replay needs --replay-ratio R (replayed : task samples in every batch)",
                "pass e.g. --replay-ratio 1 (half of every batch replayed)",
            ),
            (
                data or self.replay_images is None,
                "--replay-images is the image folder of --replay",
                "pass --replay DATA too, or drop --replay-images",
            ),
            (bad_ratio is None, *(bad_ratio or ("", ""))),
        ]

    def _penalty_checks(self) -> list[tuple[bool, str, str]]:
        """EWC needs a Fisher file and both penalties a strength."""
        penalty = self.keep in PENALTIES
        bad_strength = check_strength(self.strength) if penalty else None
        return [
            (
                self.keep != "ewc" or self.fisher is not None,
                "--keep ewc needs the general Fisher at θ₀",
                "pass --fisher FILE (forgetless stats fisher BASE --data GENERAL …)",
            ),
            (
                self.fisher is None or self.keep == "ewc",
                "--fisher is the Fisher of --keep ewc",
                "drop --fisher, or pass --keep ewc",
            ),
            (
                bad_strength is None,
                bad_strength or "",
                "pass --strength λ (e.g. 1e3 for EWC, 1e-2 for L2-SP)",
            ),
            (
                self.strength is None or penalty,
                "--strength is the λ of --keep ewc or --keep l2sp",
                "drop --strength, or pass --keep ewc / l2sp",
            ),
        ]

    def recipe(self, **facts: Any) -> dict[str, Any]:
        """What ``finetune.json`` records: every option, the optimizer's constants, and ``facts`` the run settled
        (the loader's workers, the parallelism, the precision)."""
        out = asdict(self)
        out["init_adapter"] = None if self.init_adapter is None else str(self.init_adapter)
        out["fisher"] = None if self.fisher is None else str(self.fisher)
        for key in ("replay", "replay_images"):
            out[key] = None if out[key] is None else str(out[key])
        out["optimizer"] = {"name": "AdamW", "betas": list(BETAS), "eps": EPS}
        return {**out, **facts}
