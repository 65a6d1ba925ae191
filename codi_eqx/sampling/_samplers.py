"""The samplers, for one example: one function per step, and a Python loop over the steps.

Both take `model_fn(z, t) -> F`, the (guided) raw model output, so that they are independent
of the network (the high-level `generate` builds `model_fn` from the UNet and the adapter).

The loops are Python loops on purpose. Traced inside `jit` they unroll, so each step's network
is straight-line code: XLA:CPU emits the convolutions of a network inside a `while` loop
(`lax.scan`, `fori_loop`) as generic loops instead of calling its convolution library, 10-100x
slower. For many steps, `generate` compiles the step alone (`codi_step` / `ddim_step` with a
traced timestep) and calls it once per step, so the compile time does not grow with the step
count either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..diffusion import NoiseSchedule, add_noise, consistency_output, ddim_step, to_x_eps

ModelFn = Callable[[Float[Array, "c h w"], Int[Array, ""]], Float[Array, "c h w"]]
Steps = Union[Int[Array, " n"], Int[np.ndarray, " n"], tuple[int, ...], list[int]]
Timestep = Union[int, Int[Array, ""]]


def codi_step(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    z: Float[Array, "c h w"],
    t: Timestep,
    s: Timestep,
    last: Union[bool, Bool[Array, ""]],
    *,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> Float[Array, "c h w"]:
    """One step of CoDi's few-step sampler, from `t` towards `s`.

        x_hat, eps_hat = convert(F(z, t), z, t)        # per schedule.prediction_type
        x = c_skip(t) * z + c_out(t) * x_hat
        return x  if last  else  alpha_s * x + sigma_s * eps_hat

    **Arguments:** as `codi_sample`, with `t` the current timestep, `s` the next one (unused
    when `last`), and `last` whether this is the final step (a Python or a traced bool).

    **Returns:** the latents after the step, shaped like `z`, in its dtype.
    """
    t = jnp.asarray(t, jnp.int32)
    s = jnp.asarray(s, jnp.int32)
    f = model_fn(z, t)
    x_hat, eps_hat = to_x_eps(f, z, schedule.alpha(t), schedule.sigma(t), schedule.prediction_type)
    x = consistency_output(z, x_hat, t, sigma_data, timestep_scaling)
    if isinstance(last, bool) and last:
        return x.astype(z.dtype)
    renoised = add_noise(x, eps_hat, schedule.alpha(s), schedule.sigma(s))
    return jnp.where(last, x, renoised).astype(z.dtype)


def codi_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    z: Float[Array, "c h w"],
    timesteps: Steps,
    *,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> tuple[Float[Array, "c h w"], Float[Array, "n c h w"]]:
    """CoDi's few-step sampler (consistency-model multistep sampling): `codi_step` at each of
    the descending `timesteps`, the last step returning the clean latents.

    **Arguments:**

    - `model_fn`: `F(z, t)`, the (guided) raw model output.
    - `schedule`: the base model's noise schedule.
    - `z`: initial noise `(C, h, w)`, float32.
    - `timesteps`: the descending timesteps `(n,)`, from `codi_sampling_timesteps`. Concrete
      values (numpy, a tuple) run the Python loop; traced ones a `lax.scan` (slow on CPU).
    - `timestep_scaling`: `tau` of the boundary-condition scalings.
    - `sigma_data`: of the scalings (0.5).

    **Returns:** `(x, trajectory)`: the final clean latents `(C, h, w)` and the latents after
    each step `(n, C, h, w)` (the last entry equals `x`).
    """
    if isinstance(timesteps, jax.core.Tracer):
        ts = jnp.asarray(timesteps, jnp.int32)
        nxt = jnp.concatenate([ts[1:], ts[:1]])  # the last entry is never used
        last = jnp.arange(ts.shape[0]) == ts.shape[0] - 1

        def body(z, xs):
            z = codi_step(model_fn, schedule, z, *xs, timestep_scaling=timestep_scaling,
                          sigma_data=sigma_data)
            return z, z

        return jax.lax.scan(body, z, (ts, nxt, last))
    ts = [int(t) for t in np.asarray(timesteps)]
    traj = []
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        z = codi_step(model_fn, schedule, z, t, t if last else ts[i + 1], last,
                      timestep_scaling=timestep_scaling, sigma_data=sigma_data)
        traj.append(z)
    return z, jnp.stack(traj)


def ddim_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    z: Float[Array, "c h w"],
    timesteps: Steps,
    prev_timesteps: Steps,
) -> tuple[Float[Array, "c h w"], Float[Array, "n c h w"]]:
    """Deterministic DDIM (Song et al. 2021, eta = 0), as diffusers' `DDIMScheduler`:
    `ddim_step` from each timestep to its previous one.

    **Arguments:**

    - `model_fn`: `F(z, t)`, the (guided) raw model output.
    - `schedule`: the base model's noise schedule.
    - `z`: initial noise `(C, h, w)`, float32.
    - `timesteps`: `ddim_timesteps(steps, scheduler_config)`, `(n,)` (concrete: a Python
      loop; traced: a `lax.scan`, slow on CPU).
    - `prev_timesteps`: `ddim_previous_timesteps(timesteps, T)`, `(n,)`.

    **Returns:** `(z_0, trajectory)`: the final latents and the latents after each step.
    """
    if isinstance(timesteps, jax.core.Tracer) or isinstance(prev_timesteps, jax.core.Tracer):

        def body(z, xs):
            t, p = xs
            z = ddim_step(model_fn(z, t), t, p, z, schedule).astype(z.dtype)
            return z, z

        return jax.lax.scan(body, z, (jnp.asarray(timesteps, jnp.int32),
                                      jnp.asarray(prev_timesteps, jnp.int32)))
    traj = []
    for t, p in zip(np.asarray(timesteps), np.asarray(prev_timesteps)):
        t, p = jnp.asarray(int(t), jnp.int32), jnp.asarray(int(p), jnp.int32)
        z = ddim_step(model_fn(z, t), t, p, z, schedule).astype(z.dtype)
        traj.append(z)
    return z, jnp.stack(traj)
