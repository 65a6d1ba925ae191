"""codi-eqx: Conditional Diffusion Distillation (CoDi) of Stable Diffusion in JAX + Equinox."""

import jax.numpy as jnp

from . import diffusion as diffusion
from . import errors as errors
from . import models as models
from . import nn as nn
from . import weights as weights
from ._adapter_settings import ADAPTER_SETTINGS_KEY as ADAPTER_SETTINGS_KEY
from ._adapter_settings import AdapterSettings as AdapterSettings
from ._adapter_settings import adapter_settings as adapter_settings
from ._compilation_cache import disable_compilation_cache as disable_compilation_cache
from ._compilation_cache import enable_compilation_cache as enable_compilation_cache
from ._pipeline import Pipeline as Pipeline
from ._pipeline import load_pipeline as load_pipeline
from .errors import CodiError as CodiError
from .errors import UsageError as UsageError
from .models import AutoencoderKL as AutoencoderKL
from .models import CLIPTextModel as CLIPTextModel
from .models import ControlNetModel as ControlNetModel
from .models import UNet2DConditionModel as UNet2DConditionModel
from .weights import WeightsError as WeightsError

__version__ = "0.1.0"


def load_adapter(path, *, dtype=None):
    """An adapter (`ControlNetModel`) from a diffusers ControlNet directory, an adapter saved
    by `save_adapter`, or a training run's output directory."""
    return weights.load_adapter(path, dtype=jnp.float32 if dtype is None else dtype)


def save_adapter(adapter, path, *, settings=None) -> None:
    """Write an adapter atomically (config.json + safetensors, diffusers ControlNet layout),
    with `settings` (an `AdapterSettings`) recorded in its config.json when given."""
    weights.save_adapter(
        adapter, path, extra_config=None if settings is None else settings.config_entry())
