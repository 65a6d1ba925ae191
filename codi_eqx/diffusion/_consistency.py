"""Boundary-condition scalings of the consistency-model parameterisation.

    c_skip(t) = sigma_data^2 / ((tau * t)^2 + sigma_data^2)
    c_out(t)  = (tau * t) / sqrt((tau * t)^2 + sigma_data^2)
    f(z, t)   = c_skip(t) * z + c_out(t) * x_hat(z, t)

with `t` the integer timestep and `tau` the timestep scaling. `c_skip(0) = 1` and `c_out(0) = 0`
exactly, so `f(z, 0) = z`. Shared by the distillation loss and the few-step sampler.
"""

from typing import Union

import jax.numpy as jnp
from jaxtyping import Array, Float

from ._parameterisation import _expand_to
from ._schedule import TimestepLike

Real = Union[float, int]


def _scaled(t: TimestepLike, timestep_scaling: Real) -> Float[Array, "*shape"]:
    return jnp.asarray(t).astype(jnp.float32) * timestep_scaling


def c_skip(
    t: TimestepLike, sigma_data: Real = 0.5, timestep_scaling: Real = 10.0
) -> Float[Array, "*shape"]:
    """Weight of the input latents in the consistency function.

    **Arguments:**

    - `t`: integer timesteps, any shape.
    - `sigma_data`: the data standard deviation of the parameterisation (0.5).
    - `timestep_scaling`: `tau`, multiplies `t` (`--distill_timestep_scaling`, 10).

    **Returns:** `c_skip(t)`, float32, shaped like `t`.
    """
    u = _scaled(t, timestep_scaling)
    return sigma_data**2 / (u**2 + sigma_data**2)


def c_out(
    t: TimestepLike, sigma_data: Real = 0.5, timestep_scaling: Real = 10.0
) -> Float[Array, "*shape"]:
    """Weight of the predicted clean latents in the consistency function.

    **Arguments:**

    - `t`: integer timesteps, any shape.
    - `sigma_data`: the data standard deviation of the parameterisation (0.5).
    - `timestep_scaling`: `tau`, multiplies `t` (10).

    **Returns:** `c_out(t)`, float32, shaped like `t`.
    """
    u = _scaled(t, timestep_scaling)
    return u / jnp.sqrt(u**2 + sigma_data**2)


def consistency_output(
    z: Float[Array, "*zshape"],
    x_hat: Float[Array, "*zshape"],
    t: TimestepLike,
    sigma_data: Real = 0.5,
    timestep_scaling: Real = 10.0,
) -> Float[Array, "*zshape"]:
    """The consistency function `f(z, t) = c_skip(t) * z + c_out(t) * x_hat`.

    Used with `x_hat` (the clean-latent prediction) and equally with `eps_hat` for the
    noise-space variant of the loss.

    **Arguments:**

    - `z`: the noisy latents at `t`, e.g. `(C, H, W)` for one example.
    - `x_hat`: the prediction to blend in, same shape (cast to `z`'s dtype).
    - `t`: integer timestep: a scalar for one example, or `(B,)` for a batch `(B, C, H, W)`.
    - `sigma_data`, `timestep_scaling`: as in `c_skip`.

    **Returns:** `f(z, t)`, shaped like `z`, in `z`'s dtype; equal to `z` where `t = 0`.
    """
    skip = _expand_to(c_skip(t, sigma_data, timestep_scaling), z)
    out = _expand_to(c_out(t, sigma_data, timestep_scaling), z)
    return skip * z + out * x_hat.astype(z.dtype)
