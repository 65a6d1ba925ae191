"""Judging generated shapes images without any of the models under test.

- `analyse_image`: what an image shows, read off with plain numpy: every pixel is given the
  nearest named colour, the background is the majority colour of the border, the shapes are
  the connected regions of the other pixels, each of the majority colour of its core and of
  a kind told from the moments of its mask and the corners of its bounding box;
- `caption_match` / `caption_match_parts`: whether that agrees with a caption;
- `edge_f1`: how well the outlines of the image's regions follow an edge-map condition;
- `FeatureNet`, `train_feature_net`, `features`, `frechet_distance`: a tiny CNN trained on the
  shapes world, whose features give a Frechet distance between two sets of images.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from . import _shapes

NAMES: tuple[str, ...] = tuple(_shapes.COLOURS)
_PALETTE = np.array([_shapes.COLOURS[n] for n in NAMES], np.float64)

UNKNOWN = -1
"""The label of a pixel that is near no named colour."""

MAX_COLOUR_DISTANCE = 80.0
"""A pixel farther than this (Euclidean, in RGB) from every named colour is "unknown"."""

CORE_EROSION = 2
"""A region's colour is voted by its pixels at least this many pixels inside it."""

MIN_PURITY = 0.5
"""A region less than this fraction of whose core is of its majority colour (noise, say) is
of colour "unknown"."""

MIN_AREA = 20
"""Regions smaller than this many pixels are not shapes (specks, noise)."""

TRIANGLE_SKEW = -0.15
"""A region whose rows' skewness is below this is a triangle (-0.57 ideally, 0 for circles
and squares; see `kind_features`)."""

SQUARENESS = 0.5
"""Else, a region of at least this squareness is a square (1 ideally, 0 for circles), else a
circle."""

MIN_KIND_IOU = 0.6
"""A region overlapping the template of its kind (same area and centroid) less than this
(intersection over union) is of kind "unknown"."""


# --- colours and regions ---------------------------------------------------------------------

def colour_labels(image: np.ndarray, max_distance: float = MAX_COLOUR_DISTANCE) -> np.ndarray:
    """(H, W) int: the index in `NAMES` of each pixel's nearest named colour, `UNKNOWN` where
    that is farther than `max_distance`."""
    x = np.asarray(image, np.float64)[..., None, :3]
    d2 = np.sum((x - _PALETTE) ** 2, axis=-1)
    labels = np.argmin(d2, axis=-1)
    far = np.take_along_axis(d2, labels[..., None], axis=-1)[..., 0] > max_distance**2
    return np.where(far, UNKNOWN, labels)


def _majority(labels: np.ndarray) -> int:
    """The most frequent known label (ties: the lowest), `UNKNOWN` if none is known."""
    known = labels[labels != UNKNOWN]
    if known.size == 0:
        return UNKNOWN
    return int(np.argmax(np.bincount(known, minlength=len(NAMES))))


