"""Input Gram matrices of Linear layers, G = Σ_rows x xᵀ ([in, in]), with the number of rows that went in.

Which rows count
----------------
* Language-model layers and the output embedding (rows are [batch, tokens]): the tokens with
  ``attention_mask == 1`` (``tokens="all"``, the default: padding never counts), or only the answer tokens
  (``tokens="answer"``: positions whose label is not −100).
* Vision tower and projector layers: every row, i.e. every patch of every image (images have no padding; the
  answer/prompt distinction does not apply to them).
* A layer called several times in one forward contributes the rows of every call, and they are all counted.

Shared inputs
-------------
Linears that read the same tensor (q/k/v of an attention, gate/up of a gated MLP) have the same Gram; it is
accumulated and stored once, under the first such module in scope order, and ``GramResult.shared`` maps each other module
to it. Sharing is found from the forward itself: a module whose input is the very tensor object (same version) the
previous Linear in scope read, at every call of the first batch, shares that module's Gram.

Precision
---------
float64 by default (8 bytes per entry). ``dtype=torch.float32`` keeps 4 bytes per entry: each batch's product is
computed by one float32 GEMM straight into the running sum (``addmm_``), so the rounding is that of one float32
addition per batch and GEMM block; its measured error against float64 is bounded in the tests.
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
    grams: dict[str, Tensor]  # Σ x xᵀ by the weight's checkpoint name, [in, in]; one per distinct input
    token_counts: dict[str, int]  # rows summed, per layer (every layer in scope, shared or not)
    num_samples: int
    shared: dict[str, str]  # layer → the layer whose Gram it shares (held in ``grams``)


SHARED_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def expected_shares(names: list[str]) -> dict[str, str]:
    """The sharing :func:`accumulate_gram` finds, predicted from the names alone (for accounting without a forward):
    sibling projections of one block (``…q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``) share the
    first's Gram."""
    shares: dict[str, str] = {}
    for group in SHARED_NAMES:
        firsts: dict[str, str] = {}
        for n in names:
            parent, _, leaf = n.removesuffix(".weight").rpartition(".")
            if leaf in group:
                rep = firsts.setdefault(parent, n)
                if rep != n:
                    shares[n] = rep
    return shares


def gram_memory(
    linears: Mapping[str, nn.Linear],
    dtype: torch.dtype = torch.float64,
    shared: Mapping[str, str] | None = None,
) -> int:
    """Bytes the accumulators take: in² entries of 8 (float64) or 4 (float32) bytes per distinct input."""
    if dtype not in (torch.float64, torch.float32):
        raise ForgetlessError(
            f"Gram accumulation in {dtype} is not supported", remedy="use float64 or float32"
        )
    shared = shared or {}
    return sum(m.in_features**2 * dtype.itemsize for n, m in linears.items() if n not in shared)


def accumulate_gram(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    linears: Mapping[str, nn.Linear] | None = None,
    dtype: torch.dtype = torch.float64,
    tokens: str = "all",
    share: bool = True,
    progress: ProgressFn | None = None,
    total: int | None = None,
) -> GramResult:
    """Σ x xᵀ over the inputs of each Linear (default: every Linear, keyed by its weight's checkpoint name); one
    accumulator per distinct input unless ``share=False``."""
    if tokens not in ("all", "answer"):
        raise ForgetlessError(f"unknown token selection {tokens!r}", remedy="use 'all' or 'answer'")
    gram_memory({}, dtype)  # validates dtype
    linears = dict(linear_modules(model) if linears is None else linears)
    if not linears:
        raise ForgetlessError("no Linear layers in scope for the Gram statistics", remedy="widen the scope")
    names = {m: n for n, m in linears.items()}
    if len(names) != len(linears):
        raise ForgetlessError("the same Linear is named twice in the Gram scope", remedy="name it once")
    acc = _Accumulator(linears, text_module_ids(model), dtype, share)
    was_training = model.training
    model.eval()
    handles = [
        m.register_forward_hook(lambda mod, args, _out: acc.add(names[mod], args[0]))
        for m in linears.values()
    ]
    dev = next(model.parameters()).device
    done, t0 = 0, time.perf_counter()
    try:
        for batch in batches:
            acc.start_batch(batch, tokens)
            kwargs = {
                k: (v.to(dev) if isinstance(v, Tensor) else v)
                for k, v in batch.items()
                if k not in NON_MODEL_KEYS
            }
            with torch.no_grad():
                model(**kwargs, use_cache=False)
            done += batch["input_ids"].shape[0]
            if progress is not None:
                progress(Progress(done, total, 0, time.perf_counter() - t0))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    grams, shared = acc.named_in_order()
    return GramResult(grams, acc.counts, done, shared)


