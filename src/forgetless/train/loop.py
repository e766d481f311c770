"""`forgetless finetune`: supervised fine-tuning of a model folder on a calibration-format data file (full or
LoRA, with a keep rule, on one process or under torchrun with DDP or FSDP2).

    finetune("models/llava", "task/train.jsonl", "runs/ft", train=["language.layers[20:32]", "projector"],
             steps=200, batch_size=4, grad_accum=4, lr=2e-5)
    finetune("models/llava", "task/train.jsonl", "runs/ft-lora", lora=LoraSpec(r=16, targets=["q_proj", "v_proj"]))

In order: the request checked (:class:`FinetuneConfig`) → the data checked and fed (:mod:`.feed`) → the model and
what trains (:mod:`.targets`) → the loop → the output. docs/finetune.md says what each step computes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..checkpoint import layout as layouts
from ..checkpoint import original
from ..checkpoint.guard import check_output
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.space import check_free_space
from ..checkpoint.writer import Entry, StreamingWriter, atomic_folder, parse_size
from ..errors import ForgetlessError
from ..stats.data import IGNORE_INDEX, Encoder, Sample, answer_loss, data_fingerprint, load_samples
from ..stats.distributed import all_reduce_sums, dist_info
from ..stats.run import load_model, resolve_device
from . import parallel
from .config import BETAS, EPS, FinetuneConfig, LoraSpec
from .feed import Feed
from .hooks import StepHook, StepInfo
from .memory import TrainFootprint, account, gathered_bytes
from .penalty import PENALTIES, Penalty, fisher_names, lora_pairs, read_fisher
from .spider import make_rule
from .targets import (
    adapter_key,
    check_lora_targets,
    full_params,
    load_init_adapter,
    lora_modules,
    read_init_adapter,
    stored_names,
)
from .tblog import TrainingLog

DEFAULT_FULL_SCOPE = (
    "language",
    "lm_head",
    "projector",
)  # the vision tower stays frozen, as in LLaVA's recipe
DEFAULT_LORA_SCOPE = ("language.layers",)
LOG_EVERY_S = 5.0
SHARD_SIZE = "5GB"
PARALLEL = {
    "fsdp": "FSDP2: each rank holds its share of the weights, gradients, optimizer state and keep rule",
    "ddp": "DDP",
    "none": "one process",
}


# ------------------------------------------------------------------------------------------------ public types
@dataclass
class FinetuneReport:
    """What a run did: per-step loss, learning rate and gradient norm (before clipping), and what it trained."""

    out: Path
    kind: str  # "full" or "lora"
    trained: list[str]
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    num_samples: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    keep: dict[str, Any] | None = None  # the keep rule's summary (forgetless.train.spider), None without one
    tensorboard: Path | None = None  # the run's TensorBoard events in the output (OUT/runs/RUN), None without


# ------------------------------------------------------------------------------------------------ the schedule
def lr_at(
    t: int, *, lr: float, steps: int, warmup: int = 0, schedule: str = "cosine", min_lr_ratio: float = 0.1
) -> float:
    """The learning rate of optimizer step ``t`` (1-based): linear warm-up, then cosine (or constant)."""
    if t <= warmup:
        return lr * t / warmup
    if schedule == "constant":
        return lr
    low = min_lr_ratio * lr
    return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (steps - warmup)))


# ------------------------------------------------------------------------------------------------ the loss
def answer_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample answer loss ``[B]``, equal to ``answer_loss(model(**inputs).logits, labels)``.

    The hidden states come from the model's base (``model.base_model``: decoder plus vision tower and projector);
    the output embedding is applied only to the positions whose shifted label is an answer token.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_index")}
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    target = batch["labels"][:, 1:]
    where = target != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][where]).float()
    ce = nn.functional.cross_entropy(logits, target[where], reduction="none")
    rows = where.nonzero()[:, 0]
    sums = torch.zeros(target.shape[0], device=ce.device, dtype=ce.dtype).index_add(0, rows, ce)
    return sums / where.sum(1).clamp_min(1)


class _SampleLosses(nn.Module):
    """A batch's per-sample answer losses as one module's forward: what DDP wraps (its gradient hooks are armed by
    a forward through it). ``fast``: :func:`answer_losses` on ``hf_model`` (``net``'s transformers model, the same
    parameters); else the full logits of ``net``."""

    def __init__(self, net: nn.Module, hf_model: nn.Module, fast: bool) -> None:
        super().__init__()
        self.net, self.fast = net, fast
        self._hf = (hf_model,)  # in a tuple: its parameters are net's, registered once

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.fast:
            return answer_losses(self._hf[0], batch)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_index")}
        return answer_loss(self.net(**inputs, use_cache=False).logits, batch["labels"])


def _plain_head(model: nn.Module) -> bool:
    """Whether the logits are just the output embedding of the last hidden state (no soft-capping or scaling)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale"))


