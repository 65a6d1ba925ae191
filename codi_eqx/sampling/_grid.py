"""Laying images out as one grid image."""

import math
from typing import Optional

import numpy as np
from jaxtyping import UInt8


def image_grid(
    images: UInt8[np.ndarray, "n h w c"], cols: Optional[int] = None
) -> UInt8[np.ndarray, "H W c"]:
    """Images side by side, row by row, `cols` per row (default: the smallest square)."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n)) if cols is None else cols
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return grid
