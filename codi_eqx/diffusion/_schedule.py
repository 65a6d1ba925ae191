"""The discrete noise schedule of the base model: `abar[t]`, `alpha_t`, `sigma_t`, SNR.

`z_t = alpha_t * x0 + sigma_t * eps` with `alpha_t = sqrt(abar[t])`, `sigma_t = sqrt(1 - abar[t])`
for integer timesteps `t` in `[0, T)`.
"""

import math
from collections.abc import Mapping
from typing import Any, Union

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")

# Integer timesteps: a Python int, or a JAX / numpy integer array of any shape.
TimestepLike = Union[int, Int[Array, "*shape"], Int[np.ndarray, "*shape"]]


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of "
            + ", ".join(repr(p) for p in PREDICTION_TYPES)
        )


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the squared-cosine schedule (Nichol & Dhariwal 2021), capped at `max_beta`."""

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array(
        [min(1.0 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], np.float64
    )


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale `sqrt(abar)` so that the last timestep has zero SNR (Lin et al. 2023)."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def betas_from_config(scheduler_config: Mapping[str, Any]) -> np.ndarray:
    """The float64 betas described by a diffusers `scheduler_config.json`.

    **Arguments:**

    - `scheduler_config`: the parsed config; reads `num_train_timesteps` (1000; must equal the
      length of `trained_betas` when both are given), `beta_schedule` (`"linear"`),
      `beta_start` (1e-4), `beta_end` (0.02), `trained_betas` (None) and
      `rescale_betas_zero_snr` (False), with the defaults in brackets.

    **Returns:** betas of shape `(T,)`, float64.
    """
    trained = scheduler_config.get("trained_betas")
    schedule = scheduler_config.get("beta_schedule", "linear")
    if trained is not None:
        betas = np.asarray(trained, np.float64).reshape(-1)
        n = scheduler_config.get("num_train_timesteps")
        if n is not None and int(n) != betas.shape[0]:
            raise ValueError(
                f"trained_betas has {betas.shape[0]} entries but the config says "
                f"num_train_timesteps {n}; make them agree"
            )
    else:
        n = int(scheduler_config.get("num_train_timesteps", 1000))
        start = float(scheduler_config.get("beta_start", 0.0001))
        end = float(scheduler_config.get("beta_end", 0.02))
        if schedule == "linear":
            betas = np.linspace(start, end, n, dtype=np.float64)
        elif schedule == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            raise ValueError(
                f"unsupported beta_schedule {schedule!r}; expected one of "
                + ", ".join(repr(s) for s in BETA_SCHEDULES)
                + " (or trained_betas)"
            )
    if scheduler_config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


class NoiseSchedule(eqx.Module):
    """The base model's discrete noise schedule and prediction type.

    **Fields:**

    - `alphas_cumprod`: `abar[t] = prod_{i<=t} (1 - beta_i)`, shape `(T,)`, float32.
    - `final_alpha_cumprod`: `abar` used by DDIM for a step that lands before timestep 0
      (1.0 with diffusers' `set_alpha_to_one`, else `abar[0]`), shape `()`, float32.
    - `num_train_timesteps`: `T` (static).
    - `prediction_type`: what the model outputs, `"epsilon"`, `"v_prediction"` or `"sample"`
      (static).
    """

    alphas_cumprod: Float[Array, " T"]
    final_alpha_cumprod: Float[Array, ""]
    num_train_timesteps: int = eqx.field(static=True)
    prediction_type: str = eqx.field(static=True, default="epsilon")

    def __check_init__(self):
        _check_prediction_type(self.prediction_type)
        if self.alphas_cumprod.shape != (self.num_train_timesteps,):
            raise ValueError(
                f"alphas_cumprod has shape {self.alphas_cumprod.shape}, expected "
                f"({self.num_train_timesteps},)"
            )

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build the schedule from a diffusers `scheduler/scheduler_config.json` (parsed).

        Betas and their cumulative product are computed in float64, then stored as float32.
        Reads `set_alpha_to_one` (default True) and `prediction_type` (default `"epsilon"`)
        besides the keys that `betas_from_config` reads.

        **Arguments:**

        - `scheduler_config`: the parsed config dict.

        **Returns:** a `NoiseSchedule`.
        """
        prediction_type = scheduler_config.get("prediction_type", "epsilon") or "epsilon"
        _check_prediction_type(prediction_type)
        betas = betas_from_config(scheduler_config)
        abar = np.cumprod(1.0 - betas)
        final = 1.0 if scheduler_config.get("set_alpha_to_one", True) else abar[0]
        return cls(
            alphas_cumprod=jnp.asarray(abar, jnp.float32),
            final_alpha_cumprod=jnp.asarray(final, jnp.float32),
            num_train_timesteps=int(abar.shape[0]),
            prediction_type=prediction_type,
        )

    def alpha(self, t: TimestepLike) -> Float[Array, "*shape"]:
        """`alpha_t = sqrt(abar[t])` for integer timesteps `t` of any shape (float32)."""
        return jnp.sqrt(self.alphas_cumprod[t])

    def sigma(self, t: TimestepLike) -> Float[Array, "*shape"]:
        """`sigma_t = sqrt(1 - abar[t])` for integer timesteps `t` of any shape (float32)."""
        return jnp.sqrt(1.0 - self.alphas_cumprod[t])

    def snr(self, t: TimestepLike) -> Float[Array, "*shape"]:
        """`snr_t = alpha_t^2 / sigma_t^2 = abar[t] / (1 - abar[t])` (float32)."""
        abar = self.alphas_cumprod[t]
        return abar / (1.0 - abar)
