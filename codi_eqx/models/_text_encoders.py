"""SDXL's two text encoders as one model, and the text conditioning the UNet takes.

SD 1.x / 2.x condition the UNet on one array, the text encoder's last hidden state
`(seq, d)`. SDXL conditions it on three things: the penultimate hidden states of both encoders
concatenated `(seq, d1 + d2)` (cross-attention), the second encoder's projected pooled output
`(p,)`, and six micro-conditioning time ids (original size, crop top-left, target size), the
latter two through the UNet's added embedding. Everywhere the project passes "the text
embedding" of an example (the loss, the samplers, the latent cache), SDXL's is a dict with the
keys `encoder_hidden_states`, `text_embeds` and (once the image size is known) `time_ids`;
`unet_text_inputs` splits either form into what the UNet's call takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._clip import CLIPTextModel, CLIPTextModelWithProjection

TextConditioning = Union[Float[Array, "*batch seq d"], Mapping[str, Float[Array, "..."]]]
"""One example's text conditioning: an array `(seq, d)` (SD 1.x / 2.x), or SDXL's dict of
`encoder_hidden_states` `(seq, d)`, `text_embeds` `(p,)` and `time_ids` `(6,)` (batched
alike, with a leading batch axis on every leaf)."""


def unet_text_inputs(text: TextConditioning) -> tuple[Float[Array, "*batch seq d"], Optional[dict]]:
    """`(encoder_hidden_states, added_cond_kwargs)` of a text conditioning: the array and
    None for SD 1.x / 2.x; for SDXL's dict its hidden states, and its pooled embedding and
    time ids as diffusers' `added_cond_kwargs`."""
    if not isinstance(text, Mapping):
        return text, None
    if "time_ids" not in text:
        raise ValueError("an SDXL text conditioning needs time_ids (original size, crop "
                         "top-left, target size) before it reaches the UNet")
    return text["encoder_hidden_states"], {"text_embeds": text["text_embeds"],
                                           "time_ids": text["time_ids"]}


def with_time_ids(text: TextConditioning, time_ids) -> TextConditioning:
    """SDXL's text conditioning with `time_ids` set (unchanged for SD 1.x / 2.x)."""
    if not isinstance(text, Mapping):
        return text
    return {**text, "time_ids": jnp.asarray(time_ids, jnp.float32)}


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int]) -> tuple[float, ...]:
    """SDXL's micro-conditioning: `(orig_h, orig_w, crop_top, crop_left, target_h,
    target_w)`, in pixels."""
    return tuple(float(v) for v in (*original_size, *crop_top_left, *target_size))


class SDXLTextEncoders(eqx.Module):
    """SDXL's `text_encoder` (CLIP ViT-L) and `text_encoder_2` (OpenCLIP bigG, with
    projection) as one model: token ids `(2, seq)`, one row per tokenizer, to
    `{"encoder_hidden_states": (seq, d1 + d2), "text_embeds": (p,)}`, as diffusers'
    `StableDiffusionXLPipeline.encode_prompt` computes them (no clip skip): each encoder's
    penultimate hidden state (before the final layer norm), concatenated, and the second
    encoder's projected pooled output.

    With `force_zeros_for_empty_prompt` (SDXL's pipelines set it), the empty prompt's
    conditioning is all zeros, as diffusers' unconditional embedding for guidance; so caption
    dropout in training (empty captions) and the empty negative prompt at sampling meet the
    same zeros. `empty_input_ids` are the empty prompt's ids from both tokenizers."""

    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    empty_input_ids: tuple[tuple[int, ...], tuple[int, ...]] = eqx.field(static=True)
    force_zeros_for_empty_prompt: bool = eqx.field(static=True, default=True)

    @property
    def dtype(self):
        return self.text_encoder.text_model.final_layer_norm.weight.dtype

    def __call__(self, input_ids: Int[Array, "2 seq"]) -> dict[str, Float[Array, "..."]]:
        ids_1, ids_2 = input_ids[0], input_ids[1]
        h1 = self.text_encoder.hidden_states(ids_1)[-2]
        states = self.text_encoder_2.hidden_states(ids_2)
        last = self.text_encoder_2.text_model.final_layer_norm(states[-1])
        pooled = self.text_encoder_2.project(last, ids_2)
        hidden = jnp.concatenate([h1.astype(jnp.float32), states[-2].astype(jnp.float32)], -1)
        pooled = pooled.astype(jnp.float32)
        if self.force_zeros_for_empty_prompt:
            empty = jnp.all(input_ids == jnp.asarray(self.empty_input_ids, input_ids.dtype))
            hidden = jnp.where(empty, 0.0, hidden)
            pooled = jnp.where(empty, 0.0, pooled)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}


TextEncoder = Union[CLIPTextModel, SDXLTextEncoders]
"""What maps one prompt's token ids to its text conditioning (`Pipeline.text_encoders`)."""
