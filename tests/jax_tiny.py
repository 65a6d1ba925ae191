"""Tiny random models built directly in JAX (no PyTorch), for the training and sampling tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from codi_eqx.diffusion import NoiseSchedule
from codi_eqx.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionConfig,
    UNet2DConditionModel,
)

UNET = UNet2DConditionConfig.from_dict(dict(
    block_out_channels=[16, 32],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=16,
    norm_num_groups=8,
    sample_size=4,
))

VAE = AutoencoderKLConfig.from_dict(dict(
    block_out_channels=[8, 8, 8, 8],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
))

TEXT = CLIPTextConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, max_position_embeddings=8,
)

SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def perturb(model, key, scale: float = 0.05):
    """Add small noise to every inexact array (so that zero-initialised parts are not zero)."""
    leaves, treedef = jax.tree.flatten(model)
    keys = jax.random.split(key, len(leaves))
    out = [
        a + scale * jax.random.normal(k, a.shape, a.dtype)
        if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating) else a
        for a, k in zip(leaves, keys)
    ]
    return jax.tree.unflatten(treedef, out)


def tiny_models(seed: int = 0, prediction_type: str = "epsilon"):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    unet = UNet2DConditionModel(UNET, key=k1)
    vae = AutoencoderKL(VAE, key=k2)
    text = CLIPTextModel(TEXT, key=k3)
    schedule = NoiseSchedule.from_config({**SCHEDULER, "prediction_type": prediction_type})
    return unet, vae, text, schedule