class _Accumulator:
    """The running sums of one Gram pass: which layer's rows count, which layers share a sum, and the sums."""

    def __init__(self, linears: Mapping[str, nn.Linear], text_ids: set[int], dtype: torch.dtype, share: bool):
        self.linears, self.dtype, self.share = linears, dtype, share
        self.text = {n for n, m in linears.items() if id(m) in text_ids}
        self.grams: dict[str, Tensor] = {}
        self.counts = dict.fromkeys(linears, 0)
        self.rep: dict[str, str] = {}  # layer → the layer whose sum it adds to (itself when it has its own)
        self.last: tuple[str, Tensor, int] | None = None  # the previous call's layer, input and input version

    def start_batch(self, batch: Mapping[str, Any], tokens: str) -> None:
        mask = batch.get("attention_mask")
        sel = torch.ones(batch["input_ids"].shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        if tokens == "answer":
            sel = sel & (batch["labels"] != -100)
        idx = batch.get("sample_index")
        self.select = sel
        self.index = idx.tolist() if isinstance(idx, Tensor) else idx
        self.last = None

    def _reads_previous(self, name: str, x: Tensor) -> str | None:
        """The layer whose sum ``name`` may share: the previous call's, when it read this very tensor."""
        last = self.last
        self.last = (name, x, x._version)
        if not self.share or last is None or last[1] is not x or last[2] != x._version:
            return None
        other = self.rep.get(last[0], last[0])
        return other if (other in self.text) == (name in self.text) else None

    def add(self, name: str, x: Tensor) -> None:
        previous = self._reads_previous(name, x)  # the input object itself: detach() would make a new one
        x = x.detach()
        rep = self.rep.setdefault(name, previous or name)
        rows = self._rows(name, x)
        self.counts[name] += rows.shape[0]
        if rep != name:
            if previous != rep:
                raise ForgetlessError(
                    f"read the same input as {rep} in the first batch but not in samples {self.index}",
                    tensor=name,
                    remedy="compute without shared Grams (--no-share)",
                )
            return
        if not torch.isfinite(rows).all():
            raise ForgetlessError(
                f"non-finite layer inputs in samples {self.index}",
                tensor=name,
                remedy="fix or drop these samples",
            )
        if name not in self.grams:
            width = self.linears[name].in_features
            self.grams[name] = torch.zeros(width, width, dtype=self.dtype, device=x.device)
        rows = rows.to(self.dtype)
        self.grams[name].addmm_(rows.T, rows)

    def named_in_order(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """(sums, shares) with each shared sum named after its first layer in scope order, whatever the call
        order (CLIP calls q before k; its checkpoint lists k first)."""
        first: dict[str, str] = {}
        for n in self.linears:
            if n in self.rep:
                first.setdefault(self.rep[n], n)
        grams = {first[r]: g for r, g in self.grams.items()}
        shared = {n: first[r] for n, r in self.rep.items() if first[r] != n}
        return grams, shared

    def _rows(self, name: str, x: Tensor) -> Tensor:
        """The rows that count: the selected tokens of a text layer, every row of a vision layer."""
        if name not in self.text:
            return x.reshape(-1, x.shape[-1])
        sel = self.select
        if x.dim() < 3 or tuple(x.shape[:2]) != tuple(sel.shape):
            raise ForgetlessError(
                f"cannot match the input rows {list(x.shape)} to the batch's tokens {list(sel.shape)}",
                tensor=name,
                remedy="leave this layer out of scope",
            )
        return x[sel.to(x.device)]
