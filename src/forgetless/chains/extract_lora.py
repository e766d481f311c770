"""`forgetless extract-lora BASE FINETUNED --rank R --out ADAPTER`: a full fine-tune as a PEFT LoRA adapter.

For every Linear weight in scope that the fine-tune changed, Δ = W_ft − W_0 (float32, on ``device``) is factored by
its truncated SVD U·S·Vᵀ at rank r = min(R, out, in) — exact by default, or the randomized range finder of
:mod:`.methods.adapter` (``svd="randomized"``) — and written as ``lora_A = √S·Vᵀ``, ``lora_B = U·√S`` (the
singular values split evenly between the factors, as mergekit-extract-lora's default) with ``lora_alpha = r``: PEFT's
scale is 1, so ``B @ A · scale`` is the rank-r truncation of Δ, and a module whose smaller side is below R is
written whole at that side (``rank_pattern`` / ``alpha_pattern`` name it).

A changed tensor LoRA cannot carry (a norm, an embedding, a convolution, a Linear's bias) has its module written
whole, with the fine-tune's values, under ``modules_to_save`` (what mergekit-extract-lora does with embeddings and
modules it cannot decompose); a Linear saved so is not factored. A changed tensor that two modules share (an
embedding tied to lm_head) or that belongs to a module holding Linear layers cannot be saved so and is refused.
``linear_only`` leaves every such change out instead (listed in the card): an adapter of Linear deltas alone, as
LPM (`continual add`) takes them.
Tensors equal in both models are left out; tensors outside the scope are not read.

Module paths are the ones PEFT finds on the model transformers loads (LLaVA and Qwen2-VL under transformers 5:
``model.language_model.layers.N…``), and an original LLaVA folder's own names, as ``forgetless finetune --lora``
writes its adapters. One tensor of each model is read at a time; the factors are kept in a temporary folder beside
the output until the last module is factored, then written with the model card (each module's relative error
‖Δ − BA‖_F / ‖Δ‖_F of the factors as written, and the energy ‖BA‖²_F / ‖Δ‖²_F they retain) and renamed into place.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from ..checkpoint import layout as layouts
from ..checkpoint import original
from ..checkpoint.guard import check_output
from ..checkpoint.lora import ADAPTER_CONFIG, ADAPTER_SAFE, PEFT_PREFIX
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.writer import Entry, StreamingWriter, temp_folder
from ..engine.checks import check_structure
from ..errors import ForgetlessError
from ..methods.adapter import randomized_svd, truncated_svd
from ..methods.linalg import resolve_device

SVDS = ("exact", "randomized")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CARD = "README.md"


@dataclass(frozen=True)
class _Linear:
    """A Linear layer LoRA may carry: its PEFT module path and its weight's checkpoint name and shape."""

    module: str
    weight: str
    shape: tuple[int, int]


@dataclass(frozen=True)
class _Options:
    rank: int
    svd: str
    dtype: str
    scope: tuple[str, ...]
    linear_only: bool = False


@dataclass(frozen=True)
class ModuleRow:
    """One factored module: its path in the adapter, weight shape, rank, and how well the written factors reproduce Δ."""

    module: str
    shape: tuple[int, int]
    rank: int
    error: float  # ‖Δ − BA‖_F / ‖Δ‖_F, with A and B as written
    energy: float  # ‖BA‖²_F / ‖Δ‖²_F (Σᵢ≤r σᵢ² / Σ σᵢ² for the exact SVD)
    norm: float  # ‖Δ‖_F


@dataclass
class ExtractReport:
    out: Path
    modules: list[ModuleRow] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # modules written whole (modules_to_save)
    seconds: float = 0.0
    left_out: list[str] = field(default_factory=list)  # changed tensors not carried (``linear_only``)

    def error(self) -> float:
        """The relative error of the whole update: √(Σ err²·‖Δ‖²) / √(Σ ‖Δ‖²) over the factored modules."""
        total = sum(m.norm**2 for m in self.modules)
        lost = sum((m.error * m.norm) ** 2 for m in self.modules)
        return math.sqrt(lost / total) if total else 0.0


@dataclass
class _Targets:
    """What the scope offers: the Linear layers LoRA may carry, and every other parameter's owning module."""

    linears: dict[str, _Linear]  # weight checkpoint name -> its Linear
    owners: dict[str, str]  # other parameters' checkpoint name -> the module (in-memory path) holding it
    tied: set[str]  # checkpoint names two modules share
    model: nn.Module  # on the meta device
    stored: dict[str, str]  # in-memory parameter name -> checkpoint name
    rename: Callable[[str], str]  # in-memory module path -> the path the adapter names it by


