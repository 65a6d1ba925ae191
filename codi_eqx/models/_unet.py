"""The Stable Diffusion UNet (`UNet2DConditionModel`): SD 1.x, SD 2.x and SDXL (whose added
`text_time` embedding takes the pooled text embedding and the micro-conditioning time ids)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Sequence
from collections.abc import Mapping
from typing import Any, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._typing import Timestep
from ..nn import Conv2d, GroupNorm
from ._unet_blocks import (
    DownBlock2D,
    TimestepEmbedding,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
    added_time_embedding,
    timestep_embedding,
)

AddedCondKwargs = Mapping[str, Float[Array, "..."]]
"""SDXL's added conditions of one example, as diffusers names them: `text_embeds` (the pooled
text embedding, `(p,)`) and `time_ids` (original size, crop top-left, target size, `(6,)`)."""


_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID = ("UNetMidBlock2DCrossAttn",)

# Options of diffusers' UNet config that this implementation does not provide, with the value
# that means "off"; any other value is refused with a message naming it.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "center_input_sample": False,
    "class_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "attention_type": "default",
    "act_fn": "silu",
}

ADDITION_EMBED_TYPES = (None, "text_time")


def per_block(value: Any, n: int, name: str) -> tuple:
    """A scalar repeated over `n` blocks, or a sequence of length `n` as a tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: {name} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


def check_supported(d: dict, what: str) -> None:
    for key, off in _UNSUPPORTED_DEFAULTS.items():
        if key in d and d[key] != off and not (off is False and d[key] is None):
            raise ValueError(f"{what} config: {key}={d[key]!r} is not supported (expected {off!r})")


