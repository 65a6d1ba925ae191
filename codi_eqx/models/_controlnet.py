"""The adapter: a ControlNet built from the UNet's encoder half (diffusers' `ControlNetModel`).

With every zero convolution at zero, UNet + adapter computes exactly what the UNet computes,
so distillation starts from the teacher. `conditioning_channels=None` gives an adapter with no
condition image (plain text-to-image acceleration).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._tree import cast_floating
from .._typing import Timestep
from ..nn import Conv2d
from ._unet import (
    AddedCondKwargs,
    UNet2DConditionConfig,
    UNet2DConditionModel,
    _down_blocks,
    _mid_block,
    add_embedding_of,
    check_supported,
    embed_time,
)
from ._unet_blocks import (
    DownBlock2D,
    TimestepEmbedding,
    UNetMidBlock2DCrossAttn,
    timestep_embedding,
)


@dataclass(frozen=True)
class ControlNetConfig:
    """The adapter's hyperparameters: the UNet's encoder half plus the condition encoder."""

    unet: UNet2DConditionConfig
    """The encoder-half hyperparameters, shared with the UNet the adapter was made from."""
    conditioning_channels: Optional[int] = 3
    """Channels of the condition image; `None` for an adapter without a condition image."""
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    """Channels of the condition encoder's stages (each after the first halves the size)."""
    controlnet_conditioning_channel_order: str = "rgb"
    """`rgb`, or `bgr` to flip the condition image's channels first."""
    class_embed_type: Optional[str] = None
    """`timestep`: a guidance embedding (diffusers' `class_embed_type="timestep"`): the
    `class_labels` given to the adapter (`guidance_label(w)`) go through the timestep's
    sinusoidal projection and an MLP (`class_embedding`), added to the time embedding. None:
    no such embedding."""

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        """From diffusers' ControlNet `config.json` (or this project's adapter config)."""
        class_embed_type = d.get("class_embed_type")
        if class_embed_type not in (None, "timestep"):
            raise ValueError(f"ControlNet config: class_embed_type={class_embed_type!r} is not "
                             "supported (expected None or 'timestep')")
        d = {k: v for k, v in d.items() if k != "class_embed_type"}
        check_supported(d, "ControlNet")
        if d.get("global_pool_conditions", False):
            raise ValueError("ControlNet config: global_pool_conditions=True is not supported")
        order = d.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ValueError(f"ControlNet config: unknown channel order {order!r} (rgb or bgr)")
        ups = tuple(
            "CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
            for t in reversed(d.get("down_block_types", UNet2DConditionConfig.down_block_types))
        )
        unet = UNet2DConditionConfig.from_dict({**d, "up_block_types": list(ups)})
        channels = d.get("conditioning_channels", 3)
        return cls(
            unet=unet,
            conditioning_channels=channels,
            conditioning_embedding_out_channels=tuple(
                d.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
            ),
            controlnet_conditioning_channel_order=order,
            class_embed_type=class_embed_type,
        )

    def to_dict(self) -> dict:
        """A diffusers-compatible ControlNet `config.json` dict (`conditioning_channels` may
        be null: this project's adapter without a condition image)."""
        u = self.unet.to_dict()
        keep = [
            "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
            "only_cross_attention", "block_out_channels", "layers_per_block",
            "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
            "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
            "attention_head_dim", "num_attention_heads", "use_linear_projection",
            "upcast_attention", "mid_block_type", "sample_size", "addition_embed_type",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim",
        ]
        d = {"_class_name": "ControlNetModel", **{k: u[k] for k in keep}}
        d["conditioning_channels"] = self.conditioning_channels
        d["conditioning_embedding_out_channels"] = list(self.conditioning_embedding_out_channels)
        d["controlnet_conditioning_channel_order"] = self.controlnet_conditioning_channel_order
        d["global_pool_conditions"] = False
        if self.class_embed_type is not None:
            d["class_embed_type"] = self.class_embed_type
        return d

    def replace(self, **kwargs) -> "ControlNetConfig":
        return dataclasses.replace(self, **kwargs)


def conditioning_embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The condition encoder's widths for a VAE downsampling by `vae_scale_factor` (a power
    of two, 2 to 16): diffusers' (16, 32, 96, 256) for 8, shortened or extended otherwise."""
    stages = {2: 1, 4: 2, 8: 3, 16: 4}.get(vae_scale_factor)
    if stages is None:
        raise ValueError(f"VAE scale factor {vae_scale_factor}: expected 2, 4, 8 or 16")
    return (16, 32, 96, 256, 256)[: stages + 1]


