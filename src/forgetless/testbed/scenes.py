"""Pictures for the testbed: scenes of coloured shapes and handwritten digits, 64×64 RGB, drawn from a seed.

A scene is a list of :class:`Shape` (colour, kind, centre, size) on a pale background. Shapes never overlap (their
bounding circles keep a gap), so colour, kind, count and relative position are always well defined. The digits are
scikit-learn's 8×8 handwritten digits (1797 images shipped with the package), scaled to 64×64 as dark ink on paper.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (230, 200, 20),
    "purple": (135, 55, 175),
    "orange": (245, 135, 20),
}
KINDS = ("circle", "square", "triangle")
BACKGROUNDS = ((245, 245, 245), (235, 235, 225), (225, 232, 240), (240, 230, 235))


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    x: float  # centre, pixels
    y: float
    r: float  # half the size (radius of the bounding circle)

    def phrase(self) -> str:
        return f"{self.colour} {self.kind}"


def draw(shapes: list[Shape], background: tuple[int, int, int] = BACKGROUNDS[0]) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(im)
    for s in shapes:
        c = COLOURS[s.colour]
        if s.kind == "circle":
            d.ellipse([s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r], fill=c)
        elif s.kind == "square":
            h = s.r * 0.85
            d.rectangle([s.x - h, s.y - h, s.x + h, s.y + h], fill=c)
        elif s.kind == "triangle":
            d.polygon(
                [(s.x, s.y - s.r), (s.x - s.r * 0.95, s.y + s.r * 0.8), (s.x + s.r * 0.95, s.y + s.r * 0.8)],
                fill=c,
            )
        else:
            raise ValueError(f"unknown shape kind {s.kind!r}")
    return im


def place(
    rng: random.Random,
    n: int,
    radius: tuple[float, float],
    *,
    colours=None,
    kinds=None,
    distinct: bool = False,
    tries: int = 2000,
) -> list[Shape]:
    """`n` non-overlapping shapes with radii in `radius`; `distinct`: no two share both colour and kind."""
    colours = list(colours or COLOURS)
    kinds = list(kinds or KINDS)
    for _ in range(tries):
        out: list[Shape] = []
        for _ in range(tries):
            if len(out) == n:
                break
            r = rng.uniform(*radius)
            x, y = rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1)
            if any(math.hypot(x - o.x, y - o.y) < r + o.r + 2 for o in out):
                continue
            c, k = rng.choice(colours), rng.choice(kinds)
            if distinct and any(o.colour == c and o.kind == k for o in out):
                continue
            out.append(Shape(c, k, x, y, r))
        if len(out) == n:
            return out
    raise RuntimeError(f"could not place {n} shapes of radius {radius} in {SIZE}x{SIZE}")


def scene(rng: random.Random, shapes: list[Shape]) -> Image.Image:
    return draw(shapes, rng.choice(BACKGROUNDS))


_DIGITS: tuple[np.ndarray, np.ndarray] | None = None


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: images [1797, 8, 8] in 0..16 and labels [1797]."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _DIGITS = (d.images, d.target)
    return _DIGITS


def digit_image(index: int, rng: random.Random) -> Image.Image:
    """Digit `index` as dark ink on paper, scaled to 48–60 px and placed at a random offset in 64×64."""
    images, _ = digits()
    ink = (images[index] / 16.0 * 255).astype(np.uint8)
    side = rng.randint(48, 60)
    glyph = Image.fromarray(255 - ink, mode="L").resize((side, side), Image.BILINEAR)
    im = Image.new("L", (SIZE, SIZE), 255)
    im.paste(glyph, (rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)))
    return im.convert("RGB")
