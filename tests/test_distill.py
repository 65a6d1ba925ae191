"""CoDi distillation core: the loss against a direct transcription of codi-algorithm.md, the
train step's learning, data parallelism and accumulation equal to one device, one compile."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    LATENT,
    UNET,
    T,
    distill_batch,
    distill_setup,
    np_schedule,
    perturb,
    run_train_steps,
    tiny_models,
)

from codi_eqx import distill
from codi_eqx.models import ControlNetModel
from codi_eqx.parallel import make_mesh, replicate, shard_batch

# ---------------------------------------------------------------- the loss, by hand


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
    frozen, params = distill_setup(ptype, perturbed=False)
    cfg = distill.DistillConfig(prediction_type=ptype, **options)
    batch = jax.tree.map(jnp.asarray, distill_batch(2, seed=3))
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
    # The timestep goes in as an array: a Python int is static under filter_jit (a compile
    # per timestep).
    unet = eqx.filter_jit(lambda z, t, c: frozen.unet(z, t, c))
    alpha_sigma = np_schedule()
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
            cond = np.asarray(unet(jnp.asarray(z, jnp.float32), jnp.int32(tt), c_txt))
            if not guided:
                return cond
            unc = np.asarray(unet(jnp.asarray(z, jnp.float32), jnp.int32(tt), c_null))
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


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.mark.slow
def test_devices_and_accumulation_match_one_device():
    frozen, params = distill_setup()
    cfg = distill.DistillConfig(cfg_aware_distill=True)
    batches = [distill_batch(4, seed=0), distill_batch(4, seed=1)]
    ref_state, ref, ref_step = run_train_steps(frozen, params, cfg, devices=1, batches=batches)
    assert ref_step.num_traces() == 1, "the step recompiled on new data"
    for devices, accum in ((4, 1), (1, 2)):
        state, hist, step = run_train_steps(frozen, params, cfg, devices=devices, accum=accum, batches=batches)
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


@pytest.mark.slow
def test_step_learns_on_a_fixed_batch():
    frozen, params = distill_setup()
    cfg = distill.DistillConfig()
    batch = distill_batch(2, seed=4)
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
    state, hist, _ = run_train_steps(frozen, params, cfg, devices=1, steps=150, lr=3e-3, batches=[batch], ema_decay=0.5)
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
    frozen, params = distill_setup(
        options.get("prediction_type", "epsilon"), conditioning_channels=channels, full=full,
        dtype=jnp.bfloat16 if bf16 else jnp.float32,
    )
    cfg = distill.DistillConfig(**options)
    batch = distill_batch(2)
    if channels is None:
        del batch["conditioning_pixel_values"]
    # The backward pass of jax.nn.dot_product_attention promotes bf16 with f32 internally,
    # which strict promotion (on for the tests) refuses; the library runs in standard mode.
    with jax.numpy_dtype_promotion("standard" if bf16 else "strict"):
        state, hist, _ = run_train_steps(frozen, params, cfg, devices=1, batches=[batch], steps=1)
    m = hist[0]
    assert all(np.isfinite(v) for v in m.values()), m
    if full:
        assert state.params.unet is not None
    if bf16:
        assert frozen.unet.dtype == jnp.bfloat16
        assert state.params.adapter.conv_in.weight.dtype == jnp.float32


# (The step donates the state only: tests/test_compiled_code.py, on the step it compiles.)


def test_bad_options_are_refused():
    with pytest.raises((ValueError, TypeError), match="onestepode"):
        distill.DistillConfig(onestepode="sometimes")
    with pytest.raises(ValueError, match="distill_guidance_min"):
        distill.DistillConfig(distill_guidance_min=5.0, distill_guidance_max=2.0)
    with pytest.raises((ValueError, TypeError), match="lr_scheduler"):
        distill.OptimConfig(lr_scheduler="exp")


@pytest.mark.parametrize("guided", [False, True])
def test_teacher_pass_shared_with_online_equals_separate(guided):
    # With --onestepode_control_params online the teacher's pass is the online pass without
    # gradient; the step computes it once. Loss and gradient equal the two-pass computation.
    frozen, params = distill_setup()
    ema = perturb(params, jax.random.key(11), 0.01)  # distinct online and EMA parameters
    cfg = distill.DistillConfig(onestepode_control_params="online", cfg_aware_distill=guided,
                                onestepode_cfg=guided)
    assert distill.teacher_is_online(cfg)
    assert not distill.teacher_is_online(distill.DistillConfig())
    batch = {k: v[:2] for k, v in distill_batch(2, seed=4).items()}
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


# ------------------------------------------- the loss with distinct parameters, by hand
#
# Online, EMA and teacher parameters all differ (zero convolutions non-zero), so the
# transcription below tells apart which model each pass uses: the original's bugs (a
# teacher with the adapter's initial parameters, a condition image not reaching the
# teacher, guidance halves swapped, the trained UNet as the full-CoDi `uncontrol` teacher)
# each move the loss (a blank condition image: the teacher's output) by far more than the
# tolerance.

RTOL = 2e-4
SENSITIVE = 10 * RTOL  # a wrong model must move the loss by at least this, relatively


def _cfg(**options) -> distill.DistillConfig:
    """The options with N = 5 (k = 200): a long teacher step, whose model shows in the loss."""
    return distill.DistillConfig(**{"distill_learning_steps": 5, **options})


class _Model(eqx.Module):
    """One model of the transcription: an adapter (None: the UNet alone) and a UNet;
    `blank_cond` feeds the adapter a black condition image instead of the example's."""

    adapter: object
    unet: object
    blank_cond: bool = eqx.field(static=True, default=False)
    label: object = None
    """`class_labels` for a guidance-conditioned adapter."""


