"""Residual block and resampling layers of the Stable Diffusion UNet and VAE."""

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._layers import Conv2d, GroupNorm, Linear


class ResnetBlock2D(eqx.Module):
    """GroupNorm-SiLU-conv twice, with an optional additive time embedding, and a skip path
    (a 1x1 `conv_shortcut` where the channel count changes)."""

    norm1: GroupNorm
    conv1: Conv2d
    time_emb_proj: Optional[Linear]
    norm2: GroupNorm
    conv2: Conv2d
    conv_shortcut: Optional[Conv2d]
    output_scale_factor: float = eqx.field(static=True)

    def __init__(
        self, in_channels: int, out_channels: int, *, temb_channels: Optional[int],
        groups: int = 32, eps: float = 1e-6, output_scale_factor: float = 1.0,
        dtype=jnp.float32, key: PRNGKeyArray,
    ):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, key=k1)
        self.time_emb_proj = (
            Linear(temb_channels, out_channels, dtype=dtype, key=k2)
            if temb_channels is not None else None
        )
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, key=k3)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, dtype=dtype, key=k4)
            if in_channels != out_channels else None
        )
        self.output_scale_factor = output_scale_factor

    @jax.named_scope("codi_eqx.ResnetBlock2D")
    def __call__(
        self, x: Float[Array, "cin h w"], temb: Optional[Float[Array, " t"]] = None
    ) -> Float[Array, "cout h w"]:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb)).astype(h.dtype)[:, None, None]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x.astype(h.dtype)
        out = skip + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(eqx.Module):
    """A stride-2 3x3 convolution. `padding=0` pads right and bottom by one first (the VAE)."""

    conv: Conv2d
    padding: int = eqx.field(static=True)

    def __init__(self, channels: int, *, padding: int = 1, dtype=jnp.float32, key: PRNGKeyArray):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, dtype=dtype, key=key)
        self.padding = padding

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h2 w2"]:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1)))
        return self.conv(x)


def nearest_resize(x: Float[Array, "c h w"], size: tuple[int, int]) -> Float[Array, "c H W"]:
    """Nearest-neighbour resize with PyTorch's index rule `src = floor(dst * in / out)`."""
    h, w = x.shape[1:]
    oh, ow = size
    rows = (jnp.arange(oh) * h) // oh
    cols = (jnp.arange(ow) * w) // ow
    return x[:, rows][:, :, cols]


class Upsample2D(eqx.Module):
    """Nearest-neighbour upsampling (x2, or to `output_size`) followed by a 3x3 convolution."""

    conv: Conv2d

    def __init__(self, channels: int, *, dtype=jnp.float32, key: PRNGKeyArray):
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype, key=key)

    def __call__(
        self, x: Float[Array, "c h w"], output_size: Optional[tuple[int, int]] = None
    ) -> Float[Array, "c H W"]:
        if output_size is None:
            output_size = (2 * x.shape[1], 2 * x.shape[2])
        if tuple(output_size) == (2 * x.shape[1], 2 * x.shape[2]):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = nearest_resize(x, tuple(output_size))
        return self.conv(x)
