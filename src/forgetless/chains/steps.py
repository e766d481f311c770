"""One way to record and reuse a step of a multi-step command: its output keyed by a fingerprint of what made it.

A :class:`Step` is an output (a file or folder) and a record (a small JSON file) holding the fingerprint of its
inputs and options (:func:`fingerprint`). The next run reuses the output while the record holds the fingerprint it
would compute, and makes it again in place otherwise. Records are written whole or not at all
(:func:`~forgetless.checkpoint.writer.atomic_write`), and only after the output is whole; the record of a step to
redo is removed before its output is touched. So a writer killed at any instant leaves a record that matches its
output, or none (the step is redone), and concurrent writers never share a temporary file. A record that cannot be
read is no record. Where the record is the output (an evaluation's scores) it may be content-addressed: its name
is the fingerprint.

Statistics files carry their fingerprints in their own metadata instead: the model's weights, the data selection
(the samples drawn, not only the file), the scope, the dtype the model ran in and, for a Fisher, its variant.
:func:`statistics_step` returns the file at `path` when all of those match what the step asks for, and computes it
there otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def fingerprint(obj: Any, digits: int = 16) -> str:
    """`digits` hex digits of SHA-256 over `obj` as JSON with sorted keys (what is not JSON: as its ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:digits]


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at `path`; None when it is absent or unreadable. A record of one line of text (as earlier
    versions wrote) is that key alone."""
    from ..errors import ForgetlessError
    from ..safeload import parse_json, read_text

    try:
        text = read_text(path, remedy="")
        if not text.lstrip().startswith("{"):
            return {"key": text.strip()} if text.strip() else None
        record = parse_json(text, file=path, remedy="")
    except (OSError, ForgetlessError):
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class Step:
    """A step's `record` and, when it is not the record itself, its output `out` (which must exist to be
    reused). `key`: the fingerprint of what makes the step; None when the record's name is the fingerprint."""

    record: Path
    key: str | None = None
    out: Path | None = None

    def done(self) -> dict[str, Any] | None:
        """The record, when it is this step's (its key matches) and the output is there; else None."""
        if self.out is not None and not self.out.exists():
            return None
        record = read_record(self.record)
        if record is None or (self.key is not None and record.get("key") != self.key):
            return None
        return record

    def save(self, fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Record the step as done, with `fields` beside its key (atomically); returns the record."""
        from ..checkpoint.writer import atomic_write

        record = {"key": self.key, **(fields or {})} if self.key is not None else dict(fields or {})
        atomic_write(self.record, json.dumps(record) + "\n")
        return record

    def run(
        self,
        make: Callable[[], Mapping[str, Any] | None],
        *,
        log: Callable[[str], None] | None = None,
        reusing: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """(record, reused): the record when the step is done (`reusing` is logged), else `make()` run after the
        stale record is removed, and the fields it returns recorded."""
        record = self.done()
        if record is not None:
            if log is not None and reusing:
                log(reusing)
            return record, True
        self.record.unlink(missing_ok=True)
        return self.save(make()), False


# ------------------------------------------------------------------------------------------------- statistics
def reusable(
    kind: str,
    path: Path,
    model_dir: Path,
    data: Path,
    images: Path | None,
    n: int | None,
    seed: int,
    scope: list[str],
    variant: str | None = None,
    dtype: str = "float32",
    pixels: tuple[int | None, int | None] = (None, None),
) -> bool:
    """Whether `path` holds `kind` statistics of `model_dir`'s weights on the same data selection and scope, taken
    with the model in `dtype` and the same image bounds `pixels` (and of the same Fisher variant)."""
    from ..stats.data import data_fingerprint, load_samples
    from ..stats.store import load_statistics, model_fingerprints

    if not Path(path).is_file():
        return False
    reader, meta = load_statistics(path)
    reader.close()
    extra = meta.get("extra") or {}
    samples = load_samples(data, image_folder=images, n=n, seed=seed)
    return (
        meta.get("kind") == kind
        and meta.get("model_weights_fingerprint")
        == model_fingerprints(model_dir)["model_weights_fingerprint"]
        and meta.get("data_fingerprint") == data_fingerprint(data, samples)
        and extra.get("scope") == scope
        and extra.get("dtype") == dtype
        and extra.get("pixels") == (list(pixels) if any(pixels) else None)
        and (kind != "fisher" or extra.get("variant", "empirical") == (variant or "empirical"))
    )


def statistics_step(
    kind: str,
    model_dir: str | Path,
    data: str | Path,
    path: str | Path,
    *,
    scope: list[str],
    images: str | Path | None = None,
    n: int | None = None,
    seed: int = 0,
    variant: str | None = None,
    role: str | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] | None = print,
    **compute: Any,
) -> Path:
    """`path`, reused (see :func:`reusable`) or computed there with ``forgetless stats`` (`compute`: its options)."""
    from ..stats.run import compute_statistics

    path, model_dir, data = Path(path), Path(model_dir), Path(data)
    img = Path(images) if images else None
    say = log or (lambda _s: None)
    label = role or kind
    dtype = compute.get("dtype", "float32")
    pixels = (compute.get("min_pixels"), compute.get("max_pixels"))
    if not dry_run and reusable(kind, path, model_dir, data, img, n, seed, scope, variant, dtype, pixels):
        say(
            f"{label}: reusing {path} (same model weights, data selection, scope, dtype, image bounds"
            f"{' and variant' if kind == 'fisher' else ''})"
        )
        return path
    say(
        f"{label}: {(variant or 'empirical') if kind == 'fisher' else kind} at {model_dir} on {data}"
        f"{'' if dtype == 'float32' else f' ({dtype})'}"
    )
    if kind == "fisher":
        compute["variant"] = variant or "empirical"
    compute_statistics(
        kind,
        model_dir,
        data,
        path,
        images=img,
        scope=scope,
        n=n,
        seed=seed,
        force=True,
        dry_run=dry_run,
        log=log,
        **compute,
    )
    return path
