"""Diagonal Fisher information, F = (1/N) Σᵢ (∇θ ℓᵢ)², with per-sample gradients computed for a whole batch.

ℓᵢ is the mean cross-entropy over sample i's answer tokens (positions whose label is not −100; prompt, image and
padding tokens do not count). The square is taken per sample, never of a batch gradient.

How the per-sample gradients are obtained, without a loop over samples
----------------------------------------------------------------------
One forward and one backward per batch, of the loss Σᵢ ℓᵢ (a sum, so every sample's gradient keeps its own scale).

* ``nn.Linear`` weights and biases (everything CGM uses): a forward hook keeps the layer's input x and a tensor hook
  on its output receives the output gradient g. Sample i's weight gradient is Σ_rows g_rowᵀ x_row over the rows that
  belong to sample i (``'bro,bri->boi'``), its bias gradient Σ_rows g_row. Squares are summed into the accumulator
  inside the hook, a chunk of samples at a time, so at most ``chunk_bytes`` of per-sample gradients exist at once.
  The products run in the model's dtype: a bfloat16 model's rows (a float16 model's on CUDA) are multiplied as
  they are, with float32 accumulation (:func:`per_sample_products`), not copied to float32 first.
  The weights themselves get ``requires_grad=False``: autograd never forms their batch gradient (a third of the
  backward's work and a full copy of the model in memory saved); the gradient reaches the hooks because the first
  in-scope layer's output is made to require grad.
* A Linear called several times in one forward (shared weights) is handled: the rows of all its calls are gathered
  per sample before the product, so the per-sample gradient is summed over calls before it is squared.
* Which sample a row belongs to: in the language model (``model.get_decoder()`` and the output embedding) the rows
  are [B, T]. In the vision tower and projector the leading dimension is the image (LLaVA), or all patches of all
  images are concatenated (Qwen2.5-VL, each image a contiguous block of ``prod(image_grid_thw)`` patches, or a
  quarter of that after the patch merger). Images are owned by the sample whose image tokens they fill, in order,
  exactly as the model scatters them. Anything that cannot be attributed is refused loudly, never guessed.
* The input token embedding: per sample, the output gradients of the sample's tokens are summed per token id and
  squared (sparse; only the rows the sample uses).
* Any other parameter in scope (norms, conv patch embeddings, position embeddings): an explicit per-sample loop
  over ``torch.autograd.grad(ℓᵢ, those parameters)`` on the batch's graph (no second forward). Correct for any
  module but costs one backward per sample, so keep such parameters out of scope when speed matters. Tied
  parameters (an ``lm_head`` sharing the input embedding's weight) take this path too: their gradient is the sum
  over both uses, which no single module's hook sees.

Non-finite values: a sample whose loss, or any of whose per-sample gradients, is NaN/Inf is an error
(``on_bad="error"``, naming the sample and tensor) or a counted skip (``on_bad="skip"``): it is then removed from
the sums (its contributions already added to other tensors are subtracted by re-running the batch) and from N.
A sample without answer tokens is always a counted skip. Nothing is ever silently zeroed.

The "sampled" Fisher draws each answer-position label from the model's own predictive distribution (inverse CDF,
with a generator seeded by ``(seed, sample_index)``): the labels of a sample do not depend on the batch it is in,
nor on the rank that processes it, so batched, bs-1 and data-parallel runs agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

import torch
from torch import Tensor, nn

from ..errors import ForgetlessError

IGNORE_INDEX = -100
NON_MODEL_KEYS = ("sample_index", "labels")
DEFAULT_CHUNK_BYTES = 256 << 20


# ---------------------------------------------------------------------------------------------- names and scope
def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """Map every parameter's module name (``model.named_parameters()``) to its name in a saved checkpoint.

    transformers 5 renames some families in memory (LLaVA: ``model.language_model.layers.N`` in memory,
    ``language_model.model.layers.N`` on disk; Qwen2.5-VL: ``model.visual.*`` vs ``visual.*``) and reverts that
    when saving. We apply the very functions ``save_pretrained`` uses (``remove_tied_weights_from_state_dict`` then
    ``revert_weight_conversion``) to a state dict of the parameters themselves and follow each tensor object to its
    saved name. Tied parameters map to the one name that is saved. A tensor that the conversion does not simply
    rename (a fused or split weight) has no saved name of its own and is left out of the mapping.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    sd = {n: p.detach() for n, p in named.items()}
    ident = {id(t): n for n, t in sd.items()}
    try:  # transformers ≥ 5
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # pragma: no cover - older transformers save in-memory names
        return {n: n for n in named}
    if not hasattr(model, "config"):
        return {n: n for n in named}
    kept = remove_tied_weights_from_state_dict(dict(sd), model)
    saved = revert_weight_conversion(model, dict(kept))
    out: dict[str, str] = {}
    by_ptr: dict[tuple, str] = {}
    for saved_name, t in saved.items():
        t = t[0] if isinstance(t, list) else t
        src = ident.get(id(t))
        if src is not None:
            out[src] = saved_name
            by_ptr[(t.data_ptr(), tuple(t.shape))] = saved_name
    for n, t in sd.items():  # aliases of a tied weight
        if n not in out and (t.data_ptr(), tuple(t.shape)) in by_ptr:
            out[n] = by_ptr[(t.data_ptr(), tuple(t.shape))]
    return out


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the model, keyed by its weight's checkpoint name."""
    names = checkpoint_names(model)
    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            key = names.get(f"{mname}.weight" if mname else "weight")
            if key is not None:
                out[key] = mod
    return out


def linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The default Fisher scope (what CGM uses): every Linear weight, keyed by checkpoint name."""
    return {k: m.weight for k, m in linear_modules(model).items()}


def text_module_ids(model: nn.Module) -> set[int]:
    """ids of the modules whose rows are [batch, tokens]: the language model and the output embedding."""
    ids: set[int] = set()
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or not isinstance(dec, nn.Module):
        return {id(m) for m in model.modules()}
    ids.update(id(m) for m in dec.modules())
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        ids.add(id(out))
    return ids


def fisher_memory(params: Mapping[str, nn.Parameter]) -> int:
    """Bytes of the fp32 accumulators (the per-sample chunk buffers come on top, ``DEFAULT_CHUNK_BYTES``)."""
    return sum(p.numel() * 4 for p in params.values())


# ---------------------------------------------------------------------------------------------- losses and labels
def per_sample_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over each sample's answer tokens (fp32), and the answer-token counts.

    ``labels`` are aligned with ``input_ids`` (the Hugging Face convention); logits at t predict the token at t+1.
    A sample with no answer token gets loss 0 and count 0.
    """
    sl = logits[:, :-1].float()
    tl = labels[:, 1:].to(sl.device)
    ce = nn.functional.cross_entropy(
        sl.reshape(-1, sl.shape[-1]), tl.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(tl.shape)
    counts = (tl != IGNORE_INDEX).sum(1)
    return ce.sum(1) / counts.clamp(min=1), counts


def sample_seed(seed: int, sample_index: int) -> int:
    return (int(seed) * 1_000_003 + int(sample_index) * 7_919 + 1) % (2**62)


def sample_answer_labels(logits: Tensor, labels: Tensor, sample_indices: Iterable[int], seed: int) -> Tensor:
    """Labels for the "sampled" Fisher: each answer token replaced by a draw from the model's predictive
    distribution at that position (inverse CDF with one uniform per answer token, seeded per sample).
    Non-answer positions keep −100."""
    out = labels.clone()
    shift = logits[:, :-1].detach().float()
    tl = labels[:, 1:]
    for b, idx in enumerate(sample_indices):
        pos = (tl[b] != IGNORE_INDEX).nonzero().flatten()
        if len(pos) == 0:
            continue
        g = torch.Generator().manual_seed(sample_seed(seed, idx))
        u = torch.rand(len(pos), generator=g, dtype=torch.float64)
        cdf = torch.softmax(shift[b, pos.to(shift.device)].double(), -1).cumsum(-1).cpu()
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1).clamp(max=cdf.shape[1] - 1)
        out[b, pos + 1] = drawn.to(out.dtype).to(out.device)
    return out


