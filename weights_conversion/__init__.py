"""PyTorch / diffusers / transformers checkpoints <-> Equinox parameters.

This package converts: original single-file checkpoints (`single_file`) and whole sources
into this project's format or out to diffusers' and the original layouts (`convert`). The
weight I/O it builds on (safetensors files, diffusers folders, each model's name table) lives
in the library, `codi_eqx.weights`, and is re-exported here under its old names."""

from codi_eqx.weights import CLIP_NAME_MAP as CLIP_NAME_MAP
from codi_eqx.weights import CONTROLNET_NAME_MAP as CONTROLNET_NAME_MAP
from codi_eqx.weights import UNET_NAME_MAP as UNET_NAME_MAP
from codi_eqx.weights import VAE_NAME_MAP as VAE_NAME_MAP
from codi_eqx.weights import NameMap as NameMap
from codi_eqx.weights import SafetensorsFile as SafetensorsFile
from codi_eqx.weights import TensorSource as TensorSource
from codi_eqx.weights import WeightsError as WeightsError
from codi_eqx.weights import export_state as export_state
from codi_eqx.weights import find_weight_files as find_weight_files
from codi_eqx.weights import load_adapter as load_adapter
from codi_eqx.weights import load_controlnet as load_controlnet
from codi_eqx.weights import load_state as load_state
from codi_eqx.weights import load_text_encoder as load_text_encoder
from codi_eqx.weights import load_unet as load_unet
from codi_eqx.weights import load_vae as load_vae
from codi_eqx.weights import module_keys as module_keys
from codi_eqx.weights import read_config as read_config
from codi_eqx.weights import read_tensors as read_tensors
from codi_eqx.weights import save_adapter as save_adapter
from codi_eqx.weights import save_file as save_file
from codi_eqx.weights import save_text_encoder as save_text_encoder
from codi_eqx.weights import save_unet as save_unet
from codi_eqx.weights import save_vae as save_vae
from codi_eqx.weights import stored_axes as stored_axes
from codi_eqx.weights import to_checkpoint_layout as to_checkpoint_layout

from .convert import Conversion as Conversion
from .convert import convert as convert
