"""What a fine-tune holds per rank, accounted before any weight is read (``forgetless finetune --dry-run``).

Weights: trainable ones in float32, frozen ones in the compute dtype (bf16 under ``--dtype bfloat16``, else
float32). Gradients: float32, one per trainable value (DDP keeps them in its buckets: no second copy). AdamW: two
float32 moments. Keep rule: SPIDER keeps θ₀ (in the checkpoint's 16-bit dtype where it holds the values exactly,
else float32) and a float32 gradient sum, MagnitudeMask θ₀ and a bool mask. Activations, an estimate: 34·h bytes per token and decoder layer in 16-bit (Korthikanti et
al. 2022, without the attention-score term that fused attention does not store), twice that in float32; with
gradient checkpointing each layer keeps only its input (2·h or 4·h bytes per token) and one layer at a time its
full set — over every decoder layer, an upper bound where the lower layers are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..checkpoint.writer import human_bytes

RULE_EXTRA = {"none": None, "spider": 4, "magnitude_mask": 1}  # bytes per trainable value beside θ₀
ACTIVATION_BYTES = 34  # per token, per unit of hidden size and decoder layer, with 16-bit activations


@dataclass
class TrainFootprint:
    """Bytes per rank, by what holds them."""

    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer: int
    keep_rule: int
    activations: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def lines(self) -> list[str]:
        parts = [f"{f.name.replace('_', ' ')} {human_bytes(getattr(self, f.name))}" for f in fields(self)]
        return [f"memory per rank: {human_bytes(self.total)} = " + ", ".join(parts),
                "  (activations: an estimate for the longest sample; the rest exact)"]


def activation_bytes(tokens: int, hidden: int, layers: int, *, half: bool, checkpointing: bool) -> int:
    """The activations a micro-batch of ``tokens`` keeps for the backward (module docstring)."""
    per_layer = ACTIVATION_BYTES * hidden * tokens * (1 if half else 2)
    if not checkpointing:
        return layers * per_layer
    return layers * (2 if half else 4) * hidden * tokens + per_layer


def rule_bytes(keep: str, theta0_bytes: int) -> int:
    """Bytes per trainable value the keep rule holds: θ₀ (``theta0_bytes``: 2 from a 16-bit checkpoint, else 4)
    and G (SPIDER) or the mask (MagnitudeMask)."""
    extra = RULE_EXTRA[keep]
    return 0 if extra is None else theta0_bytes + extra


def account(trainable: int, frozen: int, *, dtype: str, keep: str, tokens: int, hidden: int, layers: int,
            checkpointing: bool, theta0_bytes: int = 4) -> TrainFootprint:
    """The footprint of one rank holding ``trainable`` and ``frozen`` values (module docstring)."""
    half = dtype == "bfloat16"
    return TrainFootprint(frozen_weights=frozen * (2 if half else 4), trainable_weights=trainable * 4,
                          gradients=trainable * 4, optimizer=trainable * 8, keep_rule=trainable * rule_bytes(keep, theta0_bytes),
                          activations=activation_bytes(tokens, hidden, layers, half=half,
                                                       checkpointing=checkpointing))
