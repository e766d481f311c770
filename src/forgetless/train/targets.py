"""What a fine-tune trains: the parameters behind the folder's selected tensor names, LoRA's target modules, and
an adapter a run continues."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import layout as layouts
from ..checkpoint import original
from ..errors import ForgetlessError
from ..stats.fisher import checkpoint_names
from .config import LoraSpec


def stored_names(model: nn.Module, names: set[str]) -> dict[str, str]:
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


def full_params(model: nn.Module, stored: dict[str, str], selected: set[str]) -> dict[str, nn.Parameter]:
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


def is_selector(entry: str, layout: layouts.Layout) -> bool:
    return entry.startswith("re:") or entry.split("[")[0] in (layouts.LANGUAGE, *layout.parts)


def lora_modules(
    model: nn.Module,
    stored: dict[str, str],
    scope: set[str],
    spec: LoraSpec,
    layout: layouts.Layout,
    names: list[str],
    model_dir: Path,
) -> dict[str, str]:
    """Module name (as PEFT sees it) → checkpoint weight name, for every Linear in scope that ``spec`` targets."""
    linears = {
        m: stored[f"{m}.weight"]
        for m, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and stored.get(f"{m}.weight") in scope
    }
    if not linears:
        raise ForgetlessError(
            "no Linear layer in the LoRA scope",
            file=model_dir,
            remedy="widen --train (LoRA adapts Linear layers; default: language.layers)",
        )
    if not spec.targets:
        return linears
    chosen: dict[str, str] = {}
    for entry in spec.targets:
        if is_selector(entry, layout):
            picked = layouts.select(layout, names, [entry], file=model_dir)
            hits = {m: w for m, w in linears.items() if w in picked}
        else:
            hits = {m: w for m, w in linears.items() if m == entry or m.endswith("." + entry)}
        if not hits:
            raise ForgetlessError(
                f"LoRA target {entry!r} matches no Linear layer in the scope",
                file=model_dir,
                remedy="give module names such as q_proj, v_proj, or selectors inside --train",
            )
        chosen.update(hits)
    return dict(sorted(chosen.items()))


def check_lora_targets(
    spec: LoraSpec, scope: set[str], layout: layouts.Layout, names: list[str], model_dir: Path
) -> None:
    """Fail before any work on a LoRA target that names no weight in scope (module names by suffix, under either
    naming of the family); :func:`lora_modules` does the exact matching on the loaded model."""
    for entry in spec.targets or []:
        if is_selector(entry, layout):
            found = bool(layouts.select(layout, names, [entry], file=model_dir) & scope)
        else:
            found = any(
                c == f"{entry}.weight" or c.endswith(f".{entry}.weight")
                for n in scope
                for c in (n, *layouts.name_aliases(n))
            )
        if not found:
            raise ForgetlessError(
                f"LoRA target {entry!r} matches no weight in the scope",
                file=model_dir,
                remedy="give module names such as q_proj, v_proj, or selectors inside --train",
            )


def adapter_key(pname: str, adapter: str = "default") -> str:
    """PEFT's in-memory parameter name → its key in ``adapter_model.safetensors``."""
    return pname.replace(f".{adapter}.", ".")


def read_init_adapter(
    folder: Path, lora: LoraSpec, rename: Callable[[str], str] | None = None
) -> dict[str, torch.Tensor]:
    """The LoRA tensors of the adapter a run continues, after checking its rank and alpha against `lora`
    (``rename``: its module paths to the loaded model's, for an original LLaVA folder)."""
    from safetensors.torch import load_file

    from ..checkpoint.lora import ADAPTER_CONFIG, ADAPTER_SAFE
    from ..safeload import read_json

    cfg_file, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_SAFE
    if not cfg_file.is_file() or not weights.is_file():
        raise ForgetlessError(
            f"not a PEFT adapter folder ({ADAPTER_CONFIG} and {ADAPTER_SAFE} needed)",
            file=folder,
            remedy="give a folder written by `forgetless finetune --lora` or PEFT's save_pretrained",
        )
    cfg = read_json(cfg_file, remedy="fix or restore adapter_config.json", expect=dict)
    if int(cfg.get("r", -1)) != lora.r or float(cfg.get("lora_alpha", -1)) != float(lora.alpha):
        raise ForgetlessError(
            f"adapter of rank {cfg.get('r')} and alpha {cfg.get('lora_alpha')}, this run trains "
            f"rank {lora.r} and alpha {lora.alpha:g}",
            file=cfg_file,
            remedy="give --lora-r and --lora-alpha as the adapter's",
        )
    tensors = load_file(str(weights))
    return tensors if rename is None else {original.adapter_key(k, rename): v for k, v in tensors.items()}


def load_init_adapter(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy the adapter's tensors into the run's LoRA parameters: the same names and shapes, every one."""
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        what = (
            f"{len(missing)} of this run's LoRA tensors are not in it (e.g. {missing[0]})"
            if missing
            else f"it has {len(extra)} tensors this run does not train (e.g. {extra[0]})"
        )
        raise ForgetlessError(
            f"the adapter does not match this run's LoRA modules: {what}",
            file=folder,
            remedy="train the same --train scope and --lora-target as the adapter was trained on",
        )
    for k, p in params.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise ForgetlessError(
                f"shape {list(state[k].shape)}, this run's is {list(p.shape)}",
                file=folder,
                tensor=k,
                remedy="continue an adapter of the same model and rank",
            )
        with torch.no_grad():
            p.copy_(state[k])
