"""The synthetic "shapes" world of the built-in default: 64x64 images of one or two filled
shapes in named colours on a plain background of another named colour, their captions
("a red circle and a yellow square on a blue background") and their outlines (the condition
image of the edge adapter).

Everything is a pure function of a seed. A fixed set of (shape colour, shape kind,
background colour) combinations is held out: training scenes never contain one, held-out
scenes contain at least one, so the quality benchmark measures generalisation to captions
that training never saw.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Literal, Optional

import numpy as np

IMAGE_SIZE = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (30, 170, 60),
    "blue": (35, 65, 225),
    "yellow": (255, 235, 0),
    "orange": (255, 128, 0),
    "purple": (135, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
"""Each named colour's one RGB value; the closest pair (orange, yellow) is 107 apart."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

Split = Literal["train", "heldout", "any"]


def _heldout_combinations() -> frozenset[tuple[str, str, str]]:
    """16 of the 168 (colour, kind, background) combinations, fixed forever (seeded), chosen so
    that every colour, kind and background still occurs in training."""
    combos = [(c, k, b) for c in COLOURS for k in SHAPES for b in COLOURS if b != c]
    rng = np.random.default_rng(20240617)
    order = rng.permutation(len(combos))
    return frozenset(combos[i] for i in order[:16])


HELDOUT: frozenset[tuple[str, str, str]] = _heldout_combinations()
"""(shape colour, shape kind, background colour) combinations that training never sees."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """One filled shape: `kind`, `colour`, centre (`cy`, `cx`) and `size` (the circle's
    radius, half the square's side, the triangle's circumradius), in pixels."""

    kind: str
    colour: str
    cy: float
    cx: float
    size: float


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one image shows: its background colour and one or two shapes."""

    background: str
    shapes: tuple[Shape, ...]

    @property
    def combinations(self) -> tuple[tuple[str, str, str], ...]:
        return tuple((s.colour, s.kind, self.background) for s in self.shapes)

    @property
    def heldout(self) -> bool:
        return any(c in HELDOUT for c in self.combinations)

    @property
    def caption(self) -> str:
        return caption(self)


def caption(scene: Scene) -> str:
    """"a red circle on a blue background", "a red circle and a yellow square on a blue
    background"."""
    things = " and ".join(f"a {s.colour} {s.kind}" for s in scene.shapes)
    return f"{things} on a {scene.background} background"


_THING = r"a (\w+) (\w+)"
_CAPTION = re.compile(rf"^{_THING}(?: and {_THING})? on a (\w+) background$")


