"""From prompts to images: text encoding, sampling and VAE decoding compiled as one function,
batched with `vmap`, optionally split over all devices."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jaxtyping import Array, Bool, Float, Int, UInt8

from .._adapter_settings import AdapterSettings
from .._model_output import guided_model_output
from ..diffusion import (
    NoiseSchedule,
    check_epsilon_timesteps,
    codi_sampling_timesteps,
    ddim_previous_timesteps,
    ddim_step,
    ddim_timesteps,
)
from ..models import (
    AutoencoderKL,
    ControlNetModel,
    TextConditioning,
    TextEncoder,
    UNet2DConditionModel,
    guidance_label,
    sdxl_time_ids,
    with_time_ids,
)
from ..parallel import batch_sharding, make_mesh, replicate
from ._options import SAMPLERS, default_guidance_scale, sampling_options
from ._samplers import codi_step

Sampler = Literal["codi", "ddim"]


@dataclass(frozen=True)
class SamplerSpec:
    """The static part of a sampling run (one compilation per distinct spec)."""

    sampler: str
    """`"codi"` or `"ddim"`."""
    timesteps: tuple[int, ...]
    """The descending timesteps of the run."""
    prev_timesteps: tuple[int, ...]
    """DDIM only: the timestep each step lands on (empty for CoDi)."""
    cfg: bool
    """Whether to run the unconditional pass (guidance scale other than 1)."""
    latent_shape: tuple[int, int, int]
    """`(C, h, w)` of the latents."""
    timestep_scaling: float = 10.0
    """`tau` of the consistency scalings (CoDi only)."""
    time_ids: Optional[tuple[float, ...]] = None
    """SDXL's micro-conditioning of every image (original size, crop top-left, target
    size), None for SD 1.x / 2.x."""


def sampler_timesteps(
    sampler: str, steps: int, schedule: NoiseSchedule, scheduler_config: dict,
    distill_learning_steps: int = 50, prediction_type: Optional[str] = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The timesteps (and, for DDIM, the previous timesteps) of a run.

    **Returns:** `(timesteps, prev_timesteps)` as tuples of ints (`prev` empty for CoDi).
    Raises `ValueError` for a step count outside the sampler's range, and for an epsilon
    model at a timestep with alpha_t = 0 (`prediction_type`, default the schedule's).
    """
    prediction_type = prediction_type or schedule.prediction_type
    if sampler == "codi":
        ts = codi_sampling_timesteps(schedule.num_train_timesteps, distill_learning_steps, steps)
        check_epsilon_timesteps(schedule.alphas_cumprod, ts, prediction_type)
        return tuple(int(t) for t in ts), ()
    if sampler == "ddim":
        ts = ddim_timesteps(steps, scheduler_config)
        check_epsilon_timesteps(schedule.alphas_cumprod, ts, prediction_type)
        prev = ddim_previous_timesteps(ts, schedule.num_train_timesteps)
        return tuple(int(t) for t in ts), tuple(int(p) for p in prev)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")


class StepSpec(NamedTuple):
    """The static part of one sampler step (shared by all the steps of a run, so the step
    compiles once whatever the timesteps)."""

    sampler: str
    cfg: bool
    timestep_scaling: float


def _step_spec(spec: SamplerSpec) -> StepSpec:
    return StepSpec(spec.sampler, spec.cfg, spec.timestep_scaling)


@eqx.filter_jit
def _initial_batch(
    text_encoder: TextEncoder,
    cfg: bool,
    latent_shape: tuple[int, int, int],
    ids: Int[Array, "b *n seq"],
    negative_ids: Int[Array, "b *n seq"],
    indices: Int[Array, " b"],
    seed: Int[Array, ""],
    time_ids: Optional[tuple[float, ...]] = None,
):
    """Text embeddings of the prompts (and negative prompts) and each image's initial noise
    (SDXL: the text conditioning with `time_ids`)."""
    cond = jax.vmap(text_encoder)(ids)
    uncond = jax.vmap(text_encoder)(negative_ids) if cfg else cond
    if time_ids is not None:
        batch_ids = jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32), (ids.shape[0], 6))
        cond, uncond = with_time_ids(cond, batch_ids), with_time_ids(uncond, batch_ids)
    base = jax.random.key(seed)
    z = jax.vmap(
        lambda i: jax.random.normal(jax.random.fold_in(base, i), latent_shape, jnp.float32)
    )(indices)
    return cond, uncond, z


