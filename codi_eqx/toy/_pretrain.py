"""Pretraining of the built-in teacher: a small Stable Diffusion (VAE, CLIP text encoder,
UNet) trained from scratch on the synthetic shapes, with this project's models.

Two phases, each a compiled AdamW step over freshly drawn scenes:

1. the VAE: L1 + MSE reconstruction and a small KL term (no adversarial or perceptual loss:
   the images are flat colours); its `scaling_factor` is then set to one over the standard
   deviation of the training latents, as Stable Diffusion's was;
2. the UNet and the text encoder together, on the epsilon-prediction loss of the scaled-linear
   schedule with the VAE frozen, 10 % of captions dropped to the empty prompt (so that
   classifier-free guidance works), an EMA of both kept and written.

`pretrain_teacher(folder)` writes a diffusers-format model directory (diffusers' own
`StableDiffusionPipeline.from_pretrained` loads it). The same seed and step counts give the
same weights on the same platform.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._tiny_tokenizer import write_tiny_clip_tokenizer
from ..diffusion import NoiseSchedule, add_noise
from ..distill import ema_update
from ..models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionConfig,
    UNet2DConditionModel,
)
from ..weights import load_vae, save_text_encoder, save_unet, save_vae
from . import _shapes

MAX_TOKENS = 16
"""Tokens per prompt: the longest caption has 11 words, plus start and end."""

TEACHER_VAE = dict(
    block_out_channels=[16, 32, 64], down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, norm_num_groups=4,
    latent_channels=4, sample_size=64,
)
"""64x64 images <-> 4x16x16 latents (a downsampling factor of 4)."""
# Few groups per GroupNorm: with one channel per group (16 groups on 16 channels) a
# GroupNorm is an instance norm that erases each channel's mean, i.e. the flat colours these
# images are made of; the VAE did not learn (L1 + MSE 0.6 after 400 steps, 0.16 with 4 groups).
# No attention at the UNet's 16x16 level: there it cost more than the rest of the UNet.

TEACHER_UNET = dict(
    block_out_channels=[32, 64, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=1, attention_head_dim=4, cross_attention_dim=64, norm_num_groups=8,
    sample_size=16,
)

TEACHER_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=MAX_TOKENS)

TEACHER_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """The pretraining recipe (the defaults are the shipped teacher's)."""

    seed: int = 0
    vae_steps: int = 1200
    vae_batch_size: int = 8
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 4500
    unet_batch_size: int = 32
    unet_learning_rate: float = 4e-4
    text_learning_rate: float = 2e-4
    warmup_steps: int = 500
    caption_dropout: float = 0.1
    ema_decay: float = 0.999

    def __post_init__(self):
        for name in ("vae_steps", "vae_batch_size", "unet_steps", "unet_batch_size"):
            if getattr(self, name) < 0 or (getattr(self, name) == 0 and "batch" in name):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


def teacher_tokenizer(folder: str | Path):
    """Write the teacher's CLIP-format tokenizer (one token per word of the captions'
    grammar) to `folder` and load it with transformers."""
    from transformers import CLIPTokenizer

    write_tiny_clip_tokenizer(folder, model_max_length=MAX_TOKENS, words=_shapes.vocabulary())
    return CLIPTokenizer.from_pretrained(str(folder))


def text_config(tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TEACHER_TEXT,
    )


def _images_to_model(images: np.ndarray) -> jnp.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return jnp.asarray(images.transpose(0, 3, 1, 2), jnp.float32) / 127.5 - 1.0


def _adamw(lr: float, steps: int, warmup: int) -> optax.GradientTransformation:
    warmup = max(1, min(warmup, steps // 2))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                  end_value=lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=1e-2))


# --- phase 1: the VAE ------------------------------------------------------------------------

def vae_loss(vae: AutoencoderKL, x: jnp.ndarray, key, kl_weight: float):
    """Per-batch L1 + MSE reconstruction and `kl_weight` x KL to N(0, I) (summed over latent
    elements, averaged over the batch)."""
    def one(x, key):
        post = vae.encode(x)
        z = post.sample(key)
        rec = vae.decode(z)
        kl = 0.5 * jnp.sum(post.mean**2 + post.var - 1.0 - post.logvar)
        err = rec - x
        return jnp.mean(jnp.abs(err)) + jnp.mean(err**2), kl

    rec, kl = jax.vmap(one)(x, jax.random.split(key, x.shape[0]))
    return jnp.mean(rec) + kl_weight * jnp.mean(kl), (jnp.mean(rec), jnp.mean(kl))


def train_vae(cfg: PretrainConfig, *, progress: Optional[Callable[[int, dict], None]] = None
              ) -> AutoencoderKL:
    """Phase 1: train the VAE on fresh scenes; returns it with its `scaling_factor` set."""
    key = jax.random.key(cfg.seed)
    k_init, key = jax.random.split(key)
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict(TEACHER_VAE), key=k_init)
    opt = _adamw(cfg.vae_learning_rate, cfg.vae_steps, cfg.warmup_steps // 4)
    state = opt.init(eqx.filter(vae, eqx.is_array))

    @eqx.filter_jit(donate="all-except-first")
    def step(vae, state, x, key):
        (loss, aux), grads = eqx.filter_value_and_grad(vae_loss, has_aux=True)(
            vae, x, key, cfg.vae_kl_weight)
        updates, state = opt.update(grads, state, eqx.filter(vae, eqx.is_array))
        return eqx.apply_updates(vae, updates), state, loss, aux

    data = _shapes.batches(cfg.seed, cfg.vae_batch_size, "train")
    for i in range(cfg.vae_steps):
        images, _, _ = next(data)
        vae, state, loss, (rec, kl) = step(vae, state, _images_to_model(images),
                                           jax.random.fold_in(key, i))
        if progress is not None:
            progress(1, {"phase": "vae", "step": i + 1, "loss": float(loss), "rec": float(rec),
                         "kl": float(kl)})
    return _set_scaling_factor(vae, cfg.seed)


def _set_scaling_factor(vae: AutoencoderKL, seed: int, n: int = 256) -> AutoencoderKL:
    """`scaling_factor` = 1 / std of the posterior samples of `n` training scenes."""
    images = np.concatenate([next(_shapes.batches(seed + 1, n, "train"))[0]])
    x = _images_to_model(images)
    encode = eqx.filter_jit(jax.vmap(lambda v, x, k: v.encode(x).sample(k), in_axes=(None, 0, 0)))
    z = encode(vae, x, jax.random.split(jax.random.key(seed + 1), n))
    scale = float(1.0 / jnp.std(z))
    config = dataclasses.replace(vae.config, scaling_factor=round(scale, 5))
    shell = eqx.filter_eval_shape(lambda: AutoencoderKL(config, key=jax.random.key(0)))
    return jax.tree.unflatten(jax.tree.structure(shell), jax.tree.leaves(vae))


# --- phase 2: UNet + text encoder ------------------------------------------------------------

class Denoiser(eqx.Module):
    """What phase 2 trains: the UNet and the text encoder."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel


def denoising_loss(model: Denoiser, vae: AutoencoderKL, schedule: NoiseSchedule,
                   images: jnp.ndarray, ids: jnp.ndarray, key) -> jnp.ndarray:
    """The epsilon-prediction loss: encode (frozen VAE, posterior sample, scaled), noise at a
    uniform timestep, predict the noise from the caption's embeddings."""
    def one(x, ids, key):
        kz, kt, ke = jax.random.split(key, 3)
        z = jax.lax.stop_gradient(vae.scale_latents(vae.encode(x).sample(kz)))
        t = jax.random.randint(kt, (), 0, schedule.num_train_timesteps)
        eps = jax.random.normal(ke, z.shape)
        zt = add_noise(z, eps, schedule.alpha(t), schedule.sigma(t))
        pred = model.unet(zt, t, model.text_encoder(ids))
        return jnp.mean((pred - eps) ** 2)

    return jnp.mean(jax.vmap(one)(images, ids, jax.random.split(key, images.shape[0])))


CHECKPOINT = "denoiser-checkpoint"
"""Phase 2's checkpoint inside the unfinished output (`.NAME.partial/`): `state.eqx` (model,
EMA, optimiser state) and `state.json` (step, caption-dropout generator, recipe)."""


def _save_denoiser_checkpoint(folder: Path, step: int, tree, rng: np.random.Generator,
                              cfg: PretrainConfig) -> None:
    """Write the checkpoint beside the old one, then swap them (never half-written)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    eqx.tree_serialise_leaves(tmp / "state.eqx", tree)
    (tmp / "state.json").write_text(json.dumps(
        {"step": step, "rng": rng.bit_generator.state, "recipe": dataclasses.asdict(cfg)}))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_denoiser_checkpoint(folder: Path, like, cfg: PretrainConfig, log: Callable[[str], None]):
    """`(step, tree, rng state)` of a checkpoint made with the same recipe, else None."""
    meta_file = folder / "state.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("recipe") != dataclasses.asdict(cfg):
        log(f"ignoring {folder}: made with another recipe")
        return None
    return meta["step"], eqx.tree_deserialise_leaves(folder / "state.eqx", like), meta["rng"]


def train_denoiser(cfg: PretrainConfig, vae: AutoencoderKL, tokenizer, *,
                   progress: Optional[Callable[[int, dict], None]] = None,
                   checkpoint_dir: Optional[Path] = None, checkpoint_every: int = 500,
                   log: Optional[Callable[[str], None]] = None) -> Denoiser:
    """Phase 2: train the UNet and the text encoder together; returns their EMA.

    With `checkpoint_dir`, the state (model, EMA, optimiser, step, the caption-dropout
    generator) is saved there every `checkpoint_every` steps, and a checkpoint found there
    (made with the same recipe) is resumed: the data stream is replayed to its step, so that
    an interrupted run ends with the weights of an uninterrupted one."""
    log = log or (lambda _: None)
    k_unet, k_text, key = jax.random.split(jax.random.key(cfg.seed + 100), 3)
    model = Denoiser(
        UNet2DConditionModel(UNet2DConditionConfig.from_dict(TEACHER_UNET), key=k_unet),
        CLIPTextModel(text_config(tokenizer), key=k_text),
    )
    schedule = NoiseSchedule.from_config(TEACHER_SCHEDULER)
    labels = Denoiser(unet=jax.tree.map(lambda _: "unet", model.unet),
                      text_encoder=jax.tree.map(lambda _: "text", model.text_encoder))
    opt = optax.multi_transform(
        {"unet": _adamw(cfg.unet_learning_rate, cfg.unet_steps, cfg.warmup_steps),
         "text": _adamw(cfg.text_learning_rate, cfg.unet_steps, cfg.warmup_steps)},
        eqx.filter(labels, lambda x: isinstance(x, str), replace=None),
    )
    params = eqx.filter(model, eqx.is_array)
    state = opt.init(params)
    ema = jax.tree.map(jnp.copy, params)

    @eqx.filter_jit(donate="all-except-first")
    def step(vae, model, ema, state, images, ids, key, decay):
        loss, grads = eqx.filter_value_and_grad(denoising_loss)(
            model, vae, schedule, images, ids, key)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        ema = ema_update(ema, eqx.filter(model, eqx.is_array), decay)
        return model, ema, state, loss

    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="np").input_ids
    rng = np.random.default_rng([cfg.seed, 11])
    data = _shapes.batches(cfg.seed + 1000, cfg.unet_batch_size, "train")
    start = 0
    resumed = (None if checkpoint_dir is None else
               _load_denoiser_checkpoint(checkpoint_dir, (model, ema, state), cfg, log))
    if resumed is not None:
        start, (model, ema, state), rng_state = resumed
        rng.bit_generator.state = rng_state
        for _ in range(start):  # the scenes are drawn from one stream: replay it
            next(data)
        log(f"resuming the UNet and text encoder at step {start} from {checkpoint_dir}")
        if progress is not None:
            progress(start, {"phase": "unet", "step": start, "loss": float("nan")})
    for i in range(start, cfg.unet_steps):
        images, _, captions = next(data)
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS,
                        truncation=True, return_tensors="np").input_ids
        drop = rng.random(len(captions)) < cfg.caption_dropout
        ids = np.where(drop[:, None], empty, ids)
        decay = min(cfg.ema_decay, (1 + i) / (10 + i))
        model, ema, state, loss = step(vae, model, ema, state, _images_to_model(images),
                                       jnp.asarray(ids, jnp.int32), jax.random.fold_in(key, i),
                                       jnp.float32(decay))
        if progress is not None:
            progress(1, {"phase": "unet", "step": i + 1, "loss": float(loss)})
        if checkpoint_dir is not None and (i + 1) % checkpoint_every == 0 \
                and i + 1 < cfg.unet_steps:
            _save_denoiser_checkpoint(checkpoint_dir, i + 1, (model, ema, state), rng, cfg)
    return eqx.combine(ema, model)


# --- the whole job -----------------------------------------------------------------------------

def write_model_index(folder: Path) -> None:
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(TEACHER_SCHEDULER, indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }, indent=2) + "\n")


def pretrain_teacher(folder: str | Path, cfg: PretrainConfig = PretrainConfig(), *,
                     progress: Optional[Callable[[int, dict], None]] = None,
                     log: Optional[Callable[[str], None]] = None,
                     checkpoint_every: int = 500) -> Path:
    """Train the whole teacher and write it to `folder` as a diffusers-format model
    directory. An interrupted run resumes: its finished VAE (same VAE settings) is reused
    and the UNet and text encoder continue from their last checkpoint (every
    `checkpoint_every` steps, same recipe), ending with the weights of an uninterrupted
    run. The directory appears complete or not at all."""
    folder = Path(folder)
    work = folder.with_name(f".{folder.name}.partial")
    work.mkdir(parents=True, exist_ok=True)
    recipe = json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                         if k in ("seed", "warmup_steps") or k.startswith("vae_")},
                        sort_keys=True)
    log = log or (lambda _: None)
    timings = {}
    if (work / "vae" / "config.json").exists() and (work / "recipe.json").exists() \
            and (work / "recipe.json").read_text() == recipe:
        vae = load_vae(work / "vae")
        log(f"reusing the VAE trained earlier in {work / 'vae'}")
    else:
        (work / "recipe.json").write_text(recipe)
        t0 = time.perf_counter()
        vae = train_vae(cfg, progress=progress)
        timings["vae_seconds"] = round(time.perf_counter() - t0, 1)
        save_vae(vae, work / "vae")
    tokenizer = teacher_tokenizer(work / "tokenizer")
    t0 = time.perf_counter()
    model = train_denoiser(cfg, vae, tokenizer, progress=progress,
                           checkpoint_dir=work / CHECKPOINT, checkpoint_every=checkpoint_every,
                           log=log)
    timings["unet_and_text_seconds"] = round(time.perf_counter() - t0, 1)
    save_unet(model.unet, work / "unet")
    save_text_encoder(model.text_encoder, work / "text_encoder")
    write_model_index(work)
    (work / "pretraining.json").write_text(json.dumps(
        {"recipe": dataclasses.asdict(cfg), **timings,
         "platform": jax.default_backend()}, indent=2) + "\n")
    (work / "recipe.json").unlink()
    shutil.rmtree(work / CHECKPOINT, ignore_errors=True)
    if folder.exists():
        shutil.rmtree(folder)
    work.rename(folder)
    return folder
