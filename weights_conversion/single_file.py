"""Original (LDM) single-file Stable Diffusion and ControlNet checkpoints <-> the models.

An original checkpoint holds the whole model in one file under these prefixes:

- `model.diffusion_model.*`: the UNet (`input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`,
  `time_embed.*`, `out.*`);
- `first_stage_model.*`: the VAE (`encoder.down.N.block.M`, `mid.attn_1`, `nin_shortcut`, ...);
- `cond_stage_model.transformer.*`: SD 1.x's CLIP text encoder (already in transformers' names),
  or `cond_stage_model.model.*`: SD 2.x's OpenCLIP text encoder (`transformer.resblocks.N`, with
  a fused `attn.in_proj_weight` holding q, k and v);
- SDXL: `conditioner.embedders.0.transformer.*` (CLIP ViT-L, transformers' names) and
  `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG, with its `text_projection` matrix, applied
  as `x @ P`: transformers' `text_projection.weight` is its transpose); the UNet's added
  `text_time` embedding is `label_emb.0.0` / `label_emb.0.2`;
- `control_model.*`: an original ControlNet (the UNet's encoder half plus `input_hint_block`,
  `zero_convs`, `middle_block_out`; SDXL's with `label_emb`). A ControlNet file in diffusers'
  own names (`controlnet_down_blocks.*`, as most SDXL ControlNets are shared) is read as well.

The mapping is data: for a given config, a table of `(diffusers prefix, original prefix,
inner renames)` rows is generated mechanically (block N, layer M -> `input_blocks.K.0`), and
every key of the model's template is translated through it. The tensors, renamed, then go
through `load_state`, which checks every shape; the translation itself checks that every
expected tensor is present and every tensor of the file is used (or one of the known buffers:
EMA copies, noise-schedule tables, position ids).

Which text encoders a family has, and where, is data too (`TEXT_ENCODERS`): SD 1.x's and SDXL's
first encoder are one CLIP layout at two prefixes; SD 2.x's and SDXL's second, one OpenCLIP
layout (SD 2.x's with one more block than it uses, SDXL's with the projection).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from codi_eqx.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    ControlNetConfig,
    ControlNetModel,
    UNet2DConditionConfig,
    UNet2DConditionModel,
)
from codi_eqx.weights import (
    CLIP_NAME_MAP,
    CLIP_PROJECTION_NAME_MAP,
    CONTROLNET_NAME_MAP,
    TRANSFORMS,
    UNET_NAME_MAP,
    VAE_NAME_MAP,
    WeightsError,
    check_matched,
    load_state,
    module_keys,
    stored_axes,
    summarise_keys,
    template_shapes,
    to_checkpoint_layout,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
CONDITIONER_PREFIX = "conditioner.embedders."
SDXL_CLIP_PREFIX = CONDITIONER_PREFIX + "0.transformer."
SDXL_OPENCLIP_PREFIX = CONDITIONER_PREFIX + "1.model."
CONTROL_PREFIX = "control_model."

# Inner renames (diffusers name -> original name) of the blocks that differ.
UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)
# OpenCLIP's text tower (inside `cond_stage_model.model.`) -> transformers' CLIP names.
OPENCLIP_TOP = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm", "ln_final"),
)
OPENCLIP_PROJECTION = ("text_projection.weight", "text_projection", ())  # stored transposed
OPENCLIP_LAYER = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
OPENCLIP_FUSED = ("q_proj", "k_proj", "v_proj")  # the thirds of `attn.in_proj_*`, in order
OPENCLIP_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)")


class TextEncoderLayout(NamedTuple):
    """Where and how an original checkpoint holds one text encoder."""

    part: str
    """The diffusers component: `text_encoder` or `text_encoder_2`."""
    prefix: str
    """The prefix of its tensors in the file."""
    openclip: bool
    """OpenCLIP's layout (fused q/k/v, `ln_final`, ...; GELU) rather than transformers' names
    (quick GELU)."""
    unused_last: bool = False
    """The file holds one more block than the model uses (SD 2.x conditions on the penultimate
    layer, and diffusers' config leaves the last block out)."""
    projection: bool = False
    """It carries a `text_projection` (a `CLIPTextModelWithProjection`: SDXL's second)."""


TEXT_ENCODERS: dict[str, tuple[TextEncoderLayout, ...]] = {
    "sd1": (TextEncoderLayout("text_encoder", CLIP_PREFIX, openclip=False),),
    "sd2": (TextEncoderLayout("text_encoder", OPENCLIP_PREFIX, openclip=True, unused_last=True),),
    "sdxl": (
        TextEncoderLayout("text_encoder", SDXL_CLIP_PREFIX, openclip=False),
        TextEncoderLayout("text_encoder_2", SDXL_OPENCLIP_PREFIX, openclip=True, projection=True),
    ),
}
"""family -> its text encoders, in the diffusers pipeline's order."""

TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def text_layout(family: str, part: str) -> TextEncoderLayout:
    for layout in TEXT_ENCODERS[family]:
        if layout.part == part:
            return layout
    raise WeightsError(f"a {family} checkpoint has no {part}")

# Keys of original checkpoints that hold no model parameter: consumed, never loaded.
IGNORED = (
    r"model_ema\..*",
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|"
    r"sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|"
    r"sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|"
    r"posterior_mean_coef1|posterior_mean_coef2|logvar|scale_factor)",
    r"denoiser\.(sigmas|log_sigmas)",
    r"(cond_stage_model|conditioner\.embedders\.0)\.transformer\.(text_model\.)?embeddings\.position_ids",
    r"(cond_stage_model|conditioner\.embedders\.\d+)\.model\.(logit_scale|text_projection|attn_mask)",
)

Row = tuple[str, str, tuple[tuple[str, str], ...]]

# Defaults for what the weights do not show (the values of the released SD models).
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
# The VAE's values that the weights do not show, per family.
VAE_CONVENTIONS = {
    "sd1": {"sample_size": 512, "scaling_factor": 0.18215},
    "sd2": {"sample_size": 512, "scaling_factor": 0.18215},
    "sdxl": {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
}
SDXL_TIME_EMBED_DIM = 256  # `addition_time_embed_dim`: not in the weights


# ------------------------------------------------------------------------------------------
# The tables


def unet_rows(cfg: UNet2DConditionConfig, *, controlnet: Optional[ControlNetConfig] = None) -> list[Row]:
    """The prefix table of a UNet (or, with `controlnet`, of a ControlNet) of config `cfg`."""
    return _unet_rows(
        cfg.layers_per_block, tuple(t == "CrossAttnUpBlock2D" for t in cfg.up_block_types),
        added=cfg.addition_embed_type == "text_time",
        hint_stages=None if controlnet is None else len(controlnet.conditioning_embedding_out_channels),
    )


def _unet_rows(layers_per_block: tuple[int, ...], up_attention: tuple[bool, ...], *, added: bool,
               hint_stages: Optional[int]) -> list[Row]:
    """The table from what it depends on: the resnets per block, which up blocks have
    attention (a UNet), the added embedding, and the condition encoder's stages (a ControlNet:
    `hint_stages` not None)."""
    rows: list[Row] = [
        ("conv_in", "input_blocks.0.0", ()),
        ("time_embedding.linear_1", "time_embed.0", ()),
        ("time_embedding.linear_2", "time_embed.2", ()),
        ("mid_block.resnets.0", "middle_block.0", UNET_RESNET),
        ("mid_block.attentions.0", "middle_block.1", ()),
        ("mid_block.resnets.1", "middle_block.2", UNET_RESNET),
    ]
    if added:  # SDXL's text_time embedding
        rows += [("add_embedding.linear_1", "label_emb.0.0", ()),
                 ("add_embedding.linear_2", "label_emb.0.2", ())]
    n = len(layers_per_block)
    k = 1
    for b in range(n):
        for layer in range(layers_per_block[b]):
            rows.append((f"down_blocks.{b}.resnets.{layer}", f"input_blocks.{k}.0", UNET_RESNET))
            rows.append((f"down_blocks.{b}.attentions.{layer}", f"input_blocks.{k}.1", ()))
            k += 1
        if b < n - 1:
            rows.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{k}.0.op", ()))
            k += 1
    if hint_stages is None:
        j = 0
        for u in range(n):
            layers = layers_per_block[n - 1 - u] + 1
            for layer in range(layers):
                rows.append((f"up_blocks.{u}.resnets.{layer}", f"output_blocks.{j}.0", UNET_RESNET))
                rows.append((f"up_blocks.{u}.attentions.{layer}", f"output_blocks.{j}.1", ()))
                if layer == layers - 1 and u < n - 1:
                    rows.append((f"up_blocks.{u}.upsamplers.0.conv",
                                 f"output_blocks.{j}.{2 if up_attention[u] else 1}.conv", ()))
                j += 1
        rows += [("conv_norm_out", "out.0", ()), ("conv_out", "out.2", ())]
    else:
        zeros = 1 + sum(layers_per_block) + (n - 1)
        rows += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0", ()) for i in range(zeros)]
        rows.append(("controlnet_mid_block", "middle_block_out.0", ()))
        hint = ["controlnet_cond_embedding.conv_in"]
        hint += [f"controlnet_cond_embedding.blocks.{i}" for i in range(2 * (hint_stages - 1))]
        hint.append("controlnet_cond_embedding.conv_out")
        rows += [(d, f"input_hint_block.{2 * i}", ()) for i, d in enumerate(hint)]
    return rows


def vae_rows(cfg: AutoencoderKLConfig) -> list[Row]:
    """The prefix table of a VAE of config `cfg`."""
    n = len(cfg.block_out_channels)
    rows: list[Row] = [("encoder.conv_norm_out", "encoder.norm_out", ()),
                       ("decoder.conv_norm_out", "decoder.norm_out", ())]
    for part in ("encoder", "decoder"):
        rows += [
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION),
        ]
    for b in range(n):
        rows.append((f"encoder.down_blocks.{b}.resnets", f"encoder.down.{b}.block", VAE_RESNET))
        rows.append((f"encoder.down_blocks.{b}.downsamplers.0", f"encoder.down.{b}.downsample", ()))
        rows.append((f"decoder.up_blocks.{b}.resnets", f"decoder.up.{n - 1 - b}.block", VAE_RESNET))
        rows.append((f"decoder.up_blocks.{b}.upsamplers.0", f"decoder.up.{n - 1 - b}.upsample", ()))
    return rows


def openclip_rows(num_layers: int, *, projection: bool = False) -> list[Row]:
    rows: list[Row] = [(d, o, ()) for d, o in OPENCLIP_TOP]
    rows += [(f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}", OPENCLIP_LAYER)
             for i in range(num_layers)]
    if projection:
        rows.append(OPENCLIP_PROJECTION)
    return rows


def text_rows(layout: TextEncoderLayout, num_layers: int,
              tensors: Optional[Mapping] = None) -> tuple[list[Row], str]:
    """The table of a text encoder and the prefix it is relative to. The CLIP layout's table
    carries the prefix itself: older SD 1.x files leave `text_model.` out (as read in
    `tensors`; written with it)."""
    if layout.openclip:
        return openclip_rows(num_layers, projection=layout.projection), layout.prefix
    inner = layout.prefix + "text_model."
    if tensors is not None and not any(k.startswith(inner) for k in tensors):
        inner = layout.prefix
    return [("text_model", inner[:-1], ())], ""


def _translate(key: str, rows: list[Row]) -> str:
    """The original name of the diffusers-named tensor `key` under the table `rows`."""
    best: Optional[Row] = None
    for row in rows:
        d = row[0]
        if (key == d or key.startswith(d + ".")) and (best is None or len(d) > len(best[0])):
            best = row
    if best is None:
        return key
    d, o, inner = best
    rest = key[len(d):]
    if rest.startswith("."):
        rest = rest[1:]
        # A leading layer index (`resnets.M` rows) stays in place before the inner renames.
        m = re.match(r"(\d+\.)?(.*)", rest)
        index, rest = m.group(1) or "", m.group(2)
        for dn, on in inner:
            if rest == dn or rest.startswith(dn + "."):
                rest = on + rest[len(dn):]
                break
        return f"{o}.{index}{rest}"
    return o


# ------------------------------------------------------------------------------------------
# Reading


class Source(NamedTuple):
    """Where a parameter lies in an original file."""

    key: str
    third: Optional[int] = None
    """Which third of a fused q/k/v tensor (OpenCLIP's `attn.in_proj_*`), if any."""
    transposed: bool = False
    """Stored transposed (OpenCLIP's `text_projection`, applied as `x @ P`)."""


class _Renamed(Mapping):
    """A lazily renamed view: name -> the `Source` tensor of `source`, cut or transposed."""

    def __init__(self, source: Mapping, entries: dict[str, Source]):
        self.source = source
        self.entries = entries

    def __getitem__(self, name: str) -> np.ndarray:
        key, third, transposed = self.entries[name]
        a = self.source[key]
        if third is not None:
            n = a.shape[0] // 3
            a = a[third * n:(third + 1) * n]
        return np.ascontiguousarray(np.asarray(a).T) if transposed else a

    def shape(self, name: str) -> tuple[int, ...]:
        key, third, transposed = self.entries[name]
        shape = _shape(self.source, key)
        if third is not None:
            shape = (shape[0] // 3, *shape[1:])
        return shape[::-1] if transposed else shape

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _source(ckey: str, rows: list[Row], prefix: str, openclip: bool) -> Source:
    """Where the diffusers-named tensor `ckey` lies under the table `rows`."""
    if openclip:
        m = OPENCLIP_QKV.fullmatch(ckey)
        if m:
            return Source(f"{prefix}transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}",
                          third="qkv".index(m.group(2)))
        if ckey == OPENCLIP_PROJECTION[0]:
            return Source(prefix + OPENCLIP_PROJECTION[1], transposed=True)
    return Source(prefix + _translate(ckey, rows))


def _expected(template: Any, name_map, rows: list[Row], prefix: str,
              openclip: bool = False) -> dict[str, Source]:
    """diffusers checkpoint key -> its `Source` for every parameter of `template`."""
    return {
        ckey: _source(ckey, rows, prefix, openclip)
        for ckey in map(name_map.checkpoint_key, template_shapes(template))
    }


def _fill(template: Any, tensors: Mapping, name_map, rows: list[Row], prefix: str, *,
          what: str, dtype, openclip: bool = False, extra_ok=(), scope: Optional[str] = None) -> Any:
    """Load the part of `tensors` under `scope` (by default `prefix`) into `template`; every
    tensor under `scope` must be used (or match one of the regexes `extra_ok`), every
    parameter found."""
    entries = _expected(template, name_map, rows, prefix, openclip)
    scope = prefix if scope is None else scope
    needed = {src.key for src in entries.values()}
    missing = sorted(k for k in needed if k not in tensors)
    unexpected = sorted(
        k for k in tensors
        if k.startswith(scope) and k not in needed
        and not any(re.fullmatch(p, k) for p in (*IGNORED, *extra_ok))
    )
    check_matched(what, missing=missing, unexpected=unexpected)
    return load_state(template, _Renamed(tensors, entries), name_map, dtype=dtype, what=what)


def _is_diffusers_controlnet(keys) -> bool:
    """A ControlNet single file in diffusers' own names (most shared SDXL ControlNets)."""
    return any(k.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")) for k in keys)


def detect_family(tensors: Mapping) -> str:
    """`sd1`, `sd2`, `sdxl` (a whole model), `controlnet` (original or diffusers names), or a
    `WeightsError` for an unknown or unsupported layout."""
    keys = list(tensors)
    if any(k.startswith((CONTROL_PREFIX, "input_hint_block.")) for k in keys) \
            or _is_diffusers_controlnet(keys):
        return "controlnet"
    if any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(CONDITIONER_PREFIX + "1.") for k in keys):
            return "sdxl"
        if any(k.startswith(CONDITIONER_PREFIX) for k in keys):
            raise WeightsError(
                f"{CONDITIONER_PREFIX}0 without {CONDITIONER_PREFIX}1: an SDXL refiner (one "
                "OpenCLIP text encoder, aesthetic-score conditioning), which codi-eqx does not "
                "support; convert an SDXL base checkpoint")
        if UNET_PREFIX + "label_emb.0.0.weight" in tensors:
            raise WeightsError(
                f"{UNET_PREFIX}label_emb.* (an added embedding) without SDXL's text encoders "
                f"({CONDITIONER_PREFIX}0 and 1): not a supported SD 1.x / 2.x / SDXL checkpoint")
        if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
            return "sd2"
        if any(k.startswith(CLIP_PREFIX) for k in keys):
            return "sd1"
        proj = [k for k in keys if k.startswith(UNET_PREFIX) and k.endswith("proj_in.weight")]
        if proj and len(_shape(tensors, proj[0])) == 2:
            return "sd2"
        return "sd1"
    shown = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise WeightsError(
        "unknown key layout: not an original Stable Diffusion checkpoint (model.diffusion_model.*) "
        f"nor a ControlNet (control_model.*, or diffusers' controlnet_down_blocks.*); first keys: {shown}"
    )


def _shape(tensors: Mapping, key: str) -> tuple[int, ...]:
    shape = getattr(tensors, "shape", None)
    if callable(shape):
        try:
            return tuple(shape(key))
        except Exception:  # a plain mapping with a `shape` attribute of another kind
            pass
    return tuple(np.shape(tensors[key]))


# ------------------------------------------------------------------------------------------
# Configs inferred from the weights


def _indices(tensors: Mapping, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in tensors if (m := rx.match(k))})


def infer_unet_config(tensors: Mapping, prefix: str = UNET_PREFIX, *, controlnet: bool = False) -> dict:
    """A diffusers UNet (or ControlNet) config dict read off the original tensors' shapes.
    What the weights cannot show takes SD's values: 32 norm groups, and heads of 8 (SD 1.x,
    conv projections) or of 64 channels each (SD 2.x and SDXL, linear projections); with an
    added embedding (`label_emb`, SDXL), time ids embedded in 256 channels and latents of
    128."""
    p = re.escape(prefix)
    try:
        conv_in = _shape(tensors, prefix + "input_blocks.0.0.weight")
    except KeyError:
        raise WeightsError(f"no {prefix}input_blocks.0.0.weight: not an original UNet checkpoint") from None
    blocks: list[dict] = [{"channels": None, "layers": 0, "attn": False}]
    linear = False
    cross = None
    tlayers: list[int] = []
    for k in _indices(tensors, p + r"input_blocks\.(\d+)\.")[1:]:
        if prefix + f"input_blocks.{k}.0.op.weight" in tensors:
            blocks.append({"channels": None, "layers": 0, "attn": False})
            continue
        blk = blocks[-1]
        blk["layers"] += 1
        blk["channels"] = _shape(tensors, prefix + f"input_blocks.{k}.0.out_layers.3.weight")[0]
        proj = prefix + f"input_blocks.{k}.1.proj_in.weight"
        if proj in tensors:
            if not blk["attn"]:
                blk["attn"] = True
                tlayers.append(len(_indices(tensors, re.escape(prefix + f"input_blocks.{k}.1.transformer_blocks.") + r"(\d+)\.")))
            linear = len(_shape(tensors, proj)) == 2
            cross = _shape(tensors, prefix + f"input_blocks.{k}.1.transformer_blocks.0.attn2.to_k.weight")[1]
    if any(b["channels"] is None for b in blocks):
        raise WeightsError(f"{prefix}input_blocks: unrecognised block layout")
    channels = [b["channels"] for b in blocks]
    layers = [b["layers"] for b in blocks]
    if cross is None:
        mid = prefix + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
        cross = _shape(tensors, mid)[1] if mid in tensors else 768
    tl = [1] * len(blocks)
    it = iter(tlayers)
    for i, b in enumerate(blocks):
        if b["attn"]:
            tl[i] = next(it)
    down = ["CrossAttnDownBlock2D" if b["attn"] else "DownBlock2D" for b in blocks]
    up = ["CrossAttnUpBlock2D" if b["attn"] else "UpBlock2D" for b in reversed(blocks)]
    heads: Any = [c // 64 for c in channels] if linear else 8
    config = {
        "_class_name": "ControlNetModel" if controlnet else "UNet2DConditionModel",
        "in_channels": conv_in[1],
        "sample_size": 64,
        "down_block_types": down,
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "attention_head_dim": heads,
        "cross_attention_dim": cross,
        "transformer_layers_per_block": tl[0] if len(set(tl)) == 1 else tl,
        "use_linear_projection": linear,
        "norm_num_groups": 32,
    }
    added = prefix + "label_emb.0.0.weight"
    if added in tensors:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                      projection_class_embeddings_input_dim=_shape(tensors, added)[1],
                      sample_size=128)
    if not controlnet:
        config["up_block_types"] = up
        config["out_channels"] = _shape(tensors, prefix + "out.2.weight")[0]
    else:
        hint = _indices(tensors, p + r"input_hint_block\.(\d+)\.weight")
        if hint:
            config["conditioning_channels"] = _shape(tensors, prefix + "input_hint_block.0.weight")[1]
            outs = [_shape(tensors, prefix + f"input_hint_block.{i}.weight")[0] for i in hint[:-1]]
            config["conditioning_embedding_out_channels"] = [outs[0]] + outs[2::2]
        else:
            config["conditioning_channels"] = None
    return config


def infer_vae_config(tensors: Mapping, prefix: str = VAE_PREFIX, family: str = "sd1") -> dict:
    p = re.escape(prefix)
    n = len(_indices(tensors, p + r"encoder\.down\.(\d+)\."))
    if n == 0:
        raise WeightsError(f"no {prefix}encoder.down.*: the checkpoint holds no VAE")
    channels = [_shape(tensors, prefix + f"encoder.down.{b}.block.0.conv2.weight")[0] for b in range(n)]
    layers = len(_indices(tensors, p + r"encoder\.down\.0\.block\.(\d+)\."))
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(tensors, prefix + "encoder.conv_in.weight")[1],
        "out_channels": _shape(tensors, prefix + "decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": _shape(tensors, prefix + "decoder.conv_in.weight")[1],
        "norm_num_groups": 32,
        **VAE_CONVENTIONS[family],
    }


def infer_text_config(tensors: Mapping, family: str, part: str = "text_encoder") -> dict:
    """A transformers CLIP text config dict read off the shapes of the family's `part`
    (`text_encoder` or SDXL's `text_encoder_2`). What the weights cannot show takes the
    released models' values: heads of 64 channels, GELU for OpenCLIP, quick GELU for CLIP."""
    layout = text_layout(family, part)
    rows, prefix = text_rows(layout, 1, tensors)
    layer0 = prefix + _translate("text_model.encoder.layers.0", rows)
    layers = len(_indices(tensors, re.escape(layer0[:-1]) + r"(\d+)\."))
    rows, prefix = text_rows(layout, layers, tensors)

    def shape(name: str) -> tuple[int, ...]:
        return _shape(tensors, _source(name, rows, prefix, layout.openclip).key)

    try:
        vocab, hidden = shape("text_model.embeddings.token_embedding.weight")
    except KeyError:
        raise WeightsError(f"no {layout.prefix}*: the checkpoint holds no {part}") from None
    if layout.projection:
        projection = shape(OPENCLIP_PROJECTION[0])[-1]  # (hidden, projection), as stored
    else:
        projection = 512 if layout.openclip else 768
    return {
        "architectures": [(CLIPTextModelWithProjection if layout.projection else CLIPTextModel).__name__],
        "model_type": "clip_text_model",
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": layers - layout.unused_last,
        "num_attention_heads": hidden // 64,
        "max_position_embeddings": shape("text_model.embeddings.position_embedding.weight")[0],
        "hidden_act": "gelu" if layout.openclip else "quick_gelu", "layer_norm_eps": 1e-5,
        "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407,
        "projection_dim": projection,
    }


# ------------------------------------------------------------------------------------------
# Loading


def _config(cls, d: dict, what: str):
    try:
        return cls.from_dict(d)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{what}: unsupported config: {e}") from None


def load_unet_original(tensors: Mapping, config: dict, *, dtype=jnp.float32,
                       what: str = "unet") -> UNet2DConditionModel:
    cfg = _config(UNet2DConditionConfig, config, what)
    template = eqx.filter_eval_shape(lambda: UNet2DConditionModel(cfg, key=jax.random.key(0)))
    return _fill(template, tensors, UNET_NAME_MAP, unet_rows(cfg), UNET_PREFIX, what=what, dtype=dtype)


def load_vae_original(tensors: Mapping, config: dict, *, dtype=jnp.float32,
                      what: str = "vae") -> AutoencoderKL:
    cfg = _config(AutoencoderKLConfig, config, what)
    template = eqx.filter_eval_shape(AutoencoderKL, cfg, key=jax.random.key(0))
    return _fill(template, tensors, VAE_NAME_MAP, vae_rows(cfg), VAE_PREFIX, what=what, dtype=dtype)


def load_text_encoder_original(tensors: Mapping, config: dict, family: str, *, part: str = "text_encoder",
                               dtype=jnp.float32, what: str = "text_encoder") -> CLIPTextModel:
    """The family's text encoder `part` (`text_encoder`, or SDXL's `text_encoder_2`, a
    `CLIPTextModelWithProjection`) of an original checkpoint."""
    layout = text_layout(family, part)
    cfg = _config(CLIPTextConfig, config, what)
    cls, name_map = ((CLIPTextModelWithProjection, CLIP_PROJECTION_NAME_MAP) if layout.projection
                     else (CLIPTextModel, CLIP_NAME_MAP))
    template = eqx.filter_eval_shape(cls, cfg, dtype=dtype, key=jax.random.key(0))
    rows, prefix = text_rows(layout, cfg.num_hidden_layers, tensors)
    # The block past the configured depth (SD 2.x's last, which it never uses).
    extra_ok = ((re.escape(f"{layout.prefix}transformer.resblocks.{cfg.num_hidden_layers}.") + ".*",)
                if layout.unused_last else ())
    return _fill(template, tensors, name_map, rows, prefix, what=what, dtype=dtype,
                 openclip=layout.openclip, extra_ok=extra_ok, scope=layout.prefix)


def check_prefixes(tensors: Mapping, allowed: tuple[str, ...], what: str) -> None:
    """Every tensor is under one of `allowed` prefixes or a known buffer."""
    stray = [k for k in tensors if not k.startswith(allowed) and not any(re.fullmatch(p, k) for p in IGNORED)]
    if stray:
        raise WeightsError(f"{what}: {len(stray)} unexpected tensor(s): {summarise_keys(stray)}")


CODI_CONFIG_KEY = "codi_eqx_config"


def load_controlnet_original(tensors: Mapping, config: Optional[dict] = None, *,
                             metadata: Optional[Mapping[str, str]] = None, dtype=jnp.float32,
                             what: str = "controlnet") -> ControlNetModel:
    """A single-file ControlNet: the original layout (`control_model.*`, or the same keys
    unprefixed), or diffusers' names (`controlnet_down_blocks.*`). The config: `config`, else
    the one this project's export stores in the file's metadata, else inferred from the
    shapes (SD's conventions, as `infer_unet_config`)."""
    diffusers_names = _is_diffusers_controlnet(tensors)
    prefix = CONTROL_PREFIX if any(k.startswith(CONTROL_PREFIX) for k in tensors) else ""
    if config is None and metadata and CODI_CONFIG_KEY in metadata:
        config = json.loads(metadata[CODI_CONFIG_KEY])
    if config is None:
        config = infer_unet_config(_original_names(tensors) if diffusers_names else tensors,
                                   prefix, controlnet=True)
    cfg = _config(ControlNetConfig, config, what)
    template = eqx.filter_eval_shape(lambda: ControlNetModel(cfg, key=jax.random.key(0)))
    if diffusers_names:  # the names are the checkpoint keys already
        rows: list[Row] = []
        hint = r"controlnet_cond_embedding\..*"
    else:
        rows = unet_rows(cfg.unet, controlnet=cfg if cfg.conditioning_channels is not None
                         else cfg.replace(conditioning_channels=3))
        hint = re.escape(prefix) + r"input_hint_block\..*"
    extra_ok = () if cfg.conditioning_channels is not None else (hint,)
    if prefix:
        check_prefixes(tensors, (CONTROL_PREFIX,), what)
    return _fill(template, tensors, CONTROLNET_NAME_MAP, rows, prefix, what=what, dtype=dtype,
                 extra_ok=extra_ok)


def _original_names(tensors: Mapping) -> Mapping:
    """A diffusers-named ControlNet's tensors under their original names (a view), for the
    original layout's config inference. The table needs only what the names show: the blocks,
    their resnets, the condition encoder's stages and whether there is an added embedding."""
    n = len(_indices(tensors, r"down_blocks\.(\d+)\."))
    layers = tuple(len(_indices(tensors, rf"down_blocks\.{b}\.resnets\.(\d+)\.")) for b in range(n))
    stages = len(_indices(tensors, r"controlnet_cond_embedding\.blocks\.(\d+)\.")) // 2 + 1
    rows = _unet_rows(layers, (), added="add_embedding.linear_1.weight" in tensors, hint_stages=stages)
    return _Renamed(tensors, {_translate(k, rows): Source(k) for k in tensors})


# ------------------------------------------------------------------------------------------
# Writing the original layout


def _export(module: Any, name_map, rows: list[Row], prefix: str, dtype=None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    layouts = stored_axes(module)
    for mkey, leaf in module_keys(module).items():
        a = np.ascontiguousarray(to_checkpoint_layout(np.asarray(leaf), layouts.get(mkey)))
        if dtype is not None and (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
            a = a.astype(jnp.dtype(dtype))
        transform = name_map.transform_for(mkey)
        if transform is not None:
            a = TRANSFORMS[transform][1](a)
        out[prefix + _translate(name_map.checkpoint_key(mkey), rows)] = a
    return out


def controlnet_to_original(adapter: ControlNetModel, *, dtype=None) -> dict[str, np.ndarray]:
    """The adapter's tensors in the original `control_model.*` layout. An adapter without a
    condition encoder gets an all-zero 3-channel `input_hint_block`, whose output is exactly
    zero whatever the image."""
    cfg = adapter.config
    if cfg.conditioning_channels is None:
        adapter = with_zero_condition_encoder(adapter)
    rows = unet_rows(cfg.unet, controlnet=adapter.config)
    return _export(adapter, CONTROLNET_NAME_MAP, rows, CONTROL_PREFIX, dtype)


def with_zero_condition_encoder(adapter: ControlNetModel, channels: int = 3) -> ControlNetModel:
    """`adapter` with an all-zero condition encoder for `channels`-channel images (its output,
    hence the adapter's, does not depend on the image)."""
    from codi_eqx.models._controlnet import ControlNetConditioningEmbedding

    cfg = adapter.config
    enc = ControlNetConditioningEmbedding(
        cfg.unet.block_out_channels[0], channels, cfg.conditioning_embedding_out_channels,
        dtype=adapter.dtype, key=jax.random.key(0),
    )
    enc = jax.tree.map(lambda a: jnp.zeros_like(a) if eqx.is_inexact_array(a) else a, enc)
    new_cfg = cfg.replace(conditioning_channels=channels)
    template = eqx.filter_eval_shape(lambda: ControlNetModel(new_cfg, remat=adapter.remat, key=jax.random.key(0)))
    fields = lambda m: (  # noqa: E731
        m.controlnet_cond_embedding, m.conv_in, m.time_embedding, m.add_embedding, m.down_blocks,
        m.controlnet_down_blocks, m.mid_block, m.controlnet_mid_block,
    )
    parts = fields(adapter)  # `add_embedding`: SDXL's, else None
    return eqx.tree_at(fields, template, (enc, *parts[1:]), is_leaf=lambda x: x is None)


def text_encoder_to_original(model: CLIPTextModel, layout: TextEncoderLayout, *,
                             dtype=None) -> dict[str, np.ndarray]:
    """A text encoder's tensors in `layout` (the inverse of `load_text_encoder_original`):
    OpenCLIP's with q/k/v fused, the projection transposed and, where the layout has one, an
    unused last block of zeros."""
    n = model.config.num_hidden_layers
    rows, prefix = text_rows(layout, n)
    name_map = CLIP_PROJECTION_NAME_MAP if layout.projection else CLIP_NAME_MAP
    out = _export(model, name_map, rows, prefix, dtype)
    if not layout.openclip:
        return out
    for i in range(n):
        base = f"{layout.prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            qkv = [out.pop(f"{base}self_attn.{p}.{part}") for p in OPENCLIP_FUSED]
            out[f"{base}attn.in_proj_{part}"] = np.concatenate(qkv, axis=0)
    if layout.projection:
        key = layout.prefix + OPENCLIP_PROJECTION[1]
        out[key] = np.ascontiguousarray(out[key].T)
    if layout.unused_last:  # as SD 2.x files carry it
        first = f"{layout.prefix}transformer.resblocks.0."
        for k in [k for k in out if k.startswith(first)]:
            out[f"{layout.prefix}transformer.resblocks.{n}.{k[len(first):]}"] = np.zeros_like(out[k])
    return out


def pipeline_to_original(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                         family: str = "sd1", *, text_encoder_2: Optional[CLIPTextModel] = None,
                         dtype=None) -> dict[str, np.ndarray]:
    """A whole model's tensors in the original single-file layout of `family` (`sd1`: CLIP
    text encoder; `sd2`: OpenCLIP layout with fused q/k/v and one extra, unused last block of
    zeros; `sdxl`: both, at SDXL's prefixes, with `text_encoder_2`'s projection)."""
    out = _export(unet, UNET_NAME_MAP, unet_rows(unet.config), UNET_PREFIX, dtype)
    out.update(_export(vae, VAE_NAME_MAP, vae_rows(vae.config), VAE_PREFIX, dtype))
    models = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for layout in TEXT_ENCODERS[family]:
        if models[layout.part] is None:
            raise ValueError(f"a {family} checkpoint needs {layout.part}")
        out.update(text_encoder_to_original(models[layout.part], layout, dtype=dtype))
    return out
