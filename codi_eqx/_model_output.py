"""The raw model output `F(z, t)`: the UNet, plus the adapter's residuals, with or without
classifier-free guidance. One definition, shared by the distillation loss
(`codi_eqx.distill`), the samplers and `generate` (`codi_eqx.sampling`).

Wherever the conditional and unconditional passes share one batch, the order is fixed:
conditional first, unconditional second (the original release concatenated in one order and
split in the other). The condition image goes to both halves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._tree import cast_floating
from .diffusion import classifier_free_guidance
from .models import ControlNetModel, TextConditioning, UNet2DConditionModel, unet_text_inputs

ScaleLike = Union[float, int, Float[Array, ""]]
TimestepArg = Union[int, Int[Array, ""], Float[Array, ""]]


def _cast_models(unet, adapter, dtype):
    if dtype is None:
        return unet, adapter
    return cast_floating(unet, dtype), None if adapter is None else cast_floating(adapter, dtype)


def model_output(
    unet: UNet2DConditionModel,
    adapter: Optional[ControlNetModel],
    z: Float[Array, "c h w"],
    t: TimestepArg,
    text_emb: TextConditioning,
    control_image: Optional[Float[Array, "3 H W"]] = None,
    conditioning_scale: ScaleLike = 1.0,
    *,
    dtype: Any = None,
    class_labels: Optional[ScaleLike] = None,
) -> Float[Array, "c h w"]:
    """The raw output `F(z, t)` of the UNet, with the adapter's residuals when there is one.

    **Arguments:**

    - `unet`: the UNet (frozen, or trained in full CoDi).
    - `adapter`: the adapter, or None for the UNet alone.
    - `z`: noisy latents `(C, h, w)` (float32; cast to the models' dtype for the call).
    - `t`: the integer timestep.
    - `text_emb`: text embeddings `(L, D)`, or SDXL's text conditioning (a dict with the
      pooled embedding and the time ids, `codi_eqx.models.TextConditioning`).
    - `control_image`: the condition image `(3, 8h, 8w)` in [0, 1], or None (an adapter
      without a condition encoder, or no adapter).
    - `conditioning_scale`: multiplies the adapter's residuals.
    - `dtype`: the compute dtype: the models' floating weights are cast to it first (float32
      masters computed in bfloat16); None computes in the weights' own dtypes.
    - `class_labels`: `guidance_label(w)` for a guidance-conditioned adapter, else None.

    **Returns:** `F`, shaped like `z`, float32.
    """
    unet, adapter = _cast_models(unet, adapter, dtype)
    context, added = unet_text_inputs(text_emb)
    down, mid = None, None
    if adapter is not None:
        down, mid = adapter(
            z.astype(adapter.dtype), t, context, control_image,
            conditioning_scale=conditioning_scale, added_cond_kwargs=added,
            class_labels=class_labels,
        )
    out = unet(
        z.astype(unet.dtype), t, context, added_cond_kwargs=added,
        down_block_additional_residuals=down, mid_block_additional_residual=mid,
    )
    return out.astype(jnp.float32)


def guided_model_output(
    unet: UNet2DConditionModel,
    adapter: Optional[ControlNetModel],
    z: Float[Array, "c h w"],
    t: TimestepArg,
    cond_emb: TextConditioning,
    uncond_emb: TextConditioning,
    control_image: Optional[Float[Array, "3 H W"]] = None,
    guidance_scale: Optional[ScaleLike] = 1.0,
    conditioning_scale: ScaleLike = 1.0,
    *,
    dtype: Any = None,
    class_labels: Optional[ScaleLike] = None,
) -> Float[Array, "c h w"]:
    """`F = F(uncond) + w * (F(cond) - F(uncond))` for one example
    (`codi_eqx.diffusion.classifier_free_guidance`).

    `guidance_scale` None, or a Python number equal to 1, runs the conditional pass alone
    (`uncond_emb` unused); any other value (or an array, traced or not) runs both passes as one
    batch of two, conditional first, the condition image given to both.

    **Arguments:** as `model_output`, with `cond_emb` / `uncond_emb` the prompt's and the
    negative (or empty) prompt's embeddings `(L, D)` and `guidance_scale` the weight `w`.
    SDXL's unconditional half takes the conditional half's time ids (the same image).

    **Returns:** the guided output, shaped like `z`, float32.
    """
    if guidance_scale is None or (
        isinstance(guidance_scale, (int, float)) and guidance_scale == 1
    ):
        unet, adapter = _cast_models(unet, adapter, dtype)
        return model_output(unet, adapter, z, t, cond_emb, control_image, conditioning_scale,
                            class_labels=class_labels)
    cond, uncond = conditional_and_unconditional_outputs(
        unet, adapter, z, t, cond_emb, uncond_emb, control_image, conditioning_scale,
        dtype=dtype, class_labels=class_labels)
    return classifier_free_guidance(uncond, cond, jnp.asarray(guidance_scale, jnp.float32))


def conditional_and_unconditional_outputs(
    unet: UNet2DConditionModel,
    adapter: Optional[ControlNetModel],
    z: Float[Array, "c h w"],
    t: TimestepArg,
    cond_emb: TextConditioning,
    uncond_emb: TextConditioning,
    control_image: Optional[Float[Array, "3 H W"]] = None,
    conditioning_scale: ScaleLike = 1.0,
    *,
    dtype: Any = None,
    class_labels: Optional[ScaleLike] = None,
) -> tuple[Float[Array, "c h w"], Float[Array, "c h w"]]:
    """`(F(cond), F(uncond))`: the two halves of classifier-free guidance, computed as one
    batch of two (conditional first), the condition image given to both. Arguments as
    `guided_model_output`."""
    unet, adapter = _cast_models(unet, adapter, dtype)
    if isinstance(cond_emb, Mapping):
        uncond_emb = {**uncond_emb, "time_ids": cond_emb["time_ids"]}
    embs = jax.tree.map(  # (cond, uncond)
        lambda c, u: jnp.stack([c, u.astype(c.dtype)]), cond_emb, uncond_emb)
    both = jax.vmap(
        lambda e: model_output(unet, adapter, z, t, e, control_image, conditioning_scale,
                               class_labels=class_labels)
    )(embs)
    return both[0], both[1]
