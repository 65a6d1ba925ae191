"""Raw examples (references to undecoded images plus a caption) and their decoding into the
training example dict."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import numpy as np

from ._transforms import ImageRef, image_to_array, image_to_array_coords

Caption = Union[str, list]


@dataclasses.dataclass(frozen=True)
class RawExample:
    """One example before decoding: cheap to make, cheap to pickle to a worker.

    **Arguments:**

    - `index`: a stable integer id of the example in its dataset.
    - `image`, `conditioning`: image references (path, encoded bytes or a decoded image);
      `conditioning` is None for unconditional data.
    - `caption`: a string, or a list of strings of which one is chosen per epoch.
    - `name`: how to name the example in messages (usually the image's file name).
    """

    index: int
    image: ImageRef
    conditioning: Optional[ImageRef]
    caption: Caption
    name: str


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What the workers need to turn a `RawExample` into a training example."""

    resolution: int
    seed: int
    proportion_empty_prompts: float = 0.0


def choose_caption(caption: Caption, spec: DecodeSpec, epoch: int, index: int) -> str:
    """The caption used for `index` in `epoch`: a seeded choice among a list, replaced by the
    empty prompt with probability `proportion_empty_prompts`. It depends only on
    (seed, epoch, index), so every process and worker agrees."""
    rng = np.random.default_rng([spec.seed, epoch, index & 0x7FFFFFFFFFFFFFFF, 7])
    if isinstance(caption, (list, tuple)):
        options = [c for c in caption if isinstance(c, str)]
        text = options[int(rng.integers(len(options)))] if options else ""
    else:
        text = "" if caption is None else str(caption)
    if spec.proportion_empty_prompts > 0 and rng.random() < spec.proportion_empty_prompts:
        text = ""
    return text


def decode_example(raw: RawExample, spec: DecodeSpec, epoch: int) -> dict:
    """Decode `raw` into `{"pixel_values", "conditioning_pixel_values"?, "caption", "index",
    "original_size", "crop_top_left"}`.
    Raises whatever the image decoder raises on an unreadable image."""
    pixels, size, crop = image_to_array_coords(raw.image, spec.resolution, signed=True)
    out = {
        "pixel_values": pixels,
        "caption": choose_caption(raw.caption, spec, epoch, raw.index),
        "index": int(raw.index),
        # SDXL's micro-conditioning: the image's size before the resize, the crop's corner.
        "original_size": np.asarray(size, np.int32),
        "crop_top_left": np.asarray(crop, np.int32),
    }
    if raw.conditioning is not None:
        out["conditioning_pixel_values"] = image_to_array(
            raw.conditioning, spec.resolution, signed=False
        )
    return out


@dataclasses.dataclass(frozen=True)
class Failure:
    """A raw example that could not be decoded."""

    name: str
    message: str


def try_decode(raw: RawExample, spec: DecodeSpec, epoch: int) -> Union[dict, Failure]:
    """`decode_example`, with a failure returned rather than raised (workers use this)."""
    try:
        return decode_example(raw, spec, epoch)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
        return Failure(raw.name, f"{type(e).__name__}: {e}")