@dataclass(frozen=True)
class UNet2DConditionConfig:
    """The UNet's hyperparameters, as in diffusers' `unet/config.json` (per-block values
    resolved to tuples)."""

    in_channels: int = 4
    """Latent channels in."""
    out_channels: int = 4
    """Channels out (the prediction)."""
    sample_size: int = 64
    """Latent size the model was trained at (informative)."""
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    )
    """Encoder blocks: `CrossAttnDownBlock2D` or `DownBlock2D`."""
    up_block_types: tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
    )
    """Decoder blocks: `CrossAttnUpBlock2D` or `UpBlock2D`."""
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    """The only mid block of SD 1.x / 2.x."""
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    """Channels of each block."""
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    """Resnets per encoder block (the decoder has one more)."""
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    """Attention heads per block. diffusers' `attention_head_dim` holds this number for SD
    1.x / 2.x configs when `num_attention_heads` is absent (a naming quirk kept for
    compatibility)."""
    attention_head_dim: Union[int, tuple[int, ...]] = 8
    """The raw `attention_head_dim` of the config file, kept for export."""
    cross_attention_dim: tuple[int, ...] = (768, 768, 768, 768)
    """Width of the text embeddings, per block."""
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    """Transformer blocks per attention layer."""
    only_cross_attention: tuple[bool, ...] = (False, False, False, False)
    """Whether the first attention of each transformer block attends to the text instead of
    the image."""
    use_linear_projection: bool = False
    """Linear (SD 2.x) rather than 1x1-conv (SD 1.x) projections around the transformers."""
    upcast_attention: bool = False
    """Compute attention in float32 (SD 2.1)."""
    flip_sin_to_cos: bool = True
    """Timestep embedding order `[cos, sin]`."""
    freq_shift: float = 0.0
    """Timestep embedding frequency shift."""
    norm_num_groups: int = 32
    """GroupNorm groups."""
    norm_eps: float = 1e-5
    """GroupNorm epsilon of resnets and the output norm."""
    downsample_padding: int = 1
    """Padding of the stride-2 convolutions."""
    mid_block_scale_factor: float = 1.0
    """Output scale of the mid block's resnets."""
    conv_in_kernel: int = 3
    """Kernel size of `conv_in`."""
    conv_out_kernel: int = 3
    """Kernel size of `conv_out`."""
    addition_embed_type: Optional[str] = None
    """`text_time` (SDXL): an embedding of the pooled text embedding and the time ids is added
    to the timestep's; None for SD 1.x / 2.x."""
    addition_time_embed_dim: Optional[int] = None
    """Width of each time id's sinusoidal embedding (`text_time`; 256 in SDXL)."""
    projection_class_embeddings_input_dim: Optional[int] = None
    """Input width of the added embedding's MLP: the pooled text width plus 6 x
    `addition_time_embed_dim` (`text_time`; 2816 in SDXL base)."""

    def __post_init__(self):
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(
                f"UNet config: addition_embed_type={self.addition_embed_type!r} is not supported "
                f"(expected None or 'text_time')")
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise ValueError(
                "UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim")

    @property
    def pooled_text_dim(self) -> Optional[int]:
        """Width of the pooled text embedding the added embedding takes (`text_time`), the
        rest of its input being the six time ids' embeddings; None without one."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """Latent sizes must be divisible by this for the skip connections to line up."""
        return 2 ** (self.num_blocks - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "UNet2DConditionConfig":
        """From diffusers' `unet/config.json`; unsupported options raise `ValueError`."""
        check_supported(d, "UNet")
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        n = len(down)
        for t in down:
            if t not in _DOWN:
                raise ValueError(f"UNet config: down block type {t!r} is not supported ({_DOWN})")
        for t in up:
            if t not in _UP:
                raise ValueError(f"UNet config: up block type {t!r} is not supported ({_UP})")
        mid = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid not in _MID:
            raise ValueError(f"UNet config: mid block type {mid!r} is not supported ({_MID})")
        if len(up) != n:
            raise ValueError(f"UNet config: {len(up)} up blocks for {n} down blocks")
        block_out = tuple(d.get("block_out_channels", cls.block_out_channels))
        if len(block_out) != n:
            raise ValueError(f"UNet config: block_out_channels has {len(block_out)} entries for {n} blocks")
        head_dim = d.get("attention_head_dim", 8)
        heads = d.get("num_attention_heads") or head_dim
        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            sample_size=d.get("sample_size") or 64,
            down_block_types=down,
            up_block_types=up,
            mid_block_type=mid,
            block_out_channels=block_out,
            layers_per_block=per_block(d.get("layers_per_block", 2), n, "layers_per_block"),
            num_attention_heads=per_block(heads, n, "num_attention_heads"),
            attention_head_dim=tuple(head_dim) if isinstance(head_dim, list) else head_dim,
            cross_attention_dim=per_block(d.get("cross_attention_dim", 1280), n, "cross_attention_dim"),
            transformer_layers_per_block=per_block(
                d.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"
            ),
            only_cross_attention=per_block(
                bool(d.get("only_cross_attention", False))
                if not isinstance(d.get("only_cross_attention"), list)
                else d["only_cross_attention"], n, "only_cross_attention",
            ),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            upcast_attention=bool(d.get("upcast_attention", False)),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=float(d.get("freq_shift", 0)),
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            downsample_padding=d.get("downsample_padding", 1),
            mid_block_scale_factor=float(d.get("mid_block_scale_factor", 1.0)),
            conv_in_kernel=d.get("conv_in_kernel", 3),
            conv_out_kernel=d.get("conv_out_kernel", 3),
            addition_embed_type=d.get("addition_embed_type"),
            addition_time_embed_dim=d.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim"),
        )

    def to_dict(self) -> dict:
        """A diffusers-compatible `config.json` dict."""
        d = dataclasses.asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        for k in ("cross_attention_dim", "layers_per_block", "transformer_layers_per_block"):
            if len(set(d[k])) == 1:
                d[k] = d[k][0]
        d["only_cross_attention"] = (
            d["only_cross_attention"][0]
            if len(set(d["only_cross_attention"])) == 1 else d["only_cross_attention"]
        )
        d["num_attention_heads"] = None
        d["attention_head_dim"] = (
            list(self.num_attention_heads)
            if len(set(self.num_attention_heads)) > 1 else self.num_attention_heads[0]
        )
        return {"_class_name": "UNet2DConditionModel", "act_fn": "silu", **d}


def add_embedding_of(cfg: UNet2DConditionConfig, *, dtype, key) -> Optional[TimestepEmbedding]:
    """The added embedding's MLP of a `text_time` config (None otherwise)."""
    if cfg.addition_embed_type != "text_time":
        return None
    return TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim,
                             dtype=dtype, key=key)


