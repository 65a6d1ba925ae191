"""The Stable Diffusion VAE (`AutoencoderKL`): a convolutional encoder to a diagonal Gaussian
over latents, and a decoder back to images.

Field names follow diffusers' attribute names, so a checkpoint key such as
`encoder.down_blocks.0.resnets.1.conv1.weight` is the module path
`encoder.down_blocks[0].resnets[1].conv1.weight`.

Shapes (one example, channels first; batch with `jax.vmap`): an image `(in_channels, H, W)`
encodes to latents `(latent_channels, H / f, W / f)` with `f = 2 ** (len(block_out_channels) - 1)`
(8 for Stable Diffusion); decoding multiplies the spatial size by `f` again.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..nn import Attention, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

# The epsilon of every normalisation inside the VAE.
_EPS = 1e-6

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
# Both names denote x * sigmoid(x).
_ACTIVATIONS = ("silu", "swish")


def _bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"AutoencoderKL config: unsupported {key}={value!r} ({why})")


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Hyperparameters of `AutoencoderKL`, spelled as in diffusers' `vae/config.json`."""

    in_channels: int = 3
    """Channels of the input image."""
    out_channels: int = 3
    """Channels of the decoded image."""
    down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)
    """Encoder block kinds, one per resolution; only `"DownEncoderBlock2D"` is supported."""
    up_block_types: tuple[str, ...] = (_UP_BLOCK,)
    """Decoder block kinds, one per resolution; only `"UpDecoderBlock2D"` is supported."""
    block_out_channels: tuple[int, ...] = (64,)
    """Channels at each resolution, from the finest (encoder input side) to the coarsest."""
    layers_per_block: int = 1
    """Residual blocks per encoder block; each decoder block has one more."""
    act_fn: str = "silu"
    """Activation; `"silu"` (alias `"swish"`) is the only one supported."""
    latent_channels: int = 4
    """Channels of the latent space."""
    norm_num_groups: int = 32
    """Groups of every GroupNorm; must divide every entry of `block_out_channels`."""
    sample_size: Union[int, tuple[int, ...]] = 32
    """Nominal image size (informational; any size works)."""
    scaling_factor: float = 0.18215
    """Latents are multiplied by this before the diffusion model sees them (and divided
    by it before decoding)."""
    shift_factor: Optional[float] = None
    """Subtracted from latents before scaling, where a model defines one (None: no shift)."""
    latents_mean: Optional[tuple[float, ...]] = None
    """Per-channel latent mean some models publish for normalisation (kept for round trips)."""
    latents_std: Optional[tuple[float, ...]] = None
    """Per-channel latent std some models publish for normalisation (kept for round trips)."""
    force_upcast: bool = True
    """Whether pipelines should run this VAE in float32 even when the rest is half precision."""
    use_quant_conv: bool = True
    """Whether a 1x1 `quant_conv` follows the encoder."""
    use_post_quant_conv: bool = True
    """Whether a 1x1 `post_quant_conv` precedes the decoder."""
    mid_block_add_attention: bool = True
    """Whether the encoder's and decoder's mid blocks hold a self-attention layer."""

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n == 0:
            raise _bad("block_out_channels", self.block_out_channels, "needs at least one entry")
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                     "norm_num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(name, value, "expected a positive integer")
        for c in self.block_out_channels:
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise _bad("block_out_channels", self.block_out_channels,
                           "expected positive integers")
            if c % self.norm_num_groups:
                raise _bad("norm_num_groups", self.norm_num_groups,
                           f"does not divide block_out_channels entry {c}")
        if len(self.down_block_types) != n or any(t != _DOWN_BLOCK for t in self.down_block_types):
            raise _bad("down_block_types", self.down_block_types,
                       f"expected {n} x {_DOWN_BLOCK!r}, one per block_out_channels entry")
        if len(self.up_block_types) != n or any(t != _UP_BLOCK for t in self.up_block_types):
            raise _bad("up_block_types", self.up_block_types,
                       f"expected {n} x {_UP_BLOCK!r}, one per block_out_channels entry")
        if self.act_fn not in _ACTIVATIONS:
            raise _bad("act_fn", self.act_fn, "only 'silu' is supported")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderKLConfig":
        """Build from diffusers' `config.json` contents; keys this model does not use
        (`_class_name`, `_diffusers_version`, ...) are ignored.

        Raises `ValueError` naming the key and value on anything unsupported."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            try:
                if f.name in ("down_block_types", "up_block_types"):
                    value = tuple(str(v) for v in value)
                elif f.name == "block_out_channels":
                    value = tuple(value)
                elif f.name in ("latents_mean", "latents_std"):
                    value = None if value is None else tuple(float(v) for v in value)
                elif f.name == "sample_size":
                    value = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) \
                        else int(value)
                elif f.name in ("scaling_factor",):
                    value = float(value)
                elif f.name == "shift_factor":
                    value = None if value is None else float(value)
                elif f.name in ("force_upcast", "use_quant_conv", "use_post_quant_conv",
                                "mid_block_add_attention"):
                    if not isinstance(value, bool):
                        raise TypeError
            except (TypeError, ValueError):
                raise _bad(f.name, d[f.name], "wrong type") from None
            kwargs[f.name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-compatible `config.json` dict (`AutoencoderKL.from_config` accepts it)."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def downsample_factor(self) -> int:
        """How many image pixels one latent pixel spans along each axis."""
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussianDistribution(eqx.Module):
    """The encoder's posterior: independent Gaussians per latent element."""

    mean: Float[Array, "c h w"]
    logvar: Float[Array, "c h w"]

    def __init__(self, mean: Float[Array, "c h w"], logvar: Float[Array, "c h w"]):
        """**Arguments:** `mean` and `logvar` of the same shape; `logvar` is clipped to
        `[-30, 20]`."""
        self.mean = mean
        self.logvar = jnp.clip(logvar, -30.0, 20.0)

    @property
    def std(self) -> Float[Array, "c h w"]:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Float[Array, "c h w"]:
        return jnp.exp(self.logvar)

    def sample(self, key: PRNGKeyArray) -> Float[Array, "c h w"]:
        """`mean + std * eps` with `eps ~ N(0, 1)` drawn from `key`, in the mean's dtype."""
        return self.sample_from_noise(jax.random.normal(key, self.mean.shape, self.mean.dtype))

    def sample_from_noise(self, eps: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        """`mean + std * eps` for a given standard-normal `eps` (cast to the mean's dtype)."""
        return self.mean + self.std * eps.astype(self.mean.dtype)

    def mode(self) -> Float[Array, "c h w"]:
        return self.mean


class DownEncoderBlock2D(eqx.Module):
    """Residual blocks at one resolution, then an optional stride-2 downsampler."""

    resnets: tuple[ResnetBlock2D, ...]
    downsamplers: Optional[tuple[Downsample2D]]

    def __init__(
        self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
        add_downsample: bool, dtype=jnp.float32, key: PRNGKeyArray,
    ):
        keys = jax.random.split(key, num_layers + 1)
        self.resnets = tuple(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                          temb_channels=None, groups=groups, eps=_EPS, dtype=dtype, key=keys[i])
            for i in range(num_layers)
        )
        self.downsamplers = (
            (Downsample2D(out_channels, padding=0, dtype=dtype, key=keys[-1]),)
            if add_downsample else None
        )

    @jax.named_scope("codi_eqx.DownEncoderBlock2D")
    def __call__(self, x: Float[Array, "cin h w"]) -> Float[Array, "cout h2 w2"]:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(eqx.Module):
    """Residual blocks at one resolution, then an optional x2 nearest upsampler."""

    resnets: tuple[ResnetBlock2D, ...]
    upsamplers: Optional[tuple[Upsample2D]]

    def __init__(
        self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
        add_upsample: bool, dtype=jnp.float32, key: PRNGKeyArray,
    ):
        keys = jax.random.split(key, num_layers + 1)
        self.resnets = tuple(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                          temb_channels=None, groups=groups, eps=_EPS, dtype=dtype, key=keys[i])
            for i in range(num_layers)
        )
        self.upsamplers = (
            (Upsample2D(out_channels, dtype=dtype, key=keys[-1]),) if add_upsample else None
        )

    @jax.named_scope("codi_eqx.UpDecoderBlock2D")
    def __call__(self, x: Float[Array, "cin h w"]) -> Float[Array, "cout h2 w2"]:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(eqx.Module):
    """Resnet, then (self-attention, resnet) once, at the coarsest resolution.

    `attentions` holds `None` where the config turns the attention off."""

    resnets: tuple[ResnetBlock2D, ...]
    attentions: tuple[Optional[Attention], ...]

    def __init__(
        self, channels: int, *, groups: int, add_attention: bool, dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        k0, k1, k2 = jax.random.split(key, 3)
        self.resnets = tuple(
            ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS,
                          dtype=dtype, key=k)
            for k in (k0, k2)
        )
        # One head spanning all channels.
        self.attentions = (
            Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups,
                      eps=_EPS, residual_connection=True, dtype=dtype, key=k1)
            if add_attention else None,
        )

    @jax.named_scope("codi_eqx.UNetMidBlock2D")
    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                x = attn(x)
            x = resnet(x)
        return x


