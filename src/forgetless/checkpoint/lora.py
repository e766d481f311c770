"""LoRA adapters folded into their base model on the fly, one tensor at a time.

A model reference ``BASE_DIR+ADAPTER_DIR`` names a Hugging Face model folder and a PEFT LoRA adapter
(``adapter_config.json`` + ``adapter_model.safetensors`` or ``adapter_model.bin``). Adapters trained with the
original LLaVA code also carry ``non_lora_trainables.bin`` (keys like ``base_model.model.model.mm_projector.0.weight``):
full replacement tensors. :class:`AdaptedReader` reads such a pair with the interface of
:class:`~forgetless.checkpoint.reader.CheckpointReader`; ``get`` returns ``W + scale·B·A`` in float32 for the tensors
the adapter changes. No folded copy is ever written.

Adapter keys are mapped onto base tensor names exactly, else through :func:`layout.name_aliases` (an adapter trained
under transformers 5 names ``model.language_model.layers.N`` while the saved llava-hf base says
``language_model.model.layers.N``).

The delta follows PEFT (``peft/tuners/lora/layer.py``, ``get_delta_weight``): ``scale = alpha / r`` (``alpha / √r``
with ``use_rslora``), with ``r`` and ``alpha`` from ``rank_pattern`` / ``alpha_pattern`` where a pattern matches the
module; linear ``B @ A`` (transposed under ``fan_in_fan_out``), embedding ``(B @ A)ᵀ``, convolution
``(B[:, :, 1…] @ A.flatten(1))`` reshaped to the kernel; ``lora_bias`` adds ``scale · lora_B.bias`` to the bias.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from ..errors import ForgetlessError
from ..safeload import read_json
from .layout import name_aliases
from .reader import SAFE_DTYPES, CheckpointReader, TensorInfo, load_bin

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
NON_LORA = "non_lora_trainables.bin"
PEFT_PREFIX = "base_model.model."
FOLD_ROWS = 256  # rows per product in _Lora.delta: a fold's rows do not depend on the block read
MERGE_REMEDY = (
    "merge it with PEFT (model.merge_and_unload().save_pretrained(DIR)) and give that folder instead"
)
CONFIG_BYTES = 16 << 20  # an adapter_config.json is a few KiB
CONFIG_REMEDY = "fix adapter_config.json (the values the adapter was trained with), or save the adapter again"
MAX_UPDATE = (
    1e30  # a bound on |scale·B·A| no trained update nears; float32 ends at 3.4e38 and merges add several
)
GATHER_REMEDY = (
    "save the adapter again with the full parameters gathered (DeepSpeed ZeRO-3: inside "
    "deepspeed.zero.GatheredParameters; FSDP: inside summon_full_params)"
)

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$"
)
_EMB_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$"
)
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")


def parse_model_ref(ref: str) -> tuple[Path, Path | None]:
    """``DIR`` -> (DIR, None); ``DIR+ADAPTER`` -> (DIR, ADAPTER). A whole string that exists is always a model."""
    whole = Path(ref).expanduser()
    if whole.exists():
        return whole, None
    if "+" not in ref:
        raise ForgetlessError(
            "model folder not found",
            file=ref,
            remedy="give a model folder, or BASE_DIR+ADAPTER_DIR for a LoRA fine-tune",
        )
    base_s, adapter_s = ref.rsplit("+", 1)
    base, adapter = Path(base_s).expanduser(), Path(adapter_s).expanduser()
    if not base.is_dir():
        raise ForgetlessError(
            f"base model folder of {ref!r} not found",
            file=base,
            remedy="check the part before '+': a Hugging Face model folder",
        )
    if not adapter.is_dir():
        raise ForgetlessError(
            f"adapter folder of {ref!r} not found",
            file=adapter,
            remedy="check the part after '+': a PEFT adapter folder (adapter_config.json + "
            "adapter_model.safetensors)",
        )
    return base, adapter


def _check_values(cfg: dict[str, Any], f: Path) -> None:
    """The adapter_config.json values the fold reads have PEFT's types and ranges (named where not)."""
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(key, False), bool | None):
            raise ForgetlessError(
                f"{key} must be true or false, got {repr(cfg[key])[:60]}", file=f, remedy=CONFIG_REMEDY
            )
    saved = cfg.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        raise ForgetlessError(
            f"modules_to_save must be a list of module names, got {repr(saved)[:60]}",
            file=f,
            remedy=CONFIG_REMEDY,
        )
    _check_scale("r", cfg.get("r", 8), f, whole=True)
    _check_scale("lora_alpha", cfg.get("lora_alpha", 8), f)
    for key in ("rank_pattern", "alpha_pattern"):
        _check_pattern(key, cfg.get(key, {}), f)