def embed_time(
    cfg: UNet2DConditionConfig, time_embedding: TimestepEmbedding,
    add_embedding: Optional[TimestepEmbedding], timestep, added_cond_kwargs, dtype,
) -> Float[Array, " t"]:
    """The embedding every resnet receives: the timestep's, plus SDXL's added embedding of
    the pooled text embedding and the time ids (`added_cond_kwargs`, required there)."""
    emb = timestep_embedding(
        timestep, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift,
    )
    temb = time_embedding(emb.astype(dtype))
    if add_embedding is None:
        if added_cond_kwargs is not None:
            raise ValueError("added_cond_kwargs given to a model without an added embedding "
                             "(addition_embed_type is None)")
        return temb
    if added_cond_kwargs is None or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
        raise ValueError("this model (addition_embed_type='text_time', SDXL) needs "
                         "added_cond_kwargs with 'text_embeds' and 'time_ids'")
    text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
    if text_embeds.shape != (cfg.pooled_text_dim,) or time_ids.shape != (6,):
        raise ValueError(
            f"added_cond_kwargs: text_embeds {tuple(text_embeds.shape)} and time_ids "
            f"{tuple(time_ids.shape)}, expected ({cfg.pooled_text_dim},) and (6,)")
    return temb + added_time_embedding(
        add_embedding, text_embeds, time_ids, time_dim=cfg.addition_time_embed_dim,
        flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
    ).astype(temb.dtype)


def _down_blocks(cfg: UNet2DConditionConfig, *, dtype, key) -> tuple[DownBlock2D, ...]:
    keys = jax.random.split(key, cfg.num_blocks)
    blocks = []
    out_ch = cfg.block_out_channels[0]
    for i, kind in enumerate(cfg.down_block_types):
        in_ch, out_ch = out_ch, cfg.block_out_channels[i]
        blocks.append(
            DownBlock2D(
                in_ch, out_ch, temb_channels=cfg.time_embed_dim,
                num_layers=cfg.layers_per_block[i], add_downsample=i < cfg.num_blocks - 1,
                cross_attention=kind == "CrossAttnDownBlock2D", eps=cfg.norm_eps,
                groups=cfg.norm_num_groups, heads=cfg.num_attention_heads[i],
                transformer_layers=cfg.transformer_layers_per_block[i],
                cross_attention_dim=cfg.cross_attention_dim[i],
                use_linear_projection=cfg.use_linear_projection,
                only_cross_attention=cfg.only_cross_attention[i],
                upcast_attention=cfg.upcast_attention, downsample_padding=cfg.downsample_padding,
                dtype=dtype, key=keys[i],
            )
        )
    return tuple(blocks)


def _mid_block(cfg: UNet2DConditionConfig, *, dtype, key) -> UNetMidBlock2DCrossAttn:
    return UNetMidBlock2DCrossAttn(
        cfg.block_out_channels[-1], temb_channels=cfg.time_embed_dim, eps=cfg.norm_eps,
        groups=cfg.norm_num_groups, heads=cfg.num_attention_heads[-1],
        cross_attention_dim=cfg.cross_attention_dim[-1],
        transformer_layers=cfg.transformer_layers_per_block[-1],
        output_scale_factor=cfg.mid_block_scale_factor,
        use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention,
        dtype=dtype, key=key,
    )


