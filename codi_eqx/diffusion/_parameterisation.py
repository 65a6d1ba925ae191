"""Conversions between a model's raw output and the (clean latents, noise) pair it implies.

With `z = alpha * x + sigma * eps` (and `alpha^2 + sigma^2 = 1`), a model predicts one of

- `"epsilon"`: the noise `eps`;
- `"v_prediction"`: the velocity `v = alpha * eps - sigma * x`;
- `"sample"`: the clean latents `x`.

Scalings (`alpha`, `sigma`) broadcast against the latents aligned on the *leading* axes: a scalar
for one example, shape `(B,)` for a batch `(B, C, H, W)`, or anything already broadcastable.
Arithmetic runs in the dtype of `z` (keep latents in float32); the model output and the
scalings are cast to it.
"""

import warnings
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._schedule import _check_prediction_type

# A scaling: a Python float, or a JAX / numpy float array (see broadcasting above).
ScaleLike = Union[float, int, Float[Array, "..."], Float[np.ndarray, "..."]]

# Spellings accepted by `resolve_prediction_type`: this project's names plus the original
# release's option values.
_PREDICTION_TYPE_ALIASES = {
    "epsilon": "epsilon",
    "nprediction": "epsilon",
    "v_prediction": "v_prediction",
    "vprediction": "v_prediction",
    "sample": "sample",
    "xprediction": "sample",
}


def _expand_to(scale: ScaleLike, ref: Float[Array, "..."]) -> Float[Array, "..."]:
    """Cast `scale` to `ref`'s dtype and append trailing unit axes up to `ref`'s rank."""
    scale = jnp.asarray(scale).astype(ref.dtype)
    extra = ref.ndim - scale.ndim
    if extra < 0:
        raise ValueError(
            f"a scaling of shape {scale.shape} has more axes than the latents {ref.shape}"
        )
    return scale.reshape(scale.shape + (1,) * extra)


def add_noise(
    x: Float[Array, "*shape"],
    eps: Float[Array, "*shape"],
    alpha: ScaleLike,
    sigma: ScaleLike,
) -> Float[Array, "*shape"]:
    """The forward process `z = alpha * x + sigma * eps`.

    Also the deterministic (DDIM-style) re-noising step `z_s = alpha_s * x_hat + sigma_s * eps_hat`.

    **Arguments:**

    - `x`: clean latents.
    - `eps`: noise, same shape (cast to `x`'s dtype).
    - `alpha`, `sigma`: scalings (see the module docstring for broadcasting).

    **Returns:** `z`, same shape and dtype as `x`.
    """
    eps = eps.astype(x.dtype)
    return _expand_to(alpha, x) * x + _expand_to(sigma, x) * eps


def to_x_eps(
    model_output: Float[Array, "*shape"],
    z: Float[Array, "*shape"],
    alpha: ScaleLike,
    sigma: ScaleLike,
    prediction_type: str,
) -> tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
    """Convert a raw model output into the predicted clean latents and noise.

        epsilon:       x_hat = (z - sigma * F) / alpha      eps_hat = F
        v_prediction:  x_hat = alpha * z - sigma * F        eps_hat = alpha * F + sigma * z
        sample:        x_hat = F                            eps_hat = (z - alpha * F) / sigma

    **Arguments:**

    - `model_output`: `F`, the model's raw output at `(z, t)`.
    - `z`: the noisy latents the model was given.
    - `alpha`, `sigma`: `alpha_t`, `sigma_t` of the timestep.
    - `prediction_type`: `"epsilon"`, `"v_prediction"` or `"sample"` (static).

    **Returns:** `(x_hat, eps_hat)`, each shaped like `z`, in `z`'s dtype.
    """
    _check_prediction_type(prediction_type)
    f = model_output.astype(z.dtype)
    a = _expand_to(alpha, z)
    s = _expand_to(sigma, z)
    if prediction_type == "epsilon":
        return (z - s * f) / a, f
    if prediction_type == "v_prediction":
        return a * z - s * f, a * f + s * z
    return f, (z - a * f) / s