def background_label(labels: np.ndarray) -> int:
    """The majority label of the border pixels (of the whole image if none of them is known)."""
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    found = _majority(border)
    return found if found != UNKNOWN else _majority(labels)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count): 4-connected regions of a boolean (H, W) mask, numbered 1..count in
    raster order of their first pixel, 0 outside the mask."""
    h, w = mask.shape
    flat = np.asarray(mask, bool).ravel()
    out = np.zeros(h * w, np.int32)
    count = 0
    for start in np.flatnonzero(flat):
        if out[start]:
            continue
        count += 1
        out[start] = count
        queue = collections.deque([int(start)])
        while queue:
            p = queue.popleft()
            y, x = divmod(p, w)
            for q, ok in ((p - w, y > 0), (p + w, y < h - 1), (p - 1, x > 0), (p + 1, x < w - 1)):
                if ok and flat[q] and not out[q]:
                    out[q] = count
                    queue.append(q)
    return out.reshape(h, w), count


def _erode(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` whose 4-neighbours are all in it (outside the image is not)."""
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _shift_all(mask: np.ndarray, radius: int, combine) -> np.ndarray:
    """`combine` (np.logical_and or np.logical_or) of `mask` shifted by every offset within
    `radius` (chessboard distance), outside the image counting as False."""
    h, w = mask.shape
    p = np.pad(mask, radius)
    out = mask.copy()
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            combine(out, p[dy:dy + h, dx:dx + w], out=out)
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Every pixel within `radius` (chessboard distance) of one of `mask`."""
    return _shift_all(mask, radius, np.logical_or)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def kind_features(mask: np.ndarray) -> tuple[float, float]:
    """(skew, squareness) of a region's boolean (H, W) mask.

    `skew` is the skewness of its rows (y downwards): about -0.57 for an upright triangle,
    whose mass lies low, 0 for a circle or a square. `squareness` is the mean of two scores,
    each 1 for an axis-aligned square and 0 for a disc: the fraction of its bounding box's
    corners (the pixels outside the inscribed ellipse) that it covers, after an opening by a
    3x3 square (which keeps squares whole but drops the specks and spurs of a ragged rim
    that would stretch the box), and the four-fold moment E[x^4 + y^4 - 6 x^2 y^2] / E[r^2]^2
    about its centroid, over its value -0.6 for a square."""
    ys, xs = np.nonzero(mask)
    dy, dx = ys - ys.mean(), xs - xs.mean()
    var_y = float(np.mean(dy**2))
    skew = float(np.mean(dy**3)) / var_y**1.5 if var_y > 0 else 0.0
    r2 = float(np.mean(dx**2 + dy**2))
    four_fold = float(np.mean(dx**4 + dy**4 - 6 * dx**2 * dy**2)) / (-0.6 * r2**2) if r2 else 0.0
    opened = _dilate(_shift_all(mask, 1, np.logical_and), 1)
    y0, x0, y1, x1 = _box(opened if opened.any() else mask)
    crop = (opened if opened.any() else mask)[y0:y1, x0:x1]
    h, w = crop.shape
    yy, xx = np.mgrid[:h, :w].astype(np.float64) + 0.5
    outside = ((yy / h - 0.5) ** 2 + (xx / w - 0.5) ** 2) > 0.25
    corners = float(np.sum(crop & outside)) / max(int(outside.sum()), 1)
    return skew, (corners + four_fold) / 2.0


def kind_template(kind: str, mask: np.ndarray) -> np.ndarray:
    """The ideal mask of `kind` (as `_shapes` draws it) of the same area and centroid as a
    region's boolean (H, W) mask."""
    ys, xs = np.nonzero(mask)
    area = float(ys.size)
    size = {"circle": np.sqrt(area / np.pi), "square": np.sqrt(area) / 2.0,
            "triangle": np.sqrt(4.0 * area / (3.0 * np.sqrt(3.0)))}[kind]
    shape = _shapes.Shape(kind, "", float(ys.mean()) + 0.5, float(xs.mean()) + 0.5, float(size))
    h, w = mask.shape
    return _shapes.shape_mask(shape, max(h, w))[:h, :w]


def classify_kind(mask: np.ndarray, min_iou: float = MIN_KIND_IOU) -> tuple[str, float]:
    """(kind, iou) of a region's boolean (H, W) mask (`kind_features`): a triangle if its skew
    is below `TRIANGLE_SKEW`, else a square if its squareness is at least `SQUARENESS`, else a
    circle; "unknown" if it overlaps that kind's template (`kind_template`) less than
    `min_iou` (intersection over union)."""
    skew, squareness = kind_features(mask)
    kind = ("triangle" if skew < TRIANGLE_SKEW else
            "square" if squareness >= SQUARENESS else "circle")
    t = kind_template(kind, mask)
    iou = float(np.sum(t & mask) / np.sum(t | mask))
    return (kind if iou >= min_iou else "unknown"), iou