class ControlNetConditioningEmbedding(eqx.Module):
    """The condition-image encoder: conv + SiLU stages down to latent resolution, then a
    zero-initialised `conv_out` to the UNet's first block width."""

    conv_in: Conv2d
    blocks: tuple[Conv2d, ...]
    conv_out: Conv2d

    def __init__(
        self, embedding_channels: int, conditioning_channels: int,
        block_out_channels: tuple[int, ...], *, dtype=jnp.float32, key: PRNGKeyArray,
    ):
        k_in, *k_blocks = jax.random.split(key, 1 + 2 * (len(block_out_channels) - 1))
        self.conv_in = Conv2d(conditioning_channels, block_out_channels[0], 3, padding=1, dtype=dtype, key=k_in)
        blocks = []
        for i in range(len(block_out_channels) - 1):
            cin, cout = block_out_channels[i], block_out_channels[i + 1]
            blocks.append(Conv2d(cin, cin, 3, padding=1, dtype=dtype, key=k_blocks[2 * i]))
            blocks.append(Conv2d(cin, cout, 3, padding=1, stride=2, dtype=dtype, key=k_blocks[2 * i + 1]))
        self.blocks = tuple(blocks)
        self.conv_out = Conv2d(
            block_out_channels[-1], embedding_channels, 3, padding=1, zero_init=True,
            dtype=dtype, key=k_in,
        )

    def __call__(self, cond: Float[Array, "cc H W"]) -> Float[Array, "c h w"]:
        x = jax.nn.silu(self.conv_in(cond))
        for conv in self.blocks:
            x = jax.nn.silu(conv(x))
        return self.conv_out(x)


def _zero_convs(cfg: UNet2DConditionConfig, *, dtype) -> tuple[Conv2d, ...]:
    channels = [cfg.block_out_channels[0]]
    for i, c in enumerate(cfg.block_out_channels):
        channels += [c] * cfg.layers_per_block[i]
        if i < cfg.num_blocks - 1:
            channels.append(c)
    key = jax.random.key(0)  # unused: zero-initialised
    return tuple(Conv2d(c, c, 1, zero_init=True, dtype=dtype, key=key) for c in channels)


def _replace_fields(module: eqx.Module, **changes) -> eqx.Module:
    """A copy of `module` with some fields replaced, static ones included (which
    `eqx.tree_at` cannot reach), without running its `__init__`."""
    new = object.__new__(type(module))
    for f in dataclasses.fields(module):
        object.__setattr__(new, f.name, changes.pop(f.name, getattr(module, f.name)))
    if changes:
        raise TypeError(f"no such fields: {', '.join(changes)}")
    return new


GUIDANCE_LABEL_SCALE = 100.0
"""`guidance_label(w) = GUIDANCE_LABEL_SCALE * (w - 1)`: guidance scales 1 to 11 span the
timestep range 0 to 1000 that the sinusoidal projection is made for."""


def guidance_label(w: Union[float, Float[Array, ""]]) -> Float[Array, ""]:
    """The `class_labels` value that selects guidance scale `w` in a guidance-conditioned
    adapter (what diffusers' ControlNet is given as `class_labels`)."""
    return GUIDANCE_LABEL_SCALE * (jnp.asarray(w, jnp.float32) - 1.0)


