"""Decoding and the training transform: bilinear resize of the short side to R, centre crop to
R x R, channels first; the image to [-1, 1], the condition image to [0, 1]."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from jaxtyping import Float
from PIL import Image

ImageRef = Union[str, Path, bytes, Image.Image]
"""Where an image comes from: a file path, encoded bytes, or an already decoded image."""


def decode_rgb(ref: ImageRef) -> Image.Image:
    """Decode `ref` fully (so that a truncated file fails here, not later) as RGB."""
    if isinstance(ref, Image.Image):
        image = ref
    elif isinstance(ref, bytes):
        image = Image.open(io.BytesIO(ref))
    else:
        image = Image.open(ref)
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to `resolution` (bilinear), then crop the centre square."""
    return resize_center_crop_coords(image, resolution)[0]


def resize_center_crop_coords(
    image: Image.Image, resolution: int
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """`resize_center_crop`, with what SDXL's micro-conditioning records: the original size
    `(height, width)` and the crop's top-left corner `(top, left)` in the resized image."""
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ValueError("empty image")
    if w <= h:
        new_w, new_h = resolution, max(resolution, int(resolution * h / w))
    else:
        new_w, new_h = max(resolution, int(resolution * w / h)), resolution
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - resolution) / 2.0))
    left = int(round((new_w - resolution) / 2.0))
    return image.crop((left, top, left + resolution, top + resolution)), (h, w), (top, left)


def to_chw(image: Image.Image, *, signed: bool) -> Float[np.ndarray, "3 R R"]:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1] (`signed`) or [0, 1]."""
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    if signed:
        x = x * np.float32(2.0) - np.float32(1.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def image_to_array(ref: ImageRef, resolution: int, *, signed: bool) -> Float[np.ndarray, "3 R R"]:
    """Decode, resize, crop and scale one image (see the module docstring)."""
    return to_chw(resize_center_crop(decode_rgb(ref), resolution), signed=signed)


def image_to_array_coords(ref: ImageRef, resolution: int, *, signed: bool):
    """`image_to_array`, with the original size `(h, w)` and the crop's top-left `(top,
    left)` (`resize_center_crop_coords`)."""
    image, size, crop = resize_center_crop_coords(decode_rgb(ref), resolution)
    return to_chw(image, signed=signed), size, crop