@dataclasses.dataclass(frozen=True)
class Region:
    """One connected non-background region: its colour, kind, pixel count, bounding box
    (`y0`, `x0`, `y1`, `x1`, exclusive ends), overlap `iou` with its kind's template and the
    fraction `purity` of its core of its colour."""

    colour: str
    kind: str
    area: int
    box: tuple[int, int, int, int]
    iou: float
    purity: float


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What an image shows: its background colour and its shapes as (colour, kind) pairs,
    largest first ("unknown" where nothing fits); `regions` has the details."""

    background: str
    shapes: tuple[tuple[str, str], ...]
    regions: tuple[Region, ...] = ()


def _name(label: int) -> str:
    return "unknown" if label == UNKNOWN else NAMES[label]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    return image


def foreground_regions(image: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, int]:
    """(colour labels, background label, region labels, region count) of an (H, W, 3) image:
    the regions are the 4-connected components, of any size, of the pixels whose nearest named
    colour is not the background's (however far it is: a pixel near no named colour is still
    background if the background colour is the nearest)."""
    image = _check_image(image)
    labels = colour_labels(image)
    bg = background_label(labels)
    nearest = colour_labels(image, np.inf)
    regions, count = connected_components(
        nearest != (bg if bg != UNKNOWN else background_label(nearest)))
    return labels, bg, regions, count


def region_colour(labels: np.ndarray, mask: np.ndarray,
                  core: int = CORE_EROSION) -> tuple[int, float]:
    """(label, purity): the majority colour label of a region's core, the region eroded
    `core` times (less where that leaves no pixel of a known colour; its rim, a blend with
    the background when blurred, does not vote), and the fraction of the core's pixels of
    that colour."""
    inner = [mask]
    for _ in range(core):
        inner.append(_erode(inner[-1]))
    for m in reversed(inner):
        found = _majority(labels[m])
        if found != UNKNOWN:
            return found, float(np.mean(labels[m] == found))
    return UNKNOWN, 0.0


def describe_region(labels: np.ndarray, mask: np.ndarray) -> Region:
    """The `Region` of one connected region's boolean mask: its colour (`region_colour`;
    "unknown" if less than `MIN_PURITY` of its core is of it) and kind (`classify_kind`)."""
    colour, purity = region_colour(labels, mask)
    kind, iou = classify_kind(mask)
    return Region(_name(colour) if purity >= MIN_PURITY else "unknown", kind,
                  int(mask.sum()), _box(mask), iou, purity)


def analyse_image(image: np.ndarray, min_area: int = MIN_AREA) -> Analysis:
    """Read the background colour and the shapes off an (H, W, 3) uint8 image; regions
    smaller than `min_area` pixels are ignored."""
    labels, bg, regions, count = foreground_regions(image)
    areas = np.bincount(regions.ravel(), minlength=count + 1)
    found = [describe_region(labels, regions == i)
             for i in range(1, count + 1) if areas[i] >= min_area]
    found.sort(key=lambda r: -r.area)
    return Analysis(_name(bg), tuple((r.colour, r.kind) for r in found), tuple(found))


# --- captions ----------------------------------------------------------------------------------

def caption_match_parts(image: np.ndarray, caption: str) -> dict[str, bool]:
    """Which parts of `caption` the image shows: "background" (its colour), "colours" and
    "kinds" (the multisets of the shapes' colours, of their kinds), "count" (the number of
    shapes) and "all" (the background and the multiset of (colour, kind) pairs)."""
    background, things = _shapes.parse_caption(caption)
    a = analyse_image(image)
    want, got = collections.Counter(things), collections.Counter(a.shapes)
    return {
        "background": a.background == background,
        "colours": sorted(c for c, _ in a.shapes) == sorted(c for c, _ in things),
        "kinds": sorted(k for _, k in a.shapes) == sorted(k for _, k in things),
        "count": len(a.shapes) == len(things),
        "all": a.background == background and got == want,
    }


def caption_match(image: np.ndarray, caption: str) -> bool:
    """Whether the image shows exactly `caption`: its background colour and the same shapes
    (colour and kind, in any order, no more, no fewer)."""
    return caption_match_parts(image, caption)["all"]


# --- edges -------------------------------------------------------------------------------------

def _inner_boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` with a 4-neighbour outside it, the image's border not counting as
    outside (so a region touching the border has no edge there)."""
    p = np.pad(mask, 1, mode="edge")
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def image_edges(image: np.ndarray, min_area: int = MIN_AREA) -> np.ndarray:
    """(H, W) bool: the edges of an (H, W, 3) image, the inner boundaries (as
    `_shapes.outline` draws them) of its regions of at least `min_area` pixels (4-connected
    pixels not of the background colour; specks do not count)."""
    _, _, regions, count = foreground_regions(image)
    areas = np.bincount(regions.ravel(), minlength=count + 1)
    edges = np.zeros(regions.shape, bool)
    for i in np.flatnonzero(areas >= min_area):
        if i:
            edges |= _inner_boundary(regions == i)
    return edges


