"""One way to record and reuse a step of a multi-step command: statistics files keyed by fingerprints.

A statistics file written by `forgetless stats` records the model's weights fingerprint, the data selection's
fingerprint (the samples drawn, not only the file), the scope, the dtype the model ran in and, for a Fisher, its
variant. :func:`statistics_step` returns the file at `path` when all of those match what the step asks for, and
computes it there otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..stats.data import data_fingerprint, load_samples
from ..stats.store import load_statistics, model_fingerprints


def reusable(kind: str, path: Path, model_dir: Path, data: Path, images: Path | None, n: int | None, seed: int,
             scope: list[str], variant: str | None = None, dtype: str = "float32",
             pixels: tuple[int | None, int | None] = (None, None)) -> bool:
    """Whether `path` holds `kind` statistics of `model_dir`'s weights on the same data selection and scope, taken
    with the model in `dtype` and the same image bounds `pixels` (and of the same Fisher variant)."""
    if not Path(path).is_file():
        return False
    reader, meta = load_statistics(path)
    reader.close()
    extra = meta.get("extra") or {}
    samples = load_samples(data, image_folder=images, n=n, seed=seed)
    return (meta.get("kind") == kind
            and meta.get("model_weights_fingerprint") == model_fingerprints(model_dir)["model_weights_fingerprint"]
            and meta.get("data_fingerprint") == data_fingerprint(data, samples)
            and extra.get("scope") == scope
            and extra.get("dtype") == dtype
            and extra.get("pixels") == (list(pixels) if any(pixels) else None)
            and (kind != "fisher" or extra.get("variant", "empirical") == (variant or "empirical")))


def statistics_step(kind: str, model_dir: str | Path, data: str | Path, path: str | Path, *, scope: list[str],
                    images: str | Path | None = None, n: int | None = None, seed: int = 0,
                    variant: str | None = None, role: str | None = None, dry_run: bool = False,
                    log: Callable[[str], None] | None = print, **compute: Any) -> Path:
    """`path`, reused (see :func:`reusable`) or computed there with ``forgetless stats`` (`compute`: its options)."""
    from ..stats.run import compute_statistics

    path, model_dir, data = Path(path), Path(model_dir), Path(data)
    img = Path(images) if images else None
    say = log or (lambda _s: None)
    label = role or kind
    dtype = compute.get("dtype", "float32")
    pixels = (compute.get("min_pixels"), compute.get("max_pixels"))
    if not dry_run and reusable(kind, path, model_dir, data, img, n, seed, scope, variant, dtype, pixels):
        say(f"{label}: reusing {path} (same model weights, data selection, scope, dtype, image bounds"
            f"{' and variant' if kind == 'fisher' else ''})")
        return path
    say(f"{label}: {(variant or 'empirical') if kind == 'fisher' else kind} at {model_dir} on {data}"
        f"{'' if dtype == 'float32' else f' ({dtype})'}")
    if kind == "fisher":
        compute["variant"] = variant or "empirical"
    compute_statistics(kind, model_dir, data, path, images=img, scope=scope, n=n, seed=seed, force=True,  # type: ignore[arg-type]
                       dry_run=dry_run, log=log, **compute)
    return path
