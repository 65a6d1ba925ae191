"""codi-eqx: Conditional Diffusion Distillation (CoDi) of Stable Diffusion in JAX + Equinox."""

from . import diffusion as diffusion
from . import models as models
from . import nn as nn
from ._adapter_settings import ADAPTER_SETTINGS_KEY as ADAPTER_SETTINGS_KEY
from ._adapter_settings import AdapterSettings as AdapterSettings
from ._adapter_settings import adapter_settings as adapter_settings
from ._compilation_cache import disable_compilation_cache as disable_compilation_cache
from ._compilation_cache import enable_compilation_cache as enable_compilation_cache
from ._pipeline import Pipeline as Pipeline
from ._pipeline import load_pipeline as load_pipeline
from .models import AutoencoderKL as AutoencoderKL
from .models import CLIPTextModel as CLIPTextModel
from .models import ControlNetModel as ControlNetModel
from .models import UNet2DConditionModel as UNet2DConditionModel

__version__ = "0.1.0"


def load_adapter(path, *, dtype=None):
    """An adapter (`ControlNetModel`) from a diffusers ControlNet directory, an adapter saved
    by `save_adapter`, or a training run's output directory."""
    import jax.numpy as jnp

    from weights_conversion import load_adapter as _load

    return _load(path, dtype=jnp.float32 if dtype is None else dtype)


def save_adapter(adapter, path, *, settings=None) -> None:
    """Write an adapter atomically (config.json + safetensors, diffusers ControlNet layout),
    with `settings` (an `AdapterSettings`) recorded in its config.json when given."""
    from weights_conversion import save_adapter as _save

    _save(adapter, path, extra_config=None if settings is None else settings.config_entry())