class _Distinct(eqx.Module):
    """The models and the example of the distinct-parameter tests (see `distinct`)."""

    frozen: distill.Frozen
    pretrained: object
    fresh: dict
    pe: dict
    full: distill.Trainable
    full_ema: distill.Trainable
    examples: dict
    key: jax.Array
    batch_key: jax.Array


def _nonzero_adapter(adapter: ControlNetModel, key, scale: float = 0.05) -> ControlNetModel:
    """`adapter` perturbed, its zero convolutions and condition encoder's last convolution
    (zero at initialisation) made clearly non-zero, so that the adapter and the condition
    image visibly change F."""
    k1, k2, k3 = jax.random.split(key, 3)
    adapter = perturb(adapter, k1, scale)
    adapter = eqx.tree_at(lambda a: (a.controlnet_down_blocks, a.controlnet_mid_block), adapter,
                          replace_fn=lambda c: perturb(c, k2, 0.3))
    if adapter.controlnet_cond_embedding is not None:
        adapter = eqx.tree_at(lambda a: a.controlnet_cond_embedding.conv_out, adapter,
                              replace_fn=lambda c: perturb(c, k3, 0.3))
    return adapter


@pytest.fixture(scope="module")
def distinct() -> _Distinct:
    """The pretrained UNet (in `Frozen`), per distill_type a fresh adapter and distinct
    perturbed online / EMA adapters, full-CoDi online / EMA UNets, and one example; its key
    draws t >= 2 k (so that s > 0 and every pass shows in the loss)."""
    unet, _, _, sched = tiny_models()
    null = jax.random.normal(jax.random.key(9), (8, UNET.cross_attention_dim[0]))
    frozen = distill.make_frozen(unet, None, None, sched, null_embedding=null)
    fresh, pe = {}, {}
    for kind, channels in (("conditional", 3), ("unconditional", None)):
        a = ControlNetModel.from_unet(unet, conditioning_channels=channels, key=jax.random.key(1))
        fresh[kind] = a
        pe[kind] = (distill.Trainable(_nonzero_adapter(a, jax.random.key(5))),
                    distill.Trainable(_nonzero_adapter(a, jax.random.key(6))))
    online_a, ema_a = pe["conditional"][0].adapter, pe["conditional"][1].adapter
    full = distill.Trainable(online_a, perturb(unet, jax.random.key(7), 0.02))
    full_ema = distill.Trainable(ema_a, perturb(unet, jax.random.key(8), 0.02))
    ex = jax.tree.map(lambda a: jnp.asarray(a[0]), distill_batch(1, seed=3))
    cfg, batch_key = _cfg(), jax.random.key(12)
    key = next(k for k in (jax.random.key(100 + i) for i in range(100))
               if int(distill.draw_example(k, batch_key, LATENT, T, cfg).t) >= 2 * (T // 5))
    examples = {"conditional": ex,
                "unconditional": {k: v for k, v in ex.items() if k != "conditioning_pixel_values"}}
    return _Distinct(frozen, unet, fresh, pe, full, full_ema, examples, key, batch_key)


def _forward(model: _Model, z, t, text, cond) -> np.ndarray:
    """F(z, t) of `model` by direct calls of the modules (float64)."""
    z = jnp.asarray(z, jnp.float32)
    down = mid = None
    if model.adapter is not None:
        c = None if cond is None else (jnp.zeros_like(cond) if model.blank_cond else cond)
        down, mid = model.adapter(z, t, text, c, class_labels=model.label)
    out = model.unet(z, t, text, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid)
    return np.asarray(out, np.float64)


def _by_hand(cfg: distill.DistillConfig, ex: dict, d, null, teacher: _Model, target: _Model,
             online: _Model, pretrained: _Model = None) -> dict:
    """Steps 1-7 of codi-algorithm.md, each pass by `_forward` of the model the test names."""
    alpha_sigma = np_schedule()
    t, s, w = int(d.t), int(d.s), float(d.w)
    mean, logvar = np.asarray(ex["latent_mean"], np.float64), np.asarray(ex["latent_logvar"], np.float64)
    x0 = (mean + np.exp(0.5 * logvar) * np.asarray(d.posterior_noise)) * float(ex["scaling_factor"])
    eps = np.asarray(d.noise, np.float64)
    (a_t, s_t), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
    z_t = a_t * x0 + s_t * eps
    text = ex["text_embeddings"]
    cond = ex.get("conditioning_pixel_values") if cfg.distill_type == "conditional" else None

    def F(model, z, tt, guided):
        f_txt = _forward(model, z, tt, text, cond)
        if not guided:
            return f_txt
        f_null = _forward(model, z, tt, null, cond)
        return f_null + w * (f_txt - f_null)

    ptype, tau = cfg.prediction_type, cfg.distill_timestep_scaling
    x_hat, eps_hat = _convert(F(teacher, z_t, t, cfg.onestepode_cfg), z_t, a_t, s_t, ptype)
    reg_target = x0
    if cfg.regularizer_target == "guided":
        xc, _ = _convert(_forward(pretrained, z_t, t, text, None), z_t, a_t, s_t, ptype)
        xu, _ = _convert(_forward(pretrained, z_t, t, null, None), z_t, a_t, s_t, ptype)
        scale = a_t if cfg.regularizer_guidance_scaling == "alpha" else 1.0
        reg_target = x0 + (w - 1.0) * scale * (xc - xu)
    z_s = a_s * x_hat + s_s * (eps if cfg.onestepode_true_noise else eps_hat)
    xt, et = _convert(F(target, z_s, s, cfg.cfg_aware_distill), z_s, a_s, s_s, ptype)
    xo, eo = _convert(F(online, z_t, t, cfg.cfg_aware_distill), z_t, a_t, s_t, ptype)
    if cfg.distill_loss == "consistency_x":
        cons = np.mean((_f(z_t, xo, t, tau) - _f(z_s, xt, s, tau)) ** 2)
    else:
        cons = np.mean((_f(z_t, eo, t, tau) - _f(z_s, et, s, tau)) ** 2)
    if cfg.snr_gamma is not None:
        snr = a_t**2 / s_t**2
        cons = cons * min(snr, cfg.snr_gamma) / snr
    reg = np.mean((_f(z_t, xo, t, tau) - reg_target) ** 2)
    weight = cfg.x0_regularizer_weight
    if cfg.regularizer_snr_gamma is not None:
        weight *= min(a_t**2 / s_t**2, cfg.regularizer_snr_gamma) / cfg.regularizer_snr_gamma
    return {"loss": cons + weight * reg, "loss_consistency": cons,
            "loss_regularizer": reg, "z_t": z_t, "z_s": z_s}


def _ours(cfg, params, ema, frozen, ex, key, batch_key) -> dict:
    """The library's loss of one example and its terms, as floats."""
    loss, aux = distill.example_loss(params, ema, frozen, ex, key, batch_key, cfg, LATENT)
    return {"loss": float(loss), **{k: float(v) for k, v in aux.items()}}


def _case(m: _Distinct, cfg: distill.DistillConfig):
    """(params, ema, example, models) for `cfg`; models names each candidate model of a pass
    as an (adapter, UNet) pair: the trained (`online`) and EMA (`target`) ones, the
    pretrained UNet alone, the initial adapter (the original's teacher)."""
    if cfg.full_codi:
        params, ema = m.full, m.full_ema
    else:
        params, ema = m.pe[cfg.distill_type]

    def unet_of(p):
        return m.pretrained if p.unet is None else p.unet

    models = {
        "online": _Model(params.adapter, unet_of(params)),
        "target": _Model(ema.adapter, unet_of(ema)),
        "pretrained UNet alone": _Model(None, m.pretrained),
        "initial adapter": _Model(m.fresh[cfg.distill_type], unet_of(params)),
    }
    if cfg.full_codi:
        models["trained UNet alone"] = _Model(None, params.unet)
    if cfg.distill_type == "conditional":
        models["target, blank condition"] = _Model(ema.adapter, unet_of(ema), blank_cond=True)
        models["online, blank condition"] = _Model(params.adapter, unet_of(params), blank_cond=True)
    return params, ema, m.examples[cfg.distill_type], models


def _spec_teacher(cfg: distill.DistillConfig) -> str:
    """The one-step ODE's model as codi-algorithm.md (step 3) names it."""
    if cfg.onestepode == "uncontrol":
        return "pretrained UNet alone"
    return cfg.onestepode_control_params


def _check_against_hand(m: _Distinct, cfg: distill.DistillConfig, label: str = "") -> dict:
    """Our loss of `m`'s example equals the transcription with the spec's models; returns
    our terms."""
    params, ema, ex, models = _case(m, cfg)
    ours = _ours(cfg, params, ema, m.frozen, ex, m.key, m.batch_key)
    d = distill.draw_example(m.key, m.batch_key, LATENT, T, cfg)
    hand = _by_hand(cfg, ex, d, m.frozen.null_embedding, models[_spec_teacher(cfg)],
                    models["target"], models["online"], models["pretrained UNet alone"])
    print(f"[distinct] {label}: t={int(d.t)} loss ours {ours['loss']:.6e} by hand {hand['loss']:.6e}")
    for name in ("loss", "loss_consistency", "loss_regularizer"):
        np.testing.assert_allclose(ours[name], hand[name], rtol=RTOL, err_msg=name)
    return ours


@pytest.mark.parametrize("distill_type", ["conditional", "unconditional"])
@pytest.mark.parametrize("control_params", ["target", "online"])
@pytest.mark.parametrize("onestepode", ["control", "uncontrol"])
def test_loss_with_distinct_parameters_matches_the_formulas(distinct, onestepode, control_params,
                                                            distill_type):
    """Each pass uses the model the spec names; every other candidate teacher (the other
    parameter choice, the UNet alone, the initial adapter, a blank condition image) gives a
    different teacher output and (but the blank image) a different loss."""
    cfg = _cfg(onestepode=onestepode, onestepode_control_params=control_params,
               distill_type=distill_type)
    ours = _check_against_hand(distinct, cfg, f"{onestepode}/{control_params}/{distill_type}")
    _check_other_teachers_differ(distinct, cfg, ours)


@pytest.mark.parametrize("onestepode,control_params",
                         [("control", "target"), ("control", "online"), ("uncontrol", "target")])
def test_full_codi_loss_with_distinct_parameters_matches_the_formulas(distinct, onestepode,
                                                                      control_params):
    """Full CoDi: online and target passes run the trained / EMA UNet with their adapter; the
    `control` teacher is the EMA or trained pair, the `uncontrol` one the pretrained UNet
    (not the trained UNet, as before)."""
    cfg = _cfg(full_codi=True, onestepode=onestepode, onestepode_control_params=control_params)
    ours = _check_against_hand(distinct, cfg, f"full/{onestepode}/{control_params}")
    _check_other_teachers_differ(distinct, cfg, ours)


def _check_other_teachers_differ(m: _Distinct, cfg: distill.DistillConfig, ours: dict) -> None:
    """The library's teacher output is the spec's teacher's, and each other candidate's
    differs; each other candidate also changes the loss (but a blank condition image, whose
    effect through the short teacher step is below the tolerance: the teacher's output
    catches that one)."""
    assert not cfg.onestepode_cfg
    params, ema, ex, models = _case(m, cfg)
    d = distill.draw_example(m.key, m.batch_key, LATENT, T, cfg)
    right = _spec_teacher(cfg)
    hand = _by_hand(cfg, ex, d, m.frozen.null_embedding, models[right], models["target"],
                    models["online"])
    text, cond = ex["text_embeddings"], ex.get("conditioning_pixel_values")
    z_t, t = hand["z_t"], int(d.t)
    f = np.asarray(distill.teacher_output(params, ema, m.frozen, jnp.asarray(z_t, jnp.float32),
                                          d.t, text, cond, cfg, d.w), np.float64)
    f_right = _forward(models[right], z_t, t, text, cond)
    np.testing.assert_allclose(f, f_right, rtol=RTOL, atol=RTOL * np.max(np.abs(f_right)))
    # The initial adapter adds nothing: with the pretrained UNet it is the UNet alone.
    same = {right} | ({"initial adapter"} if right == "pretrained UNet alone" and not cfg.full_codi else set())
    for name, teacher in models.items():
        if name in same:
            continue
        assert _rel(_forward(teacher, z_t, t, text, cond), f) > SENSITIVE, name
        if "blank condition" in name:
            continue
        wrong = _by_hand(cfg, ex, d, m.frozen.null_embedding, teacher, models["target"], models["online"])
        rel = abs(wrong["loss_consistency"] - ours["loss_consistency"]) / ours["loss_consistency"]
        assert rel > SENSITIVE, f"teacher {name!r} gives the same loss as {right!r} ({rel:.1e})"


def test_full_codi_uncontrol_teacher_is_the_frozen_pretrained_unet(distinct):
    """Perturbing the trained (and EMA) UNet leaves the one-step teacher's output unchanged:
    it is the pretrained UNet's; the old teacher (the trained UNet alone) moves with it."""
    m = distinct
    cfg = _cfg(full_codi=True, onestepode="uncontrol")
    assert cfg.needs_frozen_unet and _cfg().needs_frozen_unet
    assert not _cfg(full_codi=True).needs_frozen_unet
    ex = m.examples["conditional"]
    z = jax.random.normal(jax.random.key(3), LATENT)
    t, w = jnp.asarray(600, jnp.int32), jnp.asarray(4.0)
    text, cond = ex["text_embeddings"], ex["conditioning_pixel_values"]
    moved = perturb(m.full, jax.random.key(13), 0.05), perturb(m.full_ema, jax.random.key(14), 0.05)
    f = distill.teacher_output(m.full, m.full_ema, m.frozen, z, t, text, cond, cfg, w)
    f_moved = distill.teacher_output(*moved, m.frozen, z, t, text, cond, cfg, w)
    np.testing.assert_array_equal(np.asarray(f), np.asarray(f_moved))
    np.testing.assert_allclose(np.asarray(f), _forward(_Model(None, m.pretrained), z, t, text, None),
                               rtol=1e-5, atol=1e-6)
    old = [distill.model_output(p, m.frozen, z, t, text, cond, cfg, use_adapter=False)
           for p in (m.full, moved[0])]
    assert _rel(old[1], old[0]) > 1e-2, "the old teacher did not depend on the trained UNet"
    no_unet = distill.make_frozen(None, None, None, m.frozen.schedule,
                                  null_embedding=m.frozen.null_embedding)
    with pytest.raises(ValueError, match="uncontrol"):
        distill.teacher_output(m.full, m.full_ema, no_unet, z, t, text, cond, cfg, w)


@pytest.mark.parametrize(
    "options",
    [
        {"distill_loss": "consistency_epsilon"},
        {"onestepode_true_noise": True},
        {"onestepode_cfg": True},
        {"cfg_aware_distill": True},
        {"cfg_aware_distill": True, "onestepode_cfg": True, "onestepode_control_params": "online"},
        {"distill_timestep_scaling": 0.002},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample", "onestepode": "uncontrol"},
    ],
    ids=["eps-loss", "true-noise", "ode-cfg", "cfg-aware", "cfg-aware-online-shared", "tau",
         "v-prediction", "sample-uncontrol"],
)
def test_loss_option_changes_the_loss_as_the_formulas_say(distinct, options):
    """Each option matches the transcription, and moves the loss away from the default's."""
    cfg = _cfg(**options)
    ours = _check_against_hand(distinct, cfg, str(options))
    default = _check_against_hand(distinct, _cfg(
        onestepode=cfg.onestepode, onestepode_control_params=cfg.onestepode_control_params), "default")
    rel = abs(ours["loss"] - default["loss"]) / default["loss"]
    assert rel > SENSITIVE, f"{options} left the loss unchanged ({rel:.1e})"


def test_regularizer_weight_scales_exactly_the_regularizer(distinct):
    """loss = consistency + weight * mean((online_x - x0)^2); weight 0 leaves the consistency
    term alone, and the weight changes nothing else."""
    m = distinct
    params, ema = m.pe["conditional"]
    ex = m.examples["conditional"]
    terms = {wt: _ours(_cfg(x0_regularizer_weight=wt), params, ema, m.frozen, ex,
                       m.key, m.batch_key) for wt in (0.0, 0.5, 1.0)}
    assert terms[0.0]["loss"] == terms[0.0]["loss_consistency"]
    assert terms[1.0]["loss_regularizer"] > SENSITIVE * terms[1.0]["loss"]
    for wt, got in terms.items():
        assert got["loss_consistency"] == terms[1.0]["loss_consistency"]
        assert got["loss_regularizer"] == terms[1.0]["loss_regularizer"]
        np.testing.assert_allclose(
            got["loss"], got["loss_consistency"] + wt * got["loss_regularizer"], rtol=1e-6)
    _check_against_hand(m, _cfg(x0_regularizer_weight=0.5), "regularizer 0.5")


def _conditional_case_and_snr(m: _Distinct):
    """(params, ema, example, snr_t) of the conditional example at its drawn t."""
    params, ema = m.pe["conditional"]
    d = distill.draw_example(m.key, m.batch_key, LATENT, T, _cfg())
    a_t, s_t = np_schedule()(int(d.t))
    return params, ema, m.examples["conditional"], float(a_t) ** 2 / float(s_t) ** 2


def test_snr_gamma_weights_the_consistency_by_min_snr_gamma_over_snr(distinct):
    """At the example's t, gamma = snr_t / 2 halves the consistency term, gamma = 2 snr_t
    leaves it; the regulariser is never weighted."""
    m = distinct
    params, ema, ex, snr = _conditional_case_and_snr(m)

    def run(gamma):
        return _ours(_cfg(snr_gamma=gamma), params, ema, m.frozen, ex, m.key, m.batch_key)

    plain, half, whole = run(None), run(snr / 2), run(2 * snr)
    np.testing.assert_allclose(half["loss_consistency"], 0.5 * plain["loss_consistency"], rtol=1e-5)
    assert whole["loss_consistency"] == plain["loss_consistency"]
    for got in (half, whole):
        assert got["loss_regularizer"] == plain["loss_regularizer"]
        np.testing.assert_allclose(got["loss"], got["loss_consistency"] + got["loss_regularizer"],
                                   rtol=1e-6)


def test_regularizer_snr_gamma_weights_the_regularizer_by_min_snr_gamma_over_gamma(distinct):
    """At the example's t, gamma = 2 snr_t halves the regulariser's weight, gamma = snr_t / 2
    leaves it whole; the terms themselves and the consistency term are unchanged; the loss
    equals the transcription."""
    m = distinct
    params, ema, ex, snr = _conditional_case_and_snr(m)

    def run(gamma):
        return _ours(_cfg(regularizer_snr_gamma=gamma), params, ema, m.frozen, ex, m.key,
                     m.batch_key)

    plain, half, whole = run(None), run(2 * snr), run(snr / 2)
    for got in (half, whole):
        assert got["loss_consistency"] == plain["loss_consistency"]
        assert got["loss_regularizer"] == plain["loss_regularizer"]
    np.testing.assert_allclose(half["loss"], plain["loss_consistency"]
                               + 0.5 * plain["loss_regularizer"], rtol=1e-5)
    np.testing.assert_allclose(whole["loss"], plain["loss"], rtol=1e-6)
    _check_against_hand(m, _cfg(regularizer_snr_gamma=2 * snr, x0_regularizer_weight=0.5),
                        "regularizer snr gamma")


@pytest.mark.parametrize("onestepode", [
    "control", pytest.param("uncontrol", marks=pytest.mark.slow)])
def test_guided_regularizer_target_matches_the_formula(distinct, onestepode):
    """`regularizer_target='guided'`: the regulariser regresses toward
    x0 + (w - 1) (x_hat_c - x_hat_u) of the pretrained UNet alone at z_t, whatever the
    teacher step's model, as transcribed; at w = 1 it is the data regulariser; it differs
    from it at w = 4."""
    m = distinct
    cfg = _cfg(onestepode=onestepode, onestepode_cfg=True, regularizer_target="guided",
               distill_guidance_min=4.0, distill_guidance_max=4.0)
    guided = _check_against_hand(m, cfg, f"guided target {onestepode}")
    scaled = _check_against_hand(m, cfg.replace(regularizer_guidance_scaling="alpha"),
                                 "guided target, alpha-scaled")
    assert abs(scaled["loss_regularizer"] - guided["loss_regularizer"]) > (
        SENSITIVE * guided["loss_regularizer"])
    data = _check_against_hand(m, cfg.replace(regularizer_target="data"), "data target")
    assert guided["loss_consistency"] == pytest.approx(data["loss_consistency"], rel=1e-6)
    assert abs(guided["loss_regularizer"] - data["loss_regularizer"]) > (
        SENSITIVE * data["loss_regularizer"])
    one = cfg.replace(distill_guidance_min=1.0, distill_guidance_max=1.0)
    at_one = _check_against_hand(m, one, "guided target at w = 1")
    np.testing.assert_allclose(
        at_one["loss_regularizer"],
        _ours(one.replace(regularizer_target="data"), *m.pe["conditional"], m.frozen,
              m.examples["conditional"], m.key, m.batch_key)["loss_regularizer"], rtol=1e-5)


@pytest.mark.slow
def test_guided_regularizer_target_in_full_codi_takes_the_pretrained_direction(distinct):
    """In full CoDi the trained UNet moves; the guided target's direction stays the
    pretrained UNet's (`Frozen.unet`)."""
    cfg = _cfg(full_codi=True, onestepode_cfg=True, regularizer_target="guided",
               distill_guidance_min=3.0, distill_guidance_max=3.0)
    assert cfg.needs_frozen_unet
    _check_against_hand(distinct, cfg, "guided target, full CoDi")


def test_guidance_embedding_feeds_w_to_the_student_and_one_to_the_teacher(distinct):
    """`guidance_embedding`: the online and target passes take guidance_label(w), the
    one-step teacher's adapter guidance_label(1) (inside classifier-free guidance at w), as
    transcribed; a zero-initialised embedding gives the plain adapter's loss."""
    from codi_eqx.models import guidance_label

    m = distinct
    cfg = _cfg(onestepode_cfg=True, guidance_embedding=True, distill_guidance_min=2.0,
               distill_guidance_max=5.0)
    plain = _cfg(onestepode_cfg=True, distill_guidance_min=2.0, distill_guidance_max=5.0)
    params, ema = m.pe["conditional"]
    ex = m.examples["conditional"]

    def conditioned(tr, key, perturbed):
        a = tr.adapter.with_guidance_embedding(key=key)
        if perturbed:
            a = eqx.tree_at(lambda x: x.class_embedding, a,
                            perturb(a.class_embedding, jax.random.fold_in(key, 1), 0.5))
        return distill.Trainable(a)

    fresh = [conditioned(t, jax.random.key(i), False) for i, t in enumerate((params, ema))]
    ours = _ours(cfg, *fresh, m.frozen, ex, m.key, m.batch_key)
    ref = _ours(plain, params, ema, m.frozen, ex, m.key, m.batch_key)
    np.testing.assert_allclose(ours["loss"], ref["loss"], rtol=1e-5)

    p2, e2 = [conditioned(t, jax.random.key(10 + i), True) for i, t in enumerate((params, ema))]
    ours = _ours(cfg, p2, e2, m.frozen, ex, m.key, m.batch_key)
    d = distill.draw_example(m.key, m.batch_key, LATENT, T, cfg)
    w = float(guidance_label(d.w))
    hand = _by_hand(cfg, ex, d, m.frozen.null_embedding,
                    _Model(e2.adapter, m.pretrained, label=guidance_label(1.0)),
                    _Model(e2.adapter, m.pretrained, label=w),
                    _Model(p2.adapter, m.pretrained, label=w))
    for name in ("loss", "loss_consistency", "loss_regularizer"):
        np.testing.assert_allclose(ours[name], hand[name], rtol=RTOL, err_msg=name)
    assert abs(ours["loss"] - ref["loss"]) > SENSITIVE * ref["loss"]
    with pytest.raises(ValueError, match="onestepode_cfg"):
        distill.DistillConfig(guidance_embedding=True)


def test_regularizer_options_are_validated():
    with pytest.raises(ValueError, match="onestepode_cfg"):
        distill.DistillConfig(regularizer_target="guided")
    with pytest.raises(ValueError, match="regularizer_snr_gamma"):
        distill.DistillConfig(regularizer_snr_gamma=0.0)
    with pytest.raises(ValueError, match="regularizer_target='guided'"):
        distill.DistillConfig(regularizer_guidance_scaling="alpha")
    with pytest.raises(ValueError, match="x0_regularizer_weight"):
        distill.DistillConfig(x0_regularizer_weight=-1.0)
    with pytest.raises(ValueError, match="objective='codi' only"):
        distill.DistillConfig(objective="controlnet", regularizer_snr_gamma=1.0)


def test_shared_timestep_is_one_timestep_per_batch(distinct):
    """With `shared_timestep` every example of a batch (its own key, one batch key) draws the
    batch's t; without, the examples' t differ."""
    m = distinct
    keys = [jax.random.fold_in(m.key, i) for i in range(8)]
    for shared in (False, True):
        cfg = _cfg(shared_timestep=shared)
        ts = {int(distill.draw_example(k, m.batch_key, LATENT, T, cfg).t) for k in keys}
        assert (len(ts) == 1) == shared, (shared, ts)
    params, ema = m.pe["conditional"]
    cfg = _cfg(shared_timestep=True)
    t_batch = int(distill.draw_example(m.key, m.batch_key, LATENT, T, cfg).t)
    for k in keys[:2]:
        got = _ours(cfg, params, ema, m.frozen, m.examples["conditional"], k, m.batch_key)
        assert got["timestep"] == t_batch
    _check_against_hand(m, cfg, "shared timestep")


def test_ema_update_is_the_formula_exactly():
    """theta_minus <- mu theta_minus + (1 - mu) theta on the inexact leaves (values exact in
    binary, so the result is too); integer leaves stay the EMA's."""
    ema = {"w": jnp.asarray([1.0, 2.0, -4.0, 0.5]), "b": jnp.asarray([[8.0]]),
           "n": jnp.asarray([3], jnp.int32)}
    params = {"w": jnp.asarray([0.0, 4.0, 8.0, -0.5]), "b": jnp.asarray([[0.25]]),
              "n": jnp.asarray([7], jnp.int32)}
    for mu in (0.75, 0.5, 0.0, 1.0):
        out = distill.ema_update(ema, params, mu)
        for name in ("w", "b"):
            expected = mu * np.asarray(ema[name], np.float64) + (1 - mu) * np.asarray(params[name], np.float64)
            assert out[name].dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(out[name], np.float64), expected)
        np.testing.assert_array_equal(np.asarray(out["n"]), [3])


def _bf16(tree):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, tree)


