"""What training carries from step to step (`TrainState`) and what it only reads (`Frozen`)."""

from __future__ import annotations

from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray

from .._tree import cast_floating
from ..diffusion import NoiseSchedule
from ..models import (
    AutoencoderKL,
    ControlNetModel,
    TextConditioning,
    TextEncoder,
    UNet2DConditionModel,
)


class Trainable(eqx.Module):
    """The parameters being trained: the adapter, and the UNet too in full CoDi."""

    adapter: ControlNetModel
    unet: Optional[UNet2DConditionModel] = None


class Frozen(eqx.Module):
    """What the step reads but never changes. `unet` is the pretrained UNet: PE-CoDi's, and
    full CoDi's `uncontrol` one-step teacher (None in full CoDi otherwise: the trained UNet
    is in `Trainable`); `vae` / `text_encoder` may be None when the batches carry cached
    latents / embeddings. SDXL's `text_encoder` is `SDXLTextEncoders` (both encoders) and
    its `null_embedding` a dict without time ids (each example brings its own)."""

    unet: Optional[UNet2DConditionModel]
    vae: Optional[AutoencoderKL]
    text_encoder: Optional[TextEncoder]
    schedule: NoiseSchedule
    null_embedding: TextConditioning
    """Text embeddings of the empty prompt (the unconditional branch of guidance)."""


class TrainState(eqx.Module):
    """step, trained parameters, their EMA (theta_minus), optimiser state, PRNG key."""

    step: Int[Array, ""]
    params: Trainable
    ema: Trainable
    opt_state: Any
    key: PRNGKeyArray
    tx: optax.GradientTransformation = eqx.field(static=True)


def init_train_state(
    params: Trainable, tx: optax.GradientTransformation, *, key: PRNGKeyArray
) -> TrainState:
    """A fresh state: float32 master weights, EMA equal to them, optimiser state on the
    inexact arrays of `params`."""
    params = cast_floating(params, jnp.float32)
    opt_state = tx.init(eqx.filter(params, eqx.is_inexact_array))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, ema=params, opt_state=opt_state,
        key=key, tx=tx,
    )


def make_frozen(
    unet: Optional[UNet2DConditionModel], vae: Optional[AutoencoderKL],
    text_encoder: Optional[TextEncoder], schedule: NoiseSchedule,
    null_input_ids: Optional[Int[Array, "*n seq"]] = None,
    null_embedding: Optional[TextConditioning] = None,
) -> Frozen:
    """`Frozen`, computing the empty prompt's embedding from `null_input_ids` when it is
    not given."""
    if null_embedding is None:
        if text_encoder is None or null_input_ids is None:
            raise ValueError("make_frozen needs null_embedding, or a text encoder and null_input_ids")
        null_embedding = eqx.filter_jit(text_encoder)(null_input_ids)
    return Frozen(unet, vae, text_encoder, schedule, jax.tree.map(jnp.asarray, null_embedding))