# ------------------------------------------------------------------------------------------------ output
def _by_stored_name(
    trained: dict[str, nn.Parameter], stored: dict[str, str], model: nn.Module
) -> dict[str, nn.Parameter]:
    """Every checkpoint name of a trained parameter (tied copies included) → the parameter."""
    named = dict(model.named_parameters(remove_duplicate=False))
    trained_ids = {id(p) for p in trained.values()}
    return {saved: named[p] for p, saved in stored.items() if id(named[p]) in trained_ids}


def _write_full(
    model_dir: Path,
    out: Path,
    from_model: dict[str, torch.Tensor],
    meta: dict[str, Any],
    force: bool,
    tb: TrainingLog | None = None,
) -> None:
    """Every tensor of the input folder, under its name and dtype: those of ``from_model`` (checkpoint name →
    the trained tensor) from it, all others as the input's own bytes; and the run's TensorBoard events."""
    with CheckpointReader(model_dir) as reader:
        entries = [Entry(n, reader.info(n).shape, reader.info(n).dtype) for n in reader.names()]
        writer = StreamingWriter(
            out,
            entries,
            shard_size=parse_size(SHARD_SIZE),
            force=force,
            metadata={"forgetless_version": __version__, "finetune": "full"},
        )
        try:
            for e in entries:
                if e.name in from_model:
                    t = from_model[e.name].detach().to("cpu", e.dtype).contiguous()
                    if tuple(t.shape) != e.shape:
                        raise AssertionError(f"{e.name}: trained shape {tuple(t.shape)}, stored {e.shape}")
                    writer.write(e.name, t)
                else:
                    writer.write(e.name, reader.raw(e.name))
            if tb is not None:
                tb.copy_into(writer.tmp)
            writer.commit(
                side_files_from=model_dir, extra_files={"finetune.json": json.dumps(meta, indent=1)}
            )
        except BaseException:
            writer.abort()
            raise


def _write_lora(
    peft_model: nn.Module,
    out: Path,
    meta: dict[str, Any],
    force: bool,
    tb: TrainingLog | None = None,
    state: dict[str, torch.Tensor] | None = None,
    rename: Callable[[str], str] | None = None,
) -> None:
    """The PEFT adapter folder (``save_pretrained``; ``state``: the adapter's tensors by parameter name, when the
    model's own are pieces; ``rename``: module paths to the base folder's own, for an original LLaVA folder) plus
    ``finetune.json`` and the TensorBoard events, renamed into place."""
    with atomic_folder(out, replace=force) as tmp:
        peft_model.save_pretrained(tmp, state_dict=state)
        if rename is not None:
            original.rename_adapter(tmp, rename)
        (tmp / "finetune.json").write_text(json.dumps(meta, indent=1))
        if tb is not None:
            tb.copy_into(tmp)


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ------------------------------------------------------------------------------------------------ the recipe
def _footprint(
    model_dir: Path,
    names: list[str],
    selected: set[str],
    layout: layouts.Layout,
    lora: LoraSpec | None,
    images: bool,
    **kw: Any,
) -> TrainFootprint:
    """:func:`train.memory.account` for this run, its trainable values counted on the meta-device model; with
    ``fsdp``, what FSDP2 gathers whole, from the values of its units and root group (LoRA's adapters, small, left
    out of those)."""
    from ..stats.footprint import meta_model

    model = meta_model(model_dir, "float32")
    stored = stored_names(model, set(names))
    total = sum(p.numel() for p in model.parameters())
    ids = {id(p) for p in full_params(model, stored, selected).values()} if lora is None else set()
    if kw["fsdp"]:
        root, units = parallel.group_values(model, parallel.shard_units(model, stored, layout, images), ids)
        kw["gathered"] = gathered_bytes(root, units, half=kw["dtype"] == "bfloat16")
    if lora is None:
        trainable = sum(p.numel() for p in model.parameters() if id(p) in ids)
    else:
        modules = lora_modules(model, stored, selected, lora, layout, names, model_dir)
        linears = dict(model.named_modules())
        trainable = sum(lora.r * (linears[m].in_features + linears[m].out_features) for m in modules)
        total += trainable
        kw["keep_values"] = sum(linears[m].weight.numel() for m in modules)  # a penalty's F: the targets'
    text = model.config.get_text_config()
    with CheckpointReader(model_dir) as reader:  # θ₀ is held in the stored dtype where that is 16-bit
        theta0 = max(reader.info(n).dtype.itemsize for n in selected) if selected else 4
    if lora is not None:
        theta0 = 0  # LoRA's θ₀ is the base weights themselves: nothing copied
    return account(
        trainable,
        total - trainable,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        theta0_bytes=theta0,
        **kw,
    )


