"""The Stable Diffusion models as Equinox modules (one example in, channels first)."""

from ._clip import CLIPTextConfig as CLIPTextConfig
from ._clip import CLIPTextModel as CLIPTextModel
from ._clip import CLIPTextModelWithProjection as CLIPTextModelWithProjection
from ._controlnet import ControlNetConfig as ControlNetConfig
from ._controlnet import ControlNetModel as ControlNetModel
from ._controlnet import guidance_label as guidance_label
from ._text_encoders import SDXLTextEncoders as SDXLTextEncoders
from ._text_encoders import TextConditioning as TextConditioning
from ._text_encoders import TextEncoder as TextEncoder
from ._text_encoders import sdxl_time_ids as sdxl_time_ids
from ._text_encoders import unet_text_inputs as unet_text_inputs
from ._text_encoders import with_time_ids as with_time_ids
from ._unet import AddedCondKwargs as AddedCondKwargs
from ._unet import UNet2DConditionConfig as UNet2DConditionConfig
from ._unet import UNet2DConditionModel as UNet2DConditionModel
from ._vae import AutoencoderKL as AutoencoderKL
from ._vae import AutoencoderKLConfig as AutoencoderKLConfig
from ._vae import DiagonalGaussianDistribution as DiagonalGaussianDistribution
from ._vae import scale_latents as scale_latents
from ._vae import unscale_latents as unscale_latents
