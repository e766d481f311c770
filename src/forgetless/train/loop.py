"""`forgetless finetune`: supervised fine-tuning of a model folder on a calibration-format data file.

    finetune("models/llava", "task/train.jsonl", "runs/ft", train=["language.layers[20:32]", "projector"],
             steps=200, batch_size=4, grad_accum=4, lr=2e-5)
    finetune("models/llava", "task/train.jsonl", "runs/ft-lora", lora=LoraSpec(r=16, targets=["q_proj", "v_proj"]))

One file, read top to bottom: options → data → model and trainable tensors → the loop → the output.

**Data.** The file is read by :func:`forgetless.stats.data.load_samples` (LLaVA conversations or
``{image?, question, answer}``), encoded by its :class:`~forgetless.stats.data.Encoder` (the model's own processor
and chat template; labels on the answer tokens only) and batched by its ``collate``, all in :mod:`.feed`. Every
sample is encoded once before the first step, each by one rank (its share), so a bad sample stops every rank
before any work (or is skipped and counted alike on every rank, with ``on_bad_sample="skip"``); encodings are kept
while they fit in :data:`.feed.CACHE_BYTES`. In the loop a DataLoader (``workers`` processes, 0: the main one)
encodes and collates this rank's share of the coming micro-batches ahead of the step that takes them; the batches
are the same whatever the number of workers.

**Order.** Samples are drawn as one endless stream: epoch ``e`` is a permutation of the samples seeded with
``seed + e``, epochs follow each other, and micro-batch ``k`` is the stream's items ``k·B .. (k+1)·B − 1``. So an
optimizer step always sees ``B × grad_accum`` samples, and ``grad_accum=2, batch_size=2`` sees the same samples as
``grad_accum=1, batch_size=4``.

**Loss.** A sample's loss is the mean cross-entropy over its answer tokens (:func:`stats.data.answer_loss`); the
step's loss is the mean over the ``B × grad_accum`` samples of the step. Each micro-batch back-propagates
``sum(sample losses) / (B × grad_accum)``, so the accumulated gradient is exactly the gradient of that mean. The
output projection (lm_head) is applied only at the positions whose next token is an answer token
(:func:`answer_losses`): the same loss as full logits, without the vocabulary-wide matmul over every prompt and
image token.

**Step.** AdamW (β = 0.9, 0.999, ε = 1e-8) over the trainable tensors only; weight decay on tensors of ≥ 2
dimensions (matrices), none on biases and norm weights. Gradients are clipped to a total 2-norm of ``clip`` with
:func:`torch.nn.utils.clip_grad_norm_`. The learning rate of step ``t = 1 .. T`` (``T = steps``, ``W = warmup``,
``m = min_lr_ratio · lr``)::

    t ≤ W:  lr · t / W                                             (linear warm-up)
    t > W:  m + (lr − m) · ½ · (1 + cos(π · (t − W) / (T − W)))    (schedule="cosine": lr down to m at t = T)
            lr                                                     (schedule="constant")

``min_lr_ratio`` defaults to 0.1: the cosine ends at 10 % of the peak (as nanoGPT and LLaMA do), so no step is
wasted at a zero learning rate; pass 0 for a decay to zero.

**Hooks.** ``hook`` is a plain callable, called once per optimizer step after clipping and before
``optimizer.step()``, or an object with ``before_step(info)`` and/or ``after_step(info)`` methods
(:class:`StepHook`): ``before_step`` sees the clipped gradients before the step, ``after_step`` runs right after
``optimizer.step()`` (gradients still present, weights updated) and may rewrite the weights in place — what
SPIDER needs. Both receive a :class:`StepInfo`.

**Keep rules.** ``keep="spider"`` or ``"magnitude_mask"`` (full fine-tune only) pulls the weights back towards the
input's after every step (:mod:`forgetless.train.spider`): the rule reads the clipped gradients before the user's
``before_step`` and rewrites the weights right after ``optimizer.step()``, before the user's ``after_step`` (which
so sees the final weights). Its memory (``θ₀`` and ``G`` in float32) is logged; ``finetune.json`` records the rule
and, per step, the fraction of entries that kept their update and the mean coefficient.

**Several processes.** ``torchrun --nproc-per-node N -m forgetless.cli finetune …`` trains with DDP (gloo on CPU,
nccl on CUDA, a GPU per local rank): every rank reads the same sample stream and takes its interleaved share of
each micro-batch (``items[rank::N]``; ``B`` must be a multiple of ``N``, checked before any work); each rank
back-propagates ``N · sum(its sample losses) / (B × grad_accum)`` and DDP averages over the ranks, so the
all-reduced gradient is exactly the single-process one's (up to the order of float32 additions): clipping, the
keep rule and the hooks see it whole, on every rank. DDP syncs once per optimizer step (``no_sync`` for the other
micro-batches). The reported loss is the all-reduced mean. Only rank 0 logs and writes the output; the others wait
for it. Every rank holds the whole model, optimizer state and keep rule. With dropout (``--lora-dropout``) each
rank draws its own masks, so only the distribution, not the draw, matches one process.

**FSDP2.** With ``fsdp`` (``--fsdp``) the ranks shard the model instead (``fully_shard``: each decoder layer, the
vision tower's layers when every sample has an image, then the rest as the root group; :func:`_shard_units`), so
each holds its share of the weights, gradients, AdamW state and keep rule (:mod:`.spider` works on the DTensor
pieces, :mod:`.memory` accounts it). The loss is scaled as under DDP (the reduce-scatter averages over the ranks);
the micro-batches before a step's last keep their gradients whole, unreduced (``set_requires_gradient_sync``);
clipping reduces the pieces' norms over the ranks; the output is gathered whole (``full_tensor``, every rank) and
written by rank 0. A root-group tensor that a rank's samples do not reach (the projector, text-only samples) is
reduce-scattered as zeros there (``set_reduce_scatter_unused_params``: every rank reduces the same tensors), and
left without a gradient when no rank reached it, as one process leaves it (:class:`_Reached`). On one process
``fsdp`` shards over a group of that process alone: the code of several ranks, the plain run's weights.

**Logs.** Every optimizer step's loss, learning rate, gradient norm, samples/s (and epoch), and a keep rule's
fraction of kept entries and mean coefficient, go to TensorBoard event files (:mod:`.tblog`; ``tensorboard=False``
turns them off): beside the output while training (``OUT.tensorboard/RUN``), then inside it as the Hugging Face
Trainer writes them (``OUT/runs/RUN``). Rank 0 only.

**Precision.** Trainable weights, their gradients and AdamW state are float32. ``dtype="bfloat16"`` runs forward
and backward under bf16 autocast (the loss is still computed in fp32) and holds the frozen weights in bf16 (half
their memory; ``finetune.json`` records it under ``recipe.precision``): the model is loaded in bf16 and the
trainable tensors then read in float32 from the checkpoint, their values those of a float32 load bit for bit
(LoRA's adapters keep PEFT's float32 initial values), so the frozen weights are never held in float32.
``gradient_checkpointing`` recomputes each layer's activations in the backward instead of keeping them.

**Output.** Full fine-tune: a complete Hugging Face folder written by the project's streaming writer: every tensor
of the input under its input name and dtype, the untouched ones copied byte for byte, the trained ones cast back to
their stored dtype; the config, tokenizer and processor files copied; plus ``finetune.json`` (recipe, per-step
loss, lr and gradient norm, seconds, trained tensor names). LoRA (through PEFT): a PEFT adapter folder
(``adapter_config.json``, ``adapter_model.safetensors``) that both PEFT and forgetless's ``DIR+ADAPTER`` load, plus
``finetune.json``. Either appears whole or not at all (a temporary folder beside it, then a rename); an existing
output is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import __version__
from ..checkpoint import layout as layouts
from ..checkpoint import original
from ..checkpoint.guard import check_output
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.space import check_free_space
from ..checkpoint.writer import Entry, StreamingWriter, atomic_folder, parse_size
from ..errors import ForgetlessError
from ..stats.data import (
    IGNORE_INDEX,
    ON_BAD_SAMPLE,
    Encoder,
    answer_loss,
    data_fingerprint,
    load_samples,
)
from ..stats.distributed import all_reduce_sums, dist_info, end_process_group, process_group
from ..stats.fisher import checkpoint_names
from ..stats.run import load_model, resolve_device
from .feed import Feed
from .hooks import StepHook, StepInfo
from .memory import TrainFootprint, account, gathered_bytes
from .spider import KEEP_RULES, DTensor, make_rule
from .tblog import TrainingLog

SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "bfloat16")  # bfloat16: autocast over fp32 weights
DEFAULT_FULL_SCOPE = ("language", "lm_head", "projector")  # the vision tower stays frozen, as in LLaVA's recipe
DEFAULT_LORA_SCOPE = ("language.layers",)
LOG_EVERY_S = 5.0
SHARD_SIZE = "5GB"
PARALLEL = {"fsdp": "FSDP2: each rank holds its share of the weights, gradients, optimizer state and keep rule",
            "ddp": "DDP", "none": "one process"}
BETAS, EPS = (0.9, 0.999), 1e-8


# ------------------------------------------------------------------------------------------------ public types
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
def lr_at(t: int, *, lr: float, steps: int, warmup: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1) -> float:
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


# ------------------------------------------------------------------------------------------------ checks
def _check_options(model_dir: Path, *, steps: int, batch_size: int, grad_accum: int,
                   lr: float, warmup: int, schedule: str, min_lr_ratio: float, clip: float | None, dtype: str,
                   on_bad_sample: str, lora: LoraSpec | None, world: int = 1) -> None:
    if not (model_dir / "config.json").is_file():
        raise ForgetlessError("not a model folder (no config.json)", file=model_dir,
                              remedy="give the Hugging Face folder of the model to fine-tune")
    checks = [
        (steps >= 1, f"steps must be ≥ 1, got {steps}", "pass --steps N"),
        (batch_size >= 1, f"batch size must be ≥ 1, got {batch_size}", "pass --batch-size N"),
        (batch_size % world == 0, f"batch size {batch_size} is not divisible by the {world} processes",
         f"pass a --batch-size that is a multiple of {world}: each process takes an equal share of every batch"),
        (grad_accum >= 1, f"grad_accum must be ≥ 1, got {grad_accum}", "pass --grad-accum N"),
        (lr > 0, f"the learning rate must be positive, got {lr}", "pass --lr"),
        (0 <= warmup < steps, f"warmup must be in 0..steps-1, got {warmup} for {steps} steps", "lower --warmup"),
        (schedule in SCHEDULES, f"unknown schedule {schedule!r}", f"use one of {SCHEDULES}"),
        (0 <= min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}", "pass 0.1 or 0"),
        (clip is None or clip > 0, f"clip must be positive, got {clip}", "pass --clip 1.0, or no --clip"),
        (dtype in DTYPES, f"unknown dtype {dtype!r}", f"use one of {DTYPES}"),
        (on_bad_sample in ON_BAD_SAMPLE, f"unknown on_bad_sample {on_bad_sample!r}", f"use one of {ON_BAD_SAMPLE}"),
    ]
    if lora is not None:
        checks += [(lora.r >= 1, f"LoRA rank must be ≥ 1, got {lora.r}", "pass --lora-r N"),
                   (lora.alpha > 0, f"LoRA alpha must be positive, got {lora.alpha}", "pass --lora-alpha"),
                   (0 <= lora.dropout < 1, f"LoRA dropout must be in [0, 1), got {lora.dropout}", "pass 0.05")]
    for ok, problem, remedy in checks:
        if not ok:
            raise ForgetlessError(problem, remedy=remedy)


# ------------------------------------------------------------------------------------------------ what trains
def _stored_names(model: nn.Module, names: set[str]) -> dict[str, str]:
    """Every parameter's module name (tied aliases included) → the name of its tensor in the checkpoint folder.

    The saved name is the one ``save_pretrained`` would write (:func:`stats.fisher.checkpoint_names`); a folder
    saved under the family's other naming (LLaVA/Qwen2-VL current vs legacy) is matched through the layout's
    aliases. Parameters that the folder does not store are left out.
    """
    out = {}
    for pname, saved in checkpoint_names(model).items():
        if saved not in names:
            hits = [a for a in layouts.name_aliases(saved) if a in names]
            if len(hits) != 1:
                continue
            saved = hits[0]
        out[pname] = saved
    return out


def _full_params(model: nn.Module, stored: dict[str, str], selected: set[str]) -> dict[str, nn.Parameter]:
    """checkpoint name → parameter for the selected tensors; a tied parameter appears once (its first name)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    chosen: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for pname, saved in sorted(stored.items(), key=lambda kv: kv[1]):
        p = named[pname]
        if saved in selected and id(p) not in seen:
            seen.add(id(p))
            chosen[saved] = p
    return chosen


