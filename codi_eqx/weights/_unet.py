"""UNet and ControlNet (adapter) checkpoints: the name tables, loading and saving."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from .._atomic import atomic_path
from ..models import (
    ControlNetConfig,
    ControlNetModel,
    UNet2DConditionConfig,
    UNet2DConditionModel,
)
from ._diffusers import load_folder
from ._errors import WeightsError
from ._mapping import NameMap, export_state
from ._safetensors import save_file

# The feed-forward's layers are `net.0` (GEGLU) and `net.2` (`net.1` is a parameterless
# dropout), while the module holds them as a pair.
UNET_NAME_MAP = NameMap(renames=((r"\.ff\.net\.1\.", ".ff.net.2."),))
CONTROLNET_NAME_MAP = UNET_NAME_MAP

ADAPTER_FORMAT = "codi-eqx-adapter"
ADAPTER_FORMAT_VERSION = 1


def load_unet(
    folder: str | os.PathLike, *, dtype=jnp.float32, variant: Optional[str] = None,
    remat: bool = False,
) -> UNet2DConditionModel:
    """A diffusers `unet/` folder (config.json + safetensors) as a `UNet2DConditionModel`."""
    return load_folder(
        folder, UNet2DConditionConfig,
        lambda config: UNet2DConditionModel(config, remat=remat, key=jax.random.key(0)),
        UNET_NAME_MAP, dtype=dtype, variant=variant)


def load_controlnet(
    folder: str | os.PathLike, *, dtype=jnp.float32, variant: Optional[str] = None,
    remat: bool = False,
) -> ControlNetModel:
    """A diffusers ControlNet folder, or an adapter saved by `save_adapter`."""
    return load_folder(
        folder, ControlNetConfig,
        lambda config: ControlNetModel(config, remat=remat, key=jax.random.key(0)),
        CONTROLNET_NAME_MAP, dtype=dtype, variant=variant)


def save_unet(unet: UNet2DConditionModel, folder: str | os.PathLike, *, dtype=None) -> None:
    """Write `unet` as a diffusers `unet/` folder (config.json + safetensors),
    written to a temporary folder, then renamed."""
    with atomic_path(folder, is_dir=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(unet.config.to_dict(), indent=2))
        save_file(export_state(unet, UNET_NAME_MAP, dtype=dtype), tmp / "diffusion_pytorch_model.safetensors")


def save_adapter(adapter: ControlNetModel, folder: str | os.PathLike, *, dtype=None,
                 extra_config: Optional[dict] = None) -> None:
    """Write an adapter: a ControlNet config.json (tagged with this project's format, plus
    `extra_config`'s entries, whose keys start with `_` so that diffusers ignores them) and
    its weights in diffusers' ControlNet layout, so that an adapter with a condition encoder
    is a diffusers ControlNet folder as it stands. Written to a temporary folder, then
    renamed."""
    if extra_config and any(not k.startswith("_") for k in extra_config):
        raise ValueError("extra_config keys must start with '_' (diffusers ignores those)")
    with atomic_path(folder, is_dir=True) as tmp:
        config = adapter.config.to_dict()
        config["_codi_eqx_format"] = ADAPTER_FORMAT
        config["_codi_eqx_format_version"] = ADAPTER_FORMAT_VERSION
        config.update(extra_config or {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(
            export_state(adapter, CONTROLNET_NAME_MAP, dtype=dtype),
            tmp / "diffusion_pytorch_model.safetensors",
            metadata={"format": "pt", "codi_eqx_format": ADAPTER_FORMAT},
        )


def load_adapter(path: str | os.PathLike, *, dtype=jnp.float32) -> ControlNetModel:
    """An adapter from a diffusers ControlNet folder, a folder written by `save_adapter`, or a
    training run's output directory (its final adapter at the top)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: not found")
    if not (path / "config.json").is_file():
        raise WeightsError(f"{path}: no config.json (expected an adapter or ControlNet folder)")
    return load_controlnet(path, dtype=dtype)
