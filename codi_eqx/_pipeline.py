"""Loading a whole Stable Diffusion model: UNet, VAE, text encoder(s), tokenizer(s), noise
schedule. SDXL pipelines (a second text encoder and tokenizer) load through the same call."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from . import weights
from ._tree import FLOAT_DTYPES
from .diffusion import NoiseSchedule
from .models import (
    AutoencoderKL,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    ControlNetModel,
    SDXLTextEncoders,
    UNet2DConditionModel,
)
from .weights import WeightsError, load_text_encoder, load_unet, load_vae


@dataclass(frozen=True)
class Pipeline:
    """The components of a Stable Diffusion model. The models are Equinox pytrees; the
    tokenizer is transformers' `CLIPTokenizer`; `scheduler_config` is the raw
    `scheduler/scheduler_config.json` and `schedule` the noise schedule built from it.
    SDXL adds `text_encoder_2` and `tokenizer_2` (None otherwise)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any
    scheduler_config: dict
    schedule: NoiseSchedule
    path: Path
    text_encoder_2: Optional[CLIPTextModelWithProjection] = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True
    """SDXL: the empty prompt's conditioning is zeros (its pipelines' setting)."""

    @property
    def is_sdxl(self) -> bool:
        """Whether the UNet takes SDXL's added conditioning (two text encoders, time ids)."""
        return self.unet.config.addition_embed_type == "text_time"

    @property
    def text_encoders(self):
        """The model that maps `tokenize`'s ids of one prompt to its text conditioning: the
        text encoder (SD 1.x / 2.x), or `SDXLTextEncoders` of both (SDXL)."""
        if self.text_encoder_2 is None:
            return self.text_encoder
        empty = np.asarray(self.tokenize([""]))[0]
        return SDXLTextEncoders(
            self.text_encoder, self.text_encoder_2,
            tuple(tuple(int(i) for i in row) for row in empty),
            self.force_zeros_for_empty_prompt,
        )

    @property
    def default_resolution(self) -> int:
        """The image size the UNet was trained at (`sample_size` x the VAE's factor): 512 for
        SD 1.5, 768 for SD 2.x-v, 1024 for SDXL."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for Stable Diffusion)."""
        return self.vae.config.downsample_factor

    def tokenize(self, prompts: list[str]) -> jnp.ndarray:
        """Token ids `(B, model_max_length)`, padded and truncated as Stable Diffusion does;
        SDXL: `(B, 2, model_max_length)`, one row per tokenizer."""
        ids = _token_ids(self.tokenizer, prompts)
        if self.tokenizer_2 is None:
            return jnp.asarray(ids, jnp.int32)
        ids_2 = _token_ids(self.tokenizer_2, prompts)
        return jnp.asarray(np.stack([ids, ids_2], axis=1), jnp.int32)


def _token_ids(tokenizer, prompts) -> np.ndarray:
    return tokenizer(
        list(prompts), padding="max_length", truncation=True,
        max_length=tokenizer.model_max_length, return_tensors="np",
    ).input_ids


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
        `.scheduler_config` and `.schedule` (SDXL: also `.text_encoder_2`, `.tokenizer_2`).
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
    tokenizer = _load_tokenizer(root / "tokenizer")
    unet = load_unet(root / "unet", dtype=dtype, variant=variant, remat=remat)
    sdxl = unet.config.addition_embed_type == "text_time"
    text_encoder_2 = tokenizer_2 = None
    if sdxl:
        for part in ("text_encoder_2", "tokenizer_2"):
            if not (root / part).is_dir():
                raise WeightsError(f"{root}: an SDXL UNet but no {part}/ folder (SDXL has two "
                                   "text encoders and two tokenizers)")
        tokenizer_2 = _load_tokenizer(root / "tokenizer_2")
        text_encoder_2 = load_text_encoder(root / "text_encoder_2", dtype=dtype, variant=variant)
        if not isinstance(text_encoder_2, CLIPTextModelWithProjection):
            raise WeightsError(f"{root / 'text_encoder_2'}: SDXL's second text encoder must be "
                               "a CLIPTextModelWithProjection (its config's architectures)")
        if tokenizer.model_max_length != tokenizer_2.model_max_length:
            raise WeightsError(
                f"{root}: the tokenizers' lengths differ ({tokenizer.model_max_length} and "
                f"{tokenizer_2.model_max_length})")
    text_encoder = load_text_encoder(root / "text_encoder", dtype=dtype, variant=variant)
    pipe = Pipeline(
        unet=unet,
        vae=load_vae(root / "vae", dtype=dtype, variant=variant),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        schedule=schedule,
        path=root,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        force_zeros_for_empty_prompt=bool(
            _model_index(root).get("force_zeros_for_empty_prompt", True)),
    )
    if sdxl:
        width = (text_encoder.config.hidden_size + text_encoder_2.config.hidden_size)
        pooled = text_encoder_2.config.projection_dim
        if unet.config.cross_attention_dim[0] != width or unet.config.pooled_text_dim != pooled:
            raise WeightsError(
                f"{root}: the UNet takes text of width {unet.config.cross_attention_dim[0]} and a "
                f"pooled embedding of {unet.config.pooled_text_dim}; the text encoders give "
                f"{width} and {pooled}")
    return pipe


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds here
        raise WeightsError(f"{folder}: cannot load the tokenizer ({e})") from None


def _model_index(root: Path) -> dict:
    path = root / "model_index.json"
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    return index if isinstance(index, dict) else {}


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
