"""The CoDi loss for one example (codi-algorithm.md, "One training step").

Each formula is one definition from `codi_eqx.diffusion`; targets are under
`lax.stop_gradient`. The example's random draws come from its own key, so they do not depend
on how a batch is split over devices.
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._model_output import conditional_and_unconditional_outputs, guided_model_output
from .._tree import cast_floating as cast_floating  # re-exported: its former home
from ..diffusion import (
    add_noise,
    classifier_free_guidance,
    consistency_output,
    distill_timestep,
    from_x_eps,
    to_x_eps,
)
from ..models import (
    DiagonalGaussianDistribution,
    TextConditioning,
    guidance_label,
    scale_latents,
    with_time_ids,
)
from ._config import DistillConfig
from ._state import Frozen, Trainable


def _compute_dtype(unet, cfg: DistillConfig):
    return jnp.dtype(cfg.compute_dtype) if cfg.compute_dtype is not None else unet.dtype


def _unet_of(params: Optional[Trainable], frozen: Frozen):
    unet = frozen.unet if (params is None or params.unet is None) else params.unet
    if unet is None:
        raise ValueError(
            "no UNet: full CoDi needs params.unet, and Frozen.unet (the pretrained UNet) for "
            "the onestepode='uncontrol' teacher")
    return unet


def model_output(
    params: Optional[Trainable], frozen: Frozen, z: Float[Array, "c h w"], t,
    text: TextConditioning, cond: Optional[Float[Array, "3 H W"]], cfg: DistillConfig,
    *, use_adapter: bool = True,
) -> Float[Array, "c h w"]:
    """F(z, t): the UNet's raw output with the adapter's residuals added (`use_adapter`),
    computed in `cfg.compute_dtype` (None: the UNet's dtype) from the weights as stored (the
    float32 masters are cast), returned in float32. The UNet is the trained one in full CoDi
    (`params.unet`), else the frozen one (`params` None: the frozen UNet alone).
    `codi_eqx.sampling.model_output` with the models and options that `params`, `frozen`
    and `cfg` choose."""
    return guided_output(params, frozen, z, t, text, cond, cfg, None, use_adapter=use_adapter)


def guided_output(
    params: Optional[Trainable], frozen: Frozen, z, t, text, cond, cfg: DistillConfig,
    w: Optional[Float[Array, ""]], *, use_adapter: bool = True,
    adapter_w: Optional[Float[Array, ""]] = None,
) -> Float[Array, "c h w"]:
    """F(c_null) + w (F(c_txt) - F(c_null)), both halves in one batched pass (conditional
    first, then unconditional); a plain conditional pass when `w` is None.
    `codi_eqx.sampling.guided_model_output` with the empty prompt's embedding as the
    unconditional one. With `cfg.guidance_embedding` the adapter is given
    `guidance_label(adapter_w)` (default 1)."""
    unet = _unet_of(params, frozen)
    labels = None
    if use_adapter and cfg.guidance_embedding:
        labels = guidance_label(1.0 if adapter_w is None else adapter_w)
    return guided_model_output(
        unet, params.adapter if use_adapter else None, z, t, text, frozen.null_embedding,
        cond if cfg.distill_type == "conditional" else None, w, cfg.conditioning_scale,
        dtype=_compute_dtype(unet, cfg), class_labels=labels,
    )


class ExampleDraws(eqx.Module):
    """The random quantities of one example."""

    t: jax.Array
    s: jax.Array
    noise: Float[Array, "c h w"]
    posterior_noise: Float[Array, "c h w"]
    w: Float[Array, ""]


def draw_example(
    key: PRNGKeyArray, batch_key: PRNGKeyArray, latent_shape: tuple[int, ...],
    num_train_timesteps: int, cfg: DistillConfig,
) -> ExampleDraws:
    """An example's timesteps, noises and guidance scale from its own key; the batch-level
    options (shared timestep, per-batch integer scale) draw from `batch_key` instead. The
    `controlnet` objective draws t uniformly in [0, T) (and s = t, unused)."""
    k_t, k_eps, k_post, k_w = jax.random.split(key, 4)
    b_t, b_w = jax.random.split(batch_key)
    if cfg.objective == "controlnet":
        t = s = jax.random.randint(k_t, (), 0, num_train_timesteps, dtype=jnp.int32)
    else:
        t, s = distill_timestep(b_t if cfg.shared_timestep else k_t, num_train_timesteps,
                                cfg.distill_learning_steps)
    if cfg.guidance_draw == "per_batch_integer":
        w = jax.random.randint(
            b_w, (), int(cfg.distill_guidance_min), max(int(cfg.distill_guidance_max),
                                                          int(cfg.distill_guidance_min) + 1)
        ).astype(jnp.float32)
    else:
        w = jax.random.uniform(
            k_w, (), jnp.float32, cfg.distill_guidance_min, cfg.distill_guidance_max
        )
    return ExampleDraws(
        t=t, s=s,
        noise=jax.random.normal(k_eps, latent_shape, jnp.float32),
        posterior_noise=jax.random.normal(k_post, latent_shape, jnp.float32),
        w=w,
    )


def example_latents(frozen: Frozen, example: dict, posterior_noise) -> Float[Array, "c h w"]:
    """x0: a sample of the VAE posterior (from the image, or from cached mean / logvar),
    scaled for the diffusion model (`AutoencoderKL.encode_latents`; cached: with the batch's
    `scaling_factor` and, where given, `shift_factor`)."""
    if "latent_mean" in example:
        post = DiagonalGaussianDistribution(jnp.asarray(example["latent_mean"], jnp.float32),
                                            jnp.asarray(example["latent_logvar"], jnp.float32))
        return scale_latents(post.sample_from_noise(posterior_noise), example["scaling_factor"],
                             example.get("shift_factor"))
    if frozen.vae is None:
        raise ValueError("batches without cached latents need the VAE")
    return frozen.vae.encode_latents(example["pixel_values"], posterior_noise)


def example_text(frozen: Frozen, example: dict) -> TextConditioning:
    """The example's text conditioning: cached (`text_embeddings`, SDXL's also
    `pooled_text_embeddings`) or encoded from `input_ids`; SDXL's with the example's
    `time_ids`."""
    if "text_embeddings" in example:
        text = example["text_embeddings"].astype(jnp.float32)
        if "pooled_text_embeddings" in example:
            text = {"encoder_hidden_states": text,
                    "text_embeds": example["pooled_text_embeddings"].astype(jnp.float32)}
    elif frozen.text_encoder is None:
        raise ValueError("batches without cached text embeddings need the text encoder")
    else:
        text = jax.tree.map(lambda a: a.astype(jnp.float32),
                            frozen.text_encoder(example["input_ids"]))
    if isinstance(text, dict):
        if "time_ids" not in example:
            raise ValueError("SDXL batches need time_ids (original size, crop top-left, "
                             "target size) per example")
        text = with_time_ids(text, example["time_ids"])
    return text


def diffusion_loss(
    params: Trainable, frozen: Frozen, example: dict, key: PRNGKeyArray,
    batch_key: PRNGKeyArray, cfg: DistillConfig, latent_shape: tuple[int, ...],
) -> tuple[Float[Array, ""], dict]:
    """The standard ControlNet objective for one example: t ~ U{0..T-1},
    z_t = alpha_t x0 + sigma_t eps, loss = mean((F(z_t, t) - target)^2) with F the UNet +
    adapter and target the `prediction_type`'s regression target (`from_x_eps`)."""
    schedule = frozen.schedule
    draws = draw_example(key, batch_key, latent_shape, schedule.num_train_timesteps, cfg)
    x0 = jax.lax.stop_gradient(example_latents(frozen, example, draws.posterior_noise))
    text = jax.lax.stop_gradient(example_text(frozen, example))
    cond = example.get("conditioning_pixel_values") if cfg.distill_type == "conditional" else None
    t = draws.t
    a_t, s_t = schedule.alpha(t), schedule.sigma(t)
    z_t = add_noise(x0, draws.noise, a_t, s_t)
    target = from_x_eps(x0, draws.noise, a_t, s_t, cfg.prediction_type)
    f = model_output(params, frozen, z_t, t, text, cond, cfg)
    loss = jnp.mean(jnp.square(f - target))
    return loss, {"timestep": t.astype(jnp.float32)}