@pytest.mark.slow
def test_full_codi_computes_in_the_mixed_precision_dtype_from_float32_masters(distinct):
    """Full CoDi with `compute_dtype` bfloat16: the loss of the float32 masters is the loss of
    a bfloat16 copy (and not the float32 loss); the step's convolutions, forward and
    backward, all run in bfloat16, and the trained UNet and adapter, and their EMA, stay
    float32 after a step."""
    m = distinct
    cfg32 = _cfg(full_codi=True, onestepode="uncontrol")
    cfg16 = cfg32.replace(compute_dtype="bfloat16")
    frozen16 = distill.make_frozen(_bf16(m.pretrained), None, None, m.frozen.schedule,
                                   null_embedding=m.frozen.null_embedding)
    ex = m.examples["conditional"]
    # JAX's bf16 attention mixes bf16 and f32 internally: the library runs in standard mode.
    with jax.numpy_dtype_promotion("standard"):
        masters = _ours(cfg16, m.full, m.full_ema, frozen16, ex, m.key, m.batch_key)
        copy = _ours(cfg32, _bf16(m.full), _bf16(m.full_ema), frozen16, ex, m.key, m.batch_key)
    full32 = _ours(cfg32, m.full, m.full_ema, m.frozen, ex, m.key, m.batch_key)
    print(f"[bf16] loss masters {masters['loss']:.6e} bf16 copy {copy['loss']:.6e} "
          f"float32 {full32['loss']:.6e}")
    np.testing.assert_allclose(masters["loss"], copy["loss"], rtol=1e-3)
    rel = abs(masters["loss"] - full32["loss"]) / full32["loss"]
    assert 1e-5 < rel < 5e-2, rel

    # The step, as `codi train` builds it (UNet loaded in bf16, float32 masters), traced, not
    # run (tests/test_distill.py::test_option_combinations_run runs full CoDi's step).
    ocfg = distill.OptimConfig()
    mesh = make_mesh(jax.devices()[:1])
    state = distill.init_train_state(distill.Trainable(m.full.adapter, _bf16(m.full.unet)),
                                     distill.make_optimizer(ocfg), key=jax.random.key(2))
    step = distill.make_train_step(cfg16, mesh, lr_fn=distill.lr_schedule(ocfg))
    args = replicate(frozen16, mesh), replicate(state, mesh), shard_batch(distill_batch(1, seed=3), mesh)
    with jax.numpy_dtype_promotion("standard"):
        convs = [line for line in step.lower(*args).as_text().splitlines()
                 if "stablehlo.convolution" in line]
        after, _ = eqx.filter_eval_shape(step, *args)
    assert convs and all("bf16" in line and "f32" not in line for line in convs), (
        "a convolution of the step (forward or backward) is not in bfloat16")
    def floats(tree):
        return [a.dtype for a in jax.tree.leaves(tree)
                if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)]

    n = len(floats(m.full))
    for tree in (state.params, after.params, after.ema):
        assert floats(tree) == [jnp.float32] * n