class UNet2DConditionModel(eqx.Module):
    """The text-conditioned denoiser of Stable Diffusion.

    `__call__` takes one example: latents `(C, H, W)`, a timestep, text embeddings
    `(L, D)`; and optionally an adapter's residuals, added to the skip connections (one per
    encoder output, in order) and to the mid block's output.
    """

    conv_in: Conv2d
    time_embedding: TimestepEmbedding
    add_embedding: Optional[TimestepEmbedding]
    down_blocks: tuple[DownBlock2D, ...]
    mid_block: UNetMidBlock2DCrossAttn
    up_blocks: tuple[UpBlock2D, ...]
    conv_norm_out: GroupNorm
    conv_out: Conv2d
    config: UNet2DConditionConfig = eqx.field(static=True)
    remat: bool = eqx.field(static=True)

    def __init__(
        self, config: UNet2DConditionConfig, *, dtype=jnp.float32, remat: bool = False,
        key: PRNGKeyArray,
    ):
        cfg = config
        k_in, k_t, k_down, k_mid, k_up, k_out = jax.random.split(key, 6)
        c0 = cfg.block_out_channels[0]
        self.conv_in = Conv2d(
            cfg.in_channels, c0, cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2,
            dtype=dtype, key=k_in,
        )
        self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, dtype=dtype, key=k_t)
        self.add_embedding = add_embedding_of(cfg, dtype=dtype, key=jax.random.fold_in(k_t, 1))
        self.down_blocks = _down_blocks(cfg, dtype=dtype, key=k_down)
        self.mid_block = _mid_block(cfg, dtype=dtype, key=k_mid)
        rev_ch = cfg.block_out_channels[::-1]
        rev = lambda t: t[::-1]  # noqa: E731
        keys = jax.random.split(k_up, cfg.num_blocks)
        ups = []
        out_ch = rev_ch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, out_ch = out_ch, rev_ch[i]
            in_ch = rev_ch[min(i + 1, cfg.num_blocks - 1)]
            ups.append(
                UpBlock2D(
                    in_ch, prev, out_ch, temb_channels=cfg.time_embed_dim,
                    num_layers=rev(cfg.layers_per_block)[i] + 1,
                    add_upsample=i < cfg.num_blocks - 1,
                    cross_attention=kind == "CrossAttnUpBlock2D", eps=cfg.norm_eps,
                    groups=cfg.norm_num_groups, heads=rev(cfg.num_attention_heads)[i],
                    transformer_layers=rev(cfg.transformer_layers_per_block)[i],
                    cross_attention_dim=rev(cfg.cross_attention_dim)[i],
                    use_linear_projection=cfg.use_linear_projection,
                    only_cross_attention=rev(cfg.only_cross_attention)[i],
                    upcast_attention=cfg.upcast_attention, dtype=dtype, key=keys[i],
                )
            )
        self.up_blocks = tuple(ups)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, c0, eps=cfg.norm_eps, dtype=dtype)
        self.conv_out = Conv2d(
            c0, cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2,
            dtype=dtype, key=k_out,
        )
        self.config = config
        self.remat = remat

    @property
    def dtype(self):
        return self.conv_in.weight.dtype

    def time_embed(self, timestep, added_cond_kwargs: Optional[AddedCondKwargs] = None,
                   ) -> Float[Array, " t"]:
        """The embedding fed to every resnet: the timestep's (plus SDXL's added embedding)."""
        return embed_time(self.config, self.time_embedding, self.add_embedding, timestep,
                          added_cond_kwargs, self.dtype)

    @jax.named_scope("codi_eqx.UNet2DConditionModel")
    def __call__(
        self,
        sample: Float[Array, "c h w"],
        timestep: Timestep,
        encoder_hidden_states: Float[Array, "seq d"],
        *,
        added_cond_kwargs: Optional[AddedCondKwargs] = None,
        down_block_additional_residuals: Optional[Sequence[Float[Array, "..."]]] = None,
        mid_block_additional_residual: Optional[Float[Array, "..."]] = None,
    ) -> Float[Array, "cout h w"]:
        """Arguments:
            sample: noisy latents `(C, H, W)`; sizes not divisible by `2**(len(blocks)-1)` work
                as in diffusers (upsampling to each skip's size).
            timestep: a scalar timestep (integer or fractional).
            encoder_hidden_states: text embeddings `(L, D)`.
            added_cond_kwargs: SDXL's `text_embeds` `(p,)` and `time_ids` `(6,)`; required by
                a `text_time` model, refused by others.
            down_block_additional_residuals: adapter residuals, one per skip connection.
            mid_block_additional_residual: adapter residual of the mid block.

        Returns:
            The model output `(C_out, H, W)` (noise, velocity or sample, per the schedule).
        """
        context = encoder_hidden_states.astype(self.dtype)
        temb = self.time_embed(timestep, added_cond_kwargs)
        x = self.conv_in(sample)
        skips: list = [x]
        for block in self.down_blocks:
            x, outs = block(x, temb, context, remat=self.remat)
            skips.extend(outs)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"{len(down_block_additional_residuals)} down residuals for {len(skips)} skips"
                )
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
        x = self.mid_block(x, temb, context, remat=self.remat)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = tuple(skips[-n:]), skips[:-n]
            size = tuple(skips[-1].shape[1:]) if skips else None
            x = block(x, block_skips, temb, context, upsample_size=size, remat=self.remat)
        x = jax.nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)