# ------------------------------------------------------------------------------------------------ precision
def _float32_from_checkpoint(params: dict[str, nn.Parameter], model_dir: Path) -> None:
    """The trainable tensors (by checkpoint name) of a model loaded in 16-bit, made float32 from the checkpoint's
    own values: bit for bit what a float32 load gives them, while the frozen weights were never held in float32.
    Each stored tensor is checked to be the one loaded (its values in the loaded dtype)."""
    with CheckpointReader(model_dir) as reader:
        for saved, p in params.items():
            if p.dtype == torch.float32:
                continue
            value = reader.get(saved).to(p.device)
            if value.shape != p.shape or not torch.equal(value.to(p.dtype), p.data):
                raise ForgetlessError(
                    "the stored tensor is not the parameter transformers loaded from it",
                    file=model_dir,
                    tensor=saved,
                    remedy="fine-tune with --dtype float32",
                )
            p.data = value.float()


@contextlib.contextmanager
def _float32_targets(model: nn.Module, modules: dict[str, str]) -> Iterator[None]:
    """While PEFT adds the adapters, the targeted Linear layers show a float32 weight (a zero-stride stand-in:
    no memory). PEFT draws each adapter's initial values in float32, then casts them to its base layer's weight
    dtype; so a model loaded in 16-bit gets the adapters a float32 load gets, unrounded."""
    named = dict(model.named_modules())
    held = {m: named[m].weight for m in modules}
    for m, w in held.items():
        named[m].weight = nn.Parameter(torch.zeros((), device=w.device).expand(w.shape), requires_grad=False)
    try:
        yield
    finally:
        for m, w in held.items():
            named[m].weight = w  # PEFT keeps the layer itself as its adapter's base_layer


def _hold_frozen(model: nn.Module, dtype: str) -> str:
    """Frozen floating-point weights in the compute dtype (bf16 under ``dtype="bfloat16"``: autocast computes
    their matmuls in bf16 anyway) — half their memory; trainable weights and the optimizer stay float32. The model
    is loaded in that dtype already; this casts what the load kept in float32. Returns the frozen weights'
    dtype."""
    if dtype != "bfloat16":
        return "float32"
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    return "bfloat16"


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class _Job:
    """A checked request: the inputs, the options with the scope resolved, and what was read before any work."""

    model_dir: Path
    data: Path
    out: Path
    cfg: FinetuneConfig
    images: Path | None
    names: list[str]
    layout: layouts.Layout
    selected: set[str]
    base_fingerprint: str
    samples: list[Sample]
    encoder: Encoder
    init_state: dict[str, torch.Tensor] | None
    before: Callable[[StepInfo], None] | None
    after: Callable[[StepInfo], None] | None
    say: Callable[[str], None]
    force: bool
    fisher: dict[str, torch.Tensor] | None = None  # EWC's F by tensor name
    replay: list[Sample] | None = None  # the general samples replayed, in file order


@dataclass
class _Trainee:
    """The loaded model and what trains in it: ``params`` by checkpoint name (LoRA: adapter key), ``net`` the module
    the loss runs through (PEFT's wrapper or the model), ``hf_model`` its transformers model."""

    model: nn.Module
    net: nn.Module
    hf_model: nn.Module
    params: dict[str, nn.Parameter]
    trained: list[str]
    stored: dict[str, str]
    units: list[nn.Module]
    frozen_dtype: str = "float32"


def _split_hook(
    hook: StepHook | Callable[[StepInfo], None] | None,
) -> tuple[Callable | None, Callable | None]:
    """(before, after): a plain callable runs before the step; an object's ``before_step`` / ``after_step``."""
    methods = hasattr(hook, "before_step") or hasattr(hook, "after_step")
    before = getattr(hook, "before_step", None) if methods else hook
    after = getattr(hook, "after_step", None) if methods else None
    if hook is not None and not callable(before) and not callable(after):
        raise ForgetlessError(
            "the hook has neither before_step nor after_step and is not callable",
            remedy="pass a function of StepInfo or an object with before_step/after_step",
        )
    return before, after


def _default_scope(cfg: FinetuneConfig, layout: layouts.Layout, names: list[str]) -> list[str]:
    """LoRA: the decoder layers; full: the language model, lm_head (where stored, not tied) and the projector."""
    if cfg.lora is not None:
        return list(DEFAULT_LORA_SCOPE)
    return [
        s
        for s in DEFAULT_FULL_SCOPE
        if s == layouts.LANGUAGE
        or (s in layout.parts and any(layouts.part_of(layout, n) == s for n in names))
    ]


