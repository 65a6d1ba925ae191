"""Loading a whole Stable Diffusion model: UNet, VAE, text encoder, tokenizer, noise schedule."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax.numpy as jnp

from . import weights
from ._tree import FLOAT_DTYPES
from .diffusion import NoiseSchedule
from .models import AutoencoderKL, CLIPTextModel, ControlNetModel, UNet2DConditionModel
from .weights import WeightsError, load_text_encoder, load_unet, load_vae


@dataclass(frozen=True)
class Pipeline:
    """The components of a Stable Diffusion model. The models are Equinox pytrees; the
    tokenizer is transformers' `CLIPTokenizer`; `scheduler_config` is the raw
    `scheduler/scheduler_config.json` and `schedule` the noise schedule built from it."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any
    scheduler_config: dict
    schedule: NoiseSchedule
    path: Path

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for Stable Diffusion)."""
        return self.vae.config.downsample_factor

    def tokenize(self, prompts: list[str]) -> jnp.ndarray:
        """Token ids `(B, model_max_length)`, padded and truncated as Stable Diffusion does."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", truncation=True,
            max_length=self.tokenizer.model_max_length, return_tensors="np",
        ).input_ids
        return jnp.asarray(ids, jnp.int32)


MODEL_FORMAT = "codi-eqx-model"
"""The `format` of the `codi_eqx.json` at the top of a directory written by `codi convert-weights`."""
MODEL_FORMAT_VERSION = 1
MODEL_MANIFEST = "codi_eqx.json"

_DTYPES = FLOAT_DTYPES


def read_manifest(root: str | os.PathLike) -> Optional[dict]:
    """The `codi_eqx.json` of a converted model directory (None where there is none); a
    `WeightsError` when it is corrupt, of another format or of a newer version."""
    path = Path(root) / MODEL_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MODEL_FORMAT:
        raise WeightsError(f"{path}: not a {MODEL_FORMAT} manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or version > MODEL_FORMAT_VERSION:
        raise WeightsError(
            f"{path}: format version {version!r} is newer than this codi-eqx reads "
            f"({MODEL_FORMAT_VERSION}); upgrade codi-eqx or convert the model again"
        )
    if manifest.get("dtype") not in _DTYPES:
        raise WeightsError(f"{path}: unknown dtype {manifest.get('dtype')!r}")
    return manifest


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A local model directory, or a Hugging Face Hub id resolved through the local cache
    (nothing is downloaded where the network is closed; the error says so)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if _HUB_ID.match(str(path)):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(path), local_files_only=True))
        except Exception:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            try:
                if offline:
                    raise RuntimeError
                return Path(snapshot_download(str(path)))
            except Exception:
                raise WeightsError(
                    f"{path}: not a local directory, and not in the Hugging Face cache "
                    "(download it where the network allows, or pass a local path)"
                ) from None
    raise WeightsError(f"{path}: no such model directory")


def load_pipeline(
    path: str | os.PathLike, *, dtype: Any = None, variant: Optional[str] = None,
    remat: bool = False,
) -> Pipeline:
    """Load a Stable Diffusion model.

    Arguments:
        path: a diffusers-format model directory (`model_index.json`, `unet/`, `vae/`,
            `text_encoder/`, `tokenizer/`, `scheduler/`), a directory written by
            `codi convert-weights`, or a Hub id in the local cache.
        dtype: parameter dtype of the models (float32, bfloat16, float16); by default the
            dtype a converted directory stores (loaded without any cast), else float32.
        variant: prefer weight files of this variant (`fp16`) where present.
        remat: rematerialise the UNet's blocks in the backward pass (saves memory).

    Returns:
        A `Pipeline` with `.unet`, `.vae`, `.text_encoder`, `.tokenizer`,
        `.scheduler_config` and `.schedule`.
    """
    root = resolve_model_path(path)
    if not root.is_dir():
        raise WeightsError(f"{root}: not a directory (a single-file checkpoint must be converted "
                           "first: `codi convert-weights`)")
    manifest = read_manifest(root)
    if dtype is None:
        dtype = _DTYPES[manifest["dtype"]] if manifest else jnp.float32
    if manifest is not None and not (root / "tokenizer").is_dir():
        raise WeightsError(
            f"{root}: no tokenizer/ folder (converted from a single-file checkpoint, which carries "
            f"none): copy the model family's CLIP tokenizer folder to {root / 'tokenizer'}, or "
            "convert again with --config pointing to a diffusers model directory that has one"
        )
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (root / part).is_dir():
            raise WeightsError(f"{root}: no {part}/ folder (expected a diffusers-format model directory)")
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(scheduler_file.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{scheduler_file}: not found") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{scheduler_file}: not valid JSON ({e})") from None
    try:
        schedule = NoiseSchedule.from_config(scheduler_config)
    except ValueError as e:
        raise WeightsError(f"{scheduler_file}: {e}") from None
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    except Exception as e:  # transformers raises many kinds here
        raise WeightsError(f"{root / 'tokenizer'}: cannot load the tokenizer ({e})") from None
    return Pipeline(
        unet=load_unet(root / "unet", dtype=dtype, variant=variant, remat=remat),
        vae=load_vae(root / "vae", dtype=dtype, variant=variant),
        text_encoder=load_text_encoder(root / "text_encoder", dtype=dtype, variant=variant),
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        schedule=schedule,
        path=root,
    )


def load_adapter(path: str | os.PathLike, *, dtype: Any = None) -> ControlNetModel:
    """An adapter (`ControlNetModel`) from a diffusers ControlNet directory, an adapter saved
    by `save_adapter`, or a training run's output directory (parameters in `dtype`, float32
    by default)."""
    return weights.load_adapter(path, dtype=jnp.float32 if dtype is None else dtype)


def load_trained_unet(path: str | os.PathLike, *, dtype: Any = None,
                      ) -> Optional[UNet2DConditionModel]:
    """The UNet that a full-CoDi run trains along with its adapter, which `codi train` writes
    beside the adapter as `path/unet/`; None where `path` has none."""
    folder = Path(path) / "unet"
    if not (folder / "config.json").is_file():
        return None
    return load_unet(folder, dtype=jnp.float32 if dtype is None else dtype)


def save_adapter(adapter: ControlNetModel, path: str | os.PathLike, *,
                 settings: Any = None) -> None:
    """Write an adapter atomically (config.json + safetensors, diffusers ControlNet layout),
    with `settings` (an `AdapterSettings`) recorded in its config.json when given."""
    weights.save_adapter(
        adapter, path, extra_config=None if settings is None else settings.config_entry())
