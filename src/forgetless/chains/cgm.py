"""`forgetless cgm BASE FINETUNED --general-data … --task-data …`: the whole CGM chain, from two checkpoints and
two calibration sets to a merged folder.

1. the general Fisher at θ₀ (BASE) on the general data and the task Fisher on the task data, both over the Linear
   weights in scope. The task Fisher is taken at θ₀ by default, as CGM's published run scripts do (their files
   ``fisher_matrix_flickr_from_pretrain_full.bin`` and ``fisher_matrix_pretrain_full.bin``: both at the pre-trained
   model, empirical, 16 samples); ``task_fisher_at="finetuned"`` takes it at θ_ft instead, where a converged
   fine-tune's task gradients, and so its empirical Fisher, nearly vanish (``task_fisher_variant="sampled"``
   draws the labels from the model's own predictions, which does not vanish there);
2. a statistics file is reused when it was computed on that model's weights (sampled weights fingerprint), on the
   same sample selection (data fingerprint), the same scope, with the model in the same dtype (``dtype``) and of
   the same Fisher variant; otherwise it is (re)computed;
3. the merge (``cgm`` or ``cgm_dagger``), on rank 0 alone under torchrun (the statistics are data-parallel, in one
   process group for the whole chain), with the published scope unless told otherwise: the last 37.5% of the
   decoder layers and ``lm_head`` (LLaVA-1.5-7B: layers 20–31 of 32); ``cgm_dagger`` also takes the projector.
   Tensors out of scope, and in-scope tensors without a Fisher (norms), keep the fine-tuned values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import layout as layouts
from ..checkpoint.guard import check_output
from ..checkpoint.reader import CheckpointReader
from ..engine import MergeReport, merge
from ..errors import ForgetlessError
from ..stats.distributed import process_group
from ..stats.run import resolve_device
from .steps import statistics_step

PUBLISHED_FRACTION = 0.375  # 12 of LLaVA-1.5-7B's 32 decoder layers


def published_scope(model_dir: str | Path, method: str) -> list[str]:
    """The last ⌈37.5%⌉ of the decoder layers and lm_head (+ the projector for CGM†), for this model's layout."""
    with CheckpointReader(model_dir) as r:
        lay = layouts.detect_layout(r.config, r.names())
        has_head = any(layouts.part_of(lay, n) == "lm_head" for n in r.names())
        has_projector = any(layouts.part_of(lay, n) == "projector" for n in r.names())
    k = math.ceil(PUBLISHED_FRACTION * lay.num_layers)
    scope = [f"language.layers[{lay.num_layers - k}:{lay.num_layers}]"]
    scope += (
        ["lm_head"] if has_head else []
    )  # a tied lm_head is the embedding: not part of the published scope
    if method != "cgm" and has_projector:
        scope.append("projector")
    return scope


def cgm_chain(
    base: str | Path,
    finetuned: str | Path,
    *,
    general_data: str | Path,
    task_data: str | Path,
    out: str | Path,
    method: str = "cgm",
    alpha: float | None = None,
    keep: float | None = None,
    scope: list[str] | None = None,
    general_images: str | Path | None = None,
    task_images: str | Path | None = None,
    n: int | None = 16,
    seed: int = 0,
    batch_size: int = 8,
    task_fisher_at: str = "base",
    task_fisher_variant: str = "empirical",
    stats_dir: str | Path | None = None,
    device: str = "auto",
    dtype: str = "float32",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    on_bad_sample: str = "error",
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> MergeReport | None:
    """Statistics (computed or reused) and the merge; with ``dry_run``, what would be computed, and no merge.
    ``progress``: the statistics' and the merge's progress bars."""
    if method not in ("cgm", "cgm_dagger", "cgm_plus"):
        raise ForgetlessError(f"unknown CGM variant {method!r}", remedy="use cgm or cgm_dagger")
    if task_fisher_at not in ("finetuned", "base"):
        raise ForgetlessError(
            f"task_fisher_at must be finetuned or base, got {task_fisher_at!r}",
            remedy="base (default: the published scripts) or finetuned",
        )
    if task_fisher_variant not in ("empirical", "sampled"):
        raise ForgetlessError(
            f"task_fisher_variant must be empirical or sampled, got {task_fisher_variant!r}",
            remedy="empirical (default: the published scripts) or sampled",
        )
    base, finetuned, out = Path(base), Path(finetuned), Path(out)
    for folder in (
        base,
        finetuned,
    ):  # a damaged or missing weight file is named before any statistic is computed
        with CheckpointReader(folder):
            pass
    if not scope:
        scope = published_scope(base, method)
        if "lm_head" not in scope and log is not None:
            log(
                "  lm_head is tied to the input embeddings (stored once, as language.embed): the published scope's "
                "lm_head is left out"
            )
    stats = Path(stats_dir) if stats_dir else out.parent / f"{out.name}-statistics"
    check_output(
        out, [base, finetuned, general_data, task_data, general_images, task_images, stats], force=force
    )
    jobs = {
        "fisher_general": (base, Path(general_data), general_images, "empirical"),
        "fisher_task": (
            finetuned if task_fisher_at == "finetuned" else base,
            Path(task_data),
            task_images,
            task_fisher_variant,
        ),
    }
    with process_group(resolve_device(device)) as (rank, _world):  # one group for both statistics
        log = log if rank == 0 else None
        files = {
            role: statistics_step(
                "fisher",
                model_dir,
                data,
                stats / f"{role}.safetensors",
                scope=scope,
                images=images,
                n=n,
                seed=seed,
                variant=variant,
                role=role,
                dry_run=dry_run,
                log=log,
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                on_bad_sample=on_bad_sample,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                progress=progress,
            )
            for role, (model_dir, data, images, variant) in jobs.items()
        }
        if rank == 0:  # the others wait for it as the group ends
            return _merge(
                method, base, finetuned, out, files, scope, alpha, keep, dry_run, force, progress, log
            )
    return None


def _merge(
    method: str,
    base: Path,
    finetuned: Path,
    out: Path,
    files: dict[str, Path],
    scope: list[str],
    alpha: float | None,
    keep: float | None,
    dry_run: bool,
    force: bool,
    progress: bool,
    log: Callable[[str], None] | None,
) -> MergeReport | None:
    """The merge of the chain, from the two Fisher files."""
    say = log or (lambda _s: None)
    params: dict[str, Any] = {}
    if alpha is not None:
        params["alpha"] = alpha
    if keep is not None:
        params["keep"] = keep
    recipe = {
        "method": method,
        "base": str(base),
        "models": [str(finetuned)],
        "parameters": params,
        "statistics": {k: str(v) for k, v in files.items()},
        "scope": {"include": scope, "outside": "finetuned", "no_statistics": "finetuned"},
    }
    if dry_run:
        say(f"then: merge {method} over {scope} into {out}")
        return None
    return merge(recipe, out=out, force=force, progress=progress, log=log)
