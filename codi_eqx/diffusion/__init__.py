"""Diffusion math of CoDi as small pure functions: schedule, parameterisation, consistency
scalings, timestep discretisation, DDIM and classifier-free guidance."""

from ._consistency import c_out as c_out
from ._consistency import c_skip as c_skip
from ._consistency import consistency_output as consistency_output
from ._ddim import classifier_free_guidance as classifier_free_guidance
from ._ddim import ddim_previous_timesteps as ddim_previous_timesteps
from ._ddim import ddim_step as ddim_step
from ._ddim import ddim_timesteps as ddim_timesteps
from ._discretisation import codi_sampling_timesteps as codi_sampling_timesteps
from ._discretisation import distill_timestep as distill_timestep
from ._discretisation import distill_timesteps as distill_timesteps
from ._parameterisation import add_noise as add_noise
from ._parameterisation import canonical_prediction_type as canonical_prediction_type
from ._parameterisation import check_epsilon_timesteps as check_epsilon_timesteps
from ._parameterisation import from_x_eps as from_x_eps
from ._parameterisation import resolve_prediction_type as resolve_prediction_type
from ._parameterisation import to_x_eps as to_x_eps
from ._schedule import BETA_SCHEDULES as BETA_SCHEDULES
from ._schedule import PREDICTION_TYPES as PREDICTION_TYPES
from ._schedule import NoiseSchedule as NoiseSchedule
from ._schedule import betas_from_config as betas_from_config
