"""`forgetless stats fisher|gram`: calibration data → a statistics file, on one process or under torchrun.

    compute_statistics("fisher", "models/llava", "calib.json", "fisher.safetensors",
                       scope=["language.layers[20:32]", "lm_head"], n=64)

Each rank takes an interleaved shard of the (seeded) sample selection, accumulates sums, the sums and counts are
all-reduced, and rank 0 writes the file (atomically; NaN/Inf never written). The file is keyed by the checkpoint's
own tensor names and records the model's fingerprint, so the merge engine refuses it for another model.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint import layout as layouts
from ..checkpoint.guard import check_output
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.space import check_free_space
from ..checkpoint.writer import human_bytes
from ..errors import ForgetlessError, naming
from .data import Encoder, check_images, data_fingerprint, iter_batches, load_samples
from .distributed import all_reduce_sums, finish_distributed, gather_objects, init_distributed, shard_samples
from .fisher import Progress, accumulate_fisher, checkpoint_names, fisher_memory, linear_modules
from .gram import accumulate_gram, gram_memory
from .store import model_fingerprints, save_fisher, save_gram

Kind = Literal["fisher", "gram"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StatsReport:
    kind: str
    out: Path | None
    num_samples: int = 0
    tensors: int = 0
    memory_bytes: int = 0
    seconds: float = 0.0
    skipped: list[tuple[Any, str]] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.num_samples / self.seconds if self.seconds else 0.0


def resolve_device(device: str) -> str:
    """'auto' → CUDA when present, else CPU; under torchrun each rank takes the GPU of its local rank."""
    import os

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % max(1, torch.cuda.device_count())}"
    return dev


def load_model(model_dir: Path, device: str, dtype: str):
    """The model as transformers loads it for image-text-to-text (when it has a vision config) or causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = json.loads((model_dir / "config.json").read_text())
    cls = AutoModelForImageTextToText if "vision_config" in cfg else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype])
    return model.to(device).eval(), torch.device(device)


def _scoped(model, model_dir: Path, scope: list[str] | None, kind: Kind, all_params: bool) -> dict[str, Any]:
    """checkpoint name → parameter (Fisher) or Linear module (Gram) in scope. Default: every Linear weight."""
    with CheckpointReader(model_dir) as reader:
        names = reader.names()
        selected = set(names)
        if scope:
            lay = layouts.detect_layout(reader.config, names)
            selected = layouts.select(lay, names, scope)
    linears = {k: m for k, m in linear_modules(model).items() if k in selected}
    if kind == "gram":
        return linears
    if not all_params:
        return {k: m.weight for k, m in linears.items()}
    to_ckpt = checkpoint_names(model)
    params = dict(model.named_parameters())
    return {to_ckpt[n]: p for n, p in params.items() if to_ckpt.get(n) in selected}