# ---------------------------------------------------------------------------------------------- progress
@dataclass(frozen=True)
class Progress:
    done: int
    total: int | None
    skipped: int
    elapsed_s: float

    @property
    def per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.total is None or self.per_s <= 0:
            return None
        return max(0, self.total - self.done) / self.per_s

    def __str__(self) -> str:
        tot = f"/{self.total}" if self.total is not None else ""
        eta = f", ETA {self.eta_s:.0f} s" if self.eta_s is not None else ""
        sk = f", {self.skipped} skipped" if self.skipped else ""
        return f"{self.done}{tot} samples, {self.per_s:.2f} samples/s{eta}{sk}"


ProgressFn = Callable[[Progress], Any]


# ---------------------------------------------------------------------------------------------- batch geometry
@dataclass
class BatchGeometry:
    """Which sample each row of a layer's input belongs to, for one batch."""

    batch_size: int
    seq_len: int
    image_owner: Tensor | None = None  # [n_images] sample of each image
    image_patches: Tensor | None = None  # [n_images] patches per image (Qwen-style flattened vision input)

    @classmethod
    def of(cls, model: nn.Module, batch: Mapping[str, Any]) -> BatchGeometry:
        ids = batch["input_ids"]
        B, T = ids.shape[:2]
        pv = batch.get("pixel_values")
        if pv is None:
            if batch.get("pixel_values_videos") is not None:
                raise ForgetlessError("video inputs are not supported by the statistics", remedy="use images")
            return cls(B, T)
        cfg = getattr(model, "config", None)
        tok = getattr(cfg, "image_token_id", None)
        if tok is None:
            tok = getattr(cfg, "image_token_index", None)
        if tok is None:
            raise ForgetlessError(
                "the batch has pixel_values but the model config names no image token",
                remedy="give image_token_id in config.json",
            )
        per_sample = (ids == tok).sum(1).cpu()
        grid = batch.get("image_grid_thw")
        if grid is not None:
            patches = grid.prod(-1).cpu().long()
            merge = getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", 1)
            tokens = patches // (merge * merge)
        else:
            n = pv.shape[0]
            total = int(per_sample.sum())
            if n == 0 or total % n:
                raise ForgetlessError(
                    f"{total} image tokens cannot be shared among {n} images",
                    remedy="check the image tokens of the batch",
                )
            tokens = torch.full((n,), total // n, dtype=torch.long)
            patches = None
        if int(tokens.sum()) != int(per_sample.sum()):
            raise ForgetlessError(
                f"the batch has {int(per_sample.sum())} image tokens but its images need {int(tokens.sum())}",
                remedy="check the image tokens of the batch",
            )
        start = torch.cumsum(tokens, 0) - tokens
        bounds = torch.cumsum(per_sample, 0)
        owner = torch.searchsorted(bounds, start, right=True)
        end_owner = torch.searchsorted(bounds, start + tokens - 1, right=True)
        if not torch.equal(owner, end_owner):
            raise ForgetlessError("an image's tokens span two samples", remedy="check the image tokens")
        return cls(B, T, owner, patches)

    def rows(self, x: Tensor, text: bool, what: str) -> tuple[Tensor, Tensor | None, list[int] | None]:
        """(x3 [L, R, d], owner [L] or None for identity, ragged row counts per lead or None)."""
        d = x.shape[-1]
        if text:
            if x.dim() < 3 or x.shape[0] != self.batch_size:
                raise ForgetlessError(
                    f"cannot attribute the input rows {list(x.shape)} of {what} to the "
                    f"{self.batch_size} samples of the batch",
                    tensor=what,
                    remedy="leave this layer out of scope",
                )
            return x.reshape(x.shape[0], -1, d), None, None
        if self.image_owner is None:
            raise ForgetlessError(
                f"{what} ran on a batch without images", tensor=what, remedy="leave this layer out of scope"
            )
        n = len(self.image_owner)
        if x.dim() >= 3 and x.shape[0] == n:
            x3 = x.reshape(n, -1, d)
            return x3, self.image_owner, None
        flat = x.reshape(-1, d)
        if self.image_patches is None:
            raise ForgetlessError(
                f"cannot attribute the input rows {list(x.shape)} of {what} to {n} images",
                tensor=what,
                remedy="leave this layer out of scope",
            )
        total = int(self.image_patches.sum())
        R = flat.shape[0]
        counts = [int(p) * R // total for p in self.image_patches]
        if sum(counts) != R or any(int(p) * R % total for p in self.image_patches):
            raise ForgetlessError(
                f"cannot attribute the {R} input rows of {what} to images of "
                f"{self.image_patches.tolist()} patches",
                tensor=what,
                remedy="leave this layer out of scope",
            )
        return flat, self.image_owner, counts


def per_sample_rows(calls: list[tuple[Tensor, Tensor | None, list[int] | None]], B: int) -> Tensor:
    """Gather the rows of several calls per sample: [B, R_max, d], zero-padded (zero rows add nothing)."""
    if len(calls) == 1 and calls[0][1] is None:
        return calls[0][0]
    per: list[list[Tensor]] = [[] for _ in range(B)]
    for x3, owner, counts in calls:
        if owner is None:
            for b in range(B):
                per[b].append(x3[b])
        elif counts is None:
            for lead, s in enumerate(owner.tolist()):
                per[s].append(x3[lead])
        else:
            for block, s in zip(x3.split(counts), owner.tolist()):
                per[s].append(block)
    d = calls[0][0].shape[-1]
    like = calls[0][0]
    rows = [torch.cat(p) if p else like.new_zeros(0, d) for p in per]
    R = max(r.shape[0] for r in rows)
    out = like.new_zeros(B, R, d)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


def per_sample_products(g: Tensor, x: Tensor) -> Tensor:
    """Each sample's weight gradient gᵀx ([B, R, out], [B, R, in] → [B, out, in]), in float32.

    float32 inputs (and any other pair) take the float32 product. bfloat16 or float16 inputs are multiplied as they
    are, which is what the model's own matmuls do: on CUDA with float32 accumulation and a float32 result (no
    rounding beyond the accumulation's); elsewhere torch has no such kernel, and a bfloat16 product is rounded to
    bfloat16 before it is squared in float32, while a float16 one is taken in float32 (its sums could overflow
    float16's range).
    """
    if g.dtype == x.dtype and g.dtype in (torch.bfloat16, torch.float16):
        if g.is_cuda:
            return torch.bmm(g.transpose(1, 2), x, out_dtype=torch.float32)
        if g.dtype == torch.bfloat16:
            return torch.bmm(g.transpose(1, 2), x).float()
    return torch.bmm(g.float().transpose(1, 2), x.float())


class FisherResult(NamedTuple):
    sums: dict[str, Tensor]  # Σᵢ (∇ℓᵢ)², fp32, by checkpoint name
    num_samples: int
    skipped: list[tuple[int, str]]  # (sample_index, reason)


# ---------------------------------------------------------------------------------------------- accumulator
class FisherAccumulator:
    """Accumulates Σᵢ (∇θ ℓᵢ)² over batches. Use as a context manager (hooks and requires_grad are restored)."""

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter] | None = None,
        *,
        variant: str = "empirical",
        seed: int = 0,
        on_bad: str = "error",
        progress: ProgressFn | None = None,
        total: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        if variant not in ("empirical", "sampled"):
            raise ForgetlessError(
                f"unknown Fisher variant {variant!r}", remedy="use 'empirical' or 'sampled'"
            )
        if on_bad not in ("error", "skip"):
            raise ForgetlessError(f"unknown on_bad {on_bad!r}", remedy="use 'error' or 'skip'")
        self.model, self.variant, self.seed, self.on_bad = model, variant, seed, on_bad
        self.progress, self.total, self.chunk_bytes = progress, total, chunk_bytes
        params = dict(linear_weights(model) if params is None else params)
        if not params:
            raise ForgetlessError("no parameters in scope for the Fisher", remedy="widen the scope")
        by_id = {id(p): n for n, p in params.items()}
        if len(by_id) != len(params):
            raise ForgetlessError(
                "the same parameter is named twice in the Fisher scope", remedy="name it once"
            )
        self.sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        self.num_samples = 0
        self.skipped: list[tuple[int, str]] = []
        text_ids = text_module_ids(model)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None

        # which parameter is computed how. A parameter held by several modules (tied input and output embeddings)
        # gets gradient from each use: only the generic per-sample path sees their sum, so it goes there.
        holders: dict[int, int] = {}
        for mod in model.modules():
            for p in mod.parameters(recurse=False):
                holders[id(p)] = holders.get(id(p), 0) + 1
        tied = {pid: by_id.pop(pid) for pid, count in holders.items() if count > 1 and pid in by_id}
        self._linears: dict[nn.Linear, tuple[str | None, str | None, bool]] = {}
        self._embedding: tuple[nn.Embedding, str] | None = None
        for mname, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                w = by_id.pop(id(mod.weight), None)
                b = by_id.pop(id(mod.bias), None) if mod.bias is not None else None
                if w or b:
                    self._linears[mod] = (w, b, id(mod) in text_ids)
            elif mod is emb and isinstance(mod, nn.Embedding) and id(mod.weight) in by_id:
                self._embedding = (mod, by_id.pop(id(mod.weight)))
        self._others = {n: params[n] for n in [*by_id.values(), *tied.values()]}

        self._saved_flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self._others.values():
            p.requires_grad_(True)
        self._handles = [m.register_forward_hook(self._linear_forward) for m in self._linears]
        if self._embedding is not None:
            self._handles.append(self._embedding[0].register_forward_hook(self._embedding_forward))
        self._calls: dict[nn.Module, list] = {}
        self._pending: dict[nn.Module, int] = {}
        self._geo: BatchGeometry | None = None
        self._ids: Tensor | None = None
        self._keep: Tensor | None = None
        self._sign = 1.0
        self._bad: dict[int, str] = {}
        self._record = True
        self._t0 = time.perf_counter()

    # -------------------------------------------------------------- context
    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._saved_flags.items():
            p.requires_grad_(flag)
            p.grad = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- hooks
    def _linear_forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self._record:
            return
        wname, bname, text = self._linears[module]
        x = args[0].detach()
        rows = self._geo.rows(x, text, wname or bname)
        self._calls.setdefault(module, []).append([rows, None])
        self._pending[module] = self._pending.get(module, 0) + 1
        if not output.requires_grad:
            output.requires_grad_(True)  # a leaf: the first in-scope layer starts the backward graph
        k = len(self._calls[module]) - 1
        output.register_hook(lambda g, m=module, k=k: self._linear_grad(m, k, g))

    def _linear_grad(self, module: nn.Module, k: int, g: Tensor) -> None:
        calls = self._calls.get(module)
        if calls is None:
            return
        calls[k][1] = g.detach()
        self._pending[module] -= 1
        if self._pending[module] == 0:
            self._flush_linear(module)

    def _flush_linear(self, module: nn.Module) -> None:
        calls = self._calls.pop(module)
        self._pending.pop(module, None)
        calls = [(rows, g) for rows, g in calls if g is not None]  # an output that never reached the loss
        if not calls:
            return
        wname, bname, _ = self._linears[module]
        B = self._geo.batch_size
        xs = per_sample_rows([rows for rows, _ in calls], B)
        gs = per_sample_rows(
            [(g.reshape(rows[0].shape[:-1] + (g.shape[-1],)), rows[1], rows[2]) for rows, g in calls], B
        )
        out_f, in_f = gs.shape[-1], xs.shape[-1]
        chunk = max(1, self.chunk_bytes // (4 * out_f * (in_f + 1)))
        for s in range(0, B, chunk):
            gc = gs[s : s + chunk]
            parts = {}
            if wname:
                parts[wname] = per_sample_products(gc, xs[s : s + chunk])
            if bname:
                parts[bname] = gc.sum(1, dtype=torch.float32)
            self._add(parts, s)

    def _embedding_forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self._record:
            return
        ids = args[0]
        if ids.dim() != 2 or ids.shape[0] != self._geo.batch_size:
            raise ForgetlessError(
                f"cannot attribute embedding lookups of shape {list(ids.shape)} to samples",
                tensor=self._embedding[1],
                remedy="leave the embedding out of scope",
            )
        if not output.requires_grad:
            output.requires_grad_(True)
        ids = ids.detach()
        output.register_hook(lambda g: self._embedding_grad(ids, g))

    def _embedding_grad(self, ids: Tensor, g: Tensor) -> None:
        mod, name = self._embedding
        acc = self.sums[name]
        for b in range(ids.shape[0]):
            if not self._keep[b]:
                continue
            uniq, inv = ids[b].unique(return_inverse=True)
            rows = g.new_zeros(len(uniq), g.shape[-1], dtype=torch.float32).index_add_(0, inv, g[b].float())
            if mod.padding_idx is not None:
                keep = uniq != mod.padding_idx
                uniq, rows = uniq[keep], rows[keep]
            if not torch.isfinite(rows).all():
                self._bad.setdefault(b, f"non-finite gradient in {name}")
                continue
            acc.index_add_(0, uniq, rows.square() * self._sign)

    def _add(self, parts: dict[str, Tensor], start: int) -> None:
        """Add the squares of per-sample gradients (first dim: samples start…) for kept, finite samples. The
        squares are taken in place (``parts`` are the caller's temporaries): one chunk-sized buffer, not two."""
        n = next(iter(parts.values())).shape[0]
        ok = self._keep[start : start + n].clone()
        squares = {}
        for name, t in parts.items():
            sq = squares[name] = t.square_()
            # a sample's sum of squares is NaN/Inf iff one of its entries is (or they overflow float32, when its
            # Fisher could not be stored either): one reduction instead of an elementwise isfinite pass
            fin = torch.isfinite(sq.reshape(n, -1).sum(1))
            for b in (ok & ~fin).nonzero().flatten().tolist():
                self._bad.setdefault(start + b, f"non-finite gradient in {name}")
            ok &= fin
        if not ok.any():
            return
        for name, sq in squares.items():
            self.sums[name].add_(sq[ok].sum(0) if not ok.all() else sq.sum(0), alpha=self._sign)

    # -------------------------------------------------------------- batches
    def add_batch(self, batch: Mapping[str, Any]) -> None:
        model = self.model
        dev = next(model.parameters()).device
        B = batch["input_ids"].shape[0]
        idx = batch.get("sample_index")
        idx = (
            list(range(self.num_samples + len(self.skipped), self.num_samples + len(self.skipped) + B))
            if idx is None
            else [int(i) for i in (idx.tolist() if isinstance(idx, Tensor) else idx)]
        )
        kwargs = {
            k: (v.to(dev) if isinstance(v, Tensor) else v)
            for k, v in batch.items()
            if k not in NON_MODEL_KEYS
        }
        labels = batch["labels"].to(dev)
        self._geo = BatchGeometry.of(model, batch)
        self._keep = torch.zeros(B, dtype=torch.bool, device=dev)
        reasons: dict[int, str] = {}

        def run(keep: Tensor | None, sign: float) -> None:
            """One forward + backward. keep=None: decide from the losses (main pass); else the undo pass."""
            self._sign, self._bad, self._record = sign, {}, True
            others = bool(self._others) and keep is None
            try:
                with torch.enable_grad():
                    logits = model(**kwargs, use_cache=False).logits
                    self._record = False
                    lab = (
                        labels
                        if self.variant == "empirical"
                        else sample_answer_labels(logits, labels, idx, self.seed)
                    )
                    losses, counts = per_sample_losses(logits, lab)
                    del logits
                    if keep is None:
                        for b in range(B):
                            if counts[b] == 0:
                                reasons[b] = "no answer tokens"
                            elif not torch.isfinite(losses[b]):
                                reasons[b] = f"non-finite loss ({losses[b].item()})"
                        self._check_bad({b: r for b, r in reasons.items() if r != "no answer tokens"}, idx)
                        keep = torch.tensor([b not in reasons for b in range(B)], device=dev)
                    self._keep = keep
                    total_loss = losses[keep].sum()
                    if keep.any() and total_loss.requires_grad:
                        total_loss.backward(retain_graph=others)
                for m in list(self._calls):  # calls whose output never reached the loss
                    self._flush_linear(m)
                if others and keep.any():
                    self._per_sample_others(losses, keep)
            finally:
                self._record = False
                self._calls.clear()
                self._pending.clear()
                for p in self._others.values():
                    p.grad = None

        run(None, 1.0)
        bad = dict(self._bad)
        if bad:
            self._check_bad(bad, idx)
            undo = torch.zeros(B, dtype=torch.bool, device=dev)
            undo[list(bad)] = True
            run(undo, -1.0)  # subtract what the bad samples added before they were caught
            reasons.update(bad)
        for b, r in sorted(reasons.items()):
            self.skipped.append((idx[b], r))
        self.num_samples += B - len(reasons)
        if self.progress is not None:
            self.progress(
                Progress(
                    self.num_samples + len(self.skipped),
                    self.total,
                    len(self.skipped),
                    time.perf_counter() - self._t0,
                )
            )

    def _check_bad(self, bad: dict[int, str], idx: list[int]) -> None:
        if bad and self.on_bad == "error":
            b, r = next(iter(sorted(bad.items())))
            raise ForgetlessError(
                f"sample {idx[b]}: {r}",
                remedy="fix or drop the sample, or use on_bad='skip' to count and skip such samples",
            )

    def _per_sample_others(self, losses: Tensor, keep: Tensor) -> None:
        names = list(self._others)
        ps = [self._others[n] for n in names]
        rows = keep.nonzero().flatten().tolist()
        for j, b in enumerate(rows):
            grads = torch.autograd.grad(losses[b], ps, retain_graph=j < len(rows) - 1, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g.float() for p, g in zip(ps, grads)]
            bad = [n for n, g in zip(names, grads) if not torch.isfinite(g).all()]
            if bad:
                self._bad.setdefault(b, f"non-finite gradient in {bad[0]}")
                continue
            for n, g in zip(names, grads):
                self.sums[n].add_(g.square(), alpha=self._sign)

    def result(self) -> FisherResult:
        return FisherResult(self.sums, self.num_samples, list(self.skipped))


def accumulate_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    **options: Any,
) -> FisherResult:
    """Σᵢ (∇θ ℓᵢ)² over all samples of ``batches`` (sums, fp32), the number of samples counted, and the skipped ones.

    ``params``: checkpoint tensor name → parameter (default: every Linear weight, see ``linear_weights``);
    ``options``: :class:`FisherAccumulator`'s (``variant``, ``seed``, ``on_bad``, ``progress``, ``total``,
    ``chunk_bytes``).
    The Fisher is ``sums / num_samples`` (``save_fisher`` in ``store`` does the division). The model is put in
    eval mode (no dropout) for the duration and its ``requires_grad`` flags are restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with FisherAccumulator(model, params, **options) as acc:
            for batch in batches:
                acc.add_batch(batch)
            return acc.result()
    finally:
        model.train(was_training)