def parse_caption(text: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(background, ((colour, kind), ...)) of a caption in the grammar; ValueError otherwise."""
    m = _CAPTION.match(text.strip().lower())
    if m is None:
        raise ValueError(
            f"caption {text!r} is not in the shapes grammar: 'a COLOUR SHAPE [and a COLOUR "
            "SHAPE] on a COLOUR background'"
        )
    c1, k1, c2, k2, bg = m.groups()
    things = ((c1, k1),) if c2 is None else ((c1, k1), (c2, k2))
    for colour, kind in things + ((bg, "circle"),):
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r} in {text!r}: one of {', '.join(COLOURS)}")
        if kind not in SHAPES:
            raise ValueError(f"unknown shape {kind!r} in {text!r}: one of {', '.join(SHAPES)}")
    return bg, things


def _triangle_vertices(s: Shape) -> np.ndarray:
    """An upright equilateral triangle: (3, 2) vertices (y, x)."""
    angles = np.deg2rad([-90.0, 30.0, 150.0])
    return np.stack([s.cy + s.size * np.sin(angles), s.cx + s.size * np.cos(angles)], axis=1)


def shape_mask(s: Shape, size: int = IMAGE_SIZE) -> np.ndarray:
    """The (size, size) boolean mask of the pixels whose centre lies inside the shape."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64) + 0.5
    if s.kind == "circle":
        return (yy - s.cy) ** 2 + (xx - s.cx) ** 2 <= s.size**2
    if s.kind == "square":
        return (np.abs(yy - s.cy) <= s.size) & (np.abs(xx - s.cx) <= s.size)
    if s.kind == "triangle":
        v = _triangle_vertices(s)
        inside = np.ones((size, size), bool)
        for i in range(3):
            (y0, x0), (y1, x1) = v[i], v[(i + 1) % 3]
            # the interior lies left of each edge, going round clockwise in image coordinates
            inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
        return inside
    raise ValueError(f"unknown shape {s.kind!r}: one of {', '.join(SHAPES)}")


def _extent(s: Shape) -> float:
    return s.size * (np.sqrt(2.0) if s.kind == "square" else 1.0)


def random_scene(rng: np.random.Generator, split: Split = "train", *,
                 two_shapes: Optional[bool] = None, size: int = IMAGE_SIZE) -> Scene:
    """A random scene of `split` ("train": no held-out combination; "heldout": at least one;
    "any"). Shapes lie fully inside the image and do not touch each other."""
    names = list(COLOURS)
    while True:
        n = (2 if rng.random() < 0.5 else 1) if two_shapes is None else (2 if two_shapes else 1)
        background = names[rng.integers(len(names))]
        shapes: list[Shape] = []
        tries = 0
        while len(shapes) < n and tries < 100:
            tries += 1
            kind = SHAPES[rng.integers(len(SHAPES))]
            colour = names[rng.integers(len(names))]
            if colour == background:
                continue
            lo, hi = (0.14, 0.24) if n == 1 else (0.11, 0.18)
            r = float(rng.uniform(lo, hi) * size)
            margin = r + 1.5
            cy, cx = (float(v) for v in rng.uniform(margin, size - margin, 2))
            cand = Shape(kind, colour, cy, cx, r)
            if all(np.hypot(cand.cy - o.cy, cand.cx - o.cx) > _extent(cand) + _extent(o) + 3
                   for o in shapes):
                shapes.append(cand)
        if len(shapes) < n:
            continue
        scene = Scene(background, tuple(shapes))
        if split == "any" or (split == "heldout") == scene.heldout:
            return scene


def scene_for_caption(text: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """A random layout of what a caption in the grammar describes (for its edge map)."""
    background, things = parse_caption(text)
    while True:
        drawn = random_scene(rng, "any", two_shapes=len(things) == 2, size=size)
        shapes = tuple(dataclasses.replace(s, colour=c, kind=k)
                       for s, (c, k) in zip(drawn.shapes, things))
        if all(np.hypot(a.cy - b.cy, a.cx - b.cx) > _extent(a) + _extent(b) + 3
               for i, a in enumerate(shapes) for b in shapes[i + 1:]):
            return Scene(background, shapes)


def outline(mask: np.ndarray) -> np.ndarray:
    """The inner boundary of a mask: its pixels with a 4-neighbour outside it."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def render(scene: Scene, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(image, edges): the (size, size, 3) uint8 picture and the shapes' outlines as a
    (size, size, 3) uint8 condition image (255 on the outline, 0 elsewhere)."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = COLOURS[scene.background]
    edges = np.zeros((size, size), bool)
    for s in scene.shapes:
        mask = shape_mask(s, size)
        image[mask] = COLOURS[s.colour]
        edges |= outline(mask)
    return image, np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=2)


def scenes(seed: int, n: int, split: Split = "train", *,
           two_shapes: Optional[bool] = None) -> list[Scene]:
    """`n` scenes of `split`, the same for the same seed."""
    rng = np.random.default_rng([seed, {"train": 0, "heldout": 1, "any": 2}[split]])
    return [random_scene(rng, split, two_shapes=two_shapes) for _ in range(n)]


def batches(seed: int, batch_size: int, split: Split = "train"
            ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """An endless stream of fresh (images (B, 64, 64, 3), edges (B, 64, 64, 3), captions)."""
    rng = np.random.default_rng([seed, 7])
    while True:
        drawn = [random_scene(rng, split) for _ in range(batch_size)]
        pairs = [render(s) for s in drawn]
        yield (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]),
               [s.caption for s in drawn])


def write_dataset(folder: str | Path, num_images: int, *, seed: int = 0,
                  split: Split = "train", progress=None) -> Path:
    """Write `num_images` scenes in the training layout (`images/`, `processed_images/` with
    the outlines, `meta.jsonl`) plus `scenes.jsonl` (what each image shows, exactly)."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "processed_images").mkdir(exist_ok=True)
    meta, truth = [], []
    for i, scene in enumerate(scenes(seed, num_images, split)):
        image, edges = render(scene)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(folder / "images" / name)
        Image.fromarray(edges).save(folder / "processed_images" / name)
        meta.append(json.dumps({"image": f"images/{name}",
                                "conditioning_image": f"processed_images/{name}",
                                "caption": scene.caption}))
        truth.append(json.dumps(scene_to_dict(scene)))
        if progress is not None:
            progress(1)
    (folder / "meta.jsonl").write_text("\n".join(meta) + "\n")
    (folder / "scenes.jsonl").write_text("\n".join(truth) + "\n")
    return folder


def scene_to_dict(scene: Scene) -> dict:
    return {"background": scene.background, "shapes": [dataclasses.asdict(s) for s in scene.shapes],
            "caption": scene.caption, "heldout": scene.heldout}


def scene_from_dict(d: dict) -> Scene:
    return Scene(d["background"], tuple(Shape(**s) for s in d["shapes"]))


def vocabulary() -> tuple[str, ...]:
    """Every word of the captions' grammar."""
    return ("a", "and", "on", "background") + SHAPES + tuple(COLOURS)


def edge_images(scenes_: Sequence[Scene]) -> np.ndarray:
    return np.stack([render(s)[1] for s in scenes_])