def _file_bytes(kind: Kind, targets: dict[str, Any], store_dtype: str) -> int:
    """The statistics file's size: one value per parameter (Fisher) or in×in per Linear (Gram), as stored."""
    per = TORCH_DTYPES[store_dtype].itemsize
    if kind == "gram":
        return sum(m.in_features ** 2 for m in targets.values()) * per
    return sum(p.numel() for p in targets.values()) * per


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def compute_statistics(kind: Kind, model: str | Path, data: str | Path, out: str | Path | None, *,
                       images: str | Path | None = None, scope: list[str] | None = None, n: int | None = None,
                       seed: int = 0, batch_size: int = 8, device: str = "auto", dtype: str = "float32",
                       variant: str = "empirical", on_bad_sample: str = "error", store_dtype: str = "float32",
                       all_params: bool = False, accumulate: str = "float64", tokens: str = "all",
                       max_length: int | None = None, force: bool = False, dry_run: bool = False,
                       log: Callable[[str], None] | None = print, progress: bool = True) -> StatsReport:
    model_dir = Path(model)
    if not (model_dir / "config.json").exists():
        raise ForgetlessError("not a model folder (no config.json)", file=model_dir,
                              remedy="give the Hugging Face folder of the model the statistics are for")
    out_path = Path(out) if out is not None else None
    if out_path is not None and not dry_run:
        if out_path.suffix != ".safetensors":
            raise ForgetlessError("statistics files end in .safetensors", file=out_path, remedy="rename --out")
        check_output(out_path, [model_dir, data, images], force=force)
    with CheckpointReader(model_dir):  # the checks a merge runs (headers, truncation, safe .bin), before any load
        pass
    samples = load_samples(data, image_folder=images, n=n, seed=seed)
    check_images(samples, on_bad_sample)
    data_fp = data_fingerprint(data, samples)
    device = resolve_device(device)
    rank, world = init_distributed(device)
    ok = False  # every rank waits for rank 0 to write, then the group ends (see finish_distributed)
    try:
        say = log if (log is not None and rank == 0) else (lambda _s: None)
        net, dev = load_model(model_dir, device, dtype)
        targets = _scoped(net, model_dir, scope, kind, all_params)
        if not targets:
            raise ForgetlessError(f"no {'Linear layer' if kind == 'gram' else 'parameter'} of the model in scope "
                                  f"{scope}", file=model_dir, remedy="widen --scope")
        acc_dtype = torch.float64 if accumulate == "float64" else torch.float32
        memory = fisher_memory(targets) if kind == "fisher" else gram_memory(targets, acc_dtype)
        report = StatsReport(kind, out_path, tensors=len(targets), memory_bytes=memory)
        say(f"{kind}: {len(samples)} samples of {data} on {model_dir} ({world} process{'es' if world > 1 else ''}, "
            f"{dev}), {len(targets)} tensors in scope, accumulators {human_bytes(memory)}")
        if dry_run:
            ok = True
            return report
        if out_path is not None:
            check_free_space(out_path, _file_bytes(kind, targets, store_dtype), f"the {kind} file")

        mine = shard_samples(samples, rank, world)
        encoder = Encoder(model_dir, max_length=max_length)
        bad: list[tuple[Any, str]] = []
        batches = (_to_device(b, dev) for b in iter_batches(mine, encoder, batch_size, on_bad_sample=on_bad_sample,
                                                           skipped=bad))
        ticker = _Ticker(say if progress else None, world)
        t0 = time.perf_counter()
        if kind == "fisher":
            res = accumulate_fisher(net, batches, params=targets, variant=variant, seed=seed,
                                    on_bad="skip" if on_bad_sample == "skip" else "error", progress=ticker,
                                    total=len(mine))
            sums, count, skipped = dict(res.sums), res.num_samples, list(res.skipped)
            count = all_reduce_sums(sums, count)
            token_counts = None
        else:
            gres = accumulate_gram(net, batches, linears=targets, dtype=acc_dtype, tokens=tokens, progress=ticker,
                                   total=len(mine))
            sums, count, skipped = dict(gres.grams), gres.num_samples, []
            reduced = all_reduce_sums(sums, {**gres.token_counts, "\0samples": count})
            count = reduced.pop("\0samples")  # type: ignore[union-attr]
            token_counts = reduced
        skipped = [s for part in gather_objects(skipped + bad) for s in part]  # type: ignore[union-attr]
        report.seconds = time.perf_counter() - t0
        report.num_samples, report.skipped = int(count), skipped
        if rank == 0 and out_path is not None:
            fps = model_fingerprints(model_dir)
            extra = {"variant": variant if kind == "fisher" else None, "scope": scope, "seed": seed, "n": len(samples),
                     "skipped": len(skipped), "data": str(data), "dtype": dtype, "tokens": tokens if kind == "gram" else None}
            common: dict[str, Any] = {"data_fingerprint": data_fp, "dtype": store_dtype, "extra": extra, **fps,
                                      "replace": force}
            with naming(out_path):  # safetensors' save_file says "No space left on device" without the file
                if kind == "fisher":
                    save_fisher(out_path, sums, int(count), **common)
                else:
                    save_gram(out_path, sums, token_counts, int(count), **common)  # type: ignore[arg-type]
            say(f"wrote {out_path}: {kind} over {count} samples ({len(skipped)} skipped) in {report.seconds:.1f} s, "
                f"{report.samples_per_s:.2f} samples/s")
            for sid, reason in skipped[:10]:
                say(f"  skipped {sid}: {reason}")
        ok = True
        return report
    finally:
        finish_distributed(ok)


class _Ticker:
    """Progress lines (samples, samples/s, ETA) at most every 2 s; rank 0's shard stands for the whole run."""

    def __init__(self, say: Callable[[str], None] | None, world: int):
        self.say, self.world, self.last = say, world, 0.0

    def __call__(self, p: Progress) -> None:
        now = time.perf_counter()
        if self.say is None or (now - self.last < 2.0 and p.done != p.total):
            return
        self.last = now
        scale = f" (×{self.world} ranks)" if self.world > 1 else ""
        print(f"  {p}{scale}", file=sys.stderr, flush=True)
