"""The blocks of the Stable Diffusion UNet (and of the adapter, which copies its encoder half).

Field names are diffusers' attribute names, so that checkpoint keys map one to one.
"""

import math
from typing import Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._typing import Timestep
from ..nn import Attention, Conv2d, Downsample2D, GroupNorm, LayerNorm, Linear, ResnetBlock2D
from ..nn import Upsample2D


def timestep_embedding(
    timestep: Timestep, dim: int, *,
    flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0,
) -> Float[Array, " dim"]:
    """Sinusoidal embedding of one (possibly fractional) timestep, computed in float32.

    Frequencies are `exp(-log(max_period) * i / (dim/2 - freq_shift))` for `i < dim/2`; the
    embedding is `[sin, cos]` (or `[cos, sin]` with `flip_sin_to_cos`), zero-padded to `dim`.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timestep, jnp.float32) * jnp.exp(exponent)
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos])
    if dim % 2:
        emb = jnp.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(eqx.Module):
    """`linear_2(silu(linear_1(x)))`: the MLP on the sinusoidal timestep embedding."""

    linear_1: Linear
    linear_2: Linear

    def __init__(self, in_channels: int, time_embed_dim: int, *, dtype=jnp.float32, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.linear_1 = Linear(in_channels, time_embed_dim, dtype=dtype, key=k1)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim, dtype=dtype, key=k2)

    def __call__(self, x: Float[Array, " c"]) -> Float[Array, " d"]:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def added_time_embedding(
    add_embedding: TimestepEmbedding, text_embeds: Float[Array, " p"],
    time_ids: Float[Array, " 6"], *, time_dim: int, flip_sin_to_cos: bool, freq_shift: float,
) -> Float[Array, " t"]:
    """SDXL's added embedding (`addition_embed_type="text_time"`): each time id's sinusoidal
    embedding of width `time_dim` (as the timestep's), concatenated after the pooled text
    embedding, through the `add_embedding` MLP; added to the timestep's embedding."""
    ids = jnp.asarray(time_ids, jnp.float32).reshape(-1)
    times = jax.vmap(lambda v: timestep_embedding(
        v, time_dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift))(ids)
    dtype = add_embedding.linear_1.weight.dtype
    x = jnp.concatenate([text_embeds.astype(jnp.float32), times.reshape(-1)]).astype(dtype)
    return add_embedding(x)


class GEGLU(eqx.Module):
    """`proj` to twice the width, then `hidden * gelu(gate)` (exact GELU)."""

    proj: Linear

    def __init__(self, dim_in: int, dim_out: int, *, dtype=jnp.float32, key: PRNGKeyArray):
        self.proj = Linear(dim_in, dim_out * 2, dtype=dtype, key=key)

    def __call__(self, x: Float[Array, "seq din"]) -> Float[Array, "seq dout"]:
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(eqx.Module):
    """GEGLU then a linear projection back (`net.0`, `net.2`; `net.1` is dropout)."""

    net: tuple[GEGLU, Linear]

    def __init__(self, dim: int, *, mult: int = 4, dtype=jnp.float32, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        inner = dim * mult
        self.net = (GEGLU(dim, inner, dtype=dtype, key=k1), Linear(inner, dim, dtype=dtype, key=k2))

    def __call__(self, x: Float[Array, "seq d"]) -> Float[Array, "seq d"]:
        return self.net[1](self.net[0](x))


class BasicTransformerBlock(eqx.Module):
    """Self-attention (or cross-attention only), cross-attention, GEGLU feed-forward; pre-LN."""

    norm1: LayerNorm
    attn1: Attention
    norm2: LayerNorm
    attn2: Attention
    norm3: LayerNorm
    ff: FeedForward
    only_cross_attention: bool = eqx.field(static=True)

    def __init__(
        self, dim: int, heads: int, dim_head: int, *, cross_attention_dim: int,
        only_cross_attention: bool = False, upcast_attention: bool = False,
        dtype=jnp.float32, key: PRNGKeyArray,
    ):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm1 = LayerNorm(dim, dtype=dtype)
        self.attn1 = Attention(
            dim, heads=heads, dim_head=dim_head,
            cross_attention_dim=cross_attention_dim if only_cross_attention else None,
            upcast_attention=upcast_attention, dtype=dtype, key=k1,
        )
        self.norm2 = LayerNorm(dim, dtype=dtype)
        self.attn2 = Attention(
            dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim,
            upcast_attention=upcast_attention, dtype=dtype, key=k2,
        )
        self.norm3 = LayerNorm(dim, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype, key=k3)
        self.only_cross_attention = only_cross_attention

    def __call__(
        self, x: Float[Array, "seq d"], context: Float[Array, "ctx cd"]
    ) -> Float[Array, "seq d"]:
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(eqx.Module):
    """GroupNorm, projection to tokens (1x1 conv, or linear with `use_linear_projection`),
    transformer blocks, projection back, residual."""

    norm: GroupNorm
    proj_in: Union[Conv2d, Linear]
    transformer_blocks: tuple[BasicTransformerBlock, ...]
    proj_out: Union[Conv2d, Linear]
    use_linear_projection: bool = eqx.field(static=True)

    def __init__(
        self, heads: int, dim_head: int, in_channels: int, *, num_layers: int = 1,
        cross_attention_dim: int, norm_num_groups: int = 32, use_linear_projection: bool = False,
        only_cross_attention: bool = False, upcast_attention: bool = False,
        dtype=jnp.float32, key: PRNGKeyArray,
    ):
        inner = heads * dim_head
        kin, kout, *kblocks = jax.random.split(key, 2 + num_layers)
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6, dtype=dtype)
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner, dtype=dtype, key=kin)
            self.proj_out = Linear(inner, in_channels, dtype=dtype, key=kout)
        else:
            self.proj_in = Conv2d(in_channels, inner, 1, dtype=dtype, key=kin)
            self.proj_out = Conv2d(inner, in_channels, 1, dtype=dtype, key=kout)
        self.transformer_blocks = tuple(
            BasicTransformerBlock(
                inner, heads, dim_head, cross_attention_dim=cross_attention_dim,
                only_cross_attention=only_cross_attention, upcast_attention=upcast_attention,
                dtype=dtype, key=k,
            )
            for k in kblocks
        )
        self.use_linear_projection = use_linear_projection

    @jax.named_scope("codi_eqx.Transformer2DModel")
    def __call__(
        self, x: Float[Array, "c h w"], context: Float[Array, "ctx cd"]
    ) -> Float[Array, "c h w"]:
        c, h, w = x.shape
        hidden = self.norm(x)
        if self.use_linear_projection:
            tokens = self.proj_in(hidden.reshape(c, h * w).T)
        else:
            hidden = self.proj_in(hidden)
            tokens = hidden.reshape(hidden.shape[0], h * w).T
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear_projection:
            out = self.proj_out(tokens).T.reshape(c, h, w)
        else:
            out = self.proj_out(tokens.T.reshape(tokens.shape[1], h, w))
        return out + x


