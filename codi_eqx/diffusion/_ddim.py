"""Deterministic DDIM sampling (Song et al. 2021, eta = 0) for the teacher baseline.

Matches diffusers' `DDIMScheduler` with `eta=0`, `clip_sample=False`, `thresholding=False`:

    timesteps = ddim_timesteps(num_inference_steps, scheduler_config)
    prev = ddim_previous_timesteps(timesteps, schedule.num_train_timesteps)
    for t, p in zip(timesteps, prev):
        F = classifier_free_guidance(F_uncond, F_cond, guidance_scale)
        z = ddim_step(F, t, p, z, schedule)
"""

from collections.abc import Mapping
from typing import Any, Union

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._parameterisation import ScaleLike, _expand_to, add_noise, to_x_eps
from ._schedule import NoiseSchedule, TimestepLike

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(
    num_inference_steps: int, scheduler_config: Mapping[str, Any]
) -> np.ndarray:
    """The descending timesteps of a `num_inference_steps`-step DDIM run.

    Reads `num_train_timesteps` (1000), `timestep_spacing` (`"leading"`) and `steps_offset` (0)
    from the config:

    - `"leading"`: `[0, r, 2r, ...] + steps_offset` reversed, `r = T // steps`;
    - `"trailing"`: `round(T, T - r, ..., > 0) - 1` with real `r = T / steps`;
    - `"linspace"`: `round(linspace(0, T - 1, steps))` reversed.

    **Arguments:**

    - `num_inference_steps`: number of steps, in `[1, T]`.
    - `scheduler_config`: the base model's parsed `scheduler_config.json`.

    **Returns:** int32 numpy array of shape `(num_inference_steps,)`.
    """
    n_train = int(scheduler_config.get("num_train_timesteps", 1000))
    spacing = scheduler_config.get("timestep_spacing", "leading")
    if not 1 <= num_inference_steps <= n_train:
        raise ValueError(
            f"num_inference_steps must lie in [1, {n_train}] (num_train_timesteps), "
            f"got {num_inference_steps}"
        )
    if spacing == "leading":
        ratio = n_train // num_inference_steps
        ts = np.arange(num_inference_steps, dtype=np.int64)[::-1] * ratio
        ts = ts + int(scheduler_config.get("steps_offset", 0))
    elif spacing == "trailing":
        ratio = n_train / num_inference_steps
        ts = np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, n_train - 1, num_inference_steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(
            f"unsupported timestep_spacing {spacing!r}; expected one of "
            + ", ".join(repr(s) for s in TIMESTEP_SPACINGS)
        )
    if ts.size and (ts.max() >= n_train or ts.min() < 0):
        raise ValueError(
            f"{num_inference_steps} DDIM steps with timestep_spacing {spacing!r} and steps_offset "
            f"{scheduler_config.get('steps_offset', 0)} reach timestep {int(ts.max())}, outside "
            f"[0, {n_train - 1}]: use fewer steps"
        )
    return ts.astype(np.int32)


def ddim_previous_timesteps(timesteps: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """The timestep each DDIM step lands on: `t - T // num_inference_steps`.

    This is diffusers' rule for every spacing; with `"trailing"` / `"linspace"` it need not equal
    the next entry of `timesteps`. A negative value means "past timestep 0" (see `ddim_step`).

    **Arguments:**

    - `timesteps`: the output of `ddim_timesteps`.
    - `num_train_timesteps`: `T`.

    **Returns:** int32 numpy array shaped like `timesteps`.
    """
    timesteps = np.asarray(timesteps)
    return (timesteps - num_train_timesteps // len(timesteps)).astype(np.int32)


def _alpha_cumprod_or_final(
    schedule: NoiseSchedule, t: TimestepLike
) -> Float[Array, "*shape"]:
    t = jnp.asarray(t)
    inside = schedule.alphas_cumprod[jnp.maximum(t, 0)]
    return jnp.where(t >= 0, inside, schedule.final_alpha_cumprod)


def ddim_step(
    model_output: Float[Array, "*zshape"],
    t: Union[int, Int[Array, "*tshape"], Int[np.ndarray, "*tshape"]],
    prev_t: Union[int, Int[Array, "*tshape"], Int[np.ndarray, "*tshape"]],
    z: Float[Array, "*zshape"],
    schedule: NoiseSchedule,
) -> Float[Array, "*zshape"]:
    """One deterministic DDIM step from timestep `t` to `prev_t`.

        (x_hat, eps_hat) = to_x_eps(F, z, alpha_t, sigma_t)
        z_prev = sqrt(abar_prev) * x_hat + sqrt(1 - abar_prev) * eps_hat

    with `abar_prev = schedule.final_alpha_cumprod` when `prev_t < 0`.

    **Arguments:**

    - `model_output`: the (guided) model output `F` at `(z, t)`, read per
      `schedule.prediction_type`.
    - `t`: current integer timestep (scalar for one example, or `(B,)` for a batch).
    - `prev_t`: the timestep to land on, same shape as `t`.
    - `z`: current latents.
    - `schedule`: the noise schedule.

    **Returns:** latents at `prev_t`, shaped like `z`, in `z`'s dtype.
    """
    abar_t = schedule.alphas_cumprod[jnp.asarray(t)]
    abar_prev = _alpha_cumprod_or_final(schedule, prev_t)
    x_hat, eps_hat = to_x_eps(
        model_output, z, jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t), schedule.prediction_type
    )
    return add_noise(x_hat, eps_hat, jnp.sqrt(abar_prev), jnp.sqrt(1.0 - abar_prev))


def classifier_free_guidance(
    uncond: Float[Array, "*shape"], cond: Float[Array, "*shape"], scale: ScaleLike
) -> Float[Array, "*shape"]:
    """Classifier-free guidance `F = F_uncond + w * (F_cond - F_uncond)`.

    Note the argument order (unconditional first). Where a caller runs both halves as one
    batch, the order in which it concatenates and splits them is its own business; it must just
    split in the order it concatenated.

    **Arguments:**

    - `uncond`: the output with the unconditional (empty or negative) prompt.
    - `cond`: the output with the prompt, same shape (cast to `uncond`'s dtype).
    - `scale`: `w`; a scalar, or `(B,)` per example for batched outputs. `w = 1` gives `cond`.

    **Returns:** the guided output, shaped like `uncond`, in its dtype.
    """
    cond = cond.astype(uncond.dtype)
    return uncond + _expand_to(scale, uncond) * (cond - uncond)
