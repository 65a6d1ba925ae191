"""The CLIP text encoder (`text_encoder/` of a Stable Diffusion model) <-> `CLIPTextModel`.

Module paths equal checkpoint keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`),
with these exceptions:

- `text_model.embeddings.position_ids`, a buffer of `arange(max_position_embeddings)` that
  older checkpoints (SD 1.x and 2.x among them) carry, holds no parameter: ignored.
- `text_projection.weight`: a folder whose config names `CLIPTextModelWithProjection` (SDXL's
  `text_encoder_2`) loads as `CLIPTextModelWithProjection`, whose projected pooled output
  SDXL's UNet takes; read as a plain `CLIPTextModel` (any other config), the tensor is
  ignored.
- transformers 5 writes the keys without the `text_model.` prefix; those are read as
  aliases. Export writes the prefixed spelling, which both transformers 4 and 5 load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from .._atomic import atomic_path
from ..models import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from ._diffusers import read_config, read_tensors
from ._errors import WeightsError
from ._mapping import NameMap, export_state, load_state
from ._safetensors import save_file

CLIP_NAME_MAP = NameMap(
    aliases=((r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1."),),
    ignore=(
        r"(text_model\.)?embeddings\.position_ids",
        r"text_projection\.weight",
    ),
)
CLIP_PROJECTION_NAME_MAP = NameMap(
    aliases=CLIP_NAME_MAP.aliases, ignore=(r"(text_model\.)?embeddings\.position_ids",))


def has_projection(config_dict: dict) -> bool:
    """Whether a text encoder config is transformers' `CLIPTextModelWithProjection`."""
    return "CLIPTextModelWithProjection" in (config_dict.get("architectures") or ())


def load_text_encoder(
    folder: str | os.PathLike, *, dtype=jnp.float32, variant: Optional[str] = None
) -> CLIPTextModel:
    """The text encoder in `folder` (`config.json` and safetensors weights), parameters cast
    to `dtype`: a `CLIPTextModelWithProjection` where the config names that architecture,
    else a `CLIPTextModel`. Raises `WeightsError` naming any tensor missing, unexpected or
    misshapen."""
    config_dict = read_config(folder)
    try:
        config = CLIPTextConfig.from_dict(config_dict)
    except (TypeError, ValueError) as e:
        path = Path(folder) / "config.json"
        raise WeightsError(f"{path}: not a CLIP text encoder config ({e})") from None
    cls, name_map = ((CLIPTextModelWithProjection, CLIP_PROJECTION_NAME_MAP)
                     if has_projection(config_dict) else (CLIPTextModel, CLIP_NAME_MAP))
    template = eqx.filter_eval_shape(cls, config, dtype=dtype, key=jax.random.key(0))
    return load_state(
        template, read_tensors(folder, variant), name_map, dtype=dtype, what=str(folder)
    )


def save_text_encoder(model: CLIPTextModel, folder: str | os.PathLike) -> None:
    """Write `model` to `folder` as transformers' `CLIPTextModel` (or
    `CLIPTextModelWithProjection`) does: `config.json` and
    `model.safetensors` (in the parameters' dtype), written to a temporary folder, then
    renamed."""
    projected = isinstance(model, CLIPTextModelWithProjection)
    tensors = export_state(model, CLIP_PROJECTION_NAME_MAP if projected else CLIP_NAME_MAP)
    dtypes = {str(a.dtype) for a in tensors.values()}
    config = {
        "architectures": [type(model).__name__],
        "model_type": "clip_text_model",
        **model.config.to_dict(),
        "attention_dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
    }
    if len(dtypes) == 1:
        config["torch_dtype"] = dtypes.pop()
    with atomic_path(folder, is_dir=True) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