class Encoder(eqx.Module):
    """Image `(in_channels, H, W)` -> Gaussian parameters `(2 * latent_channels, h, w)`."""

    conv_in: Conv2d
    down_blocks: tuple[DownEncoderBlock2D, ...]
    mid_block: UNetMidBlock2D
    conv_norm_out: GroupNorm
    conv_out: Conv2d

    def __init__(self, config: AutoencoderKLConfig, *, dtype=jnp.float32, key: PRNGKeyArray):
        chans = config.block_out_channels
        groups = config.norm_num_groups
        n = len(chans)
        keys = jax.random.split(key, n + 3)
        self.conv_in = Conv2d(config.in_channels, chans[0], 3, padding=1, dtype=dtype,
                              key=keys[0])
        self.down_blocks = tuple(
            DownEncoderBlock2D(chans[max(i - 1, 0)], chans[i], num_layers=config.layers_per_block,
                               groups=groups, add_downsample=i < n - 1, dtype=dtype,
                               key=keys[1 + i])
            for i in range(n)
        )
        self.mid_block = UNetMidBlock2D(chans[-1], groups=groups,
                                        add_attention=config.mid_block_add_attention,
                                        dtype=dtype, key=keys[n + 1])
        self.conv_norm_out = GroupNorm(groups, chans[-1], eps=_EPS, dtype=dtype)
        self.conv_out = Conv2d(chans[-1], 2 * config.latent_channels, 3, padding=1, dtype=dtype,
                               key=keys[n + 2])

    @jax.named_scope("codi_eqx.Encoder")
    def __call__(self, x: Float[Array, "cin H W"]) -> Float[Array, "cout h w"]:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(eqx.Module):
    """Latents `(latent_channels, h, w)` -> image `(out_channels, H, W)`."""

    conv_in: Conv2d
    mid_block: UNetMidBlock2D
    up_blocks: tuple[UpDecoderBlock2D, ...]
    conv_norm_out: GroupNorm
    conv_out: Conv2d

    def __init__(self, config: AutoencoderKLConfig, *, dtype=jnp.float32, key: PRNGKeyArray):
        chans = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        n = len(chans)
        keys = jax.random.split(key, n + 3)
        self.conv_in = Conv2d(config.latent_channels, chans[0], 3, padding=1, dtype=dtype,
                              key=keys[0])
        self.mid_block = UNetMidBlock2D(chans[0], groups=groups,
                                        add_attention=config.mid_block_add_attention,
                                        dtype=dtype, key=keys[1])
        self.up_blocks = tuple(
            UpDecoderBlock2D(chans[max(i - 1, 0)], chans[i],
                             num_layers=config.layers_per_block + 1, groups=groups,
                             add_upsample=i < n - 1, dtype=dtype, key=keys[2 + i])
            for i in range(n)
        )
        self.conv_norm_out = GroupNorm(groups, chans[-1], eps=_EPS, dtype=dtype)
        self.conv_out = Conv2d(chans[-1], config.out_channels, 3, padding=1, dtype=dtype,
                               key=keys[n + 2])

    @jax.named_scope("codi_eqx.Decoder")
    def __call__(self, z: Float[Array, "cin h w"]) -> Float[Array, "cout H W"]:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def scale_latents(
    z: Float[Array, "*shape"], scaling_factor: Union[float, Float[Array, ""]],
    shift_factor: Optional[Union[float, Float[Array, ""]]] = None,
) -> Float[Array, "*shape"]:
    """VAE latents -> the diffusion model's latents: `(z - shift_factor) * scaling_factor`
    (no shift where `shift_factor` is None). The inverse is `unscale_latents`.

    **Arguments:** `z`, latents of the VAE's posterior; `scaling_factor` and `shift_factor`,
    the VAE config's (scalars: Python floats, or arrays, e.g. per example from a latent cache).

    **Returns:** the scaled latents, shaped like `z`.
    """
    if shift_factor is not None:
        z = z - shift_factor
    return z * scaling_factor