def _as_edge_mask(edges: np.ndarray) -> np.ndarray:
    e = np.asarray(edges)
    if e.ndim == 3:
        e = e.max(axis=-1)
    if e.ndim != 2:
        raise ValueError(f"expected an (H, W) or (H, W, C) edge map, got shape {edges.shape}")
    return e.astype(bool) if e.dtype == bool else e > 127


def edge_f1(edges_condition: np.ndarray, image: np.ndarray, tolerance: int = 1) -> float:
    """F1 of the image's edges (`image_edges`) against an edge-map condition ((H, W) bool or
    uint8, or (H, W, C) uint8; edges where > 127): precision is the fraction of the image's
    edge pixels within `tolerance` pixels (chessboard distance) of a condition edge pixel,
    recall the fraction of condition edge pixels within `tolerance` of an image edge pixel.
    0 when both are 0; with no condition edge: 1 if the image has no edge either, else 0."""
    cond = _as_edge_mask(edges_condition)
    pred = image_edges(image)
    if cond.shape != pred.shape:
        raise ValueError(f"condition {cond.shape} and image {pred.shape} differ in size")
    if not cond.any():
        return 0.0 if pred.any() else 1.0
    if not pred.any():
        return 0.0
    precision = float(np.mean(_dilate(cond, tolerance)[pred]))
    recall = float(np.mean(_dilate(pred, tolerance)[cond]))
    if precision + recall == 0.0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


# --- features and the Frechet distance ---------------------------------------------------------

FEATURE_DIM = 64
COUNTS = (1, 2)


class FeatureNet(eqx.Module):
    """Three stride-2 3x3 convolutions (16, 32, 64 channels, ReLU); the global average and
    the global maximum of the last, projected (linear, ReLU) to the 64-d feature; linear heads
    on it: the background colour (8 classes), which colours and which kinds the shapes have
    (8 and 3 independent yes/no logits: a caption's order of the shapes is arbitrary) and the
    number of shapes (2 classes). Input: one (3, 64, 64) image in [-1, 1]."""

    convs: tuple[eqx.nn.Conv2d, ...]
    project: eqx.nn.Linear
    background_head: eqx.nn.Linear
    colours_head: eqx.nn.Linear
    kinds_head: eqx.nn.Linear
    count_head: eqx.nn.Linear

    def __init__(self, key: PRNGKeyArray):
        keys = jax.random.split(key, 8)
        widths = (3, 16, 32, 64)
        self.convs = tuple(
            eqx.nn.Conv2d(cin, cout, 3, stride=2, padding=1, key=k)
            for cin, cout, k in zip(widths[:-1], widths[1:], keys[:3]))
        self.project = eqx.nn.Linear(2 * widths[-1], FEATURE_DIM, key=keys[3])
        self.background_head = eqx.nn.Linear(FEATURE_DIM, len(NAMES), key=keys[4])
        self.colours_head = eqx.nn.Linear(FEATURE_DIM, len(NAMES), key=keys[5])
        self.kinds_head = eqx.nn.Linear(FEATURE_DIM, len(_shapes.SHAPES), key=keys[6])
        self.count_head = eqx.nn.Linear(FEATURE_DIM, len(COUNTS), key=keys[7])

    def embed(self, x: Float[Array, "3 h w"]) -> Float[Array, " 64"]:
        """The 64-d feature."""
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        pooled = jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))])
        return jax.nn.relu(self.project(pooled))

    def __call__(self, x: Float[Array, "3 h w"]
                 ) -> tuple[Float[Array, " 8"], Float[Array, " 8"], Float[Array, " 3"],
                            Float[Array, " 2"]]:
        """(background, colours, kinds, count) logits."""
        f = self.embed(x)
        return (self.background_head(f), self.colours_head(f), self.kinds_head(f),
                self.count_head(f))


def _to_model(images: np.ndarray) -> jnp.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return jnp.asarray(np.asarray(images).transpose(0, 3, 1, 2), jnp.float32) / 127.5 - 1.0


def scene_targets(scene: _shapes.Scene) -> np.ndarray:
    """(13,) int32: the background colour's index, whether each named colour is a shape's (8),
    whether each kind is a shape's (3), the index in `COUNTS` of the number of shapes."""
    colours = [float(n in {s.colour for s in scene.shapes}) for n in NAMES]
    kinds = [float(k in {s.kind for s in scene.shapes}) for k in _shapes.SHAPES]
    return np.array([NAMES.index(scene.background), *colours, *kinds,
                     COUNTS.index(len(scene.shapes))], np.int32)