def _is_selector(entry: str, layout: layouts.Layout) -> bool:
    return entry.startswith("re:") or entry.split("[")[0] in (layouts.LANGUAGE, *layout.parts)


def _lora_modules(model: nn.Module, stored: dict[str, str], scope: set[str], spec: LoraSpec,
                  layout: layouts.Layout, names: list[str], model_dir: Path) -> dict[str, str]:
    """Module name (as PEFT sees it) → checkpoint weight name, for every Linear in scope that ``spec`` targets."""
    linears = {m: stored[f"{m}.weight"] for m, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and stored.get(f"{m}.weight") in scope}
    if not linears:
        raise ForgetlessError("no Linear layer in the LoRA scope", file=model_dir,
                              remedy="widen --train (LoRA adapts Linear layers; default: language.layers)")
    if not spec.targets:
        return linears
    chosen: dict[str, str] = {}
    for entry in spec.targets:
        if _is_selector(entry, layout):
            picked = layouts.select(layout, names, [entry], file=model_dir)
            hits = {m: w for m, w in linears.items() if w in picked}
        else:
            hits = {m: w for m, w in linears.items() if m == entry or m.endswith("." + entry)}
        if not hits:
            raise ForgetlessError(f"LoRA target {entry!r} matches no Linear layer in the scope", file=model_dir,
                                  remedy="give module names such as q_proj, v_proj, or selectors inside --train")
        chosen.update(hits)
    return dict(sorted(chosen.items()))


