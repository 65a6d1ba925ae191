"""The samplers, for one example, each one `jax.lax.scan` over its steps.

Both take `model_fn(z, t) -> F`, the (guided) raw model output, so that they are independent
of the network (the high-level `generate` builds `model_fn` from the UNet and the adapter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..diffusion import NoiseSchedule, c_out, c_skip, ddim_step, to_x_eps

ModelFn = Callable[[Float[Array, "c h w"], Int[Array, ""]], Float[Array, "c h w"]]
Steps = Union[Int[Array, " n"], Int[np.ndarray, " n"]]


def codi_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    z: Float[Array, "c h w"],
    timesteps: Steps,
    *,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> tuple[Float[Array, "c h w"], Float[Array, "n c h w"]]:
    """CoDi's few-step sampler (consistency-model multistep sampling).

        for i, t in enumerate(ts):
            x_hat, eps_hat = convert(F(z, t), z, t)        # per schedule.prediction_type
            x = c_skip(t) * z + c_out(t) * x_hat
            z = x  if last step  else  alpha_s * x + sigma_s * eps_hat,  s = ts[i + 1]

    **Arguments:**

    - `model_fn`: `F(z, t)`, the (guided) raw model output.
    - `schedule`: the base model's noise schedule.
    - `z`: initial noise `(C, h, w)`, float32.
    - `timesteps`: the descending timesteps `(n,)`, from `codi_sampling_timesteps`.
    - `timestep_scaling`: `tau` of the boundary-condition scalings.
    - `sigma_data`: of the scalings (0.5).

    **Returns:** `(x, trajectory)`: the final clean latents `(C, h, w)` and the latents after
    each step `(n, C, h, w)` (the last entry equals `x`).
    """
    ts = jnp.asarray(timesteps, jnp.int32)
    n = ts.shape[0]
    nxt = jnp.concatenate([ts[1:], ts[:1]])  # the last entry is never used
    is_last = jnp.arange(n) == n - 1

    def step(z, inputs):
        t, s, last = inputs
        f = model_fn(z, t)
        x_hat, eps_hat = to_x_eps(f, z, schedule.alpha(t), schedule.sigma(t),
                                  schedule.prediction_type)
        x = c_skip(t, sigma_data, timestep_scaling) * z + c_out(t, sigma_data, timestep_scaling) * x_hat
        renoised = schedule.alpha(s) * x + schedule.sigma(s) * eps_hat
        z_next = jnp.where(last, x, renoised).astype(z.dtype)
        return z_next, z_next

    x, traj = jax.lax.scan(step, z, (ts, nxt, is_last))
    return x, traj


def ddim_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    z: Float[Array, "c h w"],
    timesteps: Steps,
    prev_timesteps: Steps,
) -> tuple[Float[Array, "c h w"], Float[Array, "n c h w"]]:
    """Deterministic DDIM (Song et al. 2021, eta = 0), as diffusers' `DDIMScheduler`.

    **Arguments:**

    - `model_fn`: `F(z, t)`, the (guided) raw model output.
    - `schedule`: the base model's noise schedule.
    - `z`: initial noise `(C, h, w)`, float32.
    - `timesteps`: `ddim_timesteps(steps, scheduler_config)`, `(n,)`.
    - `prev_timesteps`: `ddim_previous_timesteps(timesteps, T)`, `(n,)`.

    **Returns:** `(z_0, trajectory)`: the final latents and the latents after each step.
    """
    ts = jnp.asarray(timesteps, jnp.int32)
    prev = jnp.asarray(prev_timesteps, jnp.int32)

    def step(z, inputs):
        t, p = inputs
        z_next = ddim_step(model_fn(z, t), t, p, z, schedule).astype(z.dtype)
        return z_next, z_next

    z0, traj = jax.lax.scan(step, z, (ts, prev))
    return z0, traj