def teacher_is_online(cfg: DistillConfig) -> bool:
    """Whether the one-step teacher's pass is the online pass without gradient: the adapter
    with the current parameters (`onestepode control`, `onestepode_control_params online`)
    and the same guidance as the online pass."""
    return (cfg.onestepode == "control" and cfg.onestepode_control_params == "online"
            and cfg.onestepode_cfg == cfg.cfg_aware_distill and not cfg.guidance_embedding)


def teacher_params(params: Trainable, ema: Trainable, cfg: DistillConfig) -> Optional[Trainable]:
    """The parameters of the one-step ODE's model (step 3): for `control`, the EMA
    (`target`) or the trained (`online`) adapter, with the UNet they carry in full CoDi; for
    `uncontrol`, None: the pretrained UNet alone (`Frozen.unet`), in full CoDi too."""
    if cfg.onestepode == "uncontrol":
        return None
    return ema if cfg.onestepode_control_params == "target" else params


def teacher_output(
    params: Trainable, ema: Trainable, frozen: Frozen, z_t: Float[Array, "c h w"], t,
    text: TextConditioning, cond: Optional[Float[Array, "3 H W"]], cfg: DistillConfig,
    w: Float[Array, ""],
) -> Float[Array, "c h w"]:
    """F_teacher(z_t, t) of the one-step ODE, without gradient; guided at scale `w` with
    `onestepode_cfg`."""
    teacher = jax.lax.stop_gradient(teacher_params(params, ema, cfg))
    f = guided_output(teacher, frozen, z_t, t, text, cond, cfg,
                      w if cfg.onestepode_cfg else None, use_adapter=cfg.onestepode == "control")
    return jax.lax.stop_gradient(f)