def _prepare(
    model_dir: Path,
    data: Path,
    out: Path,
    cfg: FinetuneConfig,
    *,
    images: Path | None,
    hook: Any,
    log: Callable[[str], None] | None,
    ranks: int | None,
    dry_run: bool,
    force: bool,
) -> _Job:
    """Every check that needs neither the model nor the data's encoding, the tensor selection on the folder's own
    names, and the samples read."""
    rank, world = dist_info()  # torchrun's environment: these checks run before the process group is joined
    say = log if (log is not None and rank == 0) else (lambda _s: None)
    inputs = [model_dir, data, images, cfg.init_adapter, cfg.fisher, cfg.replay, cfg.replay_images]
    check_output(out, inputs, force=force)
    if ranks is not None and not dry_run:
        raise ForgetlessError(
            "ranks (--ranks) is the number of processes a dry run accounts for",
            remedy=("drop --ranks: a run's processes are torchrun's (--nproc-per-node), or add --dry-run"),
        )
    cfg.check(model_dir, world if ranks is None else ranks)
    before, after = _split_hook(hook)
    init_state = (
        None
        if cfg.init_adapter is None
        else read_init_adapter(
            Path(cfg.init_adapter),
            cfg.lora,
            rename=original.to_memory if original.is_original(model_dir) else None,
        )
    )
    with CheckpointReader(model_dir) as reader:
        names = reader.names()
        layout = layouts.detect_layout(reader.config, names)
        fingerprint = reader.weights_fingerprint()
        shapes = {n: torch.Size(reader.info(n).shape) for n in names}
        base = {"fingerprint": reader.fingerprint(), "weights_fingerprint": fingerprint}
        # the output is the model as stored: its disk must hold it, before training
        if cfg.lora is None and rank == 0:
            check_free_space(out, sum(reader.info(n).nbytes for n in names), "the fine-tuned model")
    if cfg.train is None:
        cfg = replace(cfg, train=_default_scope(cfg, layout, names))
    selected = layouts.select(layout, names, cfg.train, file=model_dir)
    if cfg.lora is not None:
        check_lora_targets(cfg.lora, selected, layout, names, model_dir)
    samples = load_samples(data, image_folder=images, n=cfg.n, seed=cfg.seed)
    replay = None
    if cfg.replay is not None:  # in file order: their own seeded stream shuffles them
        replay = load_samples(cfg.replay, image_folder=cfg.replay_images, shuffle=False)
    encoder = Encoder(
        model_dir, max_length=cfg.max_length, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels
    )
    fisher = None
    if cfg.keep == "ewc":  # the Fisher of every selected tensor, checked before any work
        wanted = fisher_names(model_dir, names, selected, layout, cfg.lora)  # LoRA: the targets' weights
        fisher = read_fisher(cfg.fisher, wanted, shapes, base)
    return _Job(
        model_dir,
        data,
        out,
        cfg,
        images,
        names,
        layout,
        selected,
        fingerprint,
        samples,
        encoder,
        init_state,
        before,
        after,
        say,
        force,
        fisher,
        replay=replay,
    )


def _check_data(job: _Job, rank: int, world: int) -> Feed:
    """Every sample checked once (this rank its share, the findings gathered: a collective), before any work."""
    cfg = job.cfg
    feed = Feed(
        job.samples,
        job.encoder,
        on_bad_sample=cfg.on_bad_sample,
        batch_size=cfg.batch_size,
        micro_batches=cfg.steps * cfg.grad_accum,
        seed=cfg.seed,
        rank=rank,
        world=world,
        workers=cfg.workers,
        replay=job.replay,
        replayed=cfg.replayed,
    )
    for sid, why in feed.skipped[:10] + feed.replay_skipped[:10]:
        job.say(f"  skipped {sid}: {why}")
    if feed.replay is not None:
        job.say(
            f"  replay: {len(feed.replay.samples)} samples of {cfg.replay}, the last {cfg.replayed} of every "
            f"micro-batch of {cfg.batch_size} (replayed : task = {cfg.replay_ratio:g})"
        )
    return feed


def _dry_run(job: _Job, ranks: int | None) -> None:
    """The memory per rank, from the model built on the meta device: nothing is loaded."""
    cfg = job.cfg
    world = dist_info()[1] if ranks is None else ranks
    feed = _check_data(job, 0, 1)
    footprint = _footprint(
        job.model_dir,
        job.names,
        job.selected,
        job.layout,
        cfg.lora,
        feed.images,
        dtype=cfg.dtype,
        keep=cfg.keep,
        tokens=cfg.batch_size // world * feed.longest,
        checkpointing=cfg.gradient_checkpointing,
        world=world,
        fsdp=cfg.fsdp,
        accumulate=cfg.grad_accum > 1,
    )
    for line in footprint.lines():
        job.say(line)


def _full_trainee(job: _Job, model: nn.Module, stored: dict[str, str], units: list[nn.Module]) -> _Trainee:
    """The selected tensors themselves train, from a float32 load's values."""
    params = full_params(model, stored, job.selected)
    frozen = job.selected - set(stored.values())
    if frozen:
        job.say(
            f"  {len(frozen)} selected tensors are not parameters and stay as they are, e.g. {min(frozen)}"
        )
    if not params:
        raise ForgetlessError(
            f"the selection {job.cfg.train} holds no trainable parameter",
            file=job.model_dir,
            remedy="select weights of the model (see `forgetless inspect`)",
        )
    for p in params.values():
        p.requires_grad_(True)
    _float32_from_checkpoint(params, job.model_dir)  # a float32 load's values, bit for bit
    return _Trainee(model, model, model, params, sorted(params), stored, units)


