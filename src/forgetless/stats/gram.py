"""Input Gram matrices of Linear layers, G = Σ_rows x xᵀ ([in, in]), with the number of rows that went in.

Which rows count
----------------
* Language-model layers and the output embedding (rows are [batch, tokens]): the tokens with
  ``attention_mask == 1`` (``tokens="all"``, the default: padding never counts), or only the answer tokens
  (``tokens="answer"``: positions whose label is not −100).
* Vision tower and projector layers: every row, i.e. every patch of every image (images have no padding; the
  answer/prompt distinction does not apply to them).
* A layer called several times in one forward contributes the rows of every call, and they are all counted.

Accumulation is in float64 by default. With ``dtype=torch.float32`` each batch's product is added with Kahan
(compensated) summation, which keeps the error of a long sum at the level of one batch's rounding; the
compensation buffer doubles the memory, so both cost 8 bytes per entry (``gram_memory``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import ForgetlessError
from .fisher import NON_MODEL_KEYS, Progress, ProgressFn, linear_modules, text_module_ids


class GramResult(NamedTuple):
    grams: dict[str, Tensor]  # Σ x xᵀ by the weight's checkpoint name, [in, in]
    token_counts: dict[str, int]  # rows summed, per layer
    num_samples: int


def gram_memory(linears: Mapping[str, nn.Linear], dtype: torch.dtype = torch.float64) -> int:
    """Bytes the accumulators take (float32 needs a Kahan compensation buffer of the same size)."""
    if dtype not in (torch.float64, torch.float32):
        raise ForgetlessError(f"Gram accumulation in {dtype} is not supported", remedy="use float64 or float32")
    per = 8 if dtype == torch.float64 else 2 * 4
    return sum(m.in_features ** 2 * per for m in linears.values())


def accumulate_gram(model: nn.Module, batches: Iterable[Mapping[str, Any]], *,
                    linears: Mapping[str, nn.Linear] | None = None, dtype: torch.dtype = torch.float64,
                    tokens: str = "all", progress: ProgressFn | None = None,
                    total: int | None = None) -> GramResult:
    """Σ x xᵀ over the inputs of each Linear (default: every Linear, keyed by its weight's checkpoint name)."""
    if tokens not in ("all", "answer"):
        raise ForgetlessError(f"unknown token selection {tokens!r}", remedy="use 'all' or 'answer'")
    gram_memory({}, dtype)  # validates dtype
    linears = dict(linear_modules(model) if linears is None else linears)
    if not linears:
        raise ForgetlessError("no Linear layers in scope for the Gram statistics", remedy="widen the scope")
    text_ids = text_module_ids(model)
    names = {m: n for n, m in linears.items()}
    if len(names) != len(linears):
        raise ForgetlessError("the same Linear is named twice in the Gram scope", remedy="name it once")
    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=dtype, device=m.weight.device)
             for n, m in linears.items()}
    comp = {n: torch.zeros_like(g) for n, g in grams.items()} if dtype == torch.float32 else None
    counts = dict.fromkeys(linears, 0)
    state: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        name = names[module]
        x = args[0].detach()
        if id(module) in text_ids:
            sel = state["select"]
            if x.dim() < 3 or tuple(x.shape[:2]) != tuple(sel.shape):
                raise ForgetlessError(f"cannot match the input rows {list(x.shape)} to the batch's tokens "
                                      f"{list(sel.shape)}", tensor=name, remedy="leave this layer out of scope")
            rows = x[sel.to(x.device)]
        else:
            rows = x.reshape(-1, x.shape[-1])
        prod = rows.to(dtype).T @ rows.to(dtype)
        if not torch.isfinite(prod).all():
            raise ForgetlessError(f"non-finite layer inputs in samples {state['index']}", tensor=name,
                                  remedy="fix or drop these samples")
        if comp is None:
            grams[name] += prod
        else:  # Kahan: G + prod with the lost low-order part carried in comp
            y = prod - comp[name]
            t = grams[name] + y
            comp[name] = (t - grams[name]) - y
            grams[name] = t
        counts[name] += rows.shape[0]

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(hook) for m in linears.values()]
    dev = next(model.parameters()).device
    done, t0 = 0, time.perf_counter()
    try:
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            sel = torch.ones(ids.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
            if tokens == "answer":
                sel = sel & (batch["labels"] != -100)
            idx = batch.get("sample_index")
            state["select"] = sel
            state["index"] = idx.tolist() if isinstance(idx, Tensor) else idx
            kwargs = {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in batch.items()
                      if k not in NON_MODEL_KEYS}
            with torch.no_grad():
                model(**kwargs, use_cache=False)
            done += ids.shape[0]
            if progress is not None:
                progress(Progress(done, total, 0, time.perf_counter() - t0))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return GramResult(grams, counts, done)
