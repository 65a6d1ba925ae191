"""CoDi distillation core: the loss against a direct transcription of codi-algorithm.md, the
train step's learning, data parallelism and accumulation equal to one device, one compile."""

import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_eqx import distill
from codi_eqx.models import ControlNetModel
from codi_eqx.parallel import make_mesh, replicate, shard_batch
from jax_tiny import UNET, perturb, tiny_models

T = 1000
LATENT = (4, 4, 4)
COND = (3, 32, 32)


def _batch(n=4, seed=0, with_pixels=False):
    rng = np.random.default_rng(seed)
    b = {
        "latent_mean": rng.standard_normal((n,) + LATENT).astype(np.float32),
        "latent_logvar": rng.uniform(-4, -1, (n,) + LATENT).astype(np.float32),
        "scaling_factor": np.full((n,), 0.18215, np.float32),
        "text_embeddings": rng.standard_normal((n, 8, UNET.cross_attention_dim[0])).astype(np.float32),
        "conditioning_pixel_values": rng.uniform(0, 1, (n,) + COND).astype(np.float32),
    }
    return b


def _setup(prediction_type="epsilon", conditioning_channels=3, perturbed=True, full=False, dtype=jnp.float32):
    unet, vae, text, sched = tiny_models(prediction_type=prediction_type)
    adapter = ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels, key=jax.random.key(1))
    if perturbed:
        adapter = perturb(adapter, jax.random.key(5), 0.02)
    null = jax.random.normal(jax.random.key(9), (8, UNET.cross_attention_dim[0]))
    cast = lambda m: jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, m)  # noqa: E731
    frozen = distill.make_frozen(None if full else cast(unet), None, None, sched, null_embedding=null)
    params = distill.Trainable(adapter, unet if full else None)
    return frozen, params


# ---------------------------------------------------------------- the loss, by hand


def _np_schedule():
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas).astype(np.float32)
    return lambda t: (np.sqrt(abar[t]), np.sqrt(1 - abar[t]))


def _convert(F, z, a, s, ptype):
    if ptype == "epsilon":
        return (z - s * F) / a, F
    if ptype == "v_prediction":
        return a * z - s * F, a * F + s * z
    return F, (z - a * F) / s


def _f(z, x, t, tau=10.0, sd=0.5):
    c_skip = sd**2 / ((tau * t) ** 2 + sd**2)
    c_out = (tau * t) / math.sqrt((tau * t) ** 2 + sd**2)
    return c_skip * z + c_out * x


