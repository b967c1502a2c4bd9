"""Scenes of the shapes task and their images, made in code (numpy + PIL, no torch).

A scene holds one to three shapes (circle, square, triangle, star, diamond) in named colours,
each in its own slot (left, right, top, bottom) with a jittered position and size and a small
rotation, on a plain or textured background of neutral colour, with a few neutral occluding
bars drawn over it. Everything is drawn from a numpy Generator, so a scene and its image
depend only on the generator's seed. Images have the real MobileVLM geometry: 336x336.

Colours of the background and the occluders are desaturated on purpose: a shape's colour is
the only saturated colour in its slot, so "what colour is X" has one right answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
SHAPES = ("circle", "square", "triangle", "star", "diamond")
# Reference RGB of each colour name; each drawn shape is jittered around it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (140, 55, 180),
    "orange": (240, 130, 25),
}
COLOUR_JITTER = 16
# Slot centres: the middle of each side, far enough apart that shapes never overlap (twice the
# largest extent, 1.25 * 44, plus the jitter along the diagonal, 2 * 8 * sqrt(2), is less than the
# 138 px between neighbouring slots) and never leave the image (70 - 55 - 8 > 0).
SLOTS: dict[str, tuple[int, int]] = {"top": (168, 70), "left": (70, 168), "right": (266, 168), "bottom": (168, 266)}
SLOT_ORDER = ("top", "left", "right", "bottom")  # reading order: descriptions list shapes in it
POSITION_JITTER = 8
# Big enough that each shape spans several 14-pixel patches (a star's points included).
RADIUS_RANGE = (28, 44)
MAX_ROTATION_DEG = 8.0
BACKGROUNDS = ("plain", "gradient", "noise", "stripes", "checker")


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    slot: str  # one of SLOTS
    centre: tuple[int, int]
    radius: int
    rotation: float  # degrees
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str  # one of BACKGROUNDS
    seed: tuple[int, ...]  # the generator's seed: the image is drawn from it again

    def by_kind(self, kind: str) -> Shape:
        return next(s for s in self.shapes if s.kind == kind)

    def in_reading_order(self) -> list[Shape]:
        return sorted(self.shapes, key=lambda s: SLOT_ORDER.index(s.slot))


def _jittered_rgb(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[name])
    return tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))


def sample_layout(rng: np.random.Generator, count: int) -> list[tuple[str, str, str]]:
    """`count` (kind, colour, slot) triples: distinct kinds, distinct colours, distinct slots.

    Distinct kinds and colours make "the circle" and "the red shape" name one shape each.
    """
    kinds = rng.choice(len(SHAPES), count, replace=False)
    colours = rng.choice(len(COLOURS), count, replace=False)
    slots = rng.choice(len(SLOT_ORDER), count, replace=False)
    names = list(COLOURS)
    return [(SHAPES[k], names[c], SLOT_ORDER[s]) for k, c, s in zip(kinds, colours, slots)]


def place(rng: np.random.Generator, layout: list[tuple[str, str, str]]) -> tuple[Shape, ...]:
    """Concrete shapes for a layout: jittered centre, size, rotation and colour."""
    shapes = []
    for kind, colour, slot in layout:
        x, y = SLOTS[slot]
        dx, dy = rng.integers(-POSITION_JITTER, POSITION_JITTER + 1, 2)
        radius = int(rng.integers(RADIUS_RANGE[0], RADIUS_RANGE[1] + 1))
        rotation = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        shapes.append(
            Shape(kind, colour, slot, (int(x + dx), int(y + dy)), radius, rotation, _jittered_rgb(rng, colour))
        )
    return tuple(shapes)


def sample_scene(seed: tuple[int, ...], count: int | None = None, layout=None) -> Scene:
    """A scene from its seed; `layout` (kind, colour, slot triples) fixes what is drawn, else sampled."""
    rng = np.random.default_rng(list(seed))
    if layout is None:
        layout = sample_layout(rng, count or int(rng.integers(1, 4)))
    shapes = place(rng, list(layout))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(shapes, background, tuple(seed))


# --- drawing ------------------------------------------------------------------------------


def _rotate(points: list[tuple[float, float]], centre: tuple[int, int], degrees: float) -> list[tuple[float, float]]:
    a = math.radians(degrees)
    cx, cy = centre
    return [
        (cx + (x - cx) * math.cos(a) - (y - cy) * math.sin(a), cy + (x - cx) * math.sin(a) + (y - cy) * math.cos(a))
        for x, y in points
    ]


def shape_polygon(shape: Shape) -> list[tuple[float, float]] | None:
    """The outline of a polygonal shape (None for the circle). Sizes are chosen so that every
    kind covers a similar area at the same radius: size alone never gives the kind away."""
    cx, cy = shape.centre
    r = shape.radius
    if shape.kind == "circle":
        return None
    if shape.kind == "square":
        h = 0.89 * r
        points = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape.kind == "triangle":
        R = 1.25 * r
        points = [(cx + R * math.sin(math.radians(a)), cy - R * math.cos(math.radians(a))) for a in (0, 120, 240)]
    elif shape.kind == "star":
        outer, inner = 1.25 * r, 0.5 * r
        points = [
            (
                cx + (outer if i % 2 == 0 else inner) * math.sin(math.radians(36 * i)),
                cy - (outer if i % 2 == 0 else inner) * math.cos(math.radians(36 * i)),
            )
            for i in range(10)
        ]
    elif shape.kind == "diamond":
        points = [(cx, cy - 1.2 * r), (cx + 0.8 * r, cy), (cx, cy + 1.2 * r), (cx - 0.8 * r, cy)]
    else:
        raise ValueError(f"unknown shape {shape.kind!r}")
    return _rotate(points, shape.centre, shape.rotation)


def _neutral(rng: np.random.Generator, low: int = 60, high: int = 215) -> np.ndarray:
    """A desaturated colour: a grey level with a slight tint."""
    return float(rng.integers(low, high + 1)) + rng.uniform(-10, 10, 3)


_GRID = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)  # (y, x), shared by every background


def draw_background(rng: np.random.Generator, kind: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """float [size, size, 3] in 0..255."""
    y, x = _GRID if size == IMAGE_SIZE else np.mgrid[0:size, 0:size].astype(np.float32)
    first, second = _neutral(rng), _neutral(rng)
    if kind == "plain":
        return np.broadcast_to(first, (size, size, 3)).astype(np.float32)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.cos(angle) * x + np.sin(angle) * y) / size
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return (first * (1 - t[..., None]) + second * t[..., None]).astype(np.float32)
    if kind == "noise":
        sigma = rng.uniform(5, 14)
        return first.astype(np.float32) + np.float32(sigma) * rng.standard_normal((size, size, 3), np.float32)
    if kind == "stripes":
        period = float(rng.uniform(14, 40))
        angle = rng.choice([0.0, math.pi / 2, math.pi / 4, 3 * math.pi / 4])
        band = ((np.cos(angle) * x + np.sin(angle) * y) // (period / 2)) % 2
        return np.where(band[..., None] == 0, first, second).astype(np.float32)
    if kind == "checker":
        cell = int(rng.integers(20, 49))
        board = ((x // cell + y // cell) % 2)[..., None]
        return np.where(board == 0, first, second).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}")


def _fill_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    polygon = shape_polygon(shape)
    if polygon is None:
        cx, cy = shape.centre
        draw.ellipse((cx - shape.radius, cy - shape.radius, cx + shape.radius, cy + shape.radius), fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def shape_index_map(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size]: 0 for background, i + 1 where shape i is (occluders ignored)."""
    index = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(index)
    for i, shape in enumerate(scene.shapes):
        _fill_shape(draw, shape, i + 1)
    return np.asarray(index)


def draw_scene(scene: Scene) -> Image.Image:
    """The scene's 336x336 RGB image. The background and occluders come from a generator of
    their own (the scene's seed + a tag), so the same shapes can be redrawn identically."""
    rng = np.random.default_rng([*scene.seed, 0x0BAC])
    image = Image.fromarray(np.round(draw_background(rng, scene.background)).clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _fill_shape(draw, shape, shape.rgb)
    # Occluders: thin neutral bars across the image, over the shapes (0 to 2 of them).
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
        ends = rng.uniform(0, IMAGE_SIZE, 4)
        tone = tuple(int(v) for v in np.clip(_neutral(rng, 20, 235), 0, 255))
        draw.line([(ends[0], ends[1]), (ends[2], ends[3])], fill=tone, width=int(rng.integers(3, 8)))
    return image


def image_digest(image: Image.Image) -> str:
    """sha256 of the pixels: a golden task file made from other drawing code is noticed."""
    import hashlib

    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()
