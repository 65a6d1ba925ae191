"""`--objective controlnet`: the plain diffusion loss of UNet + adapter against a direct
transcription, its gradient, the options it refuses, and a 2-step `codi train` run whose
adapter records its settings and whose validation images are DDIM samples."""

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    LATENT,
    T,
    distill_batch,
    distill_setup,
    invoke,
    make_seed_folder,
    make_tiny_pipeline,
    np_schedule,
    rows,
    run_train_steps,
    why,
)

from codi_eqx import AdapterSettings, adapter_settings, distill
from codi_eqx.train import TrainConfig, TrainConfigError

CN = dict(objective="controlnet")


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_diffusion_loss_matches_the_formula(ptype):
    frozen, params = distill_setup(ptype)  # perturbed adapter: its residuals matter
    cfg = distill.DistillConfig(prediction_type=ptype, **CN)
    batch = jax.tree.map(jnp.asarray, distill_batch(2, seed=5))
    key, batch_key = jax.random.key(31), jax.random.key(32)

    @eqx.filter_jit
    def ours(params, frozen, batch):
        return jax.vmap(lambda ex, i: distill.example_loss(
            params, params, frozen, ex, jax.random.fold_in(key, i), batch_key, cfg, LATENT,
        ))(batch, jnp.arange(2))

    losses, aux = ours(params, frozen, batch)
    assert set(aux) == {"timestep"}

    @eqx.filter_jit
    def F(adapter, unet, z, t, text, cond):  # UNet + adapter, called directly
        down, mid = adapter(z, t, text, cond)
        return unet(z, t, text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid)

    alpha_sigma = np_schedule()
    ts = []
    for i in range(2):
        ex = jax.tree.map(lambda a: a[i], batch)
        d = distill.draw_example(jax.random.fold_in(key, i), batch_key, LATENT, T, cfg)
        t = int(d.t)
        ts.append(t)
        assert 0 <= t < T and float(aux["timestep"][i]) == t
        x0 = (np.asarray(ex["latent_mean"]) + np.exp(0.5 * np.asarray(ex["latent_logvar"]))
              * np.asarray(d.posterior_noise)) * 0.18215
        eps = np.asarray(d.noise)
        a, s = alpha_sigma(t)
        z = a * x0 + s * eps
        target = eps if ptype == "epsilon" else a * eps - s * x0
        f = np.asarray(F(params.adapter, frozen.unet, jnp.asarray(z, jnp.float32), jnp.int32(t),
                         ex["text_embeddings"], ex["conditioning_pixel_values"]))
        expected = np.mean((f - target) ** 2)
        print(f"[controlnet loss] {ptype} example {i} (t={t}): ours {float(losses[i]):.6e} "
              f"by hand {expected:.6e}")
        np.testing.assert_allclose(float(losses[i]), expected, rtol=2e-4)
    # t is drawn in [0, T), not on CoDi's grid of N = 50 points.
    assert any(t % (T // 50) for t in ts) or ts[0] != ts[1]


@pytest.mark.slow
def test_gradient_reaches_the_adapter_only_and_the_step_keeps_the_ema():
    frozen, params = distill_setup(perturbed=False)  # fresh adapter: zero convs at zero
    cfg = distill.DistillConfig(**CN)
    batch = jax.tree.map(jnp.asarray, distill_batch(2, seed=6))
    key, batch_key = jax.random.key(41), jax.random.key(42)

    def total(p):
        losses, _ = jax.vmap(lambda ex, i: distill.example_loss(
            p, p, frozen, ex, jax.random.fold_in(key, i), batch_key, cfg, LATENT,
        ))(batch, jnp.arange(2))
        return jnp.mean(losses)

    # What is differentiated (the trained parameters) holds the adapter and no UNet: the
    # frozen UNet is read from `Frozen` and gets no gradient.
    grads = eqx.filter_jit(eqx.filter_grad(total))(params)
    assert params.unet is None and grads.unet is None
    assert float(jnp.abs(grads.adapter.controlnet_mid_block.weight).max()) > 0, \
        "no gradient reaches the adapter's zero convolutions"

    state, hist, _ = run_train_steps(frozen, params, cfg, devices=1, steps=1, batches=[distill_batch(2, seed=6)],
                          ema_decay=0.5)
    assert set(hist[0]) == {"loss", "timestep", "grad_norm", "lr"}
    assert np.isfinite(hist[0]["loss"]) and hist[0]["grad_norm"] > 0
    assert state.params.unet is None
    new = np.asarray(state.params.adapter.controlnet_mid_block.weight)
    ema = np.asarray(state.ema.adapter.controlnet_mid_block.weight)
    assert np.abs(new).max() > 0
    np.testing.assert_allclose(ema, 0.5 * new, rtol=1e-6, atol=1e-12)  # EMA from zero


def test_codi_options_are_refused_with_controlnet():
    for name, value in (("full_codi", True), ("cfg_aware_distill", True),
                        ("onestepode_cfg", True), ("distill_loss", "consistency_epsilon"),
                        ("snr_gamma", 5.0)):
        with pytest.raises(ValueError, match=f"{name}=.*objective='codi' only"):
            distill.DistillConfig(**CN, **{name: value})
        with pytest.raises(TrainConfigError, match=name):
            TrainConfig(pretrained_model_name_or_path="m", **CN, **{name: value})
    # (TypeError: the tests' runtime type checks see the Literal first.)
    with pytest.raises((TrainConfigError, TypeError), match="objective"):
        TrainConfig(pretrained_model_name_or_path="m", objective="diffusion")
    # The options that apply to both are accepted.
    TrainConfig(pretrained_model_name_or_path="m", **CN, distill_type="unconditional",
                onestepode_sample_eps="v_prediction", force_prediction_type=True)


@pytest.mark.slow
def test_cli_controlnet_run_writes_an_adapter_with_its_settings(tmp_path, monkeypatch):
    import codi_eqx.sampling._generate as gen
    from weights_conversion import load_adapter

    model = make_tiny_pipeline(tmp_path / "model")
    data = make_seed_folder(tmp_path / "data", n=4)
    out = tmp_path / "out"
    resolved = []
    original = gen.sampling_options

    def recording(settings, *a, **kw):
        opts = original(settings, *a, **kw)
        resolved.append((settings, opts))
        return opts

    monkeypatch.setattr(gen, "sampling_options", recording)
    r = invoke("--pretrained_model_name_or_path", model, "--train_data_dir", data,
               "--output_dir", out, "--resolution", 32, "--max_train_steps", 2,
               "--checkpointing_steps", 2, "--objective=controlnet",
               "--distill_learning_steps", 20, "--distill_timestep_scaling", 5,
               "--onestepode_sample_eps", "v_prediction", "--force_prediction_type",
               "--validation_prompt", "a cat", "--validation_image",
               data / "processed_images" / "image_0.png", "--validation_steps", 2,
               "--num_validation_images", 1, "--validation_inference_steps", 2)
    assert r.exit_code == 0, why(r)
    assert load_adapter(out).controlnet_cond_embedding is not None
    m = rows(out)
    assert [x["step"] for x in m] == [1, 2]
    for x in m:
        assert {"loss", "grad_norm", "lr", "timestep", "examples_per_sec"} <= set(x)
        assert "loss_consistency" not in x and "loss_regularizer" not in x
        assert all(math.isfinite(x[k]) for k in ("loss", "grad_norm", "lr"))

    want = AdapterSettings(
        objective="controlnet", distill_learning_steps=20, distill_timestep_scaling=5.0,
        prediction_type="v_prediction", prediction_type_forced=True, cfg_aware_distill=False,
        distill_guidance_min=2.0, distill_guidance_max=14.0, distill_type="conditional",
        base_model=str(model.resolve()))
    config = json.loads((out / "checkpoints" / "checkpoint-2" / "config.json").read_text())
    for where in (out, out / "checkpoints" / "checkpoint-2" / "adapter"):
        got = adapter_settings(where)
        assert got == want, where
        for name in ("objective", "distill_learning_steps", "distill_timestep_scaling",
                     "cfg_aware_distill", "distill_guidance_min", "distill_guidance_max",
                     "distill_type"):
            assert getattr(got, name) == config[name], name
    # The validation grid: DDIM (the adapter is not a few-step model), with the forced
    # prediction type; the teacher's DDIM beside it.
    adapter_runs = [o for s, o in resolved if s is not None]
    assert adapter_runs and all(o.sampler == "ddim" and o.prediction_type == "v_prediction"
                                for o in adapter_runs)
    assert (out / "validation" / "step-0000002.png").is_file()
    assert (out / "validation" / "teacher-ddim.png").is_file()