# ---------------------------------------------------------------------------------------------- the entry point
def extract_lora(
    base: str | Path,
    finetuned: str | Path,
    *,
    rank: int,
    out: str | Path,
    scope: list[str] | None = None,
    svd: str = "exact",
    device: str = "auto",
    dtype: str = "float32",
    linear_only: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = print,
) -> ExtractReport:
    """Write the rank-`rank` LoRA adapter of FINETUNED − BASE to `out` (module docstring); ``dtype``: the
    factors' dtype (tensors saved whole keep the fine-tune's); ``linear_only``: the changed tensors LoRA cannot
    carry are left out, not saved whole (the adapter then holds Linear deltas alone, as LPM takes them)."""
    started = time.perf_counter()
    base, finetuned, out = Path(base), Path(finetuned), Path(out)
    _check_options(rank, svd, dtype)
    opts = _Options(rank, svd, dtype, tuple(scope or ()), linear_only)
    dev = _device(device)
    check_output(out, [base, finetuned], force=force)
    with CheckpointReader(base) as b, CheckpointReader(finetuned) as f:
        _check_same_model(b, f)
        targets = _targets(base, b, scope)
        changed = [name for name in targets.owners if _changed(b, f, name)]
        saved = set() if linear_only else _saved_modules(f, targets, changed)
        spill = temp_folder(out)
        try:
            rows = _factor_all(b, f, targets, saved, opts, dev, spill, log)
            if not rows and not saved:
                raise ForgetlessError(
                    "the fine-tune equals the base on every "
                    + ("Linear weight" if linear_only and changed else "tensor")
                    + " in scope: there is nothing to extract",
                    file=finetuned,
                    remedy="check the folders, or widen --scope"
                    + (
                        " (its other changes are left out with --linear-only)"
                        if linear_only and changed
                        else ""
                    ),
                )
            named = sorted(targets.rename(m) for m in saved)
            left = sorted(changed) if linear_only else []
            report = ExtractReport(out, rows, named, time.perf_counter() - started, left)
            files = {
                ADAPTER_CONFIG: json.dumps(_config(rows, named, base), indent=2) + "\n",
                CARD: _card(report, base, finetuned, opts),
            }
            _write(out, rows, _whole_tensors(targets, saved), f, spill, DTYPES[dtype], files, force)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
    if log is not None:
        log(
            f"extract-lora: {len(rows)} Linear layer(s) factored (relative error of the whole update "
            f"{report.error():.3e}), {len(saved)} module(s) saved whole, {len(report.left_out)} changed "
            f"tensor(s) left out → {out}"
        )
    return report


