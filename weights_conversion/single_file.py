"""Original (LDM) single-file Stable Diffusion and ControlNet checkpoints <-> the models.

An original checkpoint holds the whole model in one file under these prefixes:

- `model.diffusion_model.*`: the UNet (`input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`,
  `time_embed.*`, `out.*`);
- `first_stage_model.*`: the VAE (`encoder.down.N.block.M`, `mid.attn_1`, `nin_shortcut`, ...);
- `cond_stage_model.transformer.*`: SD 1.x's CLIP text encoder (already in transformers' names),
  or `cond_stage_model.model.*`: SD 2.x's OpenCLIP text encoder (`transformer.resblocks.N`, with
  a fused `attn.in_proj_weight` holding q, k and v);
- `control_model.*`: an original ControlNet (the UNet's encoder half plus `input_hint_block`,
  `zero_convs`, `middle_block_out`).

The mapping is data: for a given config, a table of `(diffusers prefix, original prefix,
inner renames)` rows is generated mechanically (block N, layer M -> `input_blocks.K.0`), and
every key of the model's template is translated through it. The tensors, renamed, then go
through `load_state`, which checks every shape; the translation itself checks that every
expected tensor is present and every tensor of the file is used (or one of the known buffers:
EMA copies, noise-schedule tables, position ids).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from codi_eqx.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextConfig,
    CLIPTextModel,
    ControlNetConfig,
    ControlNetModel,
    UNet2DConditionConfig,
    UNet2DConditionModel,
)
from codi_eqx.weights import (
    CLIP_NAME_MAP,
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
OPENCLIP_LAYER = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
OPENCLIP_FUSED = ("q_proj", "k_proj", "v_proj")  # the thirds of `attn.in_proj_*`, in order

# Keys of original checkpoints that hold no model parameter: consumed, never loaded.
IGNORED = (
    r"model_ema\..*",
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|"
    r"sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|"
    r"sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|"
    r"posterior_mean_coef1|posterior_mean_coef2|logvar|scale_factor)",
    r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids",
    r"cond_stage_model\.model\.(logit_scale|text_projection|attn_mask)",
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


# ------------------------------------------------------------------------------------------
# The tables


def unet_rows(cfg: UNet2DConditionConfig, *, controlnet: Optional[ControlNetConfig] = None) -> list[Row]:
    """The prefix table of a UNet (or, with `controlnet`, of a ControlNet) of config `cfg`."""
    rows: list[Row] = [
        ("conv_in", "input_blocks.0.0", ()),
        ("time_embedding.linear_1", "time_embed.0", ()),
        ("time_embedding.linear_2", "time_embed.2", ()),
        ("mid_block.resnets.0", "middle_block.0", UNET_RESNET),
        ("mid_block.attentions.0", "middle_block.1", ()),
        ("mid_block.resnets.1", "middle_block.2", UNET_RESNET),
    ]
    n = cfg.num_blocks
    k = 1
    for b in range(n):
        for layer in range(cfg.layers_per_block[b]):
            rows.append((f"down_blocks.{b}.resnets.{layer}", f"input_blocks.{k}.0", UNET_RESNET))
            rows.append((f"down_blocks.{b}.attentions.{layer}", f"input_blocks.{k}.1", ()))
            k += 1
        if b < n - 1:
            rows.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{k}.0.op", ()))
            k += 1
    if controlnet is None:
        j = 0
        for u in range(n):
            layers = cfg.layers_per_block[n - 1 - u] + 1
            attn = cfg.up_block_types[u] == "CrossAttnUpBlock2D"
            for layer in range(layers):
                rows.append((f"up_blocks.{u}.resnets.{layer}", f"output_blocks.{j}.0", UNET_RESNET))
                rows.append((f"up_blocks.{u}.attentions.{layer}", f"output_blocks.{j}.1", ()))
                if layer == layers - 1 and u < n - 1:
                    rows.append((f"up_blocks.{u}.upsamplers.0.conv",
                                 f"output_blocks.{j}.{2 if attn else 1}.conv", ()))
                j += 1
        rows += [("conv_norm_out", "out.0", ()), ("conv_out", "out.2", ())]
    else:
        zeros = 1 + sum(cfg.layers_per_block) + (n - 1)
        rows += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0", ()) for i in range(zeros)]
        rows.append(("controlnet_mid_block", "middle_block_out.0", ()))
        stages = len(controlnet.conditioning_embedding_out_channels)
        hint = ["controlnet_cond_embedding.conv_in"]
        hint += [f"controlnet_cond_embedding.blocks.{i}" for i in range(2 * (stages - 1))]
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


def openclip_rows(num_layers: int) -> list[Row]:
    rows: list[Row] = [(d, o, ()) for d, o in OPENCLIP_TOP]
    rows += [(f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}", OPENCLIP_LAYER)
             for i in range(num_layers)]
    return rows


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


class _Renamed(Mapping):
    """A lazily renamed view: diffusers name -> (original name, which third or None)."""

    def __init__(self, source: Mapping, entries: dict[str, tuple[str, Optional[int]]]):
        self.source = source
        self.entries = entries

    def __getitem__(self, name: str) -> np.ndarray:
        key, third = self.entries[name]
        a = self.source[key]
        if third is not None:
            n = a.shape[0] // 3
            a = a[third * n:(third + 1) * n]
        return a

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _expected(template: Any, name_map, rows: list[Row], prefix: str,
              fused: bool = False) -> dict[str, tuple[str, Optional[int]]]:
    """diffusers checkpoint key -> (original key, third) for every parameter of `template`."""
    out = {}
    for mkey in template_shapes(template):
        ckey = name_map.checkpoint_key(mkey)
        third = None
        okey = _translate(ckey, rows)
        if fused:
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", ckey)
            if m:
                okey = f"transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}"
                third = "qkv".index(m.group(2))
        out[ckey] = (prefix + okey, third)
    return out


def _fill(template: Any, tensors: Mapping, name_map, rows: list[Row], prefix: str, *,
          what: str, dtype, fused: bool = False, extra_ok=()) -> Any:
    """Load the part of `tensors` under `prefix` into `template`; every tensor under `prefix`
    must be used (or match one of the regexes `extra_ok`), every parameter found."""
    entries = _expected(template, name_map, rows, prefix, fused)
    needed = {k for k, _ in entries.values()}
    missing = sorted(k for k in needed if k not in tensors)
    unexpected = sorted(
        k for k in tensors
        if k.startswith(prefix) and k not in needed
        and not any(re.fullmatch(p, k) for p in (*IGNORED, *extra_ok))
    )
    check_matched(what, missing=missing, unexpected=unexpected)
    return load_state(template, _Renamed(tensors, entries), name_map, dtype=dtype, what=what)


def detect_family(tensors: Mapping) -> str:
    """`sd1`, `sd2` (a whole model), `controlnet`, or a `WeightsError` for an unknown layout."""
    keys = list(tensors)
    if any(k.startswith(CONTROL_PREFIX) for k in keys):
        return "controlnet"
    if any(k.startswith("input_hint_block.") for k in keys):
        return "controlnet"
    if any(k.startswith(UNET_PREFIX) for k in keys):
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
        f"nor a ControlNet (control_model.*); first keys: {shown}"
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
    conv projections) or of 64 channels each (SD 2.x, linear projections)."""
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


