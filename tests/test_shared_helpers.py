"""The small helpers that the loss, the samplers, the training loop and the toy pretraining
share, each against its direct formula: tree casting, VAE latent scaling, the posterior
sample, and the (guided) model output."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from helpers import UNET, VAE, perturb, tiny_models

from codi_eqx import distill
from codi_eqx._tree import cast_floating
from codi_eqx.models import (
    AutoencoderKL,
    ControlNetModel,
    DiagonalGaussianDistribution,
    scale_latents,
    unscale_latents,
)
from codi_eqx.sampling import guided_model_output, model_output


class _Leaves(eqx.Module):
    w: jax.Array
    steps: jax.Array
    name: str = eqx.field(static=True)

def test_cast_floating_casts_only_the_inexact_arrays():
    tree = _Leaves(jnp.ones((2,), jnp.float32), jnp.arange(3, dtype=jnp.int32), "x")
    out = cast_floating(tree, jnp.bfloat16)
    assert out.w.dtype == jnp.bfloat16 and out.steps.dtype == jnp.int32 and out.name == "x"
    back = cast_floating(out, jnp.float32)
    np.testing.assert_array_equal(np.asarray(back.w), np.asarray(tree.w))
    np.testing.assert_array_equal(np.asarray(back.steps), np.asarray(tree.steps))

def test_latent_scaling_formula_and_round_trip():
    z = jax.random.normal(jax.random.key(0), (4, 3, 3))
    for shift in (None, 0.1159):
        scaled = scale_latents(z, 0.18215, shift)
        want = (z - (0.0 if shift is None else shift)) * 0.18215
        np.testing.assert_array_equal(np.asarray(scaled), np.asarray(want))
        np.testing.assert_allclose(np.asarray(unscale_latents(scaled, 0.18215, shift)),
                                   np.asarray(z), rtol=1e-6, atol=1e-6)

def test_posterior_sample_from_noise_is_the_keyed_sample():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    mean = jax.random.normal(k1, (4, 2, 2))
    post = DiagonalGaussianDistribution(mean, jax.random.normal(k2, (4, 2, 2)))
    eps = jax.random.normal(k3, mean.shape, mean.dtype)
    np.testing.assert_array_equal(np.asarray(post.sample(k3)),
                                  np.asarray(post.sample_from_noise(eps)))
    np.testing.assert_array_equal(np.asarray(post.sample_from_noise(eps)),
                                  np.asarray(post.mean + jnp.exp(0.5 * post.logvar) * eps))

def test_vae_encode_and_decode_latents_scale_as_the_config_says():
    _, vae, _, _ = tiny_models()
    x = jax.random.uniform(jax.random.key(2), (3, 32, 32), minval=-1.0, maxval=1.0)
    noise = jax.random.normal(jax.random.key(3), (4, 4, 4))
    got = eqx.filter_jit(lambda v, x, n: v.encode_latents(x, n))(vae, x, noise)
    post = eqx.filter_jit(lambda v, x: v.encode(x))(vae, x)
    want = (post.mean + jnp.exp(0.5 * post.logvar) * noise) * vae.scaling_factor
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    image = eqx.filter_jit(lambda v, z: v.decode_latents(z))(vae, got)
    direct = eqx.filter_jit(lambda v, z: v.decode(z))(vae, got / vae.scaling_factor)
    np.testing.assert_allclose(np.asarray(image), np.asarray(direct), rtol=1e-6, atol=1e-6)

def test_vae_latent_methods_use_the_shift_factor():
    vae = AutoencoderKL(VAE, key=jax.random.key(0))
    shifted = AutoencoderKL(dataclasses.replace(VAE, shift_factor=0.25), key=jax.random.key(0))
    assert shifted.shift_factor == 0.25
    z = jax.random.normal(jax.random.key(4), (4, 2, 2))
    np.testing.assert_array_equal(np.asarray(shifted.scale_latents(z)),
                                  np.asarray((z - 0.25) * vae.scaling_factor))
    np.testing.assert_array_equal(np.asarray(shifted.unscale_latents(z)),
                                  np.asarray(z / vae.scaling_factor + 0.25))

def _models():
    unet, _, _, schedule = tiny_models()
    adapter = perturb(ControlNetModel.from_unet(unet, conditioning_channels=None,
                                                key=jax.random.key(5)), jax.random.key(6), 0.02)
    d = UNET.cross_attention_dim[0]
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    z = jax.random.normal(k1, (4, 4, 4))
    cond = 30.0 * jax.random.normal(k2, (8, d))
    uncond = 30.0 * jax.random.normal(k3, (8, d))
    return unet, adapter, schedule, z, cond, uncond

def test_guidance_at_one_is_the_conditional_output_and_the_loss_uses_the_same_output():
    unet, adapter, schedule, z, cond, uncond = _models()
    t = jnp.asarray(500, jnp.int32)
    guided = eqx.filter_jit(guided_model_output)
    f_c = eqx.filter_jit(model_output)(unet, adapter, z, t, cond)
    # None and a Python 1 are a single conditional pass, bit for bit.
    np.testing.assert_array_equal(np.asarray(guided(unet, adapter, z, t, cond, uncond, None, None)),
                                  np.asarray(f_c))
    np.testing.assert_array_equal(np.asarray(guided(unet, adapter, z, t, cond, uncond, None, 1.0)),
                                  np.asarray(f_c))
    # A traced w = 1 runs both passes: uncond + 1 (cond - uncond) = cond up to rounding.
    w = jnp.asarray(1.0, jnp.float32)
    np.testing.assert_allclose(np.asarray(guided(unet, adapter, z, t, cond, uncond, None, w)),
                               np.asarray(f_c), rtol=0, atol=2e-5)
    # The distillation loss's guided output is this one with the empty prompt as uncond.
    frozen = distill.make_frozen(unet, None, None, schedule, null_embedding=uncond)
    cfg = distill.DistillConfig(distill_type="unconditional")
    w = jnp.asarray(4.0, jnp.float32)
    from_loss = eqx.filter_jit(distill.guided_output)(
        distill.Trainable(adapter), frozen, z, t, cond, None, cfg, w)
    np.testing.assert_array_equal(
        np.asarray(from_loss), np.asarray(guided(unet, adapter, z, t, cond, uncond, None, w)))

def test_compute_dtype_casts_the_weights():
    unet, adapter, _, z, cond, _ = _models()
    t = jnp.asarray(300, jnp.int32)
    fn = eqx.filter_jit(model_output)
    with jax.numpy_dtype_promotion("standard"):
        got = fn(unet, adapter, z, t, cond, dtype=jnp.bfloat16)
        want = fn(cast_floating(unet, jnp.bfloat16), cast_floating(adapter, jnp.bfloat16), z, t,
                  cond)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_cached_latents_scale_with_the_batch_shift_factor_as_the_vae_path_does():
    from codi_eqx.distill._loss import example_latents

    _, _, _, schedule = tiny_models()
    vae = AutoencoderKL(dataclasses.replace(VAE, shift_factor=0.25), key=jax.random.key(0))
    frozen = distill.make_frozen(None, vae, None, schedule, null_embedding=jnp.zeros((8, 16)))
    x = jax.random.uniform(jax.random.key(2), (3, 32, 32), minval=-1.0, maxval=1.0)
    noise = jax.random.normal(jax.random.key(3), (4, 4, 4))
    post = eqx.filter_jit(lambda v, x: v.encode_posterior(x))(vae, x)
    direct = eqx.filter_jit(example_latents)(frozen, {"pixel_values": x}, noise)
    cached = example_latents(frozen, {
        "latent_mean": post.mean, "latent_logvar": post.logvar,
        "scaling_factor": jnp.float32(vae.scaling_factor), "shift_factor": jnp.float32(0.25),
    }, noise)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(direct), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(direct),
        np.asarray((post.mean + jnp.exp(0.5 * post.logvar) * noise - 0.25) * vae.scaling_factor),
        rtol=1e-6, atol=1e-6)