def unscale_latents(
    z: Float[Array, "*shape"], scaling_factor: Union[float, Float[Array, ""]],
    shift_factor: Optional[Union[float, Float[Array, ""]]] = None,
) -> Float[Array, "*shape"]:
    """The diffusion model's latents -> VAE latents (what `decode` reads):
    `z / scaling_factor + shift_factor`, the inverse of `scale_latents`."""
    z = z / scaling_factor
    if shift_factor is not None:
        z = z + shift_factor
    return z


class AutoencoderKL(eqx.Module):
    """The Stable Diffusion VAE.

    `encode(x)` gives the posterior over latents; `decode(z)` maps latents back to an image.
    Neither applies `scaling_factor` / `shift_factor`: `encode_latents` / `decode_latents`
    (or `scale_latents` / `unscale_latents` around `encode` / `decode`) do, as
    `(z - shift_factor) * scaling_factor` for the diffusion model and the inverse before
    decoding. Computation runs in the parameters' dtype (normalisations in float32).
    """

    encoder: Encoder
    decoder: Decoder
    quant_conv: Optional[Conv2d]
    post_quant_conv: Optional[Conv2d]
    config: AutoencoderKLConfig = eqx.field(static=True)
    scaling_factor: float = eqx.field(static=True)
    shift_factor: Optional[float] = eqx.field(static=True)

    def __init__(self, config: AutoencoderKLConfig, *, dtype=jnp.float32, key: PRNGKeyArray):
        """**Arguments:** `config`; `dtype` of the parameters; `key` for the random
        initialisation (load weights with `codi_eqx.weights.load_vae`)."""
        ke, kd, kq, kp = jax.random.split(key, 4)
        lat = config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, key=ke)
        self.decoder = Decoder(config, dtype=dtype, key=kd)
        self.quant_conv = (
            Conv2d(2 * lat, 2 * lat, 1, dtype=dtype, key=kq) if config.use_quant_conv else None
        )
        self.post_quant_conv = (
            Conv2d(lat, lat, 1, dtype=dtype, key=kp) if config.use_post_quant_conv else None
        )
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.shift_factor = config.shift_factor

    @jax.named_scope("codi_eqx.AutoencoderKL.encode")
    def encode(self, x: Float[Array, "c H W"]) -> DiagonalGaussianDistribution:
        """**Arguments:** `x`, an image `(in_channels, H, W)`, usually in `[-1, 1]`.

        **Returns:** the posterior over latents `(latent_channels, H / f, W / f)` with
        `f = config.downsample_factor`."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        lat = self.config.latent_channels
        return DiagonalGaussianDistribution(h[:lat], h[lat:])

    @jax.named_scope("codi_eqx.AutoencoderKL.decode")
    def decode(self, z: Float[Array, "c h w"]) -> Float[Array, "cout H W"]:
        """**Arguments:** `z`, unscaled latents `(latent_channels, h, w)`.

        **Returns:** the image `(out_channels, h * f, w * f)`."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def scale_latents(self, z: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """`scale_latents(z, self.scaling_factor, self.shift_factor)`."""
        return scale_latents(z, self.scaling_factor, self.shift_factor)

    def unscale_latents(self, z: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """`unscale_latents(z, self.scaling_factor, self.shift_factor)`."""
        return unscale_latents(z, self.scaling_factor, self.shift_factor)

    def encode_posterior(self, x: Float[Array, "c H W"]) -> DiagonalGaussianDistribution:
        """`encode` computed in the encoder's dtype (`x` cast to it), the posterior's mean and
        log-variance returned in float32 (what the loss and the latent cache read)."""
        post = self.encode(x.astype(self.encoder.conv_in.weight.dtype))
        return DiagonalGaussianDistribution(
            post.mean.astype(jnp.float32), post.logvar.astype(jnp.float32))

    def encode_latents(
        self, x: Float[Array, "c H W"], noise: Float[Array, "lc h w"]
    ) -> Float[Array, "lc h w"]:
        """An image -> the diffusion model's latents: a sample of the float32 posterior
        (`encode_posterior`) with the given standard-normal `noise`, scaled.

        **Arguments:** `x`, an image `(in_channels, H, W)` in `[-1, 1]`; `noise`,
        `(latent_channels, H / f, W / f)`.

        **Returns:** `scale_latents(mean + std * noise)`, float32.
        """
        return self.scale_latents(self.encode_posterior(x).sample_from_noise(noise))

    def decode_latents(self, z: Float[Array, "lc h w"]) -> Float[Array, "cout H W"]:
        """The diffusion model's latents -> an image: `decode(unscale_latents(z))`, computed
        in the decoder's dtype, returned in float32 (about `[-1, 1]`)."""
        z = self.unscale_latents(z)
        return self.decode(z.astype(self.decoder.conv_in.weight.dtype)).astype(jnp.float32)