def _check_lora_targets(spec: LoraSpec, scope: set[str], layout: layouts.Layout, names: list[str],
                        model_dir: Path) -> None:
    """Fail before any work on a LoRA target that names no weight in scope (module names by suffix, under either
    naming of the family); :func:`_lora_modules` does the exact matching on the loaded model."""
    for entry in spec.targets or []:
        if _is_selector(entry, layout):
            found = bool(layouts.select(layout, names, [entry], file=model_dir) & scope)
        else:
            found = any(c == f"{entry}.weight" or c.endswith(f".{entry}.weight")
                        for n in scope for c in (n, *layouts.name_aliases(n)))
        if not found:
            raise ForgetlessError(f"LoRA target {entry!r} matches no weight in the scope", file=model_dir,
                                  remedy="give module names such as q_proj, v_proj, or selectors inside --train")


def _adapter_key(pname: str, adapter: str = "default") -> str:
    """PEFT's in-memory parameter name → its key in ``adapter_model.safetensors``."""
    return pname.replace(f".{adapter}.", ".")


def _read_init_adapter(folder: Path, lora: LoraSpec, rename: Callable[[str], str] | None = None
                       ) -> dict[str, torch.Tensor]:
    """The LoRA tensors of the adapter a run continues, after checking its rank and alpha against `lora`
    (``rename``: its module paths to the loaded model's, for an original LLaVA folder)."""
    from safetensors.torch import load_file

    from ..checkpoint.lora import ADAPTER_CONFIG, ADAPTER_SAFE
    from ..safeload import read_json

    cfg_file, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_SAFE
    if not cfg_file.is_file() or not weights.is_file():
        raise ForgetlessError(f"not a PEFT adapter folder ({ADAPTER_CONFIG} and {ADAPTER_SAFE} needed)", file=folder,
                              remedy="give a folder written by `forgetless finetune --lora` or PEFT's save_pretrained")
    cfg = read_json(cfg_file, remedy="fix or restore adapter_config.json")
    if int(cfg.get("r", -1)) != lora.r or float(cfg.get("lora_alpha", -1)) != float(lora.alpha):
        raise ForgetlessError(f"adapter of rank {cfg.get('r')} and alpha {cfg.get('lora_alpha')}, this run trains "
                              f"rank {lora.r} and alpha {lora.alpha:g}", file=cfg_file,
                              remedy="give --lora-r and --lora-alpha as the adapter's")
    tensors = load_file(str(weights))
    return tensors if rename is None else {original.adapter_key(k, rename): v for k, v in tensors.items()}