@pytest.mark.parametrize(
    "ptype,options",
    [
        ("epsilon", {}),
        ("v_prediction", {"cfg_aware_distill": True, "snr_gamma": 5.0}),
        ("sample", {"distill_loss": "consistency_epsilon", "onestepode_cfg": True,
                    "x0_regularizer_weight": 0.5}),
    ],
)
def test_fresh_adapter_loss_matches_the_formulas(ptype, options):
    frozen, params = _setup(ptype, perturbed=False)
    cfg = distill.DistillConfig(prediction_type=ptype, **options)
    batch = jax.tree.map(jnp.asarray, _batch(2, seed=3))
    key, batch_key = jax.random.key(11), jax.random.key(12)

    @eqx.filter_jit
    def ours(params, frozen, batch):
        return jax.vmap(
            lambda ex, i: distill.example_loss(
                params, params, frozen, ex, jax.random.fold_in(key, i), batch_key, cfg, LATENT
            )
        )(batch, jnp.arange(2))

    losses, aux = ours(params, frozen, batch)

    # With the zero convolutions at zero, UNet + adapter is the UNet: evaluate the UNet alone.
    unet = eqx.filter_jit(lambda z, t, c: frozen.unet(z, t, c))
    alpha_sigma = _np_schedule()
    for i in range(2):
        ex = jax.tree.map(lambda a: a[i], batch)
        d = distill.draw_example(jax.random.fold_in(key, i), batch_key, LATENT, T, cfg)
        t, s, w = int(d.t), int(d.s), float(d.w)
        assert t % (T // 50) == 0 and s == max(t - T // 50, 0)
        mean, logvar = np.asarray(ex["latent_mean"]), np.asarray(ex["latent_logvar"])
        x0 = (mean + np.exp(0.5 * logvar) * np.asarray(d.posterior_noise)) * 0.18215
        eps = np.asarray(d.noise)
        a_t, s_t = alpha_sigma(t)
        a_s, s_s = alpha_sigma(s)
        z_t = a_t * x0 + s_t * eps
        c_txt, c_null = ex["text_embeddings"], frozen.null_embedding

        def F(z, tt, guided):
            cond = np.asarray(unet(jnp.asarray(z, jnp.float32), tt, c_txt))
            if not guided:
                return cond
            unc = np.asarray(unet(jnp.asarray(z, jnp.float32), tt, c_null))
            return unc + w * (cond - unc)

        x_hat, eps_hat = _convert(F(z_t, t, cfg.onestepode_cfg), z_t, a_t, s_t, ptype)
        z_s = a_s * x_hat + s_s * eps_hat
        xt, et = _convert(F(z_s, s, cfg.cfg_aware_distill), z_s, a_s, s_s, ptype)
        xo, eo = _convert(F(z_t, t, cfg.cfg_aware_distill), z_t, a_t, s_t, ptype)
        if cfg.distill_loss == "consistency_x":
            cons = np.mean((_f(z_t, xo, t) - _f(z_s, xt, s)) ** 2)
        else:
            cons = np.mean((_f(z_t, eo, t) - _f(z_s, et, s)) ** 2)
        if cfg.snr_gamma is not None:
            snr = a_t**2 / s_t**2
            cons = cons * min(snr, cfg.snr_gamma) / snr
        reg = np.mean((_f(z_t, xo, t) - x0) ** 2)
        expected = cons + cfg.x0_regularizer_weight * reg
        print(f"[loss] {ptype} example {i}: ours {float(losses[i]):.6e} by hand {expected:.6e}")
        np.testing.assert_allclose(float(aux["loss_consistency"][i]), cons, rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(float(losses[i]), expected, rtol=2e-4)


# (UNet + fresh adapter == UNet alone, bit for bit, is tests/test_unet.py::
# test_fresh_adapter_leaves_unet_unchanged; the formulas test above relies on it.)


# ---------------------------------------------------------------- the step


def _run(frozen, params, cfg, *, devices, accum=1, steps=2, lr=1e-3, batches=None, ema_decay=0.9):
    ocfg = distill.OptimConfig(learning_rate=lr, ema_decay=ema_decay)
    mesh = make_mesh(jax.devices()[:devices])
    state = replicate(distill.init_train_state(params, distill.make_optimizer(ocfg), key=jax.random.key(2)), mesh)
    frz = replicate(frozen, mesh)
    step = distill.make_train_step(cfg, mesh, gradient_accumulation_steps=accum, ema_decay=ema_decay,
                                   lr_fn=distill.lr_schedule(ocfg))
    history = []
    for i in range(steps):
        batch = batches[i % len(batches)]
        state, metrics = step(frz, state, shard_batch(batch, mesh))
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history, step


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def test_devices_and_accumulation_match_one_device():
    frozen, params = _setup()
    cfg = distill.DistillConfig(cfg_aware_distill=True)
    batches = [_batch(4, seed=0), _batch(4, seed=1)]
    ref_state, ref, ref_step = _run(frozen, params, cfg, devices=1, batches=batches)
    assert ref_step.num_traces() == 1, "the step recompiled on new data"
    for devices, accum in ((4, 1), (1, 2)):
        state, hist, step = _run(frozen, params, cfg, devices=devices, accum=accum, batches=batches)
        assert step.num_traces() == 1
        for k, bound in (("loss", 1e-5), ("grad_norm", 1e-5), ("loss_consistency", 1e-4)):
            for a, b in zip(hist, ref):
                assert abs(a[k] - b[k]) <= bound * abs(b[k]), (devices, accum, k, a[k], b[k])
        p = jax.tree.leaves(eqx.filter(state.params, eqx.is_inexact_array))
        q = jax.tree.leaves(eqx.filter(ref_state.params, eqx.is_inexact_array))
        # Norm-wise relative difference of all trained parameters (AdamW normalises each
        # gradient component, so components whose true gradient is at float-noise level move
        # by ~lr either way; the norm over the parameter vector is the meaningful measure).
        p, q = [np.asarray(x, np.float64) for x in p], [np.asarray(y, np.float64) for y in q]
        diff = math.sqrt(sum(float(np.sum(np.square(x - y))) for x, y in zip(p, q)))
        norm = math.sqrt(sum(float(np.sum(np.square(y))) for y in q))
        worst = diff / norm
        print(f"[parallel] devices={devices} accum={accum}: loss {hist[-1]['loss']:.6e} vs "
              f"{ref[-1]['loss']:.6e}, max relative parameter difference {worst:.2e}")
        assert worst <= 1e-5


def test_step_learns_on_a_fixed_batch():
    frozen, params = _setup()
    cfg = distill.DistillConfig()
    batch = _batch(2, seed=4)
    key, bkey = jax.random.key(21), jax.random.key(22)

    @eqx.filter_jit
    def evaluate(params, ema):
        losses, aux = jax.vmap(
            lambda ex, i: distill.example_loss(
                params, ema, frozen, ex, jax.random.fold_in(key, i % 2), bkey, cfg, LATENT
            )
        )(jax.tree.map(lambda a: jnp.tile(jnp.asarray(a), (8,) + (1,) * (a.ndim - 1)), batch),
          jnp.arange(16))
        return jnp.mean(losses), jnp.mean(aux["loss_consistency"])

    before = evaluate(params, params)
    state, hist, _ = _run(frozen, params, cfg, devices=1, steps=150, lr=3e-3, batches=[batch], ema_decay=0.5)
    after = evaluate(state.params, state.ema)
    print(f"[learn] loss {float(before[0]):.4e} -> {float(after[0]):.4e}; consistency "
          f"{float(before[1]):.4e} -> {float(after[1]):.4e}; first/last logged loss "
          f"{hist[0]['loss']:.4e} / {hist[-1]['loss']:.4e}")
    assert float(after[0]) < 0.8 * float(before[0])
    assert float(after[1]) < float(before[1])


@pytest.mark.parametrize(
    "options",
    [
        dict(onestepode="uncontrol", distill_loss="consistency_epsilon", snr_gamma=5.0),
        dict(onestepode_control_params="online", onestepode_cfg=True, onestepode_true_noise=True),
        dict(distill_type="unconditional", cfg_aware_distill=True, guidance_draw="per_batch_integer",
             shared_timestep=True),
        dict(full_codi=True, x0_regularizer_weight=0.0, distill_learning_steps=20,
             distill_timestep_scaling=5.0),
        dict(bf16=True, cfg_aware_distill=True, prediction_type="v_prediction"),
    ],
    ids=["uncontrol-eps-snr", "online-odecfg-truenoise", "unconditional-shared", "full-codi", "bf16"],
)
def test_option_combinations_run(options):
    options = dict(options)
    bf16 = options.pop("bf16", False)
    full = options.get("full_codi", False)
    channels = None if options.get("distill_type") == "unconditional" else 3
    frozen, params = _setup(
        options.get("prediction_type", "epsilon"), conditioning_channels=channels, full=full,
        dtype=jnp.bfloat16 if bf16 else jnp.float32,
    )
    cfg = distill.DistillConfig(**options)
    batch = _batch(2)
    if channels is None:
        del batch["conditioning_pixel_values"]
    # The backward pass of jax.nn.dot_product_attention promotes bf16 with f32 internally,
    # which strict promotion (on for the tests) refuses; the library runs in standard mode.
    with jax.numpy_dtype_promotion("standard" if bf16 else "strict"):
        state, hist, _ = _run(frozen, params, cfg, devices=1, batches=[batch], steps=1)
    m = hist[0]
    assert all(np.isfinite(v) for v in m.values()), m
    if full:
        assert state.params.unet is not None
    if bf16:
        assert frozen.unet.dtype == jnp.bfloat16
        assert state.params.adapter.conv_in.weight.dtype == jnp.float32


def test_bad_options_are_refused():
    with pytest.raises((ValueError, TypeError), match="onestepode"):
        distill.DistillConfig(onestepode="sometimes")
    with pytest.raises(ValueError, match="distill_guidance_min"):
        distill.DistillConfig(distill_guidance_min=5.0, distill_guidance_max=2.0)
    with pytest.raises((ValueError, TypeError), match="lr_scheduler"):
        distill.OptimConfig(lr_scheduler="exp")


def test_step_donates_the_state_only():
    """The state's buffers are recycled; the frozen weights and the batch stay valid, so a
    caller may reuse a batch (XLA would otherwise take a batch buffer for any output of the
    same shape, as it does for SD1.5-sized steps)."""
    frozen, params = _setup()
    ocfg = distill.OptimConfig()
    mesh = make_mesh(jax.devices()[:1])
    state = replicate(distill.init_train_state(params, distill.make_optimizer(ocfg), key=jax.random.key(2)), mesh)
    step = distill.make_train_step(distill.DistillConfig(), mesh, lr_fn=distill.lr_schedule(ocfg))
    batch = shard_batch(_batch(4), mesh)
    with jax.numpy_dtype_promotion("standard"):
        text = step.lower(replicate(frozen, mesh), state, batch).as_text()
    [main] = [line for line in text.splitlines() if "func.func public @main" in line]
    args = re.findall(r"%arg\d+: [^%]*", main)
    donated = [a for a in args if "buffer_donor" in a or "aliasing_output" in a]
    n_state = len([x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)])
    assert len(donated) == n_state
    batch_args = [a for a in args if '"data"' in a]  # the inputs split over the mesh
    assert len(batch_args) == len(batch)
    assert not any(a in donated for a in batch_args), "a batch input is donated"


@pytest.mark.parametrize("guided", [False, True])
def test_teacher_pass_shared_with_online_equals_separate(guided):
    # With --onestepode_control_params online the teacher's pass is the online pass without
    # gradient; the step computes it once. Loss and gradient equal the two-pass computation.
    frozen, params = _setup()
    ema = perturb(params, jax.random.key(11), 0.01)  # distinct online and EMA parameters
    cfg = distill.DistillConfig(onestepode_control_params="online", cfg_aware_distill=guided,
                                onestepode_cfg=guided)
    assert distill.teacher_is_online(cfg)
    assert not distill.teacher_is_online(distill.DistillConfig())
    batch = {k: v[:2] for k, v in _batch(2, seed=4).items()}
    key, batch_key = jax.random.key(3), jax.random.key(4)

    def total(p, share):
        losses, _ = jax.vmap(lambda ex, i: distill.example_loss(
            p, ema, frozen, ex, jax.random.fold_in(key, i), batch_key, cfg, LATENT,
            share_passes=share))(batch, jnp.arange(2))
        return jnp.sum(losses)

    shared = eqx.filter_jit(eqx.filter_value_and_grad(lambda p: total(p, True)))(params)
    separate = eqx.filter_jit(eqx.filter_value_and_grad(lambda p: total(p, False)))(params)
    np.testing.assert_allclose(float(shared[0]), float(separate[0]), rtol=1e-6)
    # Per leaf, norm-wise: XLA fuses the two programs differently (float rounding).
    for a, b in zip(jax.tree.leaves(shared[1]), jax.tree.leaves(separate[1])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-12