def _check_scale(key: str, v: Any, f: Path, whole: bool = False) -> None:
    """`v` (an adapter_config.json value) is a positive finite number, a whole one when `whole`."""
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok or (whole and v != int(v)):
        raise ForgetlessError(
            f"{key} must be a positive {'whole' if whole else 'finite'} number, got {repr(v)[:60]}",
            file=f,
            remedy=CONFIG_REMEDY,
        )


def _check_pattern(key: str, v: Any, f: Path) -> None:
    """`v` is a PEFT pattern mapping: regular expressions to positive ranks (whole) or alphas."""
    if not isinstance(v, dict):
        raise ForgetlessError(
            f"{key} must be a mapping of module patterns to numbers, got {repr(v)[:60]} (PEFT "
            "cannot load it either)",
            file=f,
            remedy="write {} for no pattern, or save the adapter again",
        )
    for pattern, value in v.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ForgetlessError(
                f"{key}: {pattern[:60]!r} is not a regular expression ({e})", file=f, remedy=CONFIG_REMEDY
            ) from None
        _check_scale(f"{key}[{pattern[:60]!r}]", value, f, whole=key == "rank_pattern")


def _check_tensor(key: str, t: Any, f: Path) -> float:
    """An adapter tensor holds no NaN or Inf (read once, one tensor at a time, and dropped); its largest |entry|."""
    x = t.load() if isinstance(t, _LazyTensor) else t
    if not x.is_floating_point() or x.numel() == 0:
        return 0.0
    lo, hi = (float(v) for v in torch.aminmax(x))  # one pass; NaN and Inf show in the extremes
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ForgetlessError(
            "the adapter holds NaN or Inf values",
            file=f,
            tensor=key,
            remedy="its training diverged or the file is damaged: use an earlier checkpoint of "
            "the adapter, or train it again",
        )
    return max(-lo, hi)


def _check_factor_shape(key: str, t: Any, f: Path) -> None:
    """lora_A / lora_B are 2-D or more and not empty; PEFT's sign of ZeRO-3/FSDP shards not gathered otherwise."""
    if t.dim() < 2 or t.numel() == 0:
        raise ForgetlessError(
            f"LoRA factor of shape {list(t.shape)}: a 1-D or empty lora_A/lora_B means the "
            "DeepSpeed ZeRO-3/FSDP shards were not gathered before save_pretrained() (PEFT warns "
            "of the same)",
            file=f,
            tensor=key,
            remedy=GATHER_REMEDY,
        )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: a pattern key matches a module name that ends with it (at a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class _LazyTensor:
    """One tensor of an open safetensors file: shape and dtype now, the data when ``load``/``float`` is called."""

    def __init__(self, handle: Any, key: str):
        self.handle, self.key = handle, key
        sl = handle.get_slice(key)
        self.shape = torch.Size(sl.get_shape())
        self.dtype = SAFE_DTYPES[sl.get_dtype()]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self) -> torch.Tensor:
        return self.handle.get_tensor(self.key)

    def float(self) -> torch.Tensor:
        return self.load().float()

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """Rows of the tensor (dim 0), read alone."""
        return self.handle.get_slice(self.key)[rows]