def _maybe_remat(fn, remat: bool):
    return eqx.filter_checkpoint(fn) if remat else fn


class DownBlock2D(eqx.Module):
    """Resnets, each optionally followed by a transformer; then an optional stride-2 conv.

    `attentions` is empty for a `DownBlock2D` and filled for a `CrossAttnDownBlock2D`.
    """

    resnets: tuple[ResnetBlock2D, ...]
    attentions: tuple[Transformer2DModel, ...]
    downsamplers: Optional[tuple[Downsample2D]]

    def __init__(
        self, in_channels: int, out_channels: int, *, temb_channels: int, num_layers: int,
        add_downsample: bool, cross_attention: bool, eps: float, groups: int,
        heads: int = 1, transformer_layers: int = 1, cross_attention_dim: Optional[int] = None,
        use_linear_projection: bool = False, only_cross_attention: bool = False,
        upcast_attention: bool = False, downsample_padding: int = 1,
        dtype=jnp.float32, key: PRNGKeyArray,
    ):
        keys = jax.random.split(key, 2 * num_layers + 1)
        self.resnets = tuple(
            ResnetBlock2D(
                in_channels if i == 0 else out_channels, out_channels,
                temb_channels=temb_channels, groups=groups, eps=eps, dtype=dtype, key=keys[i],
            )
            for i in range(num_layers)
        )
        if cross_attention:
            if cross_attention_dim is None:
                raise ValueError("a cross-attention block needs cross_attention_dim")
            self.attentions = tuple(
                Transformer2DModel(
                    heads, out_channels // heads, out_channels, num_layers=transformer_layers,
                    cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross_attention, upcast_attention=upcast_attention,
                    dtype=dtype, key=keys[num_layers + i],
                )
                for i in range(num_layers)
            )
        else:
            self.attentions = ()
        self.downsamplers = (
            (Downsample2D(out_channels, padding=downsample_padding, dtype=dtype, key=keys[-1]),)
            if add_downsample else None
        )

    def __call__(
        self, x: Float[Array, "cin h w"], temb: Float[Array, " t"],
        context: Optional[Float[Array, "ctx cd"]], *, remat: bool = False,
    ) -> tuple[Float[Array, "cout h2 w2"], tuple[Float[Array, "..."], ...]]:
        outputs = []
        for i, resnet in enumerate(self.resnets):
            x = _maybe_remat(lambda r, a, b: r(a, b), remat)(resnet, x, temb)
            if self.attentions:
                x = _maybe_remat(lambda m, a, c: m(a, c), remat)(self.attentions[i], x, context)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, tuple(outputs)


