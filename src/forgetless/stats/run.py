"""`forgetless stats fisher|gram`: calibration data → a statistics file, on one process or under torchrun.

    compute_statistics("fisher", "models/llava", "calib.json", "fisher.safetensors",
                       scope=["language.layers[20:32]", "lm_head"], n=64)

Each rank takes an interleaved shard of the (seeded) sample selection, accumulates sums, the sums are reduced onto
rank 0, and rank 0 writes the file (atomically; NaN/Inf never written); with ``split="modules"`` each rank takes
every sample and a share of the modules instead. The memory per device is accounted on the meta device and a run
that does not fit is refused before the weights are read (``--dry-run`` prints it). The file is keyed by the checkpoint's
own tensor names and records the model's fingerprint, so the merge engine refuses it for another model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint import original
from ..checkpoint.guard import check_output
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.space import check_free_space
from ..errors import ForgetlessError, naming
from ..recipe import check_size
from .data import Encoder, check_images, data_fingerprint, iter_batches, load_samples
from .distributed import collect_owned, gather_objects, process_group, reduce_to, shard_samples
from .fisher import Progress, accumulate_fisher
from .footprint import TORCH_DTYPES, Footprint, account, check_fits, meta_model, model_class, scoped_targets
from .gram import GramResult, accumulate_gram
from .store import model_fingerprints, save_fisher, save_gram

Kind = Literal["fisher", "gram"]


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
    """The model as transformers loads it for image-text-to-text (when it has a vision config) or causal LM, in
    ``dtype`` and, on a GPU, straight onto it (``device_map``): a rank never holds the whole model in host memory
    first."""
    placement = {"device_map": device} if torch.device(device).type == "cuda" else {}
    try:
        if original.is_original(model_dir):
            model = original.load(model_dir, TORCH_DTYPES[dtype], **placement)
        else:
            model = model_class(model_dir).from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype], **placement)
    except (OSError, ValueError, KeyError) as e:  # what transformers raises for a folder it cannot load
        raise ForgetlessError(
            f"transformers cannot load the model ({type(e).__name__}: {e})",
            file=model_dir,
            remedy="give a Hugging Face model folder or an original LLaVA folder",
        ) from e
    return model.to(device).eval(), torch.device(device)


def _file_bytes(kind: Kind, targets: dict[str, Any], store_dtype: str, shared: dict[str, str]) -> int:
    """The statistics file's size: one value per parameter (Fisher) or in×in per distinct input (Gram)."""
    per = TORCH_DTYPES[store_dtype].itemsize
    if kind == "gram":
        return sum(m.in_features**2 for n, m in targets.items() if n not in shared) * per
    return sum(p.numel() for p in targets.values()) * per


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _check_request(
    kind: Kind,
    model_dir: Path,
    out_path: Path | None,
    inputs: list,
    *,
    force: bool,
    dry_run: bool,
    split: str,
    accumulate: str,
) -> None:
    """The refusals that need neither the data nor the model."""
    if not (model_dir / "config.json").exists():
        raise ForgetlessError(
            "not a model folder (no config.json)",
            file=model_dir,
            remedy="give the Hugging Face folder of the model the statistics are for",
        )
    if split not in ("none", "modules"):
        raise ForgetlessError(f"unknown split {split!r}", remedy="use none or modules")
    if split == "modules" and kind != "gram":
        raise ForgetlessError(
            "--split modules is for Gram statistics: a Fisher's accumulators (4 bytes per "
            "parameter) fit beside the model",
            remedy="drop --split",
        )
    if accumulate not in ("float64", "float32"):
        raise ForgetlessError(f"unknown accumulation dtype {accumulate!r}", remedy="use float64 or float32")
    if out_path is not None and not dry_run:
        if out_path.suffix != ".safetensors":
            raise ForgetlessError(
                "statistics files end in .safetensors", file=out_path, remedy="rename --out"
            )
        check_output(out_path, [model_dir, *inputs], force=force)
    with CheckpointReader(
        model_dir
    ):  # the checks a merge runs (headers, truncation, safe .bin), before any load
        pass


def _budget(memory: str | int) -> int:
    try:
        return check_size(memory, "a memory budget")
    except ValueError as e:
        raise ForgetlessError(f"--memory: {e}", remedy="give a size such as 40GiB") from None