def pretrained_guidance_halves(
    frozen: Frozen, z_t: Float[Array, "c h w"], t, text: TextConditioning, cfg: DistillConfig,
) -> tuple[Float[Array, "c h w"], Float[Array, "c h w"]]:
    """The pretrained UNet's conditional and unconditional outputs `(F_c, F_u)` at z_t (no
    adapter, no gradient; one batch of two): the guidance direction of the guided regression
    target. It comes from the frozen model, never from the adapter being trained, so that
    the target cannot feed back into itself (an adapter that learns to follow the direction
    would widen it at the next step)."""
    unet = _unet_of(None, frozen)
    f_c, f_u = conditional_and_unconditional_outputs(
        unet, None, z_t, t, text, frozen.null_embedding, None, dtype=_compute_dtype(unet, cfg))
    return jax.lax.stop_gradient(f_c), jax.lax.stop_gradient(f_u)


def regularizer_weight(cfg: DistillConfig, snr_t: Float[Array, ""]) -> Float[Array, ""]:
    """The regulariser's weight at a timestep of SNR `snr_t`: `x0_regularizer_weight`, times
    min(snr_t, gamma) / gamma with `regularizer_snr_gamma` gamma."""
    weight = jnp.asarray(cfg.x0_regularizer_weight, jnp.float32)
    if cfg.regularizer_snr_gamma is None:
        return weight
    gamma = cfg.regularizer_snr_gamma
    return weight * jnp.minimum(snr_t, gamma) / gamma