def from_x_eps(
    x: Float[Array, "*shape"],
    eps: Float[Array, "*shape"],
    alpha: ScaleLike,
    sigma: ScaleLike,
    prediction_type: str,
) -> Float[Array, "*shape"]:
    """The model output that `to_x_eps` maps to `(x, eps)`: the regression target of each type.

        epsilon: F = eps      v_prediction: F = alpha * eps - sigma * x      sample: F = x

    **Arguments:**

    - `x`: clean latents.
    - `eps`: noise, same shape (cast to `x`'s dtype).
    - `alpha`, `sigma`: scalings of the timestep.
    - `prediction_type`: `"epsilon"`, `"v_prediction"` or `"sample"` (static).

    **Returns:** the model output `F`, shaped like `x`, in `x`'s dtype.
    """
    _check_prediction_type(prediction_type)
    eps = eps.astype(x.dtype)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return _expand_to(alpha, x) * eps - _expand_to(sigma, x) * x
    return x


def canonical_prediction_type(name: str) -> str:
    """Map a prediction-type spelling to its canonical name.

    **Arguments:**

    - `name`: one of `"epsilon"`, `"v_prediction"`, `"sample"`, or the original release's
      `"nprediction"`, `"vprediction"`, `"xprediction"`.

    **Returns:** `"epsilon"`, `"v_prediction"` or `"sample"`. Raises `ValueError` otherwise.
    """
    try:
        return _PREDICTION_TYPE_ALIASES[name]
    except KeyError:
        raise ValueError(
            f"unknown prediction type {name!r}; expected one of "
            + ", ".join(repr(k) for k in _PREDICTION_TYPE_ALIASES)
        ) from None


def resolve_prediction_type(
    model_value: str, requested: Optional[str] = None, force: bool = False
) -> str:
    """Decide which prediction type the conversions use: the model's, unless forced.

    A `requested` value that contradicts the model's config triggers a `UserWarning` naming
    both, and is ignored unless `force` is set.

    **Arguments:**

    - `model_value`: `prediction_type` from the base model's scheduler config.
    - `requested`: a user-supplied value (any spelling `canonical_prediction_type` accepts), or
      None.
    - `force`: use `requested` even where it contradicts the model.

    **Returns:** the canonical prediction type to use.
    """
    model = canonical_prediction_type(model_value)
    if requested is None:
        return model
    wanted = canonical_prediction_type(requested)
    if wanted == model:
        return model
    if force:
        warnings.warn(
            f"prediction type forced to {wanted!r} (requested {requested!r}) although the model's "
            f"config says {model!r}",
            stacklevel=2,
        )
        return wanted
    warnings.warn(
        f"requested prediction type {requested!r} contradicts the model's {model!r}; using "
        f"{model!r} (force the requested one explicitly to override)",
        stacklevel=2,
    )
    return model



def check_epsilon_timesteps(alphas_cumprod, timesteps, prediction_type: str) -> None:
    """Raise `ValueError` when an epsilon-predicting model would be converted at a timestep
    whose `alpha_t` is 0 (a zero-terminal-SNR schedule's last timestep): `x_hat = (z - sigma
    F) / alpha` is undefined there (NaN), while v- and x-prediction are fine."""
    if prediction_type != "epsilon":
        return
    abar = np.asarray(alphas_cumprod, np.float64)
    bad = [int(t) for t in np.asarray(timesteps).reshape(-1) if 0 <= t < abar.size
           and abar[int(t)] <= 0.0]
    if bad:
        raise ValueError(
            f"timestep {bad[0]} has alpha_t = 0 (a zero-terminal-SNR schedule): epsilon "
            "prediction cannot give x_0 there; use a v_prediction model, or avoid the last "
            "timestep (trailing spacing with fewer steps)"
        )
