"""SDXL through the whole pipeline, on a tiny random SDXL-like model built with diffusers:
loading (two text encoders and tokenizers), the text conditioning against diffusers'
`StableDiffusionXLPipeline.encode_prompt`, the UNet on it, and sampling against diffusers'
pipeline."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import make_tiny_sdxl_pipeline

from codi_eqx import load_pipeline
from codi_eqx.models import SDXLTextEncoders, sdxl_time_ids, unet_text_inputs, with_time_ids

PROMPTS = ["a red circle", "two blue squares on green"]


def _rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    import diffusers

    folder = make_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "model")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return folder, ref


def _encode(pipe, prompts):
    ids = pipe.tokenize(prompts)
    return eqx.filter_jit(jax.vmap(pipe.text_encoders))(ids)


def test_loads_both_encoders(sdxl):
    folder, _ = sdxl
    pipe = load_pipeline(folder)
    assert pipe.is_sdxl and pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
    assert isinstance(pipe.text_encoders, SDXLTextEncoders)
    assert pipe.tokenize(PROMPTS).shape == (2, 2, 16)
    assert pipe.vae.scaling_factor == pytest.approx(0.13025)
    assert pipe.default_resolution == 64  # sample_size 8 x the VAE's 8


def test_text_conditioning_matches_diffusers(sdxl):
    """Hidden states (both encoders' penultimate layers, concatenated) and the pooled
    projection, as diffusers' `encode_prompt`; the empty negative prompt's are zeros
    (`force_zeros_for_empty_prompt`), as diffusers' unconditional embedding."""
    folder, ref = sdxl
    pipe = load_pipeline(folder)
    with torch.no_grad():
        pe, npe, pooled, npooled = ref.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    ours = _encode(pipe, PROMPTS)
    err = max(_rel(ours["encoder_hidden_states"], pe.numpy()),
              _rel(ours["text_embeds"], pooled.numpy()))
    print(f"\n[parity] SDXL text conditioning fp32: {err:.2e}")
    assert err <= 1e-4
    empty = _encode(pipe, ["", ""])
    assert not np.any(np.asarray(empty["encoder_hidden_states"]))
    assert not np.any(np.asarray(empty["text_embeds"]))
    assert not npe.numpy().any() and not npooled.numpy().any()


def test_unet_on_the_pipeline_conditioning(sdxl):
    """The UNet's output on our encoding and time ids equals diffusers' UNet on diffusers'
    encoding and time ids (as its pipeline builds them for a 64x64 image)."""
    folder, ref = sdxl
    pipe = load_pipeline(folder)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([999, 250])
    with torch.no_grad():
        pe, _, pooled, _ = ref.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=False)
        time_ids = ref._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                         text_encoder_projection_dim=24)
        theirs = ref.unet(torch.from_numpy(z), torch.from_numpy(t), pe,
                          added_cond_kwargs={"text_embeds": pooled,
                                             "time_ids": time_ids.repeat(2, 1)}).sample.numpy()
    ids = sdxl_time_ids((64, 64), (0, 0), (64, 64))
    assert ids == tuple(float(v) for v in time_ids[0])
    text = with_time_ids(_encode(pipe, PROMPTS), jnp.broadcast_to(jnp.asarray(ids), (2, 6)))

    def one(zi, ti, te):
        context, added = unet_text_inputs(te)
        return pipe.unet(zi, ti, context, added_cond_kwargs=added)

    ours = eqx.filter_jit(jax.vmap(one))(jnp.asarray(z), jnp.asarray(t, jnp.int32), text)
    err = _rel(ours, theirs)
    print(f"\n[parity] SDXL UNet on the pipeline's conditioning fp32: {err:.2e}")
    assert err <= 1e-4


def test_ddim_sampling_matches_diffusers(sdxl):
    """`generate` with the teacher's DDIM and guidance against diffusers'
    StableDiffusionXLPipeline with its DDIMScheduler, from the same initial noise."""
    import diffusers

    from codi_eqx.sampling import generate

    folder, ref = sdxl
    pipe = load_pipeline(folder)
    ours = generate(pipe, None, PROMPTS[:1], sampler="ddim", steps=4, guidance_scale=3.0,
                    seed=0, height=64, width=64)
    z0 = jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), (4, 8, 8), jnp.float32)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    with torch.no_grad():
        theirs = ref(PROMPTS[:1], num_inference_steps=4, guidance_scale=3.0, height=64, width=64,
                     latents=torch.from_numpy(np.asarray(z0))[None], output_type="np").images
    theirs = np.round(np.clip(theirs, 0, 1) * 255)
    diff = np.abs(ours.astype(np.float64) - theirs)
    print(f"\n[parity] SDXL DDIM 4 steps: max |ours - theirs| = {diff.max():.0f} / 255")
    assert ours.shape == (1, 64, 64, 3)
    assert diff.max() <= 2