class ControlNetModel(eqx.Module):
    """A copy of the UNet's encoder half whose outputs, through zero convolutions, become
    residuals for the UNet's skip connections and mid block. A guidance-conditioned adapter
    (`with_guidance_embedding`) also embeds the guidance scale it is asked to reproduce."""

    conv_in: Conv2d
    time_embedding: TimestepEmbedding
    add_embedding: Optional[TimestepEmbedding]
    class_embedding: Optional[TimestepEmbedding]
    controlnet_cond_embedding: Optional[ControlNetConditioningEmbedding]
    down_blocks: tuple[DownBlock2D, ...]
    controlnet_down_blocks: tuple[Conv2d, ...]
    mid_block: UNetMidBlock2DCrossAttn
    controlnet_mid_block: Conv2d
    config: ControlNetConfig = eqx.field(static=True)
    remat: bool = eqx.field(static=True)

    def __init__(
        self, config: ControlNetConfig, *, dtype=jnp.float32, remat: bool = False,
        key: PRNGKeyArray,
    ):
        cfg = config.unet
        k_in, k_t, k_cond, k_down, k_mid = jax.random.split(key, 5)
        c0 = cfg.block_out_channels[0]
        self.conv_in = Conv2d(
            cfg.in_channels, c0, cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2,
            dtype=dtype, key=k_in,
        )
        self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, dtype=dtype, key=k_t)
        self.add_embedding = add_embedding_of(cfg, dtype=dtype, key=jax.random.fold_in(k_t, 1))
        self.class_embedding = (
            TimestepEmbedding(c0, cfg.time_embed_dim, dtype=dtype, key=jax.random.fold_in(k_t, 2))
            if config.class_embed_type == "timestep" else None)
        self.controlnet_cond_embedding = (
            ControlNetConditioningEmbedding(
                c0, config.conditioning_channels, config.conditioning_embedding_out_channels,
                dtype=dtype, key=k_cond,
            )
            if config.conditioning_channels is not None else None
        )
        self.down_blocks = _down_blocks(cfg, dtype=dtype, key=k_down)
        self.controlnet_down_blocks = _zero_convs(cfg, dtype=dtype)
        self.mid_block = _mid_block(cfg, dtype=dtype, key=k_mid)
        c = cfg.block_out_channels[-1]
        self.controlnet_mid_block = Conv2d(c, c, 1, zero_init=True, dtype=dtype, key=k_mid)
        self.config = config
        self.remat = remat

    @classmethod
    def from_unet(
        cls, unet: UNet2DConditionModel, *, conditioning_channels: Optional[int] = 3,
        conditioning_embedding_out_channels: Optional[tuple[int, ...]] = None,
        controlnet_conditioning_channel_order: str = "rgb", vae_scale_factor: int = 8,
        key: PRNGKeyArray,
    ) -> "ControlNetModel":
        """A new adapter: `conv_in`, time embedding, down blocks and mid block copied from
        `unet`; zero convolutions and the condition encoder's output conv at zero; the rest of
        the condition encoder randomly initialised from `key`. Parameters are float32 copies
        (trainable master weights), whatever the UNet's dtype.

        The condition encoder's widths default to diffusers' (16, 32, 96, 256) for a VAE that
        downsamples 8x (three stride-2 stages), and to its first `log2(vae_scale_factor) + 1`
        entries otherwise, so that it maps the image to the latents' size."""
        if conditioning_embedding_out_channels is None:
            conditioning_embedding_out_channels = conditioning_embedding_channels(vae_scale_factor)
        elif 2 ** (len(conditioning_embedding_out_channels) - 1) != vae_scale_factor:
            raise ValueError(
                f"conditioning_embedding_out_channels {tuple(conditioning_embedding_out_channels)}"
                f" downsample {2 ** (len(conditioning_embedding_out_channels) - 1)}x, the VAE "
                f"{vae_scale_factor}x")
        config = ControlNetConfig(
            unet=unet.config,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
        )
        # Build only what is new; the copied parts replace the template's placeholders.
        template = eqx.filter_eval_shape(
            lambda: cls(config, dtype=jnp.float32, remat=unet.remat, key=key)
        )
        f32 = lambda tree: cast_floating(tree, jnp.float32)  # noqa: E731
        cfg = unet.config
        cond = (
            ControlNetConditioningEmbedding(
                cfg.block_out_channels[0], conditioning_channels,
                tuple(conditioning_embedding_out_channels), dtype=jnp.float32, key=key,
            )
            if conditioning_channels is not None else None
        )
        c = cfg.block_out_channels[-1]
        zero_mid = Conv2d(c, c, 1, zero_init=True, dtype=jnp.float32, key=key)
        return eqx.tree_at(
            lambda m: (
                m.conv_in, m.time_embedding, m.add_embedding, m.down_blocks, m.mid_block,
                m.controlnet_cond_embedding, m.controlnet_down_blocks, m.controlnet_mid_block,
            ),
            template,
            (
                f32(unet.conv_in), f32(unet.time_embedding), f32(unet.add_embedding),
                f32(unet.down_blocks),
                f32(unet.mid_block), cond, _zero_convs(cfg, dtype=jnp.float32), zero_mid,
            ),
            is_leaf=lambda x: x is None,
        )

    @property
    def dtype(self):
        return self.conv_in.weight.dtype

    @property
    def guidance_conditioned(self) -> bool:
        """Whether the adapter takes a guidance scale (`class_labels`)."""
        return self.class_embedding is not None

    def with_guidance_embedding(self, *, key: PRNGKeyArray) -> "ControlNetModel":
        """This adapter with a new guidance embedding whose output layer is zero, so that it
        computes exactly what this adapter computes for every guidance scale until trained."""
        if self.class_embedding is not None:
            raise ValueError("this adapter already has a guidance embedding")
        cfg = self.config.unet
        emb = TimestepEmbedding(cfg.block_out_channels[0], cfg.time_embed_dim, dtype=self.dtype,
                                key=key)
        emb = eqx.tree_at(lambda e: (e.linear_2.weight, e.linear_2.bias), emb,
                          (jnp.zeros_like(emb.linear_2.weight), jnp.zeros_like(emb.linear_2.bias)))
        return _replace_fields(self, class_embedding=emb,
                               config=self.config.replace(class_embed_type="timestep"))

    def guidance_embedding(self, class_labels) -> Float[Array, " t"]:
        """The class embedding of `class_labels` (diffusers: `class_embedding(time_proj(x))`)."""
        cfg = self.config.unet
        proj = timestep_embedding(class_labels, cfg.block_out_channels[0],
                                  flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        return self.class_embedding(proj.astype(self.dtype))

    def fold_guidance_embedding(self, w: float) -> "ControlNetModel":
        """A plain adapter that computes what this one computes at guidance scale `w`: the
        embedding of `guidance_label(w)`, a constant, is folded into the time embedding's
        output bias (for pipelines that give the ControlNet no class labels)."""
        if self.class_embedding is None:
            raise ValueError("this adapter has no guidance embedding to fold")
        extra = self.guidance_embedding(guidance_label(w))
        bias = self.time_embedding.linear_2.bias
        time_embedding = eqx.tree_at(
            lambda e: e.linear_2.bias, self.time_embedding,
            (bias.astype(jnp.float32) + extra.astype(jnp.float32)).astype(bias.dtype))
        return _replace_fields(self, time_embedding=time_embedding, class_embedding=None,
                               config=self.config.replace(class_embed_type=None))

    @jax.named_scope("codi_eqx.ControlNetModel")
    def __call__(
        self,
        sample: Float[Array, "c h w"],
        timestep: Timestep,
        encoder_hidden_states: Float[Array, "seq d"],
        controlnet_cond: Optional[Float[Array, "cc H W"]] = None,
        *,
        conditioning_scale: Union[float, Float[Array, ""]] = 1.0,
        added_cond_kwargs: Optional[AddedCondKwargs] = None,
        class_labels: Optional[Union[float, Float[Array, ""]]] = None,
    ) -> tuple[tuple[Float[Array, "..."], ...], Float[Array, "..."]]:
        """Arguments:
            sample: noisy latents `(C, h, w)`.
            timestep: a scalar timestep.
            encoder_hidden_states: text embeddings `(L, D)`.
            controlnet_cond: the condition image `(3, 8h, 8w)` in [0, 1]; required when the
                adapter has a condition encoder, refused when it has none.
            conditioning_scale: multiplies every residual.
            added_cond_kwargs: SDXL's `text_embeds` and `time_ids` (as for the UNet).
            class_labels: `guidance_label(w)` for a guidance-conditioned adapter (required
                there, refused otherwise).

        Returns:
            `(down_residuals, mid_residual)` for `UNet2DConditionModel.__call__`.
        """
        cfg = self.config.unet
        if (controlnet_cond is None) != (self.controlnet_cond_embedding is None):
            raise ValueError(
                "this adapter needs a condition image" if controlnet_cond is None
                else "this adapter has no condition encoder: pass controlnet_cond=None"
            )
        context = encoder_hidden_states.astype(self.dtype)
        temb = embed_time(cfg, self.time_embedding, self.add_embedding, timestep,
                          added_cond_kwargs, self.dtype)
        if (class_labels is None) != (self.class_embedding is None):
            raise ValueError(
                "this guidance-conditioned adapter needs class_labels (guidance_label(w))"
                if class_labels is None else
                "this adapter has no guidance embedding: pass class_labels=None")
        if self.class_embedding is not None:
            temb = temb + self.guidance_embedding(class_labels).astype(temb.dtype)
        x = self.conv_in(sample)
        if self.controlnet_cond_embedding is not None:
            cond = controlnet_cond
            factor = 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)
            if cond.shape[1:] != (factor * sample.shape[1], factor * sample.shape[2]):
                raise ValueError(
                    f"condition image of size {cond.shape[1]}x{cond.shape[2]} does not match "
                    f"latents of size {sample.shape[1]}x{sample.shape[2]} (expected "
                    f"{factor * sample.shape[1]}x{factor * sample.shape[2]})"
                )
            if self.config.controlnet_conditioning_channel_order == "bgr":
                cond = cond[::-1]
            x = x + self.controlnet_cond_embedding(cond.astype(self.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, outs = block(x, temb, context, remat=self.remat)
            skips.extend(outs)
        x = self.mid_block(x, temb, context, remat=self.remat)
        down = tuple(
            conv(s) * jnp.asarray(conditioning_scale, self.dtype)
            for conv, s in zip(self.controlnet_down_blocks, skips)
        )
        mid = self.controlnet_mid_block(x) * jnp.asarray(conditioning_scale, self.dtype)
        return down, mid
