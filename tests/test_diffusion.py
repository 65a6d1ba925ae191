"""The diffusion math against direct numpy transcriptions of codi-algorithm.md, and the
schedules / DDIM sampler against diffusers."""

import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from codi_eqx.diffusion import (
    NoiseSchedule,
    add_noise,
    betas_from_config,
    c_out,
    c_skip,
    canonical_prediction_type,
    classifier_free_guidance,
    codi_sampling_timesteps,
    consistency_output,
    ddim_previous_timesteps,
    ddim_step,
    ddim_timesteps,
    distill_timestep,
    distill_timesteps,
    from_x_eps,
    resolve_prediction_type,
    to_x_eps,
)

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SCHEDULE_CONFIGS = {
    "scaled_linear": SD_CONFIG,
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "short_T": {**SD_CONFIG, "num_train_timesteps": 200},
    "zero_snr": {**SD_CONFIG, "rescale_betas_zero_snr": True},
    "trained_betas": {"trained_betas": np.linspace(1e-4, 2e-2, 50).tolist(),
                      "num_train_timesteps": 50},
}


# --- direct numpy transcriptions of codi-algorithm.md -------------------------------------------


def np_to_x_eps(F, z, a, s, pt):
    if pt == "epsilon":
        return (z - s * F) / a, F
    if pt == "v_prediction":
        return a * z - s * F, a * F + s * z
    return F, (z - a * F) / s


def np_c_skip(t, sd=0.5, tau=10.0):
    return sd**2 / ((tau * t) ** 2 + sd**2)


def np_c_out(t, sd=0.5, tau=10.0):
    return (tau * t) / np.sqrt((tau * t) ** 2 + sd**2)


