"""The checks before any work: `plan(config)` resolves the model folder, the dataset, the
batch over the devices and the step count, or refuses the run with a one-line usage error."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..weights import WeightsError
from ._batches import open_cache
from ._config import TrainConfig, TrainConfigError


@dataclass
class Plan:
    """What the checks resolved: the model folder, the dataset, the batch and step counts."""

    model_path: Path
    vae_factor: int
    dataset: Any
    num_devices: int
    global_batch_size: int
    steps_per_epoch: int | None
    max_train_steps: int
    prediction_type: str
    notes: list[str]

    def describe(self, config: TrainConfig) -> dict:
        return {
            "config": config.to_dict(),
            "model_path": str(self.model_path),
            "vae_scale_factor": self.vae_factor,
            "dataset": type(self.dataset).__name__,
            "dataset_size": None if self.steps_per_epoch is None else len(self.dataset),
            "conditioned": bool(self.dataset.conditioned),
            "num_devices": self.num_devices,
            "global_batch_size": self.global_batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "max_train_steps": self.max_train_steps,
            "prediction_type": self.prediction_type,
        }


SD_RESOLUTION = 512
"""The training size of SD 1.x / 2.x models when none is given (diffusers' ControlNet
training scripts' default; SDXL models default to their UNet's own size)."""


def model_resolution(root: Path) -> int:
    """The default training size for the model folder `root`: the UNet's `sample_size` x the
    VAE factor for SDXL (`addition_embed_type` text_time: 1024 for SDXL base), else 512."""
    try:
        unet = json.loads((root / "unet" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return SD_RESOLUTION
    if unet.get("addition_embed_type") != "text_time" or not unet.get("sample_size"):
        return SD_RESOLUTION
    return int(unet["sample_size"]) * _vae_factor(root)


def with_model_defaults(config: TrainConfig) -> TrainConfig:
    """`config` with the model-dependent defaults filled in (the resolution, when not given).
    Unchanged when the model folder cannot be found (`plan` then says why)."""
    if config.resolution is not None:
        return config
    from .._pipeline import resolve_model_path

    try:
        root = resolve_model_path(config.pretrained_model_name_or_path)
    except WeightsError:
        return config
    return dataclasses.replace(config, resolution=model_resolution(Path(root)))


def plan(config: TrainConfig) -> Plan:
    """Check everything that can be checked before loading weights: the model folder, the
    resolution against the VAE's factor, the dataset and its columns, the batch over the
    devices. Raises `TrainConfigError` (one line) on the first problem."""
    notes: list[str] = []
    root = _model_folder(config, notes)
    config = with_model_defaults(config)
    factor = _vae_factor(root)
    prediction_type = _prediction_type(config, root, notes)
    _check_schedule(root, prediction_type)
    if config.resolution % factor:
        lo = config.resolution // factor * factor
        raise TrainConfigError(
            f"resolution {config.resolution} is not divisible by the VAE factor {factor} "
            f"(try {max(lo, factor)} or {lo + factor})")
    dataset = _dataset(config)
    n_dev, gbs, steps_per_epoch, max_steps = _batch_and_steps(config, dataset)
    _check_validation_images(config)
    p = Plan(root, factor, dataset, n_dev, gbs, steps_per_epoch, max_steps, prediction_type,
             notes)
    _check_latent_cache(config, p)
    return p


# --- the checks, in the order `plan` makes them ------------------------------------------------


def _model_folder(config: TrainConfig, notes: list[str]) -> Path:
    """The model folder (a Hub id resolved through the local cache); notes on the seed's
    flags that mean nothing here."""
    from .._pipeline import resolve_model_path

    try:
        root = resolve_model_path(config.pretrained_model_name_or_path)
    except WeightsError as e:
        raise TrainConfigError(f"pretrained_model_name_or_path: {e}") from None
    if not root.is_dir():
        raise TrainConfigError(f"pretrained_model_name_or_path {root}: not a model directory")
    local_model = Path(config.pretrained_model_name_or_path).exists()
    if config.from_pt:
        notes.append("note: from_pt ignored (weights are read from safetensors whatever "
                     "framework wrote them)")
    if config.revision and local_model:
        notes.append(f"note: revision {config.revision} ignored (the model is a local folder)")
    data_location = config.train_data_dir or config.dataset_name or ""
    if config.cache_dir and (config.train_data_dir or Path(data_location).exists()):
        notes.append(f"note: cache_dir {config.cache_dir} unused (the dataset is a local folder)")
    return root


def _vae_factor(root: Path) -> int:
    try:
        vae = json.loads((root / "vae" / "config.json").read_text())
        return 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return 8


def _prediction_type(config: TrainConfig, root: Path, notes: list[str]) -> str:
    """The model's prediction type, or `onestepode_sample_eps` where forced (a contradiction
    unforced is a warning note)."""
    from ..diffusion import resolve_prediction_type

    try:
        model_pred = json.loads((root / "scheduler" / "scheduler_config.json").read_text()).get(
            "prediction_type", "epsilon")
    except (OSError, json.JSONDecodeError):
        model_pred = "epsilon"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            prediction_type = resolve_prediction_type(
                model_pred, config.onestepode_sample_eps, config.force_prediction_type)
        except ValueError as e:
            raise TrainConfigError(f"onestepode_sample_eps: {e}") from None
    notes += [f"warning: onestepode_sample_eps: {w.message} (force_prediction_type)"
              for w in caught]
    return prediction_type


def _check_schedule(root: Path, prediction_type: str) -> None:
    """The noise schedule can be trained with this prediction type (epsilon cannot recover x0
    where alpha_t = 0)."""
    import numpy as np

    from ..diffusion import betas_from_config, check_epsilon_timesteps

    try:
        sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        abar = np.cumprod(1.0 - betas_from_config(sched))
    except (OSError, json.JSONDecodeError, ValueError, KeyError):
        return
    try:  # the grid's top timestep is T - 1 (the controlnet objective draws all of them)
        check_epsilon_timesteps(abar, [abar.size - 1], prediction_type)
    except ValueError as e:
        raise TrainConfigError(f"the model's noise schedule: {e}") from None


def _dataset(config: TrainConfig):
    from ..data import DataError, open_dataset

    try:
        dataset = open_dataset(config.data_config())
    except DataError as e:
        raise TrainConfigError(str(e)) from None
    if config.distill_type == "conditional" and not dataset.conditioned:
        raise TrainConfigError(
            "the dataset has no condition image column: set conditioning_image_column, "
            "or distill_type unconditional")
    return dataset


def _batch_and_steps(config: TrainConfig, dataset) -> tuple[int, int, int | None, int]:
    """`(devices, global batch, steps per epoch (None for streamed shards), steps)`."""
    import jax

    from ..data import TarShards

    n_dev = jax.device_count()
    gbs = config.train_batch_size * n_dev * config.gradient_accumulation_steps
    if gbs % jax.process_count():
        raise TrainConfigError(f"the global batch {gbs} does not divide over "
                               f"{jax.process_count()} processes")
    steps_per_epoch = None if isinstance(dataset, TarShards) else len(dataset) // gbs
    if steps_per_epoch == 0:
        raise TrainConfigError(
            f"the dataset has {len(dataset)} examples, fewer than one global batch of {gbs} "
            f"(train_batch_size {config.train_batch_size} x {n_dev} devices x "
            f"gradient_accumulation_steps {config.gradient_accumulation_steps})")
    if config.max_train_steps is not None:
        max_steps = config.max_train_steps
    elif steps_per_epoch is not None:
        max_steps = config.num_train_epochs * steps_per_epoch
    else:
        raise TrainConfigError("streamed tar shards have no known length: set max_train_steps")
    return n_dev, gbs, steps_per_epoch, max_steps


def _check_validation_images(config: TrainConfig) -> None:
    for image in config.validation_image:
        if not Path(image).is_file():
            raise TrainConfigError(f"validation_image {image}: no such file")
        try:
            from PIL import Image

            with Image.open(image) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            raise TrainConfigError(f"validation_image {image}: not a readable image "
                                   f"({type(e).__name__}: {e})") from None


def _check_latent_cache(config: TrainConfig, p: Plan) -> None:
    """An existing `cache_latents` folder must be a cache made for this run (nothing is
    written here)."""
    if not config.cache_latents:
        return
    cache_dir = Path(config.cache_latents)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise TrainConfigError(f"cache_latents {cache_dir}: not a folder")
    if (cache_dir / "cache.json").exists():
        open_cache(config, p.model_path, p.dataset.fingerprint)  # refuses a cache made for something else


def adapter_settings(config: TrainConfig, p: Plan, model_prediction_type: str):
    """The `AdapterSettings` this run records in the adapters it saves."""
    from .._adapter_settings import AdapterSettings

    given = config.pretrained_model_name_or_path
    return AdapterSettings(
        objective=config.objective, distill_learning_steps=config.distill_learning_steps,
        distill_timestep_scaling=config.distill_timestep_scaling,
        prediction_type=p.prediction_type,
        prediction_type_forced=p.prediction_type != model_prediction_type,
        cfg_aware_distill=config.cfg_aware_distill,
        distill_guidance_min=config.distill_guidance_min,
        distill_guidance_max=config.distill_guidance_max, distill_type=config.distill_type,
        base_model=str(Path(given).resolve()) if Path(given).exists() else given,
        guidance_embedding=config.guidance_embedding,
        sample_guidance_scale=config.sample_guidance_scale,
    )