def infer_vae_config(tensors: Mapping, prefix: str = VAE_PREFIX) -> dict:
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
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def infer_text_config(tensors: Mapping, family: str) -> dict:
    if family == "sd2":
        p = OPENCLIP_PREFIX
        layers = len(_indices(tensors, re.escape(p) + r"transformer\.resblocks\.(\d+)\."))
        vocab, hidden = _shape(tensors, p + "token_embedding.weight")
        return {
            "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": _shape(tensors, p + "transformer.resblocks.0.mlp.c_fc.weight")[0],
            # SD 2.x conditions on the penultimate layer: the last block is never used.
            "num_hidden_layers": layers - 1,
            "num_attention_heads": hidden // 64,
            "max_position_embeddings": _shape(tensors, p + "positional_embedding")[0],
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "pad_token_id": 1,
            "bos_token_id": 49406, "eos_token_id": 49407, "projection_dim": 512,
        }
    p = CLIP_PREFIX + ("text_model." if any(k.startswith(CLIP_PREFIX + "text_model.") for k in tensors) else "")
    if p + "embeddings.token_embedding.weight" not in tensors:
        raise WeightsError(f"no {CLIP_PREFIX}*: the checkpoint holds no text encoder")
    vocab, hidden = _shape(tensors, p + "embeddings.token_embedding.weight")
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": _shape(tensors, p + "encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": len(_indices(tensors, re.escape(p) + r"encoder\.layers\.(\d+)\.")),
        "num_attention_heads": hidden // 64,
        "max_position_embeddings": _shape(tensors, p + "embeddings.position_embedding.weight")[0],
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "pad_token_id": 1,
        "bos_token_id": 49406, "eos_token_id": 49407, "projection_dim": 768,
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