# ---------------------------------------------------------------------------------------------- checks
def _check_options(rank: Any, svd: str, dtype: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ForgetlessError(
            f"rank must be a whole number of at least 1, got {rank!r}",
            remedy="give --rank R (e.g. 16; a rank above a weight's smaller side keeps that weight whole)",
        )
    if svd not in SVDS:
        raise ForgetlessError(
            f"svd must be exact or randomized, got {svd!r}", remedy="--svd exact|randomized"
        )
    if dtype not in DTYPES:
        raise ForgetlessError(
            f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", remedy="--dtype float32 (default)"
        )


def _device(device: str) -> torch.device:
    try:
        return resolve_device(device)
    except ValueError as e:
        raise ForgetlessError(f"--device: {e}", remedy="give auto, cpu, cuda or cuda:N") from None


def _check_same_model(base: CheckpointReader, ft: CheckpointReader) -> None:
    """The two folders are one architecture: the same model type and the same tensor names and shapes."""
    kinds = [(r.config.get("model_type"), r.config.get("architectures")) for r in (base, ft)]
    if kinds[0] != kinds[1]:
        raise ForgetlessError(
            f"the fine-tune is a {kinds[1][0]} {kinds[1][1]}, the base a {kinds[0][0]} {kinds[0][1]}",
            file=ft.path / "config.json",
            remedy="give the fine-tune of this base (same architecture)",
        )
    check_structure(base, ft, "the fine-tune")


# ---------------------------------------------------------------------------------------------- what to extract
def _targets(base_dir: Path, reader: CheckpointReader, scope: list[str] | None) -> _Targets:
    """The scope's Linear weights and other parameters, named as the base folder stores them."""
    from ..stats.footprint import meta_model
    from ..train.targets import stored_names

    names = reader.names()
    selected = set(names)
    if scope:
        layout = layouts.detect_layout(reader.config, names)
        selected = layouts.select(layout, names, scope, file="--scope")
    model = meta_model(base_dir, "float32")
    stored = stored_names(model, set(names))
    claims = Counter(stored.values())
    linears: dict[str, _Linear] = {}
    owners: dict[str, str] = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            ckpt = stored.get(f"{mname}.{pname}" if mname else pname)
            if ckpt is None or ckpt not in selected:
                continue
            if isinstance(mod, nn.Linear) and pname == "weight" and claims[ckpt] == 1:
                linears[ckpt] = _Linear(mname, ckpt, tuple(reader.info(ckpt).shape))
            else:
                owners.setdefault(ckpt, mname)
    tied = {n for n, k in claims.items() if k > 1 and n in selected}
    rename = _original_module if original.is_original(base_dir) else str
    return _Targets(linears, owners, tied, model, stored, rename)


def _original_module(module: str) -> str:
    """An in-memory module path as an original LLaVA folder names it (the renaming works on prefixes that end in
    a dot: ``model.multi_modal_projector.linear_1.`` → ``model.mm_projector.0.``)."""
    return original.to_original(module + ".")[:-1]


def _changed(base: CheckpointReader, ft: CheckpointReader, name: str) -> bool:
    return not torch.equal(base.get(name).float(), ft.get(name).float())


def _saved_modules(ft: CheckpointReader, t: _Targets, changed: list[str]) -> set[str]:
    """The modules (in-memory paths) of the `changed` parameters LoRA cannot carry, to be saved whole; refused
    for a changed tensor two modules share or one of a module that holds Linear layers."""
    modules = dict(t.model.named_modules())
    saved: set[str] = set()
    for name in changed:
        owner = t.owners[name]
        if name in t.tied:
            raise ForgetlessError(
                f"the fine-tune changed {name}, which two modules share (an embedding tied to lm_head): "
                "PEFT's modules_to_save would untie them",
                file=ft.path,
                tensor=name,
                remedy="leave it out with --scope or --linear-only (the adapter then does not carry its change)",
            )
        mod = modules[owner]
        if not isinstance(mod, nn.Linear) and any(isinstance(m, nn.Linear) for m in mod.modules()):
            raise ForgetlessError(
                f"the fine-tune changed {name}, a parameter of {owner}, which holds Linear layers: saving "
                "it whole would also replace their LoRA",
                file=ft.path,
                tensor=name,
                remedy="leave it out with --scope or --linear-only (the adapter then does not carry its change)",
            )
        saved.add(owner)
    return {m for m in saved if not any(m.startswith(o + ".") for o in saved)}


def _whole_tensors(t: _Targets, saved: set[str]) -> dict[str, str]:
    """The parameters of the modules saved whole: checkpoint name -> the adapter's key."""
    modules = dict(t.model.named_modules())
    out = {}
    for module in sorted(saved):
        for pname, _ in modules[module].named_parameters():
            ckpt = t.stored.get(f"{module}.{pname}")
            if ckpt is not None:
                out[ckpt] = PEFT_PREFIX + t.rename(f"{module}.{pname}")
    return out


# ---------------------------------------------------------------------------------------------- the factors
def balanced(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Vᵀ, U·S)`` as ``(√S·Vᵀ, U·√S)``: S is the norm of each column of U·S (U has orthonormal columns)."""
    root = B.norm(dim=0).sqrt()
    inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    return (A * root[:, None]).contiguous(), (B * inv).contiguous()


def factor(
    delta: torch.Tensor, rank: int, svd: str = "exact", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """`delta`'s rank-`rank` factors ``(A, B)`` in `dtype` (on delta's device), the relative error of ``B @ A``
    as written and the energy it retains."""
    A, B = truncated_svd(delta, rank) if svd == "exact" else randomized_svd(delta, rank)
    A, B = balanced(A, B)
    norm2 = float(delta.square().sum())
    kept = float((B @ A).square().sum())
    A, B = A.to(dtype), B.to(dtype)
    lost = float((delta - B.float() @ A.float()).square().sum())
    return A, B, math.sqrt(lost / norm2), kept / norm2


def _factor_all(
    base: CheckpointReader,
    ft: CheckpointReader,
    t: _Targets,
    saved: set[str],
    opts: _Options,
    dev: torch.device,
    spill: Path,
    log: Callable[[str], None] | None,
) -> list[ModuleRow]:
    """Factor every changed Linear not saved whole, one at a time, its factors spilled to ``spill/N.safetensors``;
    the rows name the modules as the adapter does."""
    rows: list[ModuleRow] = []
    todo = [
        lin
        for lin in t.linears.values()
        if not any(lin.module == m or lin.module.startswith(m + ".") for m in saved)
    ]
    for i, lin in enumerate(todo, 1):
        delta = ft.get(lin.weight).to(dev, torch.float32) - base.get(lin.weight).to(dev, torch.float32)
        if bool(delta.any()):
            r = min(opts.rank, *lin.shape)
            A, B, err, energy = factor(delta, r, opts.svd, DTYPES[opts.dtype])
            save_file({"A": A.cpu(), "B": B.cpu()}, str(spill / f"{len(rows)}.safetensors"))
            rows.append(ModuleRow(t.rename(lin.module), lin.shape, r, err, energy, float(delta.norm())))
        del delta
        if log is not None and i % 50 == 0:
            log(f"  {i}/{len(todo)} Linear layers read")
    return rows


# ---------------------------------------------------------------------------------------------- writing
def _config(rows: list[ModuleRow], saved: list[str], base_dir: Path) -> dict[str, Any]:
    """adapter_config.json: ``r`` the commonest rank, ``lora_alpha = r`` (scale 1), the others by pattern."""
    ranks = Counter(m.rank for m in rows)
    r = ranks.most_common(1)[0][0] if rows else 1
    others = {re.escape(m.module): m.rank for m in rows if m.rank != r}
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base_dir.resolve()),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": [m.module for m in rows],
        "modules_to_save": saved or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _card(report: ExtractReport, base: Path, finetuned: Path, opts: _Options) -> str:
    """README.md: what was done, and each module's rank, relative error and retained energy."""
    total = sum(m.norm**2 for m in report.modules)
    kept = sum(m.energy * m.norm**2 for m in report.modules) / total if total else 1.0
    scope = ", ".join(opts.scope) or "every tensor"
    lines = [
        "# LoRA adapter extracted from a full fine-tune",
        "",
        (
            f"Written by forgetless {__version__} (`forgetless extract-lora`) in {report.seconds:.1f} s: the "
            "truncated SVD U·S·Vᵀ of Δ = W_ft − W_0 of every changed Linear layer, written as "
            "lora_A = √S·Vᵀ, lora_B = U·√S with lora_alpha = r (PEFT's scale 1)."
        ),
        "",
        f"- base: `{base}`",
        f"- fine-tune: `{finetuned}`",
        f"- rank {opts.rank} ({opts.svd} SVD), factors in {opts.dtype}; scope: {scope}",
        (
            f"- {len(report.modules)} Linear layer(s) factored; relative error of the whole update "
            f"{report.error():.6e}, energy retained {kept:.6f}"
        ),
        f"- saved whole (modules_to_save, the fine-tune's values): {', '.join(report.saved) or 'none'}",
        *(
            [
                f"- left out (--linear-only: the adapter does not carry their change): {', '.join(report.left_out)}"
            ]
            if opts.linear_only
            else []
        ),
        "",
        "| module | shape | rank | relative error ‖Δ − BA‖_F / ‖Δ‖_F | energy retained ‖BA‖²_F / ‖Δ‖²_F |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {m.module} | {m.shape[0]}×{m.shape[1]} | {m.rank} | {m.error:.6e} | {m.energy:.8f} |"
        for m in report.modules
    ]
    return "\n".join(lines) + "\n"