class UpBlock2D(eqx.Module):
    """Resnets on `[x, skip]` concatenations, each optionally followed by a transformer;
    then an optional upsampling. `attentions` is filled for a `CrossAttnUpBlock2D`."""

    resnets: tuple[ResnetBlock2D, ...]
    attentions: tuple[Transformer2DModel, ...]
    upsamplers: Optional[tuple[Upsample2D]]

    def __init__(
        self, in_channels: int, prev_output_channel: int, out_channels: int, *,
        temb_channels: int, num_layers: int, add_upsample: bool, cross_attention: bool,
        eps: float, groups: int, heads: int = 1, transformer_layers: int = 1,
        cross_attention_dim: Optional[int] = None, use_linear_projection: bool = False,
        only_cross_attention: bool = False, upcast_attention: bool = False,
        dtype=jnp.float32, key: PRNGKeyArray,
    ):
        keys = jax.random.split(key, 2 * num_layers + 1)
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            cin = prev_output_channel if i == 0 else out_channels
            resnets.append(
                ResnetBlock2D(
                    cin + skip, out_channels, temb_channels=temb_channels, groups=groups,
                    eps=eps, dtype=dtype, key=keys[i],
                )
            )
        self.resnets = tuple(resnets)
        if cross_attention:
            if cross_attention_dim is None:
                raise ValueError("a cross-attention block needs cross_attention_dim")
            self.attentions = tuple(
                Transformer2DModel(
                    heads, out_channels // heads, out_channels, num_layers=transformer_layers,
                    cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross_attention, upcast_attention=upcast_attention,
                    dtype=dtype, key=keys[num_layers + i],
                )
                for i in range(num_layers)
            )
        else:
            self.attentions = ()
        self.upsamplers = (Upsample2D(out_channels, dtype=dtype, key=keys[-1]),) if add_upsample else None

    def __call__(
        self, x: Float[Array, "cin h w"], skips: tuple[Float[Array, "..."], ...],
        temb: Float[Array, " t"], context: Optional[Float[Array, "ctx cd"]], *,
        upsample_size: Optional[tuple[int, int]] = None, remat: bool = False,
    ) -> Float[Array, "cout h2 w2"]:
        for i, resnet in enumerate(self.resnets):
            skip = skips[-(i + 1)]
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=0)
            x = _maybe_remat(lambda r, a, b: r(a, b), remat)(resnet, x, temb)
            if self.attentions:
                x = _maybe_remat(lambda m, a, c: m(a, c), remat)(self.attentions[i], x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(eqx.Module):
    """resnet, then (transformer, resnet) pairs, at the lowest resolution."""

    resnets: tuple[ResnetBlock2D, ...]
    attentions: tuple[Transformer2DModel, ...]

    def __init__(
        self, channels: int, *, temb_channels: int, eps: float, groups: int, heads: int,
        cross_attention_dim: int, num_layers: int = 1, transformer_layers: int = 1,
        output_scale_factor: float = 1.0, use_linear_projection: bool = False,
        upcast_attention: bool = False, dtype=jnp.float32, key: PRNGKeyArray,
    ):
        keys = jax.random.split(key, 2 * num_layers + 1)
        self.resnets = tuple(
            ResnetBlock2D(
                channels, channels, temb_channels=temb_channels, groups=groups, eps=eps,
                output_scale_factor=output_scale_factor, dtype=dtype, key=keys[i],
            )
            for i in range(num_layers + 1)
        )
        self.attentions = tuple(
            Transformer2DModel(
                heads, channels // heads, channels, num_layers=transformer_layers,
                cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                dtype=dtype, key=keys[num_layers + 1 + i],
            )
            for i in range(num_layers)
        )

    def __call__(
        self, x: Float[Array, "c h w"], temb: Float[Array, " t"],
        context: Float[Array, "ctx cd"], *, remat: bool = False,
    ) -> Float[Array, "c h w"]:
        x = _maybe_remat(lambda r, a, b: r(a, b), remat)(self.resnets[0], x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = _maybe_remat(lambda m, a, c: m(a, c), remat)(attn, x, context)
            x = _maybe_remat(lambda r, a, b: r(a, b), remat)(resnet, x, temb)
        return x
