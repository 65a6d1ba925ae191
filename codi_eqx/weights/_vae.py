"""The VAE (`AutoencoderKL`) <-> a diffusers `vae/` folder.

The module's paths are the checkpoint keys; the only exceptions are the older spellings of
the mid-block attention (`query`, `key`, `value`, `proj_attn`, as diffusers wrote them before
it moved the VAE onto its generic attention layer), read as aliases. Those tensors may also be
stored as 1x1 convolution weights `(out, in, 1, 1)`, which are squeezed on load. Export writes
the current spelling (`to_q`, `to_k`, `to_v`, `to_out.0`) as linear weights `(out, in)`, which
is what diffusers' own `save_pretrained` writes.
"""

import json
import os
from pathlib import Path
from typing import Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp

from .._atomic import atomic_path
from ..models._vae import AutoencoderKL, AutoencoderKLConfig
from ._diffusers import read_config, read_tensors
from ._errors import WeightsError
from ._mapping import NameMap, export_state, load_state
from ._safetensors import save_file

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

_ATTN = r"^((?:en|de)coder\.mid_block\.attentions\.\d+\.)"

VAE_NAME_MAP = NameMap(
    aliases=(
        (_ATTN + r"query\.", r"\1to_q."),
        (_ATTN + r"key\.", r"\1to_k."),
        (_ATTN + r"value\.", r"\1to_v."),
        (_ATTN + r"proj_attn\.", r"\1to_out.0."),
    ),
    transforms=(
        (r"(?:en|de)coder\.mid_block\.attentions\.\d+\.(?:to_q|to_k|to_v|to_out\.0)\.weight",
         "squeeze_1x1"),
    ),
)


def vae_config(folder: Union[str, os.PathLike]) -> AutoencoderKLConfig:
    """The `AutoencoderKLConfig` of a diffusers `vae/` folder (a `WeightsError` names the
    problem when `config.json` is missing, corrupt or unsupported)."""
    try:
        return AutoencoderKLConfig.from_dict(read_config(folder))
    except WeightsError:
        raise
    except ValueError as e:
        raise WeightsError(f"{Path(folder) / 'config.json'}: {e}") from None


def load_vae(
    folder: Union[str, os.PathLike], *, dtype=jnp.float32, variant: Optional[str] = None
) -> AutoencoderKL:
    """Load a diffusers `vae/` folder (`config.json` + safetensors weights, an fp16 / bf16
    variant or shards) as an `AutoencoderKL` whose parameters have `dtype`.

    Raises `WeightsError` naming every missing, unexpected or misshapen tensor."""
    config = vae_config(folder)
    template = eqx.filter_eval_shape(AutoencoderKL, config, key=jax.random.key(0))
    return load_state(
        template, read_tensors(folder, variant), VAE_NAME_MAP, dtype=dtype, what=str(folder)
    )


def save_vae(vae: AutoencoderKL, folder: Union[str, os.PathLike]) -> None:
    """Write `vae` as a diffusers `vae/` folder: `config.json` and
    `diffusion_pytorch_model.safetensors` (parameters in their own dtype). diffusers'
    `AutoencoderKL.from_pretrained` reads it, and so does `load_vae`.
    Written to a temporary folder, then renamed."""
    with atomic_path(folder, is_dir=True) as tmp:
        save_file(export_state(vae, VAE_NAME_MAP), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / "config.json").write_text(
            json.dumps(vae.config.to_dict(), indent=2, sort_keys=True) + "\n")
