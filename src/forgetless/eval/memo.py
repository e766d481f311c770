"""Encoded samples remembered across evaluations in one process.

A sweep, a frontier or a learned-coefficient search scores many models on the same items, and those models (a
base, its fine-tunes, their merges) share one tokenizer and image processor. Encoding an item (chat template,
tokenizer, image processor, once per option) is about a fifth of a multiple-choice evaluation's time on the
testbed; it depends only on the encoder and the item, so it is done once. A key holds everything the encoding
depends on, so a hit returns the tensors the encoder would have returned.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

from ..stats.data import Encoder, Sample

MAX_BYTES = 1 << 30  # the tensors the process-wide memo may hold (1 GiB)

V = TypeVar("V")


def tensor_bytes(value: Any, seen: set[int] | None = None) -> int:
    """The bytes of the tensors in `value` (nested dicts, lists, tuples and dataclass fields), a tensor held in
    several places counted once."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(tensor_bytes(getattr(value, f), seen) for f in value.__dataclass_fields__)
    return 0


class Memo:
    """A least-recently-used map whose values' tensors take at most `max_bytes` together (a value larger than
    that is returned, not kept)."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.held = 0
        self.hits = 0
        self._values: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def get(self, key: Hashable | None, make: Callable[[], V]) -> V:
        """The value remembered under `key`, else ``make()`` (remembered); a None key is never remembered."""
        if key is None:
            return make()
        if key in self._values:
            self._values.move_to_end(key)
            self.hits += 1
            return self._values[key][0]
        value = make()
        size = tensor_bytes(value)
        if size <= self.max_bytes:
            self._values[key] = (value, size)
            self.held += size
            self._evict()
        return value

    def clear(self) -> None:
        self._values.clear()
        self.held = self.hits = 0

    def __len__(self) -> int:
        return len(self._values)

    def _evict(self) -> None:
        while self.held > self.max_bytes:
            _, (_, size) = self._values.popitem(last=False)
            self.held -= size


def sample_key(encoder: Encoder, sample: Sample, *how: Hashable) -> tuple | None:
    """What encoding `sample` with `encoder` (in the way `how` says) depends on: the encoder's fingerprint, the
    sample's id, turns and options, its image's path, size and modification time. None where it cannot be told
    (an encoder built from an object, an image that cannot be read: encoding it names the problem)."""
    if encoder.fingerprint is None:
        return None
    image = None
    if sample.image is not None:
        try:
            st = os.stat(sample.image)
        except OSError:
            return None
        image = (str(sample.image), st.st_size, st.st_mtime_ns)
    options = tuple(sample.options) if sample.options is not None else None
    return (encoder.fingerprint, sample.id, image, tuple(map(tuple, sample.turns)), options, *how)