def _labelled_batches(seed: int, batch_size: int, split: _shapes.Split):
    """An endless stream of (images (B, 64, 64, 3) uint8, targets (B, 13) int32) of fresh
    scenes, the targets as `scene_targets`."""
    rng = np.random.default_rng([seed, 11])
    while True:
        drawn = [_shapes.random_scene(rng, split) for _ in range(batch_size)]
        yield (np.stack([_shapes.render(s)[0] for s in drawn]),
               np.stack([scene_targets(s) for s in drawn]))


def feature_net_loss(net: FeatureNet, x: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Cross-entropy of the background and count heads plus the binary cross-entropies of the
    colour and kind logits (summed over them), averaged over the batch."""
    background, colours, kinds, count = jax.vmap(net)(x)
    n = len(NAMES)
    yes = targets.astype(jnp.float32)
    per_example = (
        optax.softmax_cross_entropy_with_integer_labels(background, targets[:, 0])
        + optax.sigmoid_binary_cross_entropy(colours, yes[:, 1:1 + n]).sum(-1)
        + optax.sigmoid_binary_cross_entropy(kinds, yes[:, 1 + n:-1]).sum(-1)
        + optax.softmax_cross_entropy_with_integer_labels(count, targets[:, -1]))
    return jnp.mean(per_example)


def train_feature_net(seed: int = 0, steps: int = 1500, batch_size: int = 64, *,
                      learning_rate: float = 3e-3, split: _shapes.Split = "any",
                      progress: Callable[[int, dict], None] | None = None) -> FeatureNet:
    """Train a `FeatureNet` with Adam on `steps` batches of fresh scenes of `split` (all
    combinations by default, so that held-out ones are not unusual to it); `progress(1, info)`
    after each step."""
    net = FeatureNet(jax.random.key(seed))
    opt = optax.adam(learning_rate)
    state = opt.init(eqx.filter(net, eqx.is_array))

    @eqx.filter_jit
    def step(net, state, x, targets):
        loss, grads = eqx.filter_value_and_grad(feature_net_loss)(net, x, targets)
        updates, state = opt.update(grads, state, eqx.filter(net, eqx.is_array))
        return eqx.apply_updates(net, updates), state, loss

    data = _labelled_batches(seed, batch_size, split)
    for i in range(steps):
        images, targets = next(data)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32
            net, state, loss = step(net, state, _to_model(images), jnp.asarray(targets))
        if progress is not None:
            progress(1, {"phase": "features", "step": i + 1, "loss": float(loss)})
    return net


@eqx.filter_jit
def _embed_batch(net: FeatureNet, x: jnp.ndarray) -> jnp.ndarray:
    return jax.vmap(net.embed)(x)


def features(net: FeatureNet, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(N, 64) float32 features (`FeatureNet.embed`) of (N, 64, 64, 3) uint8 images, `chunk`
    at a time (the last chunk padded, so that one compilation serves every call)."""
    images = np.asarray(images)
    n = images.shape[0]
    out = []
    for start in range(0, n, chunk):
        part = images[start:start + chunk]
        pad = chunk - part.shape[0]
        if pad:
            part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
        out.append(np.asarray(_embed_batch(net, _to_model(part)))[:chunk - pad])
    if not out:
        return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(out).astype(np.float32)


def save_feature_net(net: FeatureNet, path: str | Path) -> Path:
    """Write the weights to `path` (a `.eqx` file; the architecture is fixed in code)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    eqx.tree_serialise_leaves(path, net)
    return path


def load_feature_net(path: str | Path) -> FeatureNet:
    """The `FeatureNet` that `save_feature_net` wrote to `path`."""
    return eqx.tree_deserialise_leaves(Path(path), FeatureNet(jax.random.key(0)))


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues
    below zero, from rounding, clipped to zero)."""
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two (N, D) feature sets:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrt(sqrt(S_a) S_b sqrt(S_a)))."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, D) feature sets, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Frechet distance needs at least 2 samples in each set")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrtm_psd(s_a)
    cross = np.trace(_sqrtm_psd(root_a @ s_b @ root_a))
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * cross)
    return max(value, 0.0)
