"""Basic layers with PyTorch's parameter layout and names (`weight`, `bias`).

Each layer keeps its parameters in the dtype it was built or loaded with and computes in that
dtype; normalisations compute their statistics in float32 and return the input's dtype.
"""

import math
from typing import ClassVar, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._conv import conv2d


def _uniform(key, shape, bound, dtype):
    return jax.random.uniform(key, shape, dtype=dtype, minval=-bound, maxval=bound)


class Linear(eqx.Module):
    """`y = x W^T + b` with `W` of shape `(out_features, in_features)`, as `torch.nn.Linear`."""

    weight: Float[Array, "out in"]
    bias: Optional[Float[Array, " out"]]
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self, in_features: int, out_features: int, *, use_bias: bool = True,
        dtype=jnp.float32, key: PRNGKeyArray,
    ):
        wkey, bkey = jax.random.split(key)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = _uniform(wkey, (out_features, in_features), bound, dtype)
        self.bias = _uniform(bkey, (out_features,), bound, dtype) if use_bias else None
        self.in_features = in_features
        self.out_features = out_features

    def __call__(self, x: Float[Array, "*batch in"]) -> Float[Array, "*batch out"]:
        y = jnp.matmul(x.astype(self.weight.dtype), self.weight.T)
        if self.bias is not None:
            y = y + self.bias
        return y


class Conv2d(eqx.Module):
    """2-D convolution on one `(C, H, W)` example; weight `(kh, kw, in, out)`, bias `(out,)`.

    The weight is held channels-last (HWIO), the layout XLA:CPU's convolution library takes:
    holding it in PyTorch's `(out, in, kh, kw)` costs a transpose of every weight at every call
    (1.7x the time of a 1280-channel 3x3 convolution at 8x8 on CPU). Checkpoints keep PyTorch's
    layout: `checkpoint_axes` tells the weight loader and exporter how to permute. Gradients
    follow `codi_eqx.nn._conv.conv2d` (matrix products where XLA:CPU's convolution gradients
    lose).
    """

    # module array = checkpoint array.transpose(axes), per field (read by codi_eqx.weights).
    checkpoint_axes: ClassVar[dict[str, tuple[int, ...]]] = {"weight": (2, 3, 1, 0)}

    weight: Float[Array, "kh kw in out"]
    bias: Optional[Float[Array, " out"]]
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
        padding: int = 0, use_bias: bool = True, zero_init: bool = False,
        dtype=jnp.float32, key: PRNGKeyArray,
    ):
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        if zero_init:
            self.weight = jnp.zeros(shape, dtype)
            self.bias = jnp.zeros((out_channels,), dtype) if use_bias else None
        else:
            wkey, bkey = jax.random.split(key)
            bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
            self.weight = _uniform(wkey, shape, bound, dtype)
            self.bias = _uniform(bkey, (out_channels,), bound, dtype) if use_bias else None
        self.stride = stride
        self.padding = padding

    def __call__(self, x: Float[Array, "cin h w"]) -> Float[Array, "cout hout wout"]:
        y = conv2d(x.astype(self.weight.dtype), self.weight, stride=self.stride,
                   padding=self.padding)
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y


class GroupNorm(eqx.Module):
    """Group normalisation over `(C, H, W)` with a per-channel affine, as `torch.nn.GroupNorm`."""

    weight: Float[Array, " c"]
    bias: Float[Array, " c"]
    num_groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5, dtype=jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.weight = jnp.ones((num_channels,), dtype)
        self.bias = jnp.zeros((num_channels,), dtype)
        self.num_groups = num_groups
        self.eps = eps

    def __call__(self, x: Float[Array, "c *spatial"]) -> Float[Array, "c *spatial"]:
        c = x.shape[0]
        xf = x.astype(jnp.float32).reshape(self.num_groups, -1)
        mean = jnp.mean(xf, axis=1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=1, keepdims=True)
        xf = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (c,) + (1,) * (x.ndim - 1)
        y = xf * self.weight.astype(jnp.float32).reshape(shape) + self.bias.astype(
            jnp.float32
        ).reshape(shape)
        return y.astype(x.dtype)


class LayerNorm(eqx.Module):
    """Layer normalisation over the last axis, as `torch.nn.LayerNorm`."""

    weight: Float[Array, " d"]
    bias: Float[Array, " d"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32):
        self.weight = jnp.ones((dim,), dtype)
        self.bias = jnp.zeros((dim,), dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight.astype(jnp.float32) + self.bias.astype(jnp.float32)
        return y.astype(x.dtype)


class Embedding(eqx.Module):
    """A lookup table `weight[(num_embeddings, dim)]`, as `torch.nn.Embedding`."""

    weight: Float[Array, "num dim"]

    def __init__(self, num_embeddings: int, dim: int, *, dtype=jnp.float32, key: PRNGKeyArray):
        self.weight = jax.random.normal(key, (num_embeddings, dim), dtype)

    def __call__(self, ids: Int[Array, "*batch"]) -> Float[Array, "*batch dim"]:
        return jnp.take(self.weight, ids, axis=0)