def compute_statistics(
    kind: Kind,
    model: str | Path,
    data: str | Path,
    out: str | Path | None,
    *,
    images: str | Path | None = None,
    scope: list[str] | None = None,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    variant: str = "empirical",
    on_bad_sample: str = "error",
    store_dtype: str = "float32",
    all_params: bool = False,
    accumulate: str = "float64",
    tokens: str = "all",
    max_length: int | None = None,
    force: bool = False,
    dry_run: bool = False,
    share: bool = True,
    split: str = "none",
    memory: str | int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
) -> StatsReport:
    """Calibration data → a statistics file (module docstring). ``share``: one Gram per distinct input;
    ``split="modules"``: under torchrun each rank accumulates a share of the modules over every sample;
    ``memory``: refuse a run whose accounted footprint per device exceeds it (the device's free memory always).
    ``min_pixels`` / ``max_pixels``: a dynamic-resolution processor's image bounds (:class:`~.data.Encoder`)."""
    model_dir = Path(model)
    out_path = Path(out) if out is not None else None
    _check_request(
        kind,
        model_dir,
        out_path,
        [data, images],
        force=force,
        dry_run=dry_run,
        split=split,
        accumulate=accumulate,
    )
    budget = None if memory is None else _budget(memory)
    samples = load_samples(data, image_folder=images, n=n, seed=seed)
    check_images(samples, on_bad_sample)
    encoder = Encoder(model_dir, max_length=max_length, min_pixels=min_pixels, max_pixels=max_pixels)
    data_fp = data_fingerprint(data, samples)
    device = resolve_device(device)
    acc_dtype = torch.float64 if accumulate == "float64" else torch.float32
    with process_group(device) as (rank, world):
        say = log if (log is not None and rank == 0) else (lambda _s: None)
        planned = meta_model(model_dir, dtype)
        targets = scoped_targets(planned, model_dir, scope, kind, all_params)
        if not targets:
            raise ForgetlessError(
                f"no {'Linear layer' if kind == 'gram' else 'parameter'} of the model in scope {scope}",
                file=model_dir,
                remedy="widen --scope",
            )
        footprint = account(
            kind, planned, targets, acc_dtype, world=world, split=split == "modules", share=share
        )
        del planned
        report = StatsReport(kind, out_path, tensors=len(targets), memory_bytes=footprint.per_device)
        say(
            f"{kind}: {len(samples)} samples of {data} on {model_dir} ({world} process{'es' if world > 1 else ''}, "
            f"{device}), {len(targets)} tensors in scope, {len(footprint.shared)} sharing another's Gram"
        )
        say(f"  {footprint.describe(device, world)}")
        check_fits(footprint, device, budget, model_dir)
        if dry_run:
            return report
        if out_path is not None:
            check_free_space(
                out_path, _file_bytes(kind, targets, store_dtype, footprint.shared), f"the {kind} file"
            )
        _run(
            kind,
            report,
            model_dir,
            samples,
            data,
            data_fp,
            device,
            rank,
            world,
            footprint,
            say,
            {
                "scope": scope,
                "all_params": all_params,
                "batch_size": batch_size,
                "on_bad_sample": on_bad_sample,
                "variant": variant,
                "seed": seed,
                "acc_dtype": acc_dtype,
                "tokens": tokens,
                "share": share,
                "progress": progress,
                "dtype": dtype,
                "store_dtype": store_dtype,
                "force": force,
                "pixels": (min_pixels, max_pixels),
                "encoder": encoder,
            },
        )
        return report