def _lora_trainee(job: _Job, model: nn.Module, stored: dict[str, str], units: list[nn.Module]) -> _Trainee:
    """PEFT's adapters on the targeted Linear layers train (from the adapter continued, with ``init_adapter``)."""
    from peft import LoraConfig, get_peft_model

    lora = job.cfg.lora
    modules = lora_modules(model, stored, job.selected, lora, job.layout, job.names, job.model_dir)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", target_modules=list(modules)
    )
    with _float32_targets(model, modules):  # the adapters' float32 initial values, whatever the dtype
        net = get_peft_model(model, config)
    net.peft_config["default"].base_model_name_or_path = str(job.model_dir)
    params = {adapter_key(n): p for n, p in net.named_parameters() if p.requires_grad}
    if job.init_state is not None:
        load_init_adapter(params, job.init_state, Path(job.cfg.init_adapter))
        job.say(f"  continuing the adapter {job.cfg.init_adapter} ({len(job.init_state)} tensors)")
    return _Trainee(model, net, net.get_base_model(), params, sorted(modules.values()), stored, units)


def _load(job: _Job, dev_name: str, images: bool) -> tuple[_Trainee, torch.device]:
    """The model in the compute dtype, its trainable tensors in float32, activation checkpointing as asked."""
    cfg = job.cfg
    torch.manual_seed(cfg.seed)
    model, dev = load_model(
        job.model_dir, dev_name, cfg.dtype
    )  # frozen weights straight in the compute dtype
    model.requires_grad_(False)
    stored = stored_names(model, set(job.names))
    units = parallel.shard_units(model, stored, job.layout, images) if cfg.fsdp else []
    trainee = (_full_trainee if cfg.lora is None else _lora_trainee)(job, model, stored, units)
    trainee.frozen_dtype = _hold_frozen(model, cfg.dtype)
    if cfg.gradient_checkpointing:  # activations recomputed in the backward, layer by layer
        trainee.hf_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    trainee.net.train()
    return trainee, dev


def _distribute(
    trainee: _Trainee, fsdp: bool, world: int, dev: torch.device, cleanup: contextlib.ExitStack
) -> tuple[nn.Module, parallel.Reached | None]:
    """The per-sample loss module, sharded with FSDP2 (``trainee.params`` then the pieces) or wrapped in DDP over
    several ranks; and, with FSDP2, what tells a step which root-group modules ran."""
    losses: nn.Module = _SampleLosses(trainee.net, trainee.hf_model, _plain_head(trainee.hf_model))
    if fsdp:  # after this, the trainable tensors are DTensors: this rank's pieces (reduce-scatters average)
        mesh, trainee.params = parallel.shard(losses, trainee.net, trainee.units, trainee.params, dev)
        cleanup.callback(parallel.forget_group, mesh)
        return losses, parallel.Reached(losses, trainee.units)
    if world == 1:
        return losses, None
    ddp = nn.parallel.DistributedDataParallel(  # a backward through it all-reduces the gradients (averaged)
        losses,
        device_ids=[dev.index] if dev.type == "cuda" else None,
        forward_sync_buffers=False,
        find_unused_parameters=True,  # a tensor a rank's samples do not reach (the projector, text-only)
        gradient_as_bucket_view=True,
    )  # the gradients live in the buckets: no second copy
    return ddp, None  # gone with the run's frame, before the process group ends


def _with_rule(
    keep: str, params: dict[str, nn.Parameter], before: Callable | None, after: Callable | None
) -> tuple[Any, Callable | None, Callable | None]:
    """The keep rule (θ₀ and G captured now, before any step) and the step hooks with it: the rule reads the clipped
    gradients before the user's ``before_step`` and rewrites the weights before the user's ``after_step``."""
    rule = None if keep in PENALTIES else make_rule(keep, params)
    if rule is None:
        return None, before, after

    def rule_before(info: StepInfo) -> None:
        rule.before_step(info)
        if before is not None:
            before(info)

    def rule_after(info: StepInfo) -> None:
        rule.after_step(info)
        if after is not None:
            after(info)

    return rule, rule_before, rule_after