def example_loss(
    params: Trainable, ema: Trainable, frozen: Frozen, example: dict, key: PRNGKeyArray,
    batch_key: PRNGKeyArray, cfg: DistillConfig, latent_shape: tuple[int, ...],
    *, share_passes: bool = True,
) -> tuple[Float[Array, ""], dict]:
    """The loss of one example and its terms (before averaging): CoDi's, or with
    `cfg.objective == "controlnet"` the plain diffusion loss (`diffusion_loss`, `ema` unused).

    Steps 1-7 of codi-algorithm.md: noise x0 to z_t; one teacher ODE step to z_s (no
    gradient); target f_{theta_minus}(z_s, s) (no gradient); online f_theta(z_t, t); the
    consistency term (optionally SNR-weighted) plus the weighted x0 regulariser.

    `share_passes` reuses the online pass as the teacher's where they are the same
    computation (`teacher_is_online`); False computes both (the same values: for tests).
    """
    if cfg.objective == "controlnet":
        return diffusion_loss(params, frozen, example, key, batch_key, cfg, latent_shape)
    schedule = frozen.schedule
    draws = draw_example(key, batch_key, latent_shape, schedule.num_train_timesteps, cfg)
    x0 = jax.lax.stop_gradient(example_latents(frozen, example, draws.posterior_noise))
    text = jax.lax.stop_gradient(example_text(frozen, example))
    cond = example.get("conditioning_pixel_values") if cfg.distill_type == "conditional" else None
    t, s = draws.t, draws.s
    a_t, s_t = schedule.alpha(t), schedule.sigma(t)
    a_s, s_s = schedule.alpha(s), schedule.sigma(s)
    z_t = add_noise(x0, draws.noise, a_t, s_t)
    ptype = cfg.prediction_type
    scal = dict(sigma_data=cfg.sigma_data, timestep_scaling=cfg.distill_timestep_scaling)

    w = draws.w if cfg.cfg_aware_distill else None

    # 5. Online with the trained parameters (computed first: with `--onestepode control
    # --onestepode_control_params online` and the same guidance, the teacher's pass is this
    # pass without gradient, and is not computed twice).
    f_online = guided_output(params, frozen, z_t, t, text, cond, cfg, w, adapter_w=draws.w)
    xo_hat, eo_hat = to_x_eps(f_online, z_t, a_t, s_t, ptype)
    online_x = consistency_output(z_t, xo_hat, t, **scal)
    online_eps = consistency_output(z_t, eo_hat, t, **scal)

    # 3. One-step ODE (teacher step) from t to s, without gradient.
    reg_target = x0
    if cfg.regularizer_target == "guided":
        # x0 + (w - 1) (x_hat_c - x_hat_u), the direction from the pretrained UNet.
        f_c, f_u = pretrained_guidance_halves(frozen, z_t, t, text, cfg)
        xc_hat, _ = to_x_eps(f_c, z_t, a_t, s_t, ptype)
        xu_hat, _ = to_x_eps(f_u, z_t, a_t, s_t, ptype)
        direction = xc_hat - xu_hat
        if cfg.regularizer_guidance_scaling == "alpha":
            direction = a_t * direction
        reg_target = x0 + (draws.w - 1.0) * direction
    if cfg.regularizer_target == "guided" and cfg.onestepode == "uncontrol":
        # The guided teacher step is the same UNet's same two halves: not computed twice.
        f_teacher = classifier_free_guidance(f_u, f_c, draws.w)
    elif share_passes and teacher_is_online(cfg):
        f_teacher = jax.lax.stop_gradient(f_online)
    else:
        f_teacher = teacher_output(params, ema, frozen, z_t, t, text, cond, cfg, draws.w)
    x_hat, eps_hat = to_x_eps(f_teacher, z_t, a_t, s_t, ptype)
    z_s = jax.lax.stop_gradient(
        add_noise(x_hat, draws.noise if cfg.onestepode_true_noise else eps_hat, a_s, s_s))

    # 4. Target with the EMA parameters, without gradient.
    f_target = guided_output(jax.lax.stop_gradient(ema), frozen, z_s, s, text, cond, cfg, w,
                             adapter_w=draws.w)
    xt_hat, et_hat = to_x_eps(f_target, z_s, a_s, s_s, ptype)
    target_x = consistency_output(z_s, xt_hat, s, **scal)
    target_eps = consistency_output(z_s, et_hat, s, **scal)

    # 7. Loss.
    if cfg.distill_loss == "consistency_x":
        consistency = jnp.mean(jnp.square(online_x - jax.lax.stop_gradient(target_x)))
    else:
        consistency = jnp.mean(jnp.square(online_eps - jax.lax.stop_gradient(target_eps)))
    if cfg.snr_gamma is not None:
        snr = schedule.snr(t)
        consistency = consistency * jnp.minimum(snr, cfg.snr_gamma) / snr
    regularizer = jnp.mean(jnp.square(online_x - jax.lax.stop_gradient(reg_target)))
    loss = consistency + regularizer_weight(cfg, schedule.snr(t)) * regularizer
    return loss, {
        "loss_consistency": consistency,
        "loss_regularizer": regularizer,
        "timestep": t.astype(jnp.float32),
        "guidance_scale": draws.w,
    }
