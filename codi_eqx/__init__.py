"""codi-eqx: Conditional Diffusion Distillation (CoDi) of Stable Diffusion in JAX + Equinox.

The error hierarchy (`errors`, `CodiError`, `UsageError`) is imported at once; every other
public name is imported on first use (PEP 562), so that `import codi_eqx.errors` (which the
CLI does at start-up) costs no JAX import. Importing the package adds its XLA:CPU flag to
`XLA_FLAGS` (`codi_eqx/_xla_flags.py`; `CODI_KEEP_XLA_FLAGS=1` leaves them alone)."""

from typing import TYPE_CHECKING

from ._xla_flags import configure_xla_flags

configure_xla_flags()  # before JAX starts its CPU backend: see codi_eqx/_xla_flags.py

from . import errors as errors
from .errors import CodiError as CodiError
from .errors import UsageError as UsageError

__version__ = "0.1.0"

# public name -> (module, attribute; None for the module itself)
_LAZY = {
    "diffusion": (".diffusion", None),
    "models": (".models", None),
    "nn": (".nn", None),
    "weights": (".weights", None),
    "ADAPTER_SETTINGS_KEY": ("._adapter_settings", "ADAPTER_SETTINGS_KEY"),
    "AdapterSettings": ("._adapter_settings", "AdapterSettings"),
    "adapter_settings": ("._adapter_settings", "adapter_settings"),
    "disable_compilation_cache": ("._compilation_cache", "disable_compilation_cache"),
    "enable_compilation_cache": ("._compilation_cache", "enable_compilation_cache"),
    "Pipeline": ("._pipeline", "Pipeline"),
    "load_pipeline": ("._pipeline", "load_pipeline"),
    "load_adapter": ("._pipeline", "load_adapter"),
    "load_trained_unet": ("._pipeline", "load_trained_unet"),
    "save_adapter": ("._pipeline", "save_adapter"),
    "AutoencoderKL": (".models", "AutoencoderKL"),
    "CLIPTextModel": (".models", "CLIPTextModel"),
    "ControlNetModel": (".models", "ControlNetModel"),
    "UNet2DConditionModel": (".models", "UNet2DConditionModel"),
    "WeightsError": (".weights", "WeightsError"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    value = importlib.import_module(module, __name__)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from . import diffusion as diffusion
    from . import models as models
    from . import nn as nn
    from . import weights as weights
    from ._adapter_settings import ADAPTER_SETTINGS_KEY as ADAPTER_SETTINGS_KEY
    from ._adapter_settings import AdapterSettings as AdapterSettings
    from ._adapter_settings import adapter_settings as adapter_settings
    from ._compilation_cache import disable_compilation_cache as disable_compilation_cache
    from ._compilation_cache import enable_compilation_cache as enable_compilation_cache
    from ._pipeline import Pipeline as Pipeline
    from ._pipeline import load_adapter as load_adapter
    from ._pipeline import load_pipeline as load_pipeline
    from ._pipeline import load_trained_unet as load_trained_unet
    from ._pipeline import save_adapter as save_adapter
    from .models import AutoencoderKL as AutoencoderKL
    from .models import CLIPTextModel as CLIPTextModel
    from .models import ControlNetModel as ControlNetModel
    from .models import UNet2DConditionModel as UNet2DConditionModel
    from .weights import WeightsError as WeightsError
