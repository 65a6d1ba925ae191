"""PyTorch / diffusers / transformers checkpoints <-> Equinox parameters."""

from ._diffusers import TensorSource as TensorSource
from ._diffusers import find_weight_files as find_weight_files
from ._diffusers import read_config as read_config
from ._diffusers import read_tensors as read_tensors
from ._errors import WeightsError as WeightsError
from ._mapping import NameMap as NameMap
from ._mapping import export_state as export_state
from ._mapping import stored_axes as stored_axes
from ._mapping import to_checkpoint_layout as to_checkpoint_layout
from ._mapping import load_state as load_state
from ._mapping import module_keys as module_keys
from ._safetensors import SafetensorsFile as SafetensorsFile
from ._safetensors import save_file as save_file
from .unet import CONTROLNET_NAME_MAP as CONTROLNET_NAME_MAP
from .unet import UNET_NAME_MAP as UNET_NAME_MAP
from .unet import load_adapter as load_adapter
from .unet import load_controlnet as load_controlnet
from .unet import load_unet as load_unet
from .unet import save_adapter as save_adapter
from .unet import save_unet as save_unet
from .clip import CLIP_NAME_MAP as CLIP_NAME_MAP
from .clip import load_text_encoder as load_text_encoder
from .clip import save_text_encoder as save_text_encoder
from .vae import VAE_NAME_MAP as VAE_NAME_MAP
from .vae import load_vae as load_vae
from .vae import save_vae as save_vae