def _penalty(job: _Job, trainee: _Trainee, dev: torch.device) -> Penalty | None:
    """EWC / L2-SP over the trained tensors (θ₀ captured now; LoRA: on each module's folded update s·B·A, θ₀ the
    base); F is kept as this rank's pieces, and the whole one the job read is let go."""
    cfg = job.cfg
    if cfg.keep not in PENALTIES:
        return None
    pairs = (
        lora_pairs(trainee.model, trainee.params, lambda m: trainee.stored[f"{m}.weight"]) if cfg.lora else []
    )
    penalty = Penalty(trainee.params, cfg.strength, job.fisher, pairs)
    what = "F ⊙ " if job.fisher else ""
    delta = " (θ − θ₀ = s·B·A of each LoRA module)" if cfg.lora else ""
    where = " (this rank's pieces)" if cfg.fsdp else ""
    job.fisher = None
    job.say(
        f"  keep rule {cfg.keep}: λ/2 Σ {what}(θ − θ₀)²{delta}, λ = {cfg.strength:g}, "
        f"{penalty.extra_bytes() / 2**20:.1f} MiB extra on {dev}{where}"
    )
    return penalty


def _optimizer(params: dict[str, nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=BETAS,
        eps=EPS,
    )


def _parallelism(cfg: FinetuneConfig, world: int) -> str:
    return "fsdp" if cfg.fsdp else "ddp" if world > 1 else "none"


def _announce(job: _Job, trainee: _Trainee, feed: Feed, rule: Any, dev: torch.device, world: int) -> None:
    cfg, say = job.cfg, job.say
    n_params = sum(p.numel() for p in trainee.params.values())
    kind = f"LoRA r={cfg.lora.r}" if cfg.lora else "full"
    mode = _parallelism(cfg, world)
    spread = (
        f" × {world} processes ({PARALLEL[mode]}, {cfg.batch_size // world} samples of each batch per rank)"
        if mode != "none"
        else ""
    )
    skipped = f" ({len(feed.skipped)} skipped)" if feed.skipped else ""
    say(
        f"finetune ({kind}): {len(trainee.trained)} tensors ({n_params / 1e6:.2f}M trainable parameters) of "
        f"{job.model_dir}, {len(feed.samples)} samples{skipped}, {cfg.steps} steps × {cfg.per_step} samples "
        f"(batch {cfg.batch_size} × accumulation {cfg.grad_accum}) on {dev}{spread}, {cfg.dtype}"
    )
    if rule is not None:
        where = " on this rank (its pieces)" if cfg.fsdp else " on every rank" if world > 1 else ""
        what = " and G, and scratch for the largest tensor" if cfg.keep == "spider" else " and mask"
        say(f"  keep rule {cfg.keep}: {rule.extra_bytes() / 2**20:.1f} MiB extra on {dev}{where} (θ₀{what})")


@dataclass
class _Stepper:
    """One optimizer step: the micro-batches' backward passes, the reductions, clipping, the hooks and AdamW."""

    cfg: FinetuneConfig
    losses: nn.Module
    reached: parallel.Reached | None
    optimizer: torch.optim.Optimizer
    trainee: _Trainee
    before: Callable | None
    after: Callable | None
    dev: torch.device
    world: int
    model_dir: Path
    penalty: Penalty | None = None

    def __call__(self, step: int, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[float, float, float]:
        """(loss, gradient norm before clipping, learning rate) of optimizer step ``step``."""
        cfg = self.cfg
        lr_t = lr_at(
            step,
            lr=cfg.lr,
            steps=cfg.steps,
            warmup=cfg.warmup,
            schedule=cfg.schedule,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr_t
        loss = self._backward(batches)
        if (
            self.penalty is not None
        ):  # its gradient joins the step's before clipping, as if it were in the loss
            self.penalty.add_gradients()
        if not math.isfinite(loss):
            raise ForgetlessError(
                f"the loss is {loss} at step {step}",
                file=self.model_dir,
                remedy="lower --lr, add --warmup or --clip, or use --dtype float32",
            )
        params = self.trainee.params
        norm = parallel.clip_gradients(list(params.values()), cfg.clip)
        info = StepInfo(step, cfg.steps, lr_t, loss, norm, self.trainee.net, params, self.optimizer)
        if self.before is not None:
            self.before(info)
        self.optimizer.step()
        if self.after is not None:
            self.after(info)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm, lr_t

    def _backward(self, batches: Iterator[dict[str, torch.Tensor]]) -> float:
        """The step's micro-batches back-propagated (the mean over the step's samples); the mean loss."""
        cfg, total = self.cfg, 0.0
        for k in range(cfg.grad_accum):
            last = k == cfg.grad_accum - 1  # DDP and FSDP2 reduce after the last micro-batch only
            with parallel.syncing(self.losses, last):
                with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                    per_sample = self.losses(next(batches))
                (per_sample.sum() * self.world / cfg.per_step).backward()  # the mean over ranks: the sum
            total += per_sample.detach().sum().item()
        if self.reached is not None:
            self.reached.settle(self.dev)
        step_sum = torch.tensor(total, dtype=torch.float64, device=self.dev)
        all_reduce_sums({"loss": step_sum})
        return float(step_sum) / cfg.per_step


def _loop(
    job: _Job,
    feed: Feed,
    step_once: _Stepper,
    rule: Any,
    tb: TrainingLog | None,
    cleanup: contextlib.ExitStack,
) -> FinetuneReport:
    """Every optimizer step, logged (TensorBoard on rank 0, a line every :data:`LOG_EVERY_S`)."""
    cfg, dev = job.cfg, step_once.dev
    batches = feed.batches(
        dev
    )  # this rank's share of each micro-batch, encoded ahead by the loader's workers
    cleanup.callback(batches.close)  # the workers end with the run, however it ends
    report = FinetuneReport(
        out=job.out,
        kind="lora" if cfg.lora else "full",
        trained=step_once.trainee.trained,
        num_samples=len(feed.samples),
        skipped=feed.skipped,
    )
    t0 = last_log = step_end = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        loss, norm, lr_t = step_once(step, batches)
        report.losses.append(loss)
        report.lrs.append(lr_t)
        report.grad_norms.append(norm)
        now = time.perf_counter()
        kept = {k: rule.history[-1][k] for k in ("updated_fraction", "mean_c")} if rule is not None else {}
        if tb is not None:
            tb.scalars(
                step,
                {
                    "loss": loss,
                    "lr": lr_t,
                    "grad_norm": norm,
                    "epoch": feed.epochs(step * cfg.grad_accum),
                    "samples_per_second": cfg.per_step / (now - step_end),
                    **kept,
                },
            )
        step_end = now
        if step in (1, cfg.steps) or now - last_log >= LOG_EVERY_S:
            last_log, elapsed = now, now - t0
            note = f"  kept {kept['updated_fraction']:.3f} c̄ {kept['mean_c']:.3f}" if kept else ""
            job.say(
                f"  step {step}/{cfg.steps}  loss {loss:.4f}  lr {lr_t:.3g}  |g| {norm:.3g}{note}  "
                f"{step * cfg.per_step / elapsed:.2f} samples/s  ETA {_hms(elapsed / step * (cfg.steps - step))}"
            )
    report.seconds = time.perf_counter() - t0
    report.keep = rule.summary() if rule is not None else None
    return report


def _replay_meta(cfg: FinetuneConfig, feed: Feed) -> dict[str, Any] | None:
    """The replay data, its usable samples' fingerprint, the ratio, the replayed samples per micro-batch, their
    stream's seed, and the replayed samples of the run in the order used (:meth:`Feed.replayed_items`)."""
    if feed.replay is None:
        return None
    return {
        "data": str(cfg.replay),
        "data_fingerprint": data_fingerprint(cfg.replay, feed.replay.samples),
        "num_samples": len(feed.replay.samples),
        "skipped": [list(s) for s in feed.replay_skipped],
        "ratio": cfg.replay_ratio,
        "per_batch": cfg.replayed,
        "seed": feed.replay.seed,
        **feed.replayed_items(),
    }


def _meta(
    job: _Job, feed: Feed, trainee: _Trainee, report: FinetuneReport, dev: torch.device, world: int
) -> dict[str, Any]:
    """``finetune.json``: the recipe (the options and what the run settled), the inputs' fingerprints, the curves."""
    cfg = job.cfg
    recipe = cfg.recipe(
        workers=feed.workers,
        parallel=_parallelism(cfg, world),
        precision={"trainable": "float32", "optimizer": "float32", "frozen": trainee.frozen_dtype},
    )
    return {
        "forgetless_version": __version__,
        "kind": report.kind,
        "base": str(job.model_dir),
        "base_weights_fingerprint": job.base_fingerprint,
        "data": str(job.data),
        "data_fingerprint": data_fingerprint(job.data, feed.samples),
        "num_samples": len(feed.samples),
        "skipped": [list(s) for s in feed.skipped],
        "replay": _replay_meta(cfg, feed),
        "recipe": recipe,
        "trained_tensors": trainee.trained,
        "adapter_tensors": sorted(trainee.params) if cfg.lora else None,
        "losses": report.losses,
        "lrs": report.lrs,
        "grad_norms": report.grad_norms,
        "keep": report.keep,
        "seconds": round(report.seconds, 3),
        "device": str(dev),
        "processes": world,
        "torch": torch.__version__,
    }


def _write(job: _Job, trainee: _Trainee, meta: dict[str, Any], tb: TrainingLog | None, rank: int) -> None:
    """The output, written by rank 0; with FSDP2 every rank first takes part in gathering the whole tensors."""
    cfg = job.cfg
    written = (
        _by_stored_name(trainee.params, trainee.stored, trainee.model)
        if cfg.lora is None
        else {n: p for n, p in trainee.net.named_parameters() if p.requires_grad}
    )
    if cfg.fsdp:  # the whole tensors, gathered from the ranks' pieces onto rank 0 (every rank takes part)
        written = parallel.gather_whole(written, rank)
    if rank != 0:  # the others wait for it as the process group ends
        return
    if cfg.lora is None:
        _write_full(job.model_dir, job.out, written, meta, job.force, tb)
    else:
        _write_lora(
            trainee.net,
            job.out,
            meta,
            job.force,
            tb,
            state=written if cfg.fsdp else None,
            rename=original.to_original if original.is_original(job.model_dir) else None,
        )
    if tb is not None:
        tb.finish()


def _run(
    job: _Job,
    feed: Feed,
    rank: int,
    world: int,
    dev_name: str,
    tensorboard: bool,
    cleanup: contextlib.ExitStack,
) -> FinetuneReport:
    """The run, in a frame of its own: what it builds (FSDP2's state, DTensors, a DDP wrapper) holds the process
    group, and is gone when the group ends."""
    cfg = job.cfg
    trainee, dev = _load(job, dev_name, images=feed.images)
    losses, reached = _distribute(trainee, cfg.fsdp, world, dev, cleanup)
    rule, before, after = _with_rule(cfg.keep, trainee.params, job.before, job.after)
    _announce(job, trainee, feed, rule, dev, world)
    penalty = _penalty(job, trainee, dev)  # θ₀ now
    tb = TrainingLog.open(job.out, job.say) if tensorboard and rank == 0 else None
    if tb is not None:
        cleanup.callback(tb.close)  # the events flushed however the run ends
    stepper = _Stepper(
        cfg,
        losses,
        reached,
        _optimizer(trainee.params, cfg),
        trainee,
        before,
        after,
        dev,
        world,
        job.model_dir,
        penalty,
    )
    report = _loop(job, feed, stepper, rule, tb, cleanup)
    if penalty is not None:
        report.keep = penalty.summary(cfg.keep)
    trainee.net.eval()
    meta = _meta(job, feed, trainee, report, dev, world)
    if tb is not None:
        report.tensorboard, meta["tensorboard"] = job.out / "runs" / tb.name, f"runs/{tb.name}"
    _write(job, trainee, meta, tb, rank)
    job.say(
        f"wrote {job.out}: {cfg.steps} steps in {_hms(report.seconds)}, loss {report.losses[0]:.4f} → "
        f"{report.losses[-1]:.4f}"
    )
    return report


def finetune(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: FinetuneConfig | None = None,
    *,
    images: str | os.PathLike | None = None,
    hook: StepHook | Callable[[StepInfo], None] | None = None,
    log: Callable[[str], None] | None = print,
    device: str = "auto",
    tensorboard: bool = True,
    dry_run: bool = False,
    ranks: int | None = None,
    force: bool = False,
    **options: Any,
) -> FinetuneReport | None:
    """Fine-tune the model in ``model_dir`` on ``data`` and write the result to ``out`` (docs/finetune.md).

    ``config`` or ``options`` (the fields of :class:`FinetuneConfig`): ``train``, layout selectors of the tensors
    to train, checked against the folder's names before the model is loaded (default: the language model, lm_head
    and projector; LoRA: the decoder layers, where ``lora.targets`` picks Linear layers); ``keep``: ``"none"``,
    ``"spider"`` or ``"magnitude_mask"`` (full fine-tune); ``init_adapter``: a PEFT adapter to continue (same rank,
    alpha and targets; the optimizer starts fresh); ``workers``: loader processes per rank (None: up to 2, none
    when every sample is kept encoded); ``fsdp``: shard the model with FSDP2; ``replay`` (a data file),
    ``replay_images`` and ``replay_ratio``: general samples in the last ``B·R / (1 + R)`` slots of every
    micro-batch (:mod:`.feed`). ``images``: the folder of relative image paths (default: the data's); ``hook``:
    called at every step (:class:`StepHook`); ``ranks``: with ``dry_run``, the processes the memory per rank is
    for (default: torchrun's). Returns the per-step losses,
    learning rates and gradient norms, also written to ``out/finetune.json``; None for a dry run.
    """
    if config is not None and options:
        raise TypeError("pass the options either as a FinetuneConfig or as keywords, not both")
    cfg = config if config is not None else FinetuneConfig(**options)
    job = _prepare(
        Path(model_dir),
        Path(data),
        Path(out),
        cfg,
        images=None if images is None else Path(images),
        hook=hook,
        log=log,
        ranks=ranks,
        dry_run=dry_run,
        force=force,
    )
    if dry_run:
        return _dry_run(job, ranks)
    dev_name = resolve_device(device)
    with parallel.ranks(dev_name, cfg.fsdp) as (rank, world), contextlib.ExitStack() as cleanup:  # one group
        return _run(job, _check_data(job, rank, world), rank, world, dev_name, tensorboard, cleanup)


__all__ = ["FinetuneConfig", "FinetuneReport", "LoraSpec", "answer_losses", "finetune", "lr_at"]