@dataclass
class _Lora:
    module: str  # module path as the adapter names it (without base_model.model.)
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    kind: str  # "linear" | "embedding" | "conv"
    fan_in_fan_out: bool

    def shape(self) -> tuple[int, ...]:
        if self.kind == "embedding":
            return (self.A.shape[1], self.B.shape[0])
        if self.kind == "conv":
            return (self.B.shape[0], *self.A.shape[1:])
        out, inp = self.B.shape[0], self.A.shape[1]
        return (inp, out) if self.fan_in_fan_out else (out, inp)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scale) with ``delta == scale * (B @ A).reshape(weight shape)``, in float32."""
        A, B = self.A.float(), self.B.float()
        if self.kind == "embedding" or (self.kind == "linear" and self.fan_in_fan_out):
            return B.T.contiguous(), A.T.contiguous(), self.scale
        if self.kind == "conv":
            return A.flatten(1), B.flatten(1), self.scale
        return A, B, self.scale

    def delta(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """``scale · B @ A`` shaped like the weight; ``rows``: only the weight's rows ``start:stop`` (dim 0). The
        product runs on :data:`FOLD_ROWS`-row chunks aligned to row 0, so a row comes out bit for bit the same
        whatever block asks for it (a BLAS may round a row by the shape of the call it is in)."""
        A, B, _ = self.factors()
        start, stop = rows or (0, B.shape[0])
        first = start - start % FOLD_ROWS  # the chunks that hold the rows asked for, whole
        end = min(stop + -stop % FOLD_ROWS, B.shape[0])
        d = torch.empty(end - first, A.shape[1], dtype=A.dtype, device=A.device)
        for i in range(first, end, FOLD_ROWS):
            torch.matmul(B[i : i + FOLD_ROWS], A, out=d[i - first : i - first + FOLD_ROWS])
        return d[start - first : stop - first].mul_(self.scale).reshape(stop - start, *self.shape()[1:])


class LoraAdapter:
    """A PEFT LoRA adapter (plus LLaVA's ``non_lora_trainables.bin``) mapped onto a base model's tensor names."""

    def __init__(self, path: str | os.PathLike, base_names: Collection[str]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ForgetlessError(
                "adapter folder not found",
                file=self.path,
                remedy="give a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
            )
        base = set(base_names)
        self.config = self._read_config()
        self._check_config()
        self.files: list[Path] = []
        weights = self._load_weights()
        extra = self._load_non_lora()
        self._lora: dict[str, _Lora] = {}
        self._bias: dict[str, tuple[torch.Tensor, float]] = {}  # bias name -> (lora_B.bias, scale)
        self._replace: dict[str, torch.Tensor] = {}
        self._replace_keys: dict[str, tuple[str, str]] = {}  # base name -> (key as stored, file it came from)
        self._build(weights, extra, base)

    # ------------------------------------------------------------------ reading
    def _read_config(self) -> dict[str, Any]:
        f = self.path / ADAPTER_CONFIG
        if not f.exists():
            if (
                (self.path / NON_LORA).exists()
                and not (self.path / ADAPTER_SAFE).exists()
                and not (self.path / ADAPTER_BIN).exists()
            ):
                return {}  # only full replacement tensors
            raise ForgetlessError(
                f"no {ADAPTER_CONFIG}",
                file=self.path,
                remedy="give a PEFT adapter folder saved with save_pretrained()",
            )
        return read_json(f, remedy="fix or restore adapter_config.json", limit=CONFIG_BYTES, expect=dict)

    def _check_config(self) -> None:
        cfg, f = self.config, self.path / ADAPTER_CONFIG
        if not cfg:
            return
        peft_type = str(cfg.get("peft_type") or "LORA").upper()
        if peft_type != "LORA":
            raise ForgetlessError(
                f"PEFT type {peft_type} is not supported (only LoRA)", file=f, remedy=MERGE_REMEDY
            )
        if cfg.get("use_dora"):
            raise ForgetlessError(
                "DoRA adapters (use_dora) are not supported: their update is not W + B·A",
                file=f,
                remedy=MERGE_REMEDY,
            )
        for key in ("target_parameters", "trainable_token_indices", "layer_replication"):
            if cfg.get(key):
                raise ForgetlessError(f"adapters with {key} are not supported", file=f, remedy=MERGE_REMEDY)
        _check_values(cfg, f)

    def _load_weights(self) -> dict[str, Any]:
        """Tensor name -> tensor, or a :class:`_LazyTensor` that reads it from the safetensors file when used (eight
        7B-sized adapters stay on disk until each module is merged)."""
        safe, binf = self.path / ADAPTER_SAFE, self.path / ADAPTER_BIN
        if safe.exists():
            from safetensors import SafetensorError, safe_open

            try:
                handle = safe_open(
                    str(safe), framework="pt"
                )  # checks the header covers the file: truncation fails here
                lazy = {k: _LazyTensor(handle, k) for k in handle.keys()}  # noqa: SIM118 (not iterable)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ForgetlessError(
                    f"cannot read ({e})",
                    file=safe,
                    remedy="the file is damaged or incomplete; save the adapter again",
                ) from None
            self.files.append(safe)
            return lazy
        if binf.exists():
            self.files.append(binf)
            return load_bin(binf)
        if self.config:
            raise ForgetlessError(
                f"no adapter weights ({ADAPTER_SAFE} or {ADAPTER_BIN})",
                file=self.path,
                remedy="give a PEFT adapter folder saved with save_pretrained()",
            )
        return {}

    def _load_non_lora(self) -> dict[str, torch.Tensor]:
        f = self.path / NON_LORA
        if not f.exists():
            return {}
        self.files.append(f)
        return load_bin(f)

    # ------------------------------------------------------------------ mapping onto the base
    def _build(
        self, weights: dict[str, torch.Tensor], extra: dict[str, torch.Tensor], base: set[str]
    ) -> None:
        """Map the adapter's tensors onto the base's names: LoRA pairs, bias updates and full replacements; an
        adapter tensor that matches no base tensor is an error listing them."""
        self._base_names = base
        unmapped: list[str] = []
        pairs, peaks = self._pairs(weights, unmapped)
        for key, t in extra.items():
            _check_tensor(key, t, self.path / NON_LORA)
            self._add_replacement(key.removeprefix(PEFT_PREFIX), key, t, self._resolve, unmapped, NON_LORA)
        for module, slots in pairs.items():
            self._add_pair(module, slots, peaks, unmapped)
        if unmapped:
            shown = ", ".join(unmapped[:4]) + (f" (+{len(unmapped) - 4} more)" if len(unmapped) > 4 else "")
            raise ForgetlessError(
                f"{len(unmapped)} adapter tensor(s) match no tensor of the base model: {shown}",
                file=self.path,
                remedy="check that the adapter was trained on this base model",
            )

    def _resolve(self, name: str) -> str | None:
        """The base's name for ``name``, under either naming of its family; None if it has none."""
        if name in self._base_names:
            return name
        hits = [a for a in name_aliases(name) if a in self._base_names]
        return hits[0] if len(hits) == 1 else None

    def _pairs(
        self, weights: dict[str, torch.Tensor], unmapped: list[str]
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[tuple[str, str], float]]:
        """The adapter file's LoRA factors by module and slot, and each one's largest |entry|; its other tensors
        (modules_to_save copies, a saved embedding) added as replacements."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        peaks: dict[tuple[str, str], float] = {}  # (module, slot) -> largest |entry|
        for key, t in weights.items():
            k = key.removeprefix(PEFT_PREFIX)
            if "lora_magnitude_vector" in k:
                raise ForgetlessError(
                    "DoRA adapters are not supported: their update is not W + B·A",
                    file=self.files[0],
                    tensor=key,
                    remedy=MERGE_REMEDY,
                )
            peak = _check_tensor(key, t, self.files[0])
            m = _LORA_KEY.match(k) or _EMB_KEY.match(k)
            if (
                m is None
            ):  # ``<module>.base_layer.weight``: the full embedding PEFT saves with save_embedding_layers
                full = _MODULES_TO_SAVE.sub(".", k).replace(".base_layer.", ".")
                self._add_replacement(full, key, t, self._resolve, unmapped, ADAPTER_SAFE)
                continue
            if m.groupdict().get("param") != "bias":
                _check_factor_shape(key, t, self.files[0])
            slot = m.group("kind") + ("." + m.group("param") if "param" in m.groupdict() else "")
            pairs.setdefault(m.group("module"), {})[slot] = t
            peaks[m.group("module"), slot] = peak
        return pairs, peaks

    def _add_pair(
        self,
        module: str,
        slots: dict[str, torch.Tensor],
        peaks: dict[tuple[str, str], float],
        unmapped: list[str],
    ) -> None:
        """One module's LoRA update (and bias update), checked against the config's rank and a float32 bound."""
        emb = "lora_embedding_A" in slots or "lora_embedding_B" in slots
        a_slot, b_slot = (
            ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        )
        A, B = slots.get(a_slot), slots.get(b_slot)
        if A is None or B is None:
            raise ForgetlessError(
                f"module {module} has only one of its two LoRA factors",
                file=self.files[0],
                remedy="the adapter file is incomplete; save the adapter again",
            )
        kind = "embedding" if emb else "conv" if A.dim() > 2 else "linear"
        target = self._resolve(module + ".weight")
        if target is None:
            unmapped.append(f"{PEFT_PREFIX}{module}")
            return
        scale = self._scale(module, A, B, kind)
        self._check_update(module, scale, A.shape[0], peaks[module, a_slot], peaks[module, b_slot])
        fifo = bool(self.config.get("fan_in_fan_out"))
        self._lora[target] = _Lora(module, A, B, float(scale), kind, fifo and kind == "linear")
        if "lora_B.bias" in slots:
            bias = self._resolve(module + ".bias")
            if bias is None:
                unmapped.append(f"{PEFT_PREFIX}{module}.lora_B.bias")
                return
            self._bias[bias] = (slots["lora_B.bias"], float(scale))

    def _scale(self, module: str, A: torch.Tensor, B: torch.Tensor, kind: str) -> float:
        """PEFT's scale for this module, alpha / r (rsLoRA: alpha / √r), after checking r against lora_A's rank."""
        cfg = self.config
        r = _pattern_value(cfg.get("rank_pattern", {}), module, cfg.get("r", 8))
        alpha = _pattern_value(cfg.get("alpha_pattern", {}), module, cfg.get("lora_alpha", 8))
        if A.shape[0] != r:
            raise ForgetlessError(
                f"{ADAPTER_CONFIG} gives r={r} for {module} but its lora_A has rank {A.shape[0]}",
                file=self.path / ADAPTER_CONFIG,
                remedy="use the adapter_config.json saved with these weights",
            )
        if kind == "conv" and any(s != 1 for s in B.shape[2:]):
            raise ForgetlessError(
                f"LoRA on {module} has a lora_B kernel {tuple(B.shape[2:])}, not 1×1",
                file=self.files[0],
                remedy=MERGE_REMEDY,
            )
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def _check_update(self, module: str, scale: float, rank: int, peak_a: float, peak_b: float) -> None:
        """``scale · B @ A`` stays far inside float32 (bounded by scale · rank · max|A| · max|B|), else a merge
        would overflow to Inf: refused, with the numbers that make it."""
        bound = scale * rank * peak_a * peak_b
        if not bound < MAX_UPDATE:
            raise ForgetlessError(
                f"the update of {module} can reach {bound:.3g} (scale {scale:.3g}, rank {rank}, "
                f"largest |A| {peak_a:.3g}, |B| {peak_b:.3g}), far beyond any trained adapter's",
                file=self.path,
                remedy="check lora_alpha / alpha_pattern in adapter_config.json "
                "and the factors; save the adapter again",
            )

    def _add_replacement(
        self, name: str, key: str, t: torch.Tensor, resolve, unmapped: list[str], source: str
    ) -> None:
        target = resolve(name)
        if target is None:
            unmapped.append(key)
        elif target in self._replace:
            raise ForgetlessError(
                "tensor given twice by the adapter (adapter_model and non_lora_trainables)",
                file=self.path,
                tensor=target,
                remedy="keep one of the two copies",
            )
        else:
            self._replace[target] = t
            self._replace_keys[target] = (key, source)

    # ------------------------------------------------------------------ queries
    def targets(self) -> set[str]:
        """Base tensor names this adapter changes."""
        return set(self._lora) | set(self._bias) | set(self._replace)

    def shape_of(self, name: str) -> tuple[int, ...] | None:
        """The shape the adapter implies for a targeted tensor (to check against the base), else None."""
        if name in self._lora:
            return self._lora[name].shape()
        if name in self._bias:
            return tuple(self._bias[name][0].shape)
        if name in self._replace:
            return tuple(self._replace[name].shape)
        return None

    def delta(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """``scale · B @ A`` in float32, shaped like the weight (``rows``: its rows ``start:stop`` only); None where
        there is no LoRA (a replacement alone)."""
        if name in self._lora:
            return self._lora[name].delta(rows)
        if name in self._bias:
            b, scale = self._bias[name]
            return _rows(b, rows).float() * scale
        return None

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, B, scale)`` in float32 with ``delta == scale * (B @ A).reshape(weight.shape)``; None if not LoRA."""
        lora = self._lora.get(name)
        return lora.factors() if lora else None

    def loras(self) -> Mapping[str, _Lora]:
        """Base weight name -> its LoRA pair (factors read when used); a read-only view, not a copy."""
        return MappingProxyType(self._lora)

    def lora_biases(self) -> set[str]:
        """Base bias names the adapter changes through ``lora_B.bias`` (``lora_bias=True``)."""
        return set(self._bias)

    def replacements(self) -> dict[str, tuple[str, str, torch.dtype]]:
        """Base name -> (key as the adapter stores it, the file that holds it: adapter_model / non_lora, dtype)."""
        return {n: (*kf, self._replace[n].dtype) for n, kf in self._replace_keys.items()}

    def replacement(self, name: str) -> torch.Tensor | None:
        t = self._replace.get(name)
        return None if t is None else t.float()

    def apply(
        self, name: str, base: torch.Tensor | None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The adapted tensor in float32: (replacement or base) + delta; untouched tensors come back as given.

        ``base`` may be None for a tensor the adapter replaces (see :meth:`replacement`). ``rows``: `base` is the
        rows ``start:stop`` (dim 0) of the tensor, and so is the result.
        """
        if name not in self.targets():
            if base is None:
                raise KeyError(name)
            return base
        w = _rows(self._replace[name], rows) if name in self._replace else base
        if w is None:
            raise KeyError(name)
        d = self.delta(name, rows)
        return w.float().clone() if d is None else w.float() + d

    def other_base(self, base: str | os.PathLike) -> str | None:
        """``base_model_name_or_path`` when it names another model than the folder `base`, else None (also when
        it names none). A path that exists here matches by its real path; a Hub id, or a path from another
        machine, by its last part: the folder's name, or the Hub cache's ``models--ORG--NAME`` above it."""
        name = self.config.get("base_model_name_or_path")
        if not name:
            return None
        name, folder = str(name), Path(base).resolve()
        given = Path(name).expanduser()
        try:
            here = given.exists()
        except (OSError, ValueError):  # a name too long or with a NUL byte names no folder here
            here = False
        if here:
            return None if given.resolve() == folder else name
        tail = [p.lower() for p in name.replace("\\", "/").split("/") if p]
        parts = [p.lower() for p in folder.parts]
        return None if tail and (parts[-1] == tail[-1] or "models--" + "--".join(tail) in parts) else name

    def fingerprint(self) -> str:
        """Full SHA-256 of the adapter files (adapters are small)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.name}\n".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        cfg = self.path / ADAPTER_CONFIG
        if cfg.exists():
            h.update(cfg.read_bytes())
        return h.hexdigest()[:16]


class AdaptedReader:
    """A base :class:`CheckpointReader` with a :class:`LoraAdapter` folded in, read like a model folder.

    ``get`` returns base+delta (or the replacement) in float32 for the adapter's targets, while ``info().dtype``
    stays the base dtype. ``raw(name)`` of a targeted tensor falls back to the adapted tensor cast to that dtype
    (so stored bytes and ``info`` stay consistent); ``is_untouched(name)`` tells a caller when ``raw`` is a plain
    copy of the base file.
    """

    def __init__(self, base: CheckpointReader, adapter: LoraAdapter):
        self.base = base
        self.adapter = adapter
        self.path = base.path
        self.adapter_path = adapter.path
        self.config = base.config
        self.infos = base.infos
        self.format = base.format
        self._targets = adapter.targets()
        for name in sorted(self._targets):
            want, have = adapter.shape_of(name), base.info(name).shape
            if want != have:
                raise ForgetlessError(
                    f"adapter implies shape {list(want or ())}, the base has {list(have)}",
                    file=adapter.path,
                    tensor=name,
                    remedy="check that the adapter was trained on this base model",
                )

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def targets(self) -> set[str]:
        return set(self._targets)

    def is_untouched(self, name: str) -> bool:
        return name not in self._targets

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A fresh tensor: float32 base+delta for the adapter's targets, the stored tensor otherwise; ``rows``: its
        rows ``start:stop`` (dim 0) only."""
        if name not in self._targets:
            return self.base.get(name, rows)
        replaced = name in self.adapter.replacements()
        return self.adapter.apply(name, None if replaced else self.base.get(name, rows), rows)

    def raw(self, name: str, rows: tuple[int, int] | None = None) -> bytes | bytearray:
        if name not in self._targets:
            return self.base.raw(name, rows)
        t = self.get(name, rows).to(self.info(name).dtype).contiguous()
        return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""

    def files(self) -> list[Path]:
        return [*self.base.files(), *self.adapter.files]

    def fingerprint(self) -> str:
        """Structure of the base (names and shapes): adapting changes no name or shape."""
        return self.base.fingerprint()

    def weights_fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.base.weights_fingerprint()}+{self.adapter.fingerprint()}".encode())
        return h.hexdigest()[:16]

    def close(self) -> None:
        self.base.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _rows(t: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return t if rows is None else t[rows[0] : rows[1]]


def open_model(ref: str) -> CheckpointReader | AdaptedReader:
    """The one entry point: ``DIR`` opens a model folder, ``DIR+ADAPTER`` that folder with a LoRA adapter folded in."""
    base_path, adapter_path = parse_model_ref(ref)
    reader = CheckpointReader(base_path)
    if adapter_path is None:
        return reader
    try:
        return AdaptedReader(reader, LoraAdapter(adapter_path, reader.names()))
    except BaseException:
        reader.close()
        raise