@eqx.filter_jit
def sampler_step_batch(
    unet: UNet2DConditionModel,
    adapter: Optional[ControlNetModel],
    schedule: NoiseSchedule,
    step: StepSpec,
    cond: TextConditioning,
    uncond: TextConditioning,
    control: Optional[Float[Array, "b 3 H W"]],
    z: Float[Array, "b c h w"],
    t: Int[Array, ""],
    s: Int[Array, ""],
    last: Bool[Array, ""],
    guidance_scale: Float[Array, ""],
    conditioning_scale: Float[Array, ""],
) -> Float[Array, "b c h w"]:
    """One sampler step for a batch, from timestep `t` to `s` (DDIM: to the previous
    timestep `s`; CoDi: re-noised to `s` unless `last`). The timesteps are traced, so a run
    compiles this once for all its steps."""
    # A guidance-conditioned adapter reproduces guidance at `guidance_scale` in one pass.
    conditioned = adapter is not None and adapter.guidance_conditioned
    w = guidance_scale if step.cfg else 1.0
    labels = guidance_label(guidance_scale) if conditioned else None

    def one(c, u, img, zi):
        def model_fn(x, tt):
            return guided_model_output(unet, adapter, x, tt, c, u, img, w, conditioning_scale,
                                       class_labels=labels)

        if step.sampler == "codi":
            return codi_step(model_fn, schedule, zi, t, s, last,
                             timestep_scaling=step.timestep_scaling)
        return ddim_step(model_fn(zi, t), t, s, zi, schedule).astype(zi.dtype)

    return jax.vmap(one, in_axes=(0, 0, None if control is None else 0, 0))(cond, uncond, control, z)


@eqx.filter_jit
def _decode_batch(vae: AutoencoderKL, z: Float[Array, "b c h w"]) -> UInt8[Array, "b H W 3"]:
    return jax.vmap(lambda zi: decode_latents(vae, zi))(z)


def decode_latents(vae: AutoencoderKL, z: Float[Array, "c h w"]) -> UInt8[Array, "H W 3"]:
    """Scaled latents -> an RGB image `(H, W, 3)`, uint8 (`AutoencoderKL.decode_latents`,
    then [-1, 1] -> [0, 255])."""
    x = jnp.clip(vae.decode_latents(z) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(jnp.transpose(x, (1, 2, 0)) * 255).astype(jnp.uint8)


def sample_batch(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: TextEncoder,
    adapter: Optional[ControlNetModel],
    schedule: NoiseSchedule,
    spec: SamplerSpec,
    ids: Int[Array, "b *n seq"],
    negative_ids: Int[Array, "b *n seq"],
    control: Optional[Float[Array, "b 3 H W"]],
    indices: Int[Array, " b"],
    seed: Int[Array, ""],
    guidance_scale: Float[Array, ""],
    conditioning_scale: Float[Array, ""],
) -> UInt8[Array, "b H W 3"]:
    """A batch of images: text encoding, the sampler's steps, VAE decoding.

    Three compiled functions: the text encoding with the initial noise, one sampler step
    (`sampler_step_batch`, called once per step with the timesteps as arguments), and the
    decoding. No network sits inside a compiled loop (XLA:CPU would loop-emit its
    convolutions), and the compile time does not grow with the number of steps. The latents
    stay on the device between the calls.

    Image `i` starts from the noise of `fold_in(key(seed), indices[i])`, so it does not depend
    on the batch it is in.

    **Arguments:**

    - `unet`, `vae`, `text_encoder`: the pipeline's models (`text_encoder`: its
      `text_encoders`, both of SDXL's); `adapter`: or None.
    - `schedule`: the noise schedule; `spec`: the static sampler description.
    - `ids`, `negative_ids`: token ids of each image's prompt and negative prompt `(B, L)`
      (SDXL: `(B, 2, L)`).
    - `control`: condition images `(B, 3, H, W)` in [0, 1], or None.
    - `indices`: each image's global index `(B,)`; `seed`: the run's seed.
    - `guidance_scale`, `conditioning_scale`: scalars.

    **Returns:** images `(B, H, W, 3)`, uint8.
    """
    cond, uncond, z = _initial_batch(
        text_encoder, spec.cfg, spec.latent_shape, ids, negative_ids, indices, seed,
        spec.time_ids,
    )
    step = _step_spec(spec)
    n = len(spec.timesteps)
    targets = spec.prev_timesteps if spec.sampler == "ddim" else spec.timesteps[1:] + spec.timesteps[-1:]
    for i, (t, s) in enumerate(zip(spec.timesteps, targets)):
        z = sampler_step_batch(
            unet, adapter, schedule, step, cond, uncond, control, z,
            jnp.asarray(t, jnp.int32), jnp.asarray(s, jnp.int32), jnp.asarray(i == n - 1),
            guidance_scale, conditioning_scale,
        )
    return _decode_batch(vae, z)


def _as_list(value: Union[str, Sequence[str]], n: int, what: str) -> list[str]:
    if isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"{len(value)} {what}s for {n} prompts (give one, or one per prompt)")
    return value


