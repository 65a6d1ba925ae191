"""The project's dimension vocabulary for jaxtyping annotations.

Arrays are one example, channels first (Equinox's convention); batch with `jax.vmap`.

- `c h w`: a feature map; `4 h w` latents (VAE latent channels), `3 H W` images.
- `seq d`: a token sequence (text embeddings: `seq d` with `d` the cross-attention width).
"""

from typing import Union

import jax
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, Shaped

FeatureMap = Float[Array, "c h w"]
Latents = Float[Array, "c h w"]
Image = Float[Array, "3 H W"]
TextEmbeddings = Float[Array, "seq d"]
TokenIds = Int[Array, " seq"]
Scalar = Union[Float[Array, ""], Int[Array, ""], float, int]
Timestep = Union[Float[Array, ""], Int[Array, ""], float, int]
Key = PRNGKeyArray
ArrayLike = Union[jax.Array, np.ndarray]

__all__ = [
    "Array",
    "ArrayLike",
    "FeatureMap",
    "Float",
    "Image",
    "Int",
    "Key",
    "Latents",
    "PRNGKeyArray",
    "Scalar",
    "Shaped",
    "TextEmbeddings",
    "Timestep",
    "TokenIds",
]