def _load_init_adapter(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy the adapter's tensors into the run's LoRA parameters: the same names and shapes, every one."""
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        what = (f"{len(missing)} of this run's LoRA tensors are not in it (e.g. {missing[0]})" if missing
                else f"it has {len(extra)} tensors this run does not train (e.g. {extra[0]})")
        raise ForgetlessError(f"the adapter does not match this run's LoRA modules: {what}", file=folder,
                              remedy="train the same --train scope and --lora-target as the adapter was trained on")
    for k, p in params.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise ForgetlessError(f"shape {list(state[k].shape)}, this run's is {list(p.shape)}", file=folder,
                                  tensor=k, remedy="continue an adapter of the same model and rank")
        with torch.no_grad():
            p.copy_(state[k])


# ------------------------------------------------------------------------------------------------ output
def _by_stored_name(trained: dict[str, nn.Parameter], stored: dict[str, str], model: nn.Module
                    ) -> dict[str, nn.Parameter]:
    """Every checkpoint name of a trained parameter (tied copies included) → the parameter."""
    named = dict(model.named_parameters(remove_duplicate=False))
    trained_ids = {id(p) for p in trained.values()}
    return {saved: named[p] for p, saved in stored.items() if id(named[p]) in trained_ids}


def _write_full(model_dir: Path, out: Path, from_model: dict[str, torch.Tensor], meta: dict[str, Any], force: bool,
                tb: TrainingLog | None = None) -> None:
    """Every tensor of the input folder, under its name and dtype: those of ``from_model`` (checkpoint name →
    the trained tensor) from it, all others as the input's own bytes; and the run's TensorBoard events."""
    with CheckpointReader(model_dir) as reader:
        entries = [Entry(n, reader.info(n).shape, reader.info(n).dtype) for n in reader.names()]
        writer = StreamingWriter(out, entries, shard_size=parse_size(SHARD_SIZE), force=force,
                                 metadata={"forgetless_version": __version__, "finetune": "full"})
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
            writer.commit(side_files_from=model_dir, extra_files={"finetune.json": json.dumps(meta, indent=1)})
        except BaseException:
            writer.abort()
            raise


def _write_lora(peft_model: nn.Module, out: Path, meta: dict[str, Any], force: bool,
                tb: TrainingLog | None = None, state: dict[str, torch.Tensor] | None = None,
                rename: Callable[[str], str] | None = None) -> None:
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
def _footprint(model_dir: Path, names: list[str], selected: set[str], layout: layouts.Layout,
               lora: LoraSpec | None, images: bool, **kw: Any) -> TrainFootprint:
    """:func:`train.memory.account` for this run, its trainable values counted on the meta-device model; with
    ``fsdp``, what FSDP2 gathers whole, from the values of its units and root group (LoRA's adapters, small, left
    out of those)."""
    from ..stats.footprint import meta_model

    model = meta_model(model_dir, "float32")
    stored = _stored_names(model, set(names))
    total = sum(p.numel() for p in model.parameters())
    ids = {id(p) for p in _full_params(model, stored, selected).values()} if lora is None else set()
    if kw["fsdp"]:
        root, units = _group_values(model, _shard_units(model, stored, layout, images), ids)
        kw["gathered"] = gathered_bytes(root, units, half=kw["dtype"] == "bfloat16")
    if lora is None:
        trainable = sum(p.numel() for p in model.parameters() if id(p) in ids)
    else:
        modules = _lora_modules(model, stored, selected, lora, layout, names, model_dir)
        linears = dict(model.named_modules())
        trainable = sum(lora.r * (linears[m].in_features + linears[m].out_features) for m in modules)
        total += trainable
    text = model.config.get_text_config()
    with CheckpointReader(model_dir) as reader:  # θ₀ is held in the stored dtype where that is 16-bit
        theta0 = max(reader.info(n).dtype.itemsize for n in selected) if selected else 4
    return account(trainable, total - trainable, hidden=text.hidden_size, layers=text.num_hidden_layers,
                   theta0_bytes=theta0, **kw)


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
                raise ForgetlessError("the stored tensor is not the parameter transformers loaded from it",
                                      file=model_dir, tensor=saved, remedy="fine-tune with --dtype float32")
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


# ------------------------------------------------------------------------------------------------ several processes
@contextlib.contextmanager
def _ranks(dev_name: str, fsdp: bool) -> Iterator[tuple[int, int]]:
    """``(rank, world)`` in torchrun's process group (:func:`stats.distributed.process_group`); with ``fsdp`` on one
    process, in a group of this process alone, so that FSDP2 shards over one rank by the code that shards over
    several."""
    with process_group(dev_name) as (rank, world):
        if not fsdp or dist.is_initialized():
            yield rank, world
            return
        importlib.import_module("torch._dynamo")  # as init_distributed does: imported after the group, it pins it
        backend = "nccl" if torch.device(dev_name).type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        ok = False
        try:
            yield 0, 1
            ok = True
        finally:
            end_process_group(wait=ok)


def _shard_units(model: nn.Module, stored: dict[str, str], layout: layouts.Layout, images: bool) -> list[nn.Module]:
    """The modules FSDP2 shards one by one, each gathered whole only for its own forward and backward: every decoder
    layer of the language model, and the vision tower's layers when every sample has an image. A unit some rank's
    micro-batch skips would leave the others waiting in its all-gather, so a vision tower that text-only samples
    skip stays in the root group, with the embeddings, norms, lm_head and projector (gathered for the whole step)."""
    parts = {"language.layers", *(["vision"] if images else [])}
    units: list[nn.Module] = []
    inside: list[str] = []  # the units' names: a ModuleList within one (experts) is part of it
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or any(name.startswith(u + ".") for u in inside):
            continue
        for i, child in enumerate(mod):
            first = next((f"{name}.{i}.{n}" for n, _ in child.named_parameters()), None)
            if first in stored and layouts.part_of(layout, stored[first]) in parts:
                units.append(child)
                inside.append(f"{name}.{i}")
    return units


def _group_values(model: nn.Module, units: list[nn.Module], trainable: set[int]
                  ) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """``(trainable, frozen)`` values of FSDP2's root group (what no unit holds) and of each unit; ``trainable``:
    the ids of the trainable parameters."""
    def values(params: list[nn.Parameter]) -> tuple[int, int]:
        n = sum(p.numel() for p in params if id(p) in trainable)
        return n, sum(p.numel() for p in params) - n

    inside = {id(p) for u in units for p in u.parameters()}
    return values([p for p in model.parameters() if id(p) not in inside]), [values(list(u.parameters())) for u in units]


def _shard(root: nn.Module, net: nn.Module, units: list[nn.Module], params: dict[str, nn.Parameter],
           dev: torch.device) -> tuple[Any, dict[str, nn.Parameter]]:
    """FSDP2 (``fully_shard``) over the process group's ranks: each unit, then ``root`` (the rest). Returns the
    device mesh and ``params`` (keys as given, of ``net``'s parameters) as the sharded parameters that replace them.
    A tensor a rank's samples do not reach (the projector, text-only) gets a zero gradient there, so that every
    rank reduce-scatters the same tensors (:class:`_Reached` puts None back where no rank reached it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in net.named_parameters()}
    order = [(key, names[id(p)]) for key, p in params.items()]
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(root, mesh=mesh)
    root.set_reduce_scatter_unused_params(True)
    sharded = dict(net.named_parameters())
    return mesh, {key: sharded[name] for key, name in order}


def _forget_group(mesh: Any) -> None:
    """Let the device mesh drop the process group: torch's DTensor dispatch cache keeps the mesh for good, and the
    group's threads end only once nothing holds it."""
    getattr(mesh, "_pg_registry", {}).clear()


class _Reached:
    """Whether the modules of FSDP2's root group that own trainable tensors ran in a step, on any rank. Where no
    rank's samples reached one (no image in the step), FSDP2 still reduce-scatters a zero gradient for its
    tensors, where one process leaves them none and AdamW skips them: :meth:`settle` takes the zeros away."""

    def __init__(self, root: nn.Module, units: list[nn.Module]) -> None:
        inside = {id(m) for u in units for m in u.modules()}
        self.modules = [m for m in root.modules() if id(m) not in inside
                        and any(p.requires_grad for p in m.parameters(recurse=False))]
        self.runs = [0] * len(self.modules)
        for i, m in enumerate(self.modules):
            m.register_forward_pre_hook(functools.partial(self._ran, i))

    def _ran(self, i: int, *_: Any) -> None:
        self.runs[i] += 1

    def settle(self, device: torch.device) -> None:
        """After the step's backward passes, on every rank (an all-reduce): no gradient where no rank ran."""
        runs = torch.tensor(self.runs, dtype=torch.float64, device=device)
        all_reduce_sums({"runs": runs})
        for m, n in zip(self.modules, runs.tolist(), strict=True):
            for p in m.parameters(recurse=False) if n == 0 else []:
                p.grad = None
        self.runs = [0] * len(self.modules)


def _syncing(losses: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Gradients reduced over the ranks after the step's last micro-batch only: DDP's ``no_sync`` and FSDP2's
    ``set_requires_gradient_sync`` keep the others' unreduced, whole, for the next micro-batch to add to."""
    if isinstance(losses, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if last else losses.no_sync()
    if hasattr(losses, "set_requires_gradient_sync"):
        losses.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _clip(params: list[nn.Parameter], clip: float | None) -> float:
    """Scale the gradients to a total 2-norm of at most ``clip`` (None: leave them); returns the norm before. With
    FSDP2's sharded gradients the pieces' norms are reduced over the ranks first (a collective)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, clip if clip is not None else math.inf, norm)
    return float(norm)


def _gather(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Every tensor whole, on rank 0's CPU (the other ranks get {}): a DTensor gathered from its pieces, one at a
    time, once however many names it has. A collective: every rank calls it, with the same tensors in order."""
    seen: set[int] = set()
    whole: dict[int, torch.Tensor] = {}
    for t in tensors.values():
        if id(t) not in seen:
            seen.add(id(t))
            full = (t.full_tensor() if isinstance(t, DTensor) else t).detach()
            if rank == 0:
                whole[id(t)] = full.to("cpu")
    return {name: whole[id(t)] for name, t in tensors.items() if id(t) in whole}


def finetune(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
             train: list[str] | None = None, lora: LoraSpec | None = None, steps: int = 100, batch_size: int = 4,
             grad_accum: int = 1, lr: float = 2e-5, weight_decay: float = 0.0, warmup: int = 0,
             schedule: str = "cosine", min_lr_ratio: float = 0.1, clip: float | None = 1.0, seed: int = 0,
             images: str | os.PathLike | None = None, n: int | None = None,
             hook: StepHook | Callable[[StepInfo], None] | None = None, log: Callable[[str], None] | None = print,
             device: str = "auto", dtype: str = "float32", max_length: int | None = None,
             on_bad_sample: str = "error", keep: str = "none", init_adapter: str | os.PathLike | None = None,
             tensorboard: bool = True, gradient_checkpointing: bool = False, dry_run: bool = False,
             min_pixels: int | None = None, max_pixels: int | None = None, workers: int | None = None,
             fsdp: bool = False, ranks: int | None = None, force: bool = False) -> FinetuneReport | None:
    """Fine-tune the model in ``model_dir`` on ``data`` and write the result to ``out`` (see the module's notes).

    ``train``: layout selectors of the tensors to train (``language.layers[20:30]``, ``projector``, ``lm_head``,
    ``re:<regex>``), checked against the folder's tensor names before the model is loaded. Default: the language
    model, lm_head and the projector for a full fine-tune (the vision tower stays frozen); for LoRA the decoder
    layers, the scope in which ``lora.targets`` picks Linear layers. ``images``: folder of relative image paths
    (default: the data's folder); ``n``: a seeded subset of that many samples. Returns the per-step losses,
    learning rates and gradient norms, also written to ``out/finetune.json``. ``keep``: ``"none"``, ``"spider"``
    or ``"magnitude_mask"``, a rule applied after every step of a full fine-tune (see the module's notes).
    ``init_adapter``: a PEFT adapter folder to continue training (LoRA only): its LoRA weights are the starting
    point instead of PEFT's initialisation (B = 0); it must have the same rank, alpha and adapted weights as this
    run. The optimizer state starts fresh. Sequential fine-tuning, task after task, is one adapter passed on.
    ``tensorboard``: write TensorBoard event files (see the module's notes; skipped, in one line, without the
    tensorboard package). ``workers``: the data loader's processes per rank, encoding the coming micro-batches
    while the model trains (0: in the main process; None: up to 2, none when every sample is kept encoded).
    ``fsdp``: shard the model over the ranks with FSDP2 (see the module's notes). ``ranks``: with ``dry_run``, the
    number of processes the memory per rank is for (default: torchrun's).
    """
    model_dir, out, data = Path(model_dir), Path(out), Path(data)
    rank, world = dist_info()  # torchrun's environment: the checks below run before the process group is joined
    say = log if (log is not None and rank == 0) else (lambda _s: None)
    check_output(out, [model_dir, data, images, init_adapter], force=force)
    if ranks is not None and not dry_run:
        raise ForgetlessError("ranks (--ranks) is the number of processes a dry run accounts for", remedy=(
            "drop --ranks: a run's processes are torchrun's (--nproc-per-node), or add --dry-run"))
    accounted = world if ranks is None else ranks  # the processes the memory per rank is for
    _check_options(model_dir, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                   warmup=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio, clip=clip, dtype=dtype,
                   on_bad_sample=on_bad_sample, lora=lora, world=accounted)
    if keep not in KEEP_RULES:
        raise ForgetlessError(f"unknown keep rule {keep!r}", remedy=f"use one of {', '.join(KEEP_RULES)}")
    if init_adapter is not None and lora is None:
        raise ForgetlessError("init_adapter continues a LoRA adapter; this run is a full fine-tune", file=init_adapter,
                              remedy="pass --lora with the adapter's rank and targets, or drop --init-adapter")
    init_state = None if init_adapter is None else _read_init_adapter(
        Path(init_adapter), lora, rename=original.to_memory if original.is_original(model_dir) else None)
    if lora is not None and keep != "none":
        raise ForgetlessError(f"keep={keep!r} applies to a full fine-tune, not to LoRA", remedy=(
            "drop --lora to fine-tune the weights themselves with --keep, or drop --keep for the LoRA run"))
    methods = hasattr(hook, "before_step") or hasattr(hook, "after_step")
    before = getattr(hook, "before_step", None) if methods else hook
    after = getattr(hook, "after_step", None) if methods else None
    if hook is not None and not callable(before) and not callable(after):
        raise ForgetlessError("the hook has neither before_step nor after_step and is not callable",
                              remedy="pass a function of StepInfo or an object with before_step/after_step")

    # -- which tensors: resolved on the folder's own names, before anything heavy is loaded
    with CheckpointReader(model_dir) as reader:
        names = reader.names()
        layout = layouts.detect_layout(reader.config, names)
        base_fingerprint = reader.weights_fingerprint()
        if lora is None and rank == 0:  # the output is the model as stored: its disk must hold it, before training
            check_free_space(out, sum(reader.info(n).nbytes for n in names), "the fine-tuned model")
    if train is None:
        train = list(DEFAULT_LORA_SCOPE if lora is not None else
                     [s for s in DEFAULT_FULL_SCOPE if s == layouts.LANGUAGE or (s in layout.parts and any(
                         layouts.part_of(layout, n) == s for n in names))])  # a tied lm_head is not stored
    selected = layouts.select(layout, names, train, file=model_dir)
    if lora is not None:
        _check_lora_targets(lora, selected, layout, names, model_dir)

    # -- data
    samples = load_samples(data, image_folder=images, n=n, seed=seed)
    encoder = Encoder(model_dir, max_length=max_length, min_pixels=min_pixels, max_pixels=max_pixels)

    def check_data(rank: int, world: int) -> Feed:
        """Every sample checked once (this rank its share, the findings gathered: a collective), before any work."""
        feed = Feed(samples, encoder, on_bad_sample=on_bad_sample, batch_size=batch_size,
                    micro_batches=steps * grad_accum, seed=seed, rank=rank, world=world, workers=workers)
        for sid, why in feed.skipped[:10]:
            say(f"  skipped {sid}: {why}")
        return feed

    if dry_run:  # the memory per rank, from the model built on the meta device: nothing is loaded
        feed = check_data(0, 1)
        images_everywhere = all(s.image is not None for s in feed.samples)
        footprint = _footprint(model_dir, names, selected, layout, lora, images_everywhere, dtype=dtype, keep=keep,
                               tokens=batch_size // accounted * feed.longest, checkpointing=gradient_checkpointing,
                               world=accounted, fsdp=fsdp, accumulate=grad_accum > 1)
        for line in footprint.lines():
            say(line)
        return None

    dev_name = resolve_device(device)

    def run(rank: int, world: int, feed: Feed, cleanup: contextlib.ExitStack, before: Callable | None,
            after: Callable | None) -> FinetuneReport:
        """The run, in a frame of its own: what it builds (FSDP2's state, DTensors, a DDP wrapper) holds the
        process group, and is gone when the group ends."""
        samples, skipped = feed.samples, feed.skipped
        images_everywhere = all(s.image is not None for s in samples)  # every micro-batch runs the vision tower
        # -- model and trainable tensors
        torch.manual_seed(seed)
        model, dev = load_model(model_dir, dev_name, dtype)  # frozen weights straight in the compute dtype
        model.requires_grad_(False)
        stored = _stored_names(model, set(names))
        units = _shard_units(model, stored, layout, images_everywhere) if fsdp else []
        if lora is None:
            params = _full_params(model, stored, selected)
            frozen = selected - set(stored.values())
            if frozen:
                say(f"  {len(frozen)} selected tensors are not parameters and stay as they are, e.g. {min(frozen)}")
            if not params:
                raise ForgetlessError(f"the selection {train} holds no trainable parameter", file=model_dir,
                                      remedy="select weights of the model (see `forgetless inspect`)")
            for p in params.values():
                p.requires_grad_(True)
            _float32_from_checkpoint(params, model_dir)  # a float32 load's values, bit for bit
            net, hf_model, trained = model, model, sorted(params)
        else:
            from peft import LoraConfig, get_peft_model

            modules = _lora_modules(model, stored, selected, lora, layout, names, model_dir)
            config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                                target_modules=list(modules))
            with _float32_targets(model, modules):  # the adapters' float32 initial values, whatever the dtype
                net = get_peft_model(model, config)
            net.peft_config["default"].base_model_name_or_path = str(model_dir)
            hf_model = net.get_base_model()
            params = {_adapter_key(n): p for n, p in net.named_parameters() if p.requires_grad}
            trained = sorted(modules.values())
            if init_state is not None:
                _load_init_adapter(params, init_state, Path(init_adapter))  # type: ignore[arg-type]
                say(f"  continuing the adapter {init_adapter} ({len(init_state)} tensors)")
        frozen_dtype = _hold_frozen(model, dtype)
        if gradient_checkpointing:  # activations recomputed in the backward, layer by layer
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        net.train()
        losses: nn.Module = _SampleLosses(net, hf_model, _plain_head(hf_model))
        reached = None
        if fsdp:  # after this, the trainable tensors are DTensors: this rank's pieces (reduce-scatters average)
            mesh, params = _shard(losses, net, units, params, dev)
            cleanup.callback(_forget_group, mesh)
            reached = _Reached(losses, units)
        elif world > 1:  # after this, a backward through `losses` all-reduces the gradients (averaged over ranks)
            losses = nn.parallel.DistributedDataParallel(
                losses, device_ids=[dev.index] if dev.type == "cuda" else None, forward_sync_buffers=False,
                find_unused_parameters=True,  # a tensor a rank's samples do not reach (the projector, text-only)
                gradient_as_bucket_view=True)  # the gradients live in the buckets: no second copy

            def drop_ddp() -> None:  # DDP holds the process group: let it go first, so the group's end joins its threads
                nonlocal losses
                del losses

            cleanup.callback(drop_ddp)
        rule = make_rule(keep, params)  # θ₀ (and G) captured now, before any step
        if rule is not None:
            user_before, user_after = before, after

            def before(info: StepInfo) -> None:
                rule.before_step(info)
                if user_before is not None:
                    user_before(info)

            def after(info: StepInfo) -> None:
                rule.after_step(info)
                if user_after is not None:
                    user_after(info)

        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=BETAS, eps=EPS)
        autocast = dtype == "bfloat16"
        per_step = batch_size * grad_accum
        n_params = sum(p.numel() for p in params.values())
        kind = f"LoRA r={lora.r}" if lora else "full"
        parallel = "fsdp" if fsdp else "ddp" if world > 1 else "none"
        spread = (f" × {world} processes ({PARALLEL[parallel]}, {batch_size // world} samples of each batch per rank)"
                  if parallel != "none" else "")
        say(f"finetune ({kind}): {len(trained)} tensors "
            f"({n_params / 1e6:.2f}M trainable parameters) of {model_dir}, {len(samples)} samples"
            f"{f' ({len(skipped)} skipped)' if skipped else ''}, {steps} steps × {per_step} samples "
            f"(batch {batch_size} × accumulation {grad_accum}) on {dev}{spread}, {dtype}")
        if rule is not None:
            say(f"  keep rule {keep}: {rule.extra_bytes() / 2**20:.1f} MiB extra on {dev}"
                f"{' on this rank (its pieces)' if fsdp else ' on every rank' if world > 1 else ''} "
                f"(θ₀{' and G, and scratch for the largest tensor' if keep == 'spider' else ' and mask'})")

        tb = TrainingLog.open(out, say) if tensorboard and rank == 0 else None
        if tb is not None:
            cleanup.callback(tb.close)  # the events flushed however the run ends

        # -- the loop
        batches = feed.batches(dev)  # this rank's share of each micro-batch, encoded ahead by the loader's workers
        cleanup.callback(batches.close)  # the workers end with the run, however it ends

        def next_batch() -> dict[str, torch.Tensor]:
            return next(batches)

        def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                return losses(batch)

        report = FinetuneReport(out=out, kind="lora" if lora else "full", trained=trained, num_samples=len(samples),
                                skipped=skipped)
        t0 = last_log = step_end = time.perf_counter()
        for step in range(1, steps + 1):
            lr_t = lr_at(step, lr=lr, steps=steps, warmup=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr_t
            total = 0.0
            for k in range(grad_accum):
                last = k == grad_accum - 1  # DDP and FSDP2 reduce after the last micro-batch only
                with _syncing(losses, last):
                    per_sample = loss_of(next_batch())
                    (per_sample.sum() * world / per_step).backward()  # the mean over ranks: the sum
                total += per_sample.detach().sum().item()
            if reached is not None:
                reached.settle(dev)
            step_sum = torch.tensor(total, dtype=torch.float64, device=dev)
            all_reduce_sums({"loss": step_sum})
            loss = float(step_sum) / per_step
            if not math.isfinite(loss):
                raise ForgetlessError(f"the loss is {loss} at step {step}", file=model_dir,
                                      remedy="lower --lr, add --warmup or --clip, or use --dtype float32")
            norm = _clip(list(params.values()), clip)
            info = StepInfo(step, steps, lr_t, loss, norm, net, params, optimizer)
            if before is not None:
                before(info)
            optimizer.step()
            if after is not None:
                after(info)
            optimizer.zero_grad(set_to_none=True)
            report.losses.append(loss)
            report.lrs.append(lr_t)
            report.grad_norms.append(norm)

            now = time.perf_counter()
            if tb is not None:
                kept_now = {k: rule.history[-1][k] for k in ("updated_fraction", "mean_c")} if rule is not None else {}
                tb.scalars(step, {"loss": loss, "lr": lr_t, "grad_norm": norm, "epoch": step * per_step / len(samples),
                                  "samples_per_second": per_step / (now - step_end), **kept_now})
            step_end = now
            if step in (1, steps) or now - last_log >= LOG_EVERY_S:
                last_log, elapsed = now, now - t0
                kept = (f"  kept {rule.history[-1]['updated_fraction']:.3f} c̄ {rule.history[-1]['mean_c']:.3f}"
                        if rule is not None else "")
                say(f"  step {step}/{steps}  loss {loss:.4f}  lr {lr_t:.3g}  |g| {norm:.3g}{kept}  "
                    f"{step * per_step / elapsed:.2f} samples/s  ETA {_hms(elapsed / step * (steps - step))}")
        report.seconds = time.perf_counter() - t0
        report.keep = rule.summary() if rule is not None else None
        net.eval()

        # -- the output
        recipe = {"train": train, "lora": asdict(lora) if lora else None, "steps": steps, "batch_size": batch_size,
                  "grad_accum": grad_accum, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
                  "schedule": schedule, "min_lr_ratio": min_lr_ratio, "clip": clip, "seed": seed, "n": n,
                  "dtype": dtype, "optimizer": {"name": "AdamW", "betas": list(BETAS), "eps": EPS},
                  "max_length": max_length, "on_bad_sample": on_bad_sample, "keep": keep,
                  "init_adapter": None if init_adapter is None else str(init_adapter),
                  "gradient_checkpointing": gradient_checkpointing, "pixels": [min_pixels, max_pixels],
                  "workers": feed.workers, "parallel": parallel,
                  "precision": {"trainable": "float32", "optimizer": "float32", "frozen": frozen_dtype}}
        meta = {"forgetless_version": __version__, "kind": report.kind, "base": str(model_dir),
                "base_weights_fingerprint": base_fingerprint, "data": str(data),
                "data_fingerprint": data_fingerprint(data, samples), "num_samples": len(samples),
                "skipped": [list(s) for s in skipped], "recipe": recipe, "trained_tensors": trained,
                "adapter_tensors": sorted(params) if lora else None, "losses": report.losses, "lrs": report.lrs,
                "grad_norms": report.grad_norms, "keep": report.keep, "seconds": round(report.seconds, 3),
                "device": str(dev), "processes": world, "torch": torch.__version__}
        if tb is not None:
            report.tensorboard, meta["tensorboard"] = out / "runs" / tb.name, f"runs/{tb.name}"
        written = (_by_stored_name(params, stored, model) if lora is None else
                   {n: p for n, p in net.named_parameters() if p.requires_grad})
        if fsdp:  # the whole tensors, gathered from the ranks' pieces onto rank 0 (every rank takes part)
            written = _gather(written, rank)
        if rank == 0:  # the others wait for it as the process group ends
            if lora is None:
                _write_full(model_dir, out, written, meta, force, tb)
            else:
                _write_lora(net, out, meta, force, tb, state=written if fsdp else None,
                            rename=original.to_original if original.is_original(model_dir) else None)
            if tb is not None:
                tb.finish()
        say(f"wrote {out}: {steps} steps in {_hms(report.seconds)}, loss {report.losses[0]:.4f} → "
            f"{report.losses[-1]:.4f}")
        return report

    with _ranks(dev_name, fsdp) as (rank, world), contextlib.ExitStack() as cleanup:  # one group, data to output
        return run(rank, world, check_data(rank, world), cleanup, before, after)