def load_text_encoder_original(tensors: Mapping, config: dict, family: str, *, dtype=jnp.float32,
                               what: str = "text_encoder") -> CLIPTextModel:
    cfg = _config(CLIPTextConfig, config, what)
    template = eqx.filter_eval_shape(CLIPTextModel, cfg, dtype=dtype, key=jax.random.key(0))
    if family == "sd2":
        rows = openclip_rows(cfg.num_hidden_layers)
        # Blocks past the configured depth (the last one: SD 2.x uses the penultimate layer).
        extra = (re.escape(OPENCLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\..*",)
        n = cfg.num_hidden_layers
        extra_ok = tuple(
            k for k in tensors if k.startswith(OPENCLIP_PREFIX + "transformer.resblocks.")
            and re.fullmatch(extra[0], k) and int(k.split(".")[4]) >= n
        )
        extra_ok = tuple(re.escape(k) for k in extra_ok)
        return _fill(template, tensors, CLIP_NAME_MAP, rows, OPENCLIP_PREFIX, what=what,
                     dtype=dtype, fused=True, extra_ok=extra_ok)
    prefix = CLIP_PREFIX + ("text_model." if any(k.startswith(CLIP_PREFIX + "text_model.") for k in tensors) else "")
    return _fill_clip(template, tensors, prefix, what=what, dtype=dtype)


def _fill_clip(template, tensors, prefix, *, what, dtype):
    rows = [("text_model", prefix[:-1], ())]
    entries = _expected(template, CLIP_NAME_MAP, rows, "")
    # `rows` already carries the prefix: check against the text encoder's own tensors.
    needed = {k for k, _ in entries.values()}
    missing = sorted(k for k in needed if k not in tensors)
    unexpected = sorted(k for k in tensors if k.startswith(CLIP_PREFIX) and k not in needed
                        and not any(re.fullmatch(p, k) for p in IGNORED))
    check_matched(what, missing=missing, unexpected=unexpected)
    return load_state(template, _Renamed(tensors, entries), CLIP_NAME_MAP, dtype=dtype, what=what)


def check_prefixes(tensors: Mapping, allowed: tuple[str, ...], what: str) -> None:
    """Every tensor is under one of `allowed` prefixes or a known buffer."""
    stray = [k for k in tensors if not k.startswith(allowed) and not any(re.fullmatch(p, k) for p in IGNORED)]
    if stray:
        raise WeightsError(f"{what}: {len(stray)} unexpected tensor(s): {summarise_keys(stray)}")


CODI_CONFIG_KEY = "codi_eqx_config"


def load_controlnet_original(tensors: Mapping, config: Optional[dict] = None, *,
                             metadata: Optional[Mapping[str, str]] = None, dtype=jnp.float32,
                             what: str = "controlnet") -> ControlNetModel:
    """An original single-file ControlNet (`control_model.*`, or the same keys unprefixed).
    The config: `config`, else the one this project's export stores in the file's metadata,
    else inferred from the shapes."""
    prefix = CONTROL_PREFIX if any(k.startswith(CONTROL_PREFIX) for k in tensors) else ""
    if config is None and metadata and CODI_CONFIG_KEY in metadata:
        config = json.loads(metadata[CODI_CONFIG_KEY])
    if config is None:
        config = infer_unet_config(tensors, prefix, controlnet=True)
    cfg = _config(ControlNetConfig, config, what)
    template = eqx.filter_eval_shape(lambda: ControlNetModel(cfg, key=jax.random.key(0)))
    rows = unet_rows(cfg.unet, controlnet=cfg if cfg.conditioning_channels is not None
                     else cfg.replace(conditioning_channels=3))
    extra_ok = () if cfg.conditioning_channels is not None else (
        re.escape(prefix) + r"input_hint_block\..*",)
    if prefix:
        check_prefixes(tensors, (CONTROL_PREFIX,), what)
    return _fill(template, tensors, CONTROLNET_NAME_MAP, rows, prefix, what=what, dtype=dtype,
                 extra_ok=extra_ok)


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
        m.conv_in, m.time_embedding, m.controlnet_cond_embedding, m.down_blocks,
        m.controlnet_down_blocks, m.mid_block, m.controlnet_mid_block,
    )
    parts = fields(adapter)
    return eqx.tree_at(fields, template, (*parts[:2], enc, *parts[3:]))


def pipeline_to_original(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                         family: str = "sd1", *, dtype=None) -> dict[str, np.ndarray]:
    """A whole model's tensors in the original single-file layout (`sd1`: CLIP text encoder;
    `sd2`: OpenCLIP layout with fused q/k/v and one extra, unused last block of zeros)."""
    out = _export(unet, UNET_NAME_MAP, unet_rows(unet.config), UNET_PREFIX, dtype)
    out.update(_export(vae, VAE_NAME_MAP, vae_rows(vae.config), VAE_PREFIX, dtype))
    if family == "sd1":
        out.update(_export(text_encoder, CLIP_NAME_MAP, [("text_model", "transformer.text_model", ())],
                           "cond_stage_model.", dtype))
        return out
    n = text_encoder.config.num_hidden_layers
    text = _export(text_encoder, CLIP_NAME_MAP, openclip_rows(n), OPENCLIP_PREFIX, dtype)
    for i in range(n + 1):
        base = f"{OPENCLIP_PREFIX}transformer.resblocks.{i}."
        if i == n:  # the unused last block, as SD 2.x files carry it
            for k in [k for k in text if k.startswith(f"{OPENCLIP_PREFIX}transformer.resblocks.0.")]:
                text[base + k.split(".", 5)[5]] = np.zeros_like(text[k])
            continue
        for part in ("weight", "bias"):
            qkv = [text.pop(f"{base}self_attn.{p}.{part}") for p in OPENCLIP_FUSED]
            text[f"{base}attn.in_proj_{part}"] = np.concatenate(qkv, axis=0)
    out.update(text)
    return out
