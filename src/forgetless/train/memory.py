"""What a fine-tune holds per rank, accounted before any weight is read (``forgetless finetune --dry-run``).

Weights: trainable ones in float32, frozen ones in the compute dtype (bf16 under ``--dtype bfloat16``, else
float32). Gradients: float32, one per trainable value (DDP keeps them in its buckets: no second copy). AdamW: two
float32 moments. Keep rule: SPIDER keeps θ₀ (in the checkpoint's 16-bit dtype where it holds the values exactly,
else float32) and a float32 gradient sum, MagnitudeMask θ₀ and a bool mask, EWC θ₀ and its float32 Fisher, L2-SP θ₀; with LoRA, EWC
keeps the float32 Fisher of the targeted weights and L2-SP nothing (θ₀ is the base itself). Activations, an estimate: 34·h bytes
per token and decoder layer in 16-bit (Korthikanti et al. 2022, without the attention-score term that fused
attention does not store), twice that in float32; with gradient checkpointing each layer keeps only its input
(2·h or 4·h bytes per token) and one layer at a time its full set — over every decoder layer, an upper bound where
the lower layers are frozen.

**FSDP2** (``--fsdp`` over ``world`` ranks): each rank holds ``1/world`` of the weights, gradients, AdamW state and
keep rule (rounded up), and beside them what is gathered whole for a while (:func:`gathered_bytes`). With gradient
accumulation the gradients of the micro-batches before the last are kept whole, unreduced, on every rank (FSDP2's
``set_requires_gradient_sync(False)``, as DDP's ``no_sync``): then the gradients count whole. Before sharding, each
rank loads the whole model (``load``: frozen weights in the compute dtype, trainable ones in float32), a peak of its
own, before the training state exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint.writer import human_bytes

# bytes per value beside θ₀: SPIDER's G, MagnitudeMask's mask, EWC's F (L2-SP: θ₀ alone)
RULE_EXTRA = {"none": None, "spider": 4, "magnitude_mask": 1, "ewc": 4, "l2sp": 0}
ACTIVATION_BYTES = 34  # per token, per unit of hidden size and decoder layer, with 16-bit activations
PARTS = (
    "frozen_weights",
    "trainable_weights",
    "gradients",
    "optimizer",
    "keep_rule",
    "activations",
    "gathered",
)


@dataclass
class TrainFootprint:
    """Bytes per rank, by what holds them (:data:`PARTS`, summed in ``total``); ``load``: the whole model as each
    rank loads it before FSDP2 shards it (0 without FSDP2, where it is the weights)."""

    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer: int
    keep_rule: int
    activations: int
    gathered: int = 0  # FSDP2: weights and gradients gathered whole for a while (gathered_bytes)
    load: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, p) for p in PARTS)

    def lines(self) -> list[str]:
        shown = [p for p in PARTS if p != "gathered" or self.gathered]
        parts = [f"{p.replace('_', ' ')} {human_bytes(getattr(self, p))}" for p in shown]
        out = [
            f"memory per rank: {human_bytes(self.total)} = " + ", ".join(parts),
            "  (activations: an estimate for the longest sample; the rest exact)",
        ]
        if self.load:
            out.append(
                f"  loading: {human_bytes(self.load)} per rank, the whole model before FSDP2 shards it"
            )
        return out


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


def weight_bytes(trainable: int, frozen: int, *, half: bool) -> int:
    """Weights of ``trainable`` float32 values and ``frozen`` ones in the compute dtype."""
    return trainable * 4 + frozen * (2 if half else 4)


def gathered_bytes(root: tuple[int, int], units: list[tuple[int, int]], *, half: bool) -> int:
    """What FSDP2 holds whole beside the shards at the peak of a step: the root group's weights (gathered at the
    forward's start and kept to the backward's end) and gradients, two units' weights (the one computing and the
    next, prefetched) and one unit's gradients before their reduce-scatter. ``root`` and each of ``units`` (the
    modules sharded one by one: decoder layers): its ``(trainable, frozen)`` values."""
    largest = max(units, key=lambda u: weight_bytes(*u, half=half), default=(0, 0))
    return (
        weight_bytes(*root, half=half) + 4 * root[0] + 2 * weight_bytes(*largest, half=half) + 4 * largest[0]
    )


def account(
    trainable: int,
    frozen: int,
    *,
    dtype: str,
    keep: str,
    tokens: int,
    hidden: int,
    layers: int,
    checkpointing: bool,
    theta0_bytes: int = 4,
    world: int = 1,
    fsdp: bool = False,
    gathered: int = 0,
    accumulate: bool = False,
    keep_values: int | None = None,
) -> TrainFootprint:
    """The footprint of one rank holding ``trainable`` and ``frozen`` values (module docstring); ``tokens``: that
    rank's share of a micro-batch. ``fsdp``: sharded over ``world`` ranks, ``gathered`` bytes beside the shards
    (:func:`gathered_bytes`); ``accumulate``: several micro-batches per step; ``keep_values``: the values the keep
    rule holds state for, when not the trainable ones (LoRA's penalty: the targeted weights')."""
    half = dtype == "bfloat16"
    ranks = world if fsdp else 1

    def share(n: int) -> int:
        return -(-n // ranks)

    return TrainFootprint(
        frozen_weights=share(frozen * (2 if half else 4)),
        trainable_weights=share(trainable * 4),
        gradients=trainable * 4 if fsdp and accumulate else share(trainable * 4),
        optimizer=share(trainable * 8),
        keep_rule=share((trainable if keep_values is None else keep_values) * rule_bytes(keep, theta0_bytes)),
        activations=activation_bytes(tokens, hidden, layers, half=half, checkpointing=checkpointing),
        gathered=gathered if fsdp else 0,
        load=weight_bytes(trainable, frozen, half=half) if fsdp else 0,
    )