def np_sampling_grid(T, N, steps):
    k = T // N
    grid = [i * k for i in range(N - 1, -1, -1)]
    r = math.ceil(N / steps)
    ts = grid[::r]
    if len(ts) < steps:
        ts = grid[:: N // steps][:steps]
    return ts


@pytest.fixture(scope="module")
def sd_schedule():
    return NoiseSchedule.from_config(SD_CONFIG)


def _rng(seed=0):
    return np.random.default_rng(seed)


# --- schedule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULE_CONFIGS))
def test_schedule_matches_diffusers(name):
    cfg = SCHEDULE_CONFIGS[name]
    ref = DDPMScheduler(**cfg)
    if name != "zero_snr":  # diffusers re-derives those betas from float32 ratios (~1e-4 off)
        np.testing.assert_allclose(betas_from_config(cfg), ref.betas.numpy(), rtol=1e-6, atol=1e-9)
    sched = NoiseSchedule.from_config(cfg)
    assert sched.alphas_cumprod.dtype == jnp.float32
    assert sched.num_train_timesteps == ref.config.num_train_timesteps
    assert sched.prediction_type == "epsilon"
    # rtol 1e-6, plus the float32 rounding of diffusers' own betas / cumprod where abar is tiny
    # (the cosine schedule ends with betas at the 0.999 cap).
    np.testing.assert_allclose(
        np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-6
    )


def test_schedule_config_fields():
    cfg = {**SD_CONFIG, "prediction_type": "v_prediction", "set_alpha_to_one": False}
    sched = NoiseSchedule.from_config(cfg)
    assert sched.prediction_type == "v_prediction"
    assert sched.final_alpha_cumprod == sched.alphas_cumprod[0]
    assert NoiseSchedule.from_config(SD_CONFIG).final_alpha_cumprod == 1.0
    accepted = "'scaled_linear'.*'linear'.*'squaredcos_cap_v2'"
    with pytest.raises(ValueError, match="'sigmoid'.*" + accepted):
        NoiseSchedule.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="trained_betas has 3 .* num_train_timesteps 1000"):
        NoiseSchedule.from_config({"trained_betas": [0.1, 0.2, 0.3], "num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="'x0'.*'epsilon'.*'v_prediction'.*'sample'"):
        NoiseSchedule.from_config({**SD_CONFIG, "prediction_type": "x0"})


def test_alpha_sigma_snr(sd_schedule):
    abar = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    t = np.array([[0, 1, 17], [500, 998, 999]], np.int32)
    alpha, sigma, snr = sd_schedule.alpha(t), sd_schedule.sigma(t), sd_schedule.snr(t)
    for v in (alpha, sigma, snr):
        assert v.shape == t.shape and v.dtype == jnp.float32
    np.testing.assert_allclose(alpha, np.sqrt(abar[t]), rtol=1e-6)
    # The formulas on the stored float32 abar; `1 - abar` loses ~1e-5 relative near t = 0.
    abar32 = np.asarray(sd_schedule.alphas_cumprod, np.float64)
    np.testing.assert_allclose(sigma, np.sqrt(1 - abar32[t]), rtol=1e-6)
    np.testing.assert_allclose(snr, abar32[t] / (1 - abar32[t]), rtol=1e-5)
    np.testing.assert_allclose(sigma, np.sqrt(1 - abar[t]), rtol=5e-5)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
    assert sd_schedule.alpha(3).shape == ()
    # Jittable, with the schedule as an argument.
    jitted = eqx.filter_jit(lambda s, t: s.alpha(t))(sd_schedule, jnp.asarray(t))
    np.testing.assert_array_equal(jitted, alpha)


# --- parameterisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("pt", PREDICTION_TYPES)
def test_to_x_eps_matches_spec(pt, sd_schedule):
    rng = _rng(1)
    t = np.array([10, 300, 900], np.int32)
    a = np.asarray(sd_schedule.alpha(t))
    s = np.asarray(sd_schedule.sigma(t))
    F = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    z = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    want_x, want_e = np_to_x_eps(F, z, a[:, None, None, None], s[:, None, None, None], pt)
    # Batched, with per-example scalings of shape (B,).
    x, e = to_x_eps(jnp.asarray(F), jnp.asarray(z), jnp.asarray(a), jnp.asarray(s), pt)
    np.testing.assert_allclose(x, want_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e, want_e, rtol=1e-5, atol=1e-6)
    # One example at a time under vmap, with scalar scalings.
    fn = jax.vmap(lambda F, z, a, s: to_x_eps(F, z, a, s, pt))
    x1, e1 = fn(jnp.asarray(F), jnp.asarray(z), jnp.asarray(a), jnp.asarray(s))
    np.testing.assert_allclose(x1, x, rtol=1e-6)
    np.testing.assert_allclose(e1, e, rtol=1e-6)


@pytest.mark.parametrize("pt", PREDICTION_TYPES)
def test_round_trips(pt, sd_schedule):
    rng = _rng(2)
    t = jnp.asarray([0, 250, 700], jnp.int32)
    a, s = sd_schedule.alpha(t), sd_schedule.sigma(t)
    x = jnp.asarray(rng.standard_normal((3, 4, 8, 8)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((3, 4, 8, 8)), jnp.float32)
    z = add_noise(x, eps, a, s)
    np.testing.assert_allclose(
        z, np.asarray(a)[:, None, None, None] * x + np.asarray(s)[:, None, None, None] * eps,
        rtol=1e-6, atol=1e-7,
    )
    F = from_x_eps(x, eps, a, s, pt)
    x2, eps2 = to_x_eps(F, z, a, s, pt)
    np.testing.assert_allclose(x2, x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(eps2, eps, rtol=1e-4, atol=1e-4)
    # Through every other parameterisation and back: eps <-> x <-> v.
    for other in PREDICTION_TYPES:
        G = from_x_eps(x2, eps2, a, s, other)
        x3, eps3 = to_x_eps(G, z, a, s, other)
        np.testing.assert_allclose(from_x_eps(x3, eps3, a, s, pt), F, rtol=1e-4, atol=1e-4)
    if pt == "v_prediction":
        np.testing.assert_allclose(
            F, np.asarray(a)[:, None, None, None] * eps - np.asarray(s)[:, None, None, None] * x,
            rtol=1e-6, atol=1e-6,
        )


def test_unknown_prediction_type():
    z = jnp.zeros((4, 2, 2), jnp.float32)
    with pytest.raises(ValueError, match="'vprediction'.*'epsilon'.*'v_prediction'.*'sample'"):
        to_x_eps(z, z, 1.0, 0.0, "vprediction")
    with pytest.raises(ValueError, match="'eps'"):
        from_x_eps(z, z, 1.0, 0.0, "eps")


def test_resolve_prediction_type():
    assert resolve_prediction_type("epsilon") == "epsilon"
    for alias, canonical in [
        ("nprediction", "epsilon"), ("vprediction", "v_prediction"), ("xprediction", "sample"),
        ("epsilon", "epsilon"), ("v_prediction", "v_prediction"), ("sample", "sample"),
    ]:
        assert canonical_prediction_type(alias) == canonical
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_prediction_type("v_prediction", "vprediction") == "v_prediction"
        assert resolve_prediction_type("epsilon", "nprediction") == "epsilon"
    # The original README's combination: SD 1.5 (epsilon) with a v-prediction flag.
    with pytest.warns(UserWarning, match="'vprediction'.*'epsilon'") as rec:
        assert resolve_prediction_type("epsilon", "vprediction") == "epsilon"
    assert len(rec) == 1
    with pytest.warns(UserWarning, match="'sample'.*'v_prediction'"):
        assert resolve_prediction_type("v_prediction", "sample") == "v_prediction"
    with pytest.warns(UserWarning):
        assert resolve_prediction_type("epsilon", "vprediction", force=True) == "v_prediction"
    with pytest.raises(ValueError, match="'v'.*'xprediction'"):
        resolve_prediction_type("epsilon", "v")


# --- consistency scalings ------------------------------------------------------------------------


def test_boundary_condition():
    assert c_skip(0) == 1.0 and c_out(0) == 0.0
    assert c_skip(jnp.int32(0), 0.3, 7) == 1.0 and c_out(jnp.int32(0), 0.3, 7) == 0.0
    rng = _rng(3)
    z = jnp.asarray(rng.standard_normal((4, 8, 8)), jnp.float32)
    x_hat = jnp.asarray(rng.standard_normal((4, 8, 8)), jnp.float32)
    np.testing.assert_array_equal(consistency_output(z, x_hat, jnp.int32(0)), z)
    np.testing.assert_array_equal(consistency_output(z, x_hat, 0), z)


@pytest.mark.parametrize("sd,tau", [(0.5, 10.0), (0.3, 1.0)])
def test_consistency_scalings_match_spec(sd, tau):
    t = np.array([0, 1, 20, 500, 999], np.int32)
    cs, co = c_skip(jnp.asarray(t), sd, tau), c_out(jnp.asarray(t), sd, tau)
    assert cs.dtype == co.dtype == jnp.float32 and cs.shape == t.shape
    np.testing.assert_allclose(cs, np_c_skip(t.astype(np.float64), sd, tau), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(co, np_c_out(t.astype(np.float64), sd, tau), rtol=1e-6)
    rng = _rng(4)
    z = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    x_hat = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    want = (np_c_skip(t, sd, tau)[:, None, None, None] * z
            + np_c_out(t, sd, tau)[:, None, None, None] * x_hat)
    got = consistency_output(jnp.asarray(z), jnp.asarray(x_hat), jnp.asarray(t), sd, tau)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got1 = jax.vmap(lambda z, x, t: consistency_output(z, x, t, sd, tau))(
        jnp.asarray(z), jnp.asarray(x_hat), jnp.asarray(t)
    )
    np.testing.assert_allclose(got1, got, rtol=1e-6)


# --- discretisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("T,N", [(1000, 50), (1000, 20), (1000, 1), (1000, 1000), (999, 7)])
def test_distill_timesteps(T, N):
    k = T // N
    key = jax.random.key(0)
    t, s = distill_timesteps(key, 512, T, N)
    assert t.shape == s.shape == (512,) and t.dtype == s.dtype == jnp.int32
    t, s = np.asarray(t), np.asarray(s)
    n = t // k
    assert np.all(t % k == 0) and np.all(n >= 0) and np.all(n <= N - 1)
    np.testing.assert_array_equal(s, np.maximum(n - 1, 0) * k)
    if 1 < N <= 50:  # 512 draws cover a small grid
        assert set(n.tolist()) == set(range(N))
    # Per example: example i uses the i-th split key.
    keys = jax.random.split(key, 512)
    for i in (0, 7, 511):
        ti, si = distill_timestep(keys[i], T, N)
        assert ti.shape == () and ti.dtype == jnp.int32
        assert (int(ti), int(si)) == (t[i], s[i])
    ts, ss = distill_timesteps(key, 64, T, N, shared=True)
    assert ts.shape == (64,) and ts.dtype == jnp.int32
    assert np.all(np.asarray(ts) == ts[0]) and np.all(np.asarray(ss) == ss[0])
    assert (int(ts[0]), int(ss[0])) == tuple(int(v) for v in distill_timestep(key, T, N))


def test_distill_timesteps_validation():
    with pytest.raises(ValueError, match="distill_learning_steps"):
        distill_timestep(jax.random.key(0), 1000, 0)
    with pytest.raises(ValueError, match="distill_learning_steps"):
        distill_timesteps(jax.random.key(0), 4, 10, 11)


def test_codi_sampling_timesteps():
    assert codi_sampling_timesteps(1000, 50, 4) == [980, 720, 460, 200]
    assert codi_sampling_timesteps(1000, 50, 1) == [980]
    assert codi_sampling_timesteps(1000, 20, 8) == [950, 850, 750, 650, 550, 450, 350, 250]
    for T, N in [(1000, 50), (1000, 20), (1000, 7), (500, 13), (1000, 1)]:
        for steps in range(1, N + 1):
            got = codi_sampling_timesteps(T, N, steps)
            assert got == np_sampling_grid(T, N, steps), (T, N, steps)
            assert len(got) == steps and all(type(v) is int for v in got)
            assert got == sorted(got, reverse=True) and len(set(got)) == steps
    with pytest.raises(ValueError, match="steps"):
        codi_sampling_timesteps(1000, 50, 0)
    with pytest.raises(ValueError, match="steps"):
        codi_sampling_timesteps(1000, 20, 21)


# --- DDIM ---------------------------------------------------------------------------------------


DDIM_CONFIGS = {
    "leading_offset": {**SD_CONFIG, "timestep_spacing": "leading", "steps_offset": 1,
                       "set_alpha_to_one": False},
    "trailing": {**SD_CONFIG, "timestep_spacing": "trailing", "set_alpha_to_one": True},
    "linspace": {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"},
}


@pytest.mark.parametrize("name", list(DDIM_CONFIGS))
def test_ddim_timesteps_match_diffusers(name):
    cfg = DDIM_CONFIGS[name]
    ref = DDIMScheduler(**cfg)
    for steps in (1, 3, 10, 25, 50, 999, 1000):
        ref.set_timesteps(steps)
        if ref.timesteps.max() >= ref.config.num_train_timesteps:
            # diffusers' step would index alphas_cumprod[T] there: ours refuses up front
            with pytest.raises(ValueError, match="outside"):
                ddim_timesteps(steps, cfg)
            continue
        got = ddim_timesteps(steps, cfg)
        assert got.dtype == np.int32 and got.shape == (steps,)
        np.testing.assert_array_equal(got, ref.timesteps.numpy())
    with pytest.raises(ValueError, match="timestep_spacing"):
        ddim_timesteps(10, {**cfg, "timestep_spacing": "uniform"})
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_timesteps(1001, cfg)


def _synthetic_model(z, t):
    """A fixed function of (z, t) standing in for the UNet (numpy, float32)."""
    return (0.7 * z * np.cos(t / 700.0) + 0.2 * np.sin(3.0 * z + t / 100.0)).astype(np.float32)


@pytest.mark.parametrize("pt", PREDICTION_TYPES)
@pytest.mark.parametrize("name", ["leading_offset", "trailing"])
def test_ddim_loop_matches_diffusers(pt, name):
    cfg = {**DDIM_CONFIGS[name], "prediction_type": pt, "clip_sample": False,
           "thresholding": False}
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(10)
    schedule = NoiseSchedule.from_config(cfg)
    timesteps = ddim_timesteps(10, cfg)
    prev = ddim_previous_timesteps(timesteps, schedule.num_train_timesteps)
    step = eqx.filter_jit(ddim_step)

    z0 = _rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
    z_ref, z = torch.from_numpy(z0.copy()), jnp.asarray(z0)
    for t, p in zip(timesteps, prev):
        out_ref = torch.from_numpy(_synthetic_model(z_ref.numpy(), int(t)))
        z_ref = ref.step(out_ref, int(t), z_ref, eta=0.0).prev_sample
        out = jnp.asarray(_synthetic_model(np.asarray(z), int(t)))
        z = step(out, jnp.int32(t), jnp.int32(p), z, schedule)
        assert z.dtype == jnp.float32
        scale = float(np.abs(z_ref.numpy()).max())
        np.testing.assert_allclose(z, z_ref.numpy(), rtol=1e-5, atol=1e-5 * scale)
    assert prev[-1] < 0  # the last step uses final_alpha_cumprod


def test_ddim_step_matches_spec(sd_schedule):
    rng = _rng(6)
    z = rng.standard_normal((4, 8, 8)).astype(np.float32)
    F = rng.standard_normal((4, 8, 8)).astype(np.float32)
    abar = np.asarray(sd_schedule.alphas_cumprod, np.float64)
    for t, p in [(981, 961), (21, 1), (1, -19)]:
        x, e = np_to_x_eps(F, z, np.sqrt(abar[t]), np.sqrt(1 - abar[t]), "epsilon")
        ap = abar[p] if p >= 0 else 1.0
        want = np.sqrt(ap) * x + np.sqrt(1 - ap) * e
        got = ddim_step(jnp.asarray(F), t, p, jnp.asarray(z), sd_schedule)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_classifier_free_guidance():
    rng = _rng(7)
    u = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)
    c = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)
    uj, cj = jnp.asarray(u), jnp.asarray(c)
    np.testing.assert_allclose(classifier_free_guidance(uj, cj, 7.5), u + 7.5 * (c - u), rtol=1e-6)
    np.testing.assert_allclose(classifier_free_guidance(uj, cj, 1), c, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(classifier_free_guidance(uj, cj, 0.0), u)
    w = np.array([2.0, 5.5, 14.0], np.float32)
    np.testing.assert_allclose(
        classifier_free_guidance(uj, cj, jnp.asarray(w)),
        u + w[:, None, None, None] * (c - u), rtol=1e-6, atol=1e-6,
    )