def _write(
    out: Path,
    rows: list[ModuleRow],
    whole: dict[str, str],
    ft: CheckpointReader,
    spill: Path,
    dtype: torch.dtype,
    files: dict[str, str],
    force: bool,
) -> None:
    """adapter_model.safetensors (every module's factors, then the tensors of the modules saved whole, `whole`:
    checkpoint name -> key), its config and card, renamed into place."""
    keys = [PEFT_PREFIX + m.module for m in rows]
    entries: list[Entry] = []
    for key, m in zip(keys, rows):
        entries.append(Entry(f"{key}.lora_A.weight", (m.rank, m.shape[1]), dtype))
        entries.append(Entry(f"{key}.lora_B.weight", (m.shape[0], m.rank), dtype))
    entries += [Entry(key, ft.info(n).shape, ft.info(n).dtype) for n, key in whole.items()]
    size = sum(e.nbytes for e in entries) + 1  # one file
    writer = StreamingWriter(out, entries, shard_size=size, force=force, single_name=ADAPTER_SAFE)
    try:
        for i, key in enumerate(keys):
            with safe_open(str(spill / f"{i}.safetensors"), framework="pt") as h:
                writer.write(f"{key}.lora_A.weight", h.get_tensor("A"))
                writer.write(f"{key}.lora_B.weight", h.get_tensor("B"))
        for n, key in whole.items():
            writer.write(key, ft.raw(n))
        writer.commit(extra_files=files)
    except BaseException:
        writer.abort()
        raise
