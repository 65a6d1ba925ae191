"""Weight files and diffusers-format folders <-> the project's Equinox models.

The generic part: safetensors files read memory-mapped and written atomically
(`SafetensorsFile`, `save_file`), a diffusers component folder as one tensor mapping
(`read_tensors`, `read_config`), and the rule `module path == checkpoint key` with each
model's exceptions as data (`NameMap`, `load_state`, `export_state`). Then, per model, its name
table and the load / save functions of a diffusers folder. (Original single-file checkpoints
are converted by a separate package built on this one; the library never imports it.)"""

from ._clip import CLIP_NAME_MAP as CLIP_NAME_MAP
from ._clip import CLIP_PROJECTION_NAME_MAP as CLIP_PROJECTION_NAME_MAP
from ._clip import load_text_encoder as load_text_encoder
from ._clip import save_text_encoder as save_text_encoder
from ._diffusers import TensorSource as TensorSource
from ._diffusers import find_weight_files as find_weight_files
from ._diffusers import load_folder as load_folder
from ._diffusers import read_config as read_config
from ._diffusers import read_tensors as read_tensors
from ._errors import WeightsError as WeightsError
from ._mapping import TRANSFORMS as TRANSFORMS
from ._mapping import NameMap as NameMap
from ._mapping import check_matched as check_matched
from ._mapping import export_state as export_state
from ._mapping import load_state as load_state
from ._mapping import module_keys as module_keys
from ._mapping import stored_axes as stored_axes
from ._mapping import summarise_keys as summarise_keys
from ._mapping import template_shapes as template_shapes
from ._mapping import to_checkpoint_layout as to_checkpoint_layout
from ._safetensors import SafetensorsFile as SafetensorsFile
from ._safetensors import save_file as save_file
from ._unet import CONTROLNET_NAME_MAP as CONTROLNET_NAME_MAP
from ._unet import UNET_NAME_MAP as UNET_NAME_MAP
from ._unet import load_adapter as load_adapter
from ._unet import load_controlnet as load_controlnet
from ._unet import load_unet as load_unet
from ._unet import save_adapter as save_adapter
from ._unet import save_unet as save_unet
from ._vae import VAE_NAME_MAP as VAE_NAME_MAP
from ._vae import load_vae as load_vae
from ._vae import save_vae as save_vae
