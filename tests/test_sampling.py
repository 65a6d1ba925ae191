"""The samplers: step grid, CoDi steps against the spec, DDIM against diffusers, guidance,
and `generate`'s determinism and batch independence."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SCHEDULER, make_tiny_pipeline

from codi_eqx import ControlNetModel, load_pipeline
from codi_eqx.diffusion import NoiseSchedule, codi_sampling_timesteps
from codi_eqx.sampling import (
    codi_sample,
    ddim_sample,
    generate,
    guided_model_output,
    sampler_timesteps,
)


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def pipe(pipe_folder):
    return load_pipeline(pipe_folder)


def _spec_grid(T, N, steps):
    k = T // N
    grid = [(N - 1 - i) * k for i in range(N)]
    ts = grid[:: math.ceil(N / steps)]
    if len(ts) < steps:
        ts = grid[:: N // steps][:steps]
    return ts


@pytest.mark.parametrize("N,steps", [(50, 4), (50, 1), (50, 2), (20, 8), (20, 3), (10, 10)])
def test_step_grid(N, steps):
    ts = codi_sampling_timesteps(1000, N, steps)
    assert ts == _spec_grid(1000, N, steps)
    assert len(ts) == steps and ts == sorted(ts, reverse=True)
    assert codi_sampling_timesteps(1000, 50, 4) == [980, 720, 460, 200]


def _fake_model(z, t):
    # Depends on both z and t, so that an off-by-one in either shows.
    return 0.7 * z + 0.05 * jnp.sin(t.astype(jnp.float32) / 37.0)


def _fake_model_np(z, t):
    return 0.7 * z + 0.05 * np.sin(t / 37.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("N,steps", [(50, 4), (20, 8), (50, 1)])
def test_codi_sampler_matches_spec(prediction_type, N, steps):
    config = {**SCHEDULER, "prediction_type": prediction_type}
    schedule = NoiseSchedule.from_config(config)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    tau, sd = 10.0, 0.5
    ts = codi_sampling_timesteps(1000, N, steps)
    z0 = np.asarray(jax.random.normal(jax.random.key(3), (4, 3, 2)), np.float64)

    # The spec, transcribed in numpy (float64).
    z, traj = z0, []
    for i, t in enumerate(ts):
        a, s = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
        f = _fake_model_np(z, t)
        if prediction_type == "epsilon":
            x_hat, e_hat = (z - s * f) / a, f
        elif prediction_type == "v_prediction":
            x_hat, e_hat = a * z - s * f, a * f + s * z
        else:
            x_hat, e_hat = f, (z - a * f) / s
        u = tau * t
        x = sd**2 / (u**2 + sd**2) * z + u / math.sqrt(u**2 + sd**2) * x_hat
        if i == len(ts) - 1:
            z = x
        else:
            nxt = ts[i + 1]
            z = math.sqrt(abar[nxt]) * x + math.sqrt(1 - abar[nxt]) * e_hat
        traj.append(z)

    # Concrete timesteps (a tuple is static under filter_jit) run the unrolled Python loop,
    # traced ones the lax.scan: both follow the spec.
    for timesteps in (tuple(ts), np.asarray(ts, np.int32)):
        x, got = eqx.filter_jit(codi_sample)(
            _fake_model, schedule, jnp.asarray(z0, jnp.float32), timesteps, timestep_scaling=tau,
        )
        np.testing.assert_allclose(np.asarray(got), np.stack(traj), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(got[-1]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("trailing", 7), ("linspace", 5)])
def test_ddim_matches_diffusers(prediction_type, spacing, steps):
    import torch
    from diffusers import DDIMScheduler

    config = {**SCHEDULER, "prediction_type": prediction_type, "timestep_spacing": spacing}
    schedule = NoiseSchedule.from_config(config)
    ref = DDIMScheduler.from_config({k: v for k, v in config.items() if k != "_class_name"})
    ref.set_timesteps(steps)
    ts, prev = sampler_timesteps("ddim", steps, schedule, config)
    assert list(ts) == [int(t) for t in ref.timesteps]

    z0 = np.asarray(jax.random.normal(jax.random.key(5), (4, 3, 2)), np.float32)
    sample, ref_traj = torch.from_numpy(z0.copy()), []
    for t in ref.timesteps:
        f = torch.from_numpy(_fake_model_np(sample.numpy().astype(np.float64), int(t))
                             .astype(np.float32))
        sample = ref.step(f, t, sample).prev_sample
        ref_traj.append(sample.numpy())

    for timesteps, previous in ((tuple(ts), tuple(prev)),  # unrolled loop, then lax.scan
                                (np.asarray(ts, np.int32), np.asarray(prev, np.int32))):
        _, traj = eqx.filter_jit(ddim_sample)(
            _fake_model, schedule, jnp.asarray(z0), timesteps, previous)
        for i, want in enumerate(ref_traj):
            np.testing.assert_allclose(np.asarray(traj[i]), want, rtol=1e-5, atol=1e-5,
                                       err_msg=f"step {i}")


@eqx.filter_jit
def _guided(unet, adapter, z, t, cond, uncond, control, w):
    return guided_model_output(unet, adapter, z, t, cond, uncond, control, w, 0.7)


def test_guidance(pipe):
    unet = pipe.unet
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
    adapter = ControlNetModel.from_unet(unet, conditioning_channels=3, key=k5)
    # Non-zero zero convs, so that the adapter and the control image matter.
    adapter = jax.tree.map(
        lambda a: a + 0.02 if eqx.is_inexact_array(a) else a, adapter)
    z = jax.random.normal(k1, (4, 8, 8))
    cond = 30.0 * jax.random.normal(k2, (16, 32))
    uncond = 30.0 * jax.random.normal(k3, (16, 32))
    control = jax.random.uniform(k4, (3, 64, 64))
    t = jnp.asarray(500, jnp.int32)
    # guidance_scale 1 (a Python float) is a single conditional pass.
    f_c = _guided(unet, adapter, z, t, cond, uncond, control, 1.0)
    f_u = _guided(unet, adapter, z, t, uncond, cond, control, 1.0)
    # The tiny random UNet barely listens to the text: the halves differ by ~4e-4.
    assert float(jnp.abs(f_c - f_u).max()) > 1e-4
    # The two-pass path: w = 1 -> conditional, w = 0 -> unconditional (order cond, uncond).
    # A large w amplifies the difference, so that a swapped order could not pass.
    for w, want, tol in [(1.0, f_c, 2e-5), (0.0, f_u, 2e-5),
                         (1000.0, f_u + 1000.0 * (f_c - f_u), 1e-2)]:
        got = _guided(unet, adapter, z, t, cond, uncond, control, jnp.asarray(w, jnp.float32))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=tol)
    swapped = f_c + 1000.0 * (f_u - f_c)
    assert float(jnp.abs(got - swapped).max()) > 0.1


@pytest.mark.slow
def test_generate_seed_and_batch_independence(pipe):
    three = generate(pipe, None, ["a red cube"], num_images_per_prompt=3, seed=7)
    assert three.shape == (3, 64, 64, 3) and three.dtype == np.uint8
    ones = generate(pipe, None, ["a red cube"], num_images_per_prompt=3, seed=7, batch_size=1)
    # Image i does not depend on the batch: XLA may block a batch-3 convolution differently
    # from a batch-1 one, so float rounding can move a pixel across a uint8 boundary (CI saw
    # one value of 36864 off by 1); anything more would mean the images interact.
    diff = np.abs(three.astype(int) - ones.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    again = generate(pipe, None, ["a red cube"], num_images_per_prompt=3, seed=7, batch_size=1)
    np.testing.assert_array_equal(ones, again)
    other = generate(pipe, None, ["a red cube"], num_images_per_prompt=3, seed=8, batch_size=1)
    assert np.abs(other.astype(int) - ones.astype(int)).max() > 0
    assert np.abs(ones[0].astype(int) - ones[1].astype(int)).max() > 0


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (simulated) devices")
def test_generate_sharded_equals_one_device(pipe):
    n = jax.device_count()
    sharded = generate(pipe, None, ["a red cube"], num_images_per_prompt=n, seed=7)
    single = generate(pipe, None, ["a red cube"], num_images_per_prompt=n, seed=7, batch_size=1)
    np.testing.assert_allclose(sharded.astype(int), single.astype(int), atol=1)


def test_generate_ddim_with_guidance(pipe, pipe_folder):
    """`generate`'s guided DDIM gives diffusers' StableDiffusionPipeline images (same model,
    scheduler and initial noise) up to uint8 rounding, and the guidance visibly matters."""
    import diffusers
    import torch
    import transformers

    prompts = ["a cat", "a dog"]
    calls = []
    images = generate(
        pipe, None, prompts, negative_prompt="blurry", sampler="ddim", steps=3,
        guidance_scale=5.0, batch_size=1, progress=lambda d, n: calls.append((d, n)),
    )
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert calls == [(1, 2), (2, 2)]

    folder = pipe_folder
    ref = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval(),
        text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        scheduler=diffusers.DDIMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    # generate's documented initial noise: image i from fold_in(key(seed), i), seed 0.
    z = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(0), i),
                                               (4, 8, 8), jnp.float32)) for i in range(2)])

    def reference(w):
        with torch.no_grad():
            return ref(prompt=prompts, negative_prompt=["blurry"] * 2, num_inference_steps=3,
                       guidance_scale=w, latents=torch.from_numpy(z), output_type="np",
                       height=64, width=64).images

    want = reference(5.0)
    levels = np.abs(images.astype(np.float64) - 255.0 * want).max()
    assert levels <= 1.0, f"{levels:.2f} uint8 levels from diffusers' guided DDIM"
    # Unguided, the images are far from these: a wrong guidance could not pass.
    assert np.abs(255.0 * reference(1.0) - images).max() > 20


def test_generate_rejects_bad_input(pipe):
    with pytest.raises(ValueError, match="steps"):
        generate(pipe, None, ["x"], steps=60)
    with pytest.raises(ValueError, match="adapter"):
        generate(pipe, None, ["x"], control_images=np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="divisible"):
        generate(pipe, None, ["x"], height=60, width=64)
