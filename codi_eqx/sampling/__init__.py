"""Sampling: CoDi's few-step sampler, DDIM for the teacher, and `generate` (prompts -> images)."""

from .._model_output import guided_model_output as guided_model_output
from .._model_output import model_output as model_output
from ._generate import SAMPLERS as SAMPLERS
from ._generate import SamplerSpec as SamplerSpec
from ._generate import decode_latents as decode_latents
from ._generate import generate as generate
from ._generate import sample_batch as sample_batch
from ._generate import sampler_timesteps as sampler_timesteps
from ._grid import image_grid as image_grid
from ._options import SamplingOptions as SamplingOptions
from ._options import contradictions as contradictions
from ._options import default_guidance_scale as default_guidance_scale
from ._options import sampling_options as sampling_options
from ._samplers import codi_sample as codi_sample
from ._samplers import ddim_sample as ddim_sample