def _control_array(control_images: Any, n_prompts: int) -> np.ndarray:
    """Condition images as float32 `(n_prompts, 3, H, W)` in [0, 1]."""
    if isinstance(control_images, np.ndarray) or hasattr(control_images, "shape"):
        arr = np.asarray(control_images)
        if arr.ndim == 3:
            arr = arr[None]
    else:
        arr = np.stack([np.asarray(c) for c in control_images])
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"control images must be (N, H, W, 3), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32).transpose(0, 3, 1, 2)
    if arr.shape[0] == 1:
        arr = np.repeat(arr, n_prompts, axis=0)
    if arr.shape[0] != n_prompts:
        raise ValueError(
            f"{arr.shape[0]} control images for {n_prompts} prompts (give one, or one per prompt)"
        )
    return arr


def _batch_sharding(batch: int) -> Optional[NamedSharding]:
    """The data-parallel sharding of a batch over all devices (`codi_eqx.parallel`), or None
    where there is one device or the batch does not split evenly."""
    n = jax.device_count()
    if n <= 1 or batch % n != 0:
        return None
    return batch_sharding(make_mesh())


def generate(
    pipe: Any,
    adapter: Optional[ControlNetModel],
    prompts: Union[str, Sequence[str]],
    *,
    negative_prompt: Union[str, Sequence[str]] = "",
    control_images: Any = None,
    steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    sampler: Optional[str] = None,
    seed: int = 0,
    num_images_per_prompt: int = 1,
    distill_learning_steps: Optional[int] = None,
    timestep_scaling: Optional[float] = None,
    prediction_type: Optional[str] = None,
    settings: Optional[AdapterSettings] = None,
    controlnet_conditioning_scale: float = 1.0,
    batch_size: Optional[int] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    timestep_spacing: Optional[str] = None,
) -> np.ndarray:
    """Sample images with CoDi's few-step sampler or the teacher's DDIM.

    Images are ordered prompt by prompt (`num_images_per_prompt` each); image `i` starts from
    the noise of `fold_in(key(seed), i)`, whatever the batch size. Batches have a fixed size
    (the last is padded), so the sampler compiles once; a batch divisible by the number of
    devices is split over all of them.

    **Arguments:**

    - `pipe`: a `Pipeline` (`load_pipeline`).
    - `adapter`: a `ControlNetModel`, or None (DDIM of the teacher; CoDi steps of the bare UNet).
    - `prompts`: one prompt or a list.
    - `negative_prompt`: one for all, or one per prompt (the unconditional half of guidance).
    - `control_images`: `(H, W, 3)` or `(N, H, W, 3)` (one, or one per prompt), float in [0, 1]
      or uint8; required by an adapter with a condition encoder, refused otherwise.
    - `steps`: sampling steps (default 4 for `codi`, 50 for `ddim`).
    - `guidance_scale`: `w` (default: the adapter's recorded `sample_guidance_scale`, else
      1.0 for `codi`, a single conditional pass, and 7.5 for `ddim`). A guidance-conditioned adapter (`ControlNetModel.guidance_conditioned`) takes
      `w` through its guidance embedding, in one pass per step.
    - `sampler`: `"codi"` or `"ddim"` (default: the one `settings` names, else `codi`).
    - `seed`: the run's seed.
    - `num_images_per_prompt`: images per prompt.
    - `distill_learning_steps`: `N` of the distillation grid (CoDi; default: `settings`', else 50).
    - `timestep_scaling`: `tau` of the consistency scalings (CoDi; default: `settings`', else 10).
    - `prediction_type`: how outputs convert, for both samplers (default: `settings`', else
      the model's).
    - `settings`: the adapter's training record (`codi_eqx.adapter_settings(path)`), whose
      values are the defaults of the four options above (`sampling_options`).
    - `controlnet_conditioning_scale`: multiplies the adapter's residuals.
    - `batch_size`: images per compiled batch (default: all of them at once).
    - `height`, `width`: image size (default: the control image's, else the UNet's
      `sample_size` times the VAE factor); multiples of the VAE factor.
    - `progress`: called as `progress(batches_done, batches_total)` after each batch.
    - `timestep_spacing`: DDIM's spacing (`leading`, `trailing`, `linspace`; default: the
      model's scheduler config, as diffusers' `DDIMScheduler` reads it).

    **Returns:** images `(B, H, W, 3)`, uint8.
    """
    opts = sampling_options(
        settings, pipe.prediction_type, sampler=sampler,
        distill_learning_steps=distill_learning_steps, timestep_scaling=timestep_scaling,
        prediction_type=prediction_type)
    sampler = opts.sampler
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
    steps = (4 if sampler == "codi" else 50) if steps is None else steps
    if guidance_scale is None:
        guidance_scale = default_guidance_scale(settings, sampler)
    negatives = _as_list(negative_prompt, len(prompts), "negative prompt")
    factor = pipe.vae_scale_factor

    control = None
    has_encoder = adapter is not None and adapter.controlnet_cond_embedding is not None
    if control_images is not None:
        if adapter is None:
            raise ValueError("a control image needs an adapter (none given)")
        if not has_encoder:
            raise ValueError("this adapter has no condition encoder: give no control image")
        control = _control_array(control_images, len(prompts))
        ch, cw = control.shape[2:]
        if (height or ch, width or cw) != (ch, cw):
            raise ValueError(
                f"control images are {ch}x{cw}, but {height}x{width} was asked for; resize them"
            )
        height, width = ch, cw
    elif has_encoder:
        raise ValueError("this adapter needs a control image (it has a condition encoder)")
    default = pipe.unet.config.sample_size * factor
    height, width = height or default, width or default
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} is not divisible by the VAE factor {factor}")

    scheduler_config = dict(pipe.scheduler_config)
    if timestep_spacing is not None:
        scheduler_config["timestep_spacing"] = timestep_spacing
    timesteps, prev = sampler_timesteps(
        sampler, steps, pipe.schedule, scheduler_config, opts.distill_learning_steps,
        opts.prediction_type,
    )
    spec = SamplerSpec(
        sampler=sampler, timesteps=timesteps, prev_timesteps=prev,
        # A guidance-conditioned adapter takes the scale as an input: one pass per step.
        cfg=float(guidance_scale) != 1.0 and not (adapter is not None
                                                  and adapter.guidance_conditioned),
        latent_shape=(pipe.unet.config.in_channels, height // factor, width // factor),
        timestep_scaling=opts.timestep_scaling,
        # SDXL: generated at the asked size, uncropped, as diffusers' pipeline conditions it.
        time_ids=(sdxl_time_ids((height, width), (0, 0), (height, width))
                  if pipe.unet.config.addition_embed_type == "text_time" else None),
    )

    total = len(prompts) * num_images_per_prompt
    bs = total if batch_size is None else max(1, min(int(batch_size), total))
    n_batches = math.ceil(total / bs)
    prompt_of = np.repeat(np.arange(len(prompts)), num_images_per_prompt)
    ids = np.asarray(pipe.tokenize(prompts))
    neg_ids = np.asarray(pipe.tokenize(negatives))

    sharding = _batch_sharding(bs)
    # The samplers convert outputs with the schedule's prediction type.
    schedule = pipe.schedule
    if opts.prediction_type != schedule.prediction_type:
        schedule = dataclasses.replace(schedule, prediction_type=opts.prediction_type)
    models = (pipe.unet, pipe.vae, pipe.text_encoders, adapter, schedule)
    if sharding is not None:
        models = replicate(models, sharding.mesh)
    unet, vae, text_encoder, adapter, schedule = models

    def put(x):
        return x if sharding is None else jax.device_put(x, sharding)

    scalars = (
        jnp.asarray(seed, jnp.int32) if seed < 2**31 else jnp.asarray(seed % 2**31, jnp.int32),
        jnp.asarray(guidance_scale, jnp.float32),
        jnp.asarray(controlnet_conditioning_scale, jnp.float32),
    )
    out = []
    for b in range(n_batches):
        idx = np.arange(b * bs, (b + 1) * bs)
        idx = np.minimum(idx, total - 1)  # pad the last batch by repeating its last image
        p = prompt_of[idx]
        images = sample_batch(
            unet, vae, text_encoder, adapter, schedule, spec,
            put(jnp.asarray(ids[p])), put(jnp.asarray(neg_ids[p])),
            None if control is None else put(jnp.asarray(control[p])),
            put(jnp.asarray(idx, jnp.int32)), *scalars,
        )
        n_real = min(bs, total - b * bs)
        out.append(np.asarray(images)[:n_real])
        if progress is not None:
            progress(b + 1, n_batches)
    return np.concatenate(out, axis=0)