def _run(
    kind: Kind,
    report: StatsReport,
    model_dir: Path,
    samples: list,
    data: str | Path,
    data_fp: str,
    device: str,
    rank: int,
    world: int,
    footprint: Footprint,
    say: Callable[[str], None],
    o: dict[str, Any],
) -> None:
    """Load the model, accumulate this rank's share, bring the sums to rank 0 and write them there."""
    net, dev = load_model(model_dir, device, o["dtype"])
    targets = scoped_targets(net, model_dir, o["scope"], kind, o["all_params"])
    owners = footprint.owners
    if owners is not None:  # every sample, this rank's modules
        targets = {k: v for k, v in targets.items() if owners[k] == rank}
    mine = samples if owners is not None else shard_samples(samples, rank, world)
    encoder = o["encoder"]
    bad: list[tuple[Any, str]] = []
    batches = (
        _to_device(b, dev)
        for b in iter_batches(mine, encoder, o["batch_size"], on_bad_sample=o["on_bad_sample"], skipped=bad)
    )
    ticker = _Ticker(say if o["progress"] else None, world)
    t0 = time.perf_counter()
    if kind == "fisher":
        res = accumulate_fisher(
            net,
            batches,
            params=targets,
            variant=o["variant"],
            seed=o["seed"],
            on_bad="skip" if o["on_bad_sample"] == "skip" else "error",
            progress=ticker,
            total=len(mine),
        )
        sums, count, skipped, counts, shared = dict(res.sums), res.num_samples, list(res.skipped), None, {}
        reduce_to(sums)
        count = sum(gather_objects(count))
    else:
        gres = (
            accumulate_gram(
                net,
                batches,
                linears=targets,
                dtype=o["acc_dtype"],
                tokens=o["tokens"],
                share=o["share"],
                progress=ticker,
                total=len(mine),
            )
            if targets
            else None
        )
        sums, counts, shared = _gram_sums(gres, owners is not None)
        counted = gather_objects(gres.num_samples if gres is not None else 0)
        count = max(counted) if owners is not None else sum(counted)
        skipped = []
    del net
    if owners is None:
        skipped = [s for part in gather_objects(skipped + bad) for s in part]
    else:  # every rank saw every sample: its own skips stand for all
        skipped = skipped + bad
    report.seconds = time.perf_counter() - t0
    report.num_samples, report.skipped = int(count), skipped
    if rank == 0 and report.out is not None:
        _write(kind, report, model_dir, sums, counts, shared, int(count), data, data_fp, o)
        say(
            f"wrote {report.out}: {kind} over {count} samples ({len(skipped)} skipped) in {report.seconds:.1f} s, "
            f"{report.samples_per_s:.2f} samples/s"
        )
        for sid, reason in skipped[:10]:
            say(f"  skipped {sid}: {reason}")


def _gram_sums(gres: GramResult | None, split: bool) -> tuple[dict, dict[str, int], dict[str, str]]:
    """(sums on rank 0, token counts, shares): reduced onto rank 0 (data-parallel), or each rank's modules sent
    there (split)."""
    grams = dict(gres.grams) if gres is not None else {}
    counts = dict(gres.token_counts) if gres is not None else {}
    shared = dict(gres.shared) if gres is not None else {}
    if split:
        merged_counts: dict[str, int] = {}
        merged_shared: dict[str, str] = {}
        for c, sh in gather_objects((counts, shared)):
            merged_counts.update(c)
            merged_shared.update(sh)
        return collect_owned(grams), merged_counts, merged_shared
    reduce_to(grams)
    total: dict[str, int] = {}
    for part in gather_objects(counts):
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return grams, total, shared


def _write(
    kind: Kind,
    report: StatsReport,
    model_dir: Path,
    sums: dict,
    counts: dict[str, int] | None,
    shared: dict[str, str],
    count: int,
    data: str | Path,
    data_fp: str,
    o: dict[str, Any],
) -> None:
    extra = {
        "variant": o["variant"] if kind == "fisher" else None,
        "scope": o["scope"],
        "seed": o["seed"],
        "n": report.num_samples,
        "skipped": len(report.skipped),
        "data": str(data),
        "dtype": o["dtype"],
        "tokens": o["tokens"] if kind == "gram" else None,
        **({"pixels": list(o["pixels"])} if any(o["pixels"]) else {}),
    }
    common: dict[str, Any] = {
        "data_fingerprint": data_fp,
        "dtype": o["store_dtype"],
        "extra": extra,
        **model_fingerprints(model_dir),
        "replace": o["force"],
    }
    with naming(report.out):  # safetensors' save_file says "No space left on device" without the file
        if kind == "fisher":
            save_fisher(report.out, sums, count, **common)
        else:
            save_gram(report.out, sums, counts, count, shared=shared, **common)


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
