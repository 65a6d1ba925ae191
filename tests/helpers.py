"""What the tests share: tiny random models (diffusers / transformers ones saved in diffusers'
format for the parity and loading tests, and JAX ones built directly for the training and
sampling tests), seeded data, the distillation test set-up, and the CLI runner of the training
tests. The one helper module: test modules import from here, never from each other."""

import functools
import io
import json
import math
import os
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import typer
from PIL import Image
from typer.testing import CliRunner

from codi_eqx import distill
from codi_eqx.diffusion import NoiseSchedule
from codi_eqx.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextConfig,
    CLIPTextModel,
    ControlNetModel,
    UNet2DConditionConfig,
    UNet2DConditionModel,
)
from codi_eqx.parallel import make_mesh, replicate, shard_batch


def xla_flags(devices: int) -> str:
    """This session's XLA flags (tests/conftest.py: the optimisation level) with `devices`
    simulated CPU devices, for a child process whose numbers are compared with this one's."""
    return re.sub(r"--xla_force_host_platform_device_count=\d+",
                  f"--xla_force_host_platform_device_count={devices}",
                  os.environ.get("XLA_FLAGS", ""))


# ==========================================================================================
# Tiny random models built with diffusers / transformers (PyTorch), saved in diffusers' format
# so that the real loading code is exercised

SD1_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=4,
    cross_attention_dim=32,
    norm_num_groups=8,
)

SD2_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=[2, 4, 4],
    cross_attention_dim=24,
    norm_num_groups=8,
    use_linear_projection=True,
    upcast_attention=True,
    only_cross_attention=[True, False, False],
    transformer_layers_per_block=[2, 1, 1],
)

SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=[2, 4, 4],
    cross_attention_dim=40,  # the two text encoders' widths, 16 + 24, concatenated
    norm_num_groups=8,
    use_linear_projection=True,
    transformer_layers_per_block=[1, 2, 3],  # the mid block takes the last
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,  # pooled width + 6 time ids
)
"""SDXL's layout at toy size: no attention in the first block, several transformer layers
deeper, linear projections, per-block heads, and the added `text_time` embedding."""


def randomize_(module, seed: int = 0, scale: float = 0.2) -> None:
    """Fill every parameter (norms and zero convs included) with seeded random values:
    weights around their default magnitude, norm scales around 1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and ("norm" in name and name.endswith("weight")):
                p.copy_(1.0 + scale * noise)
            elif p.ndim == 1:
                p.copy_(scale * noise)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / np.sqrt(fan_in))


def make_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**config).eval()
    randomize_(unet, seed)
    return unet


def save_unet_dir(unet, folder: Path) -> Path:
    unet.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


PIPELINE_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=32,
    norm_num_groups=8,
)

PIPELINE_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
)

SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def make_tiny_pipeline(folder: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A complete tiny random Stable Diffusion model in diffusers' directory format: UNet,
    VAE (downsampling by 8, as SD's), CLIP text encoder, tokenizer, scheduler config."""
    import diffusers
    import transformers

    from codi_eqx._tiny_tokenizer import write_tiny_clip_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_clip_tokenizer(folder / "tokenizer", model_max_length=16)
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    text = transformers.CLIPTextModel(text_config).eval()
    randomize_(text, seed + 1, scale=0.05)
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet = make_unet(PIPELINE_UNET, seed + 2)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae = diffusers.AutoencoderKL(**PIPELINE_VAE).eval()
    randomize_(vae, seed + 3, scale=0.05)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SCHEDULER, "prediction_type": prediction_type})
    )
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }))
    return folder


SDXL_PIPELINE_UNET = dict(
    SDXL_UNET,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=[2, 4],
    transformer_layers_per_block=[1, 2],
)
"""A tiny SDXL UNet for whole-pipeline tests (text widths 16 + 24, pooled 24)."""


def make_tiny_sdxl_pipeline(folder: Path, *, seed: int = 0) -> Path:
    """A complete tiny random SDXL model in diffusers' directory format: the `text_time`
    UNet, a VAE downsampling by 8 (scaling factor 0.13025), `text_encoder` (CLIP, quick_gelu,
    width 16) and `text_encoder_2` (with projection, gelu, width 24, projection 24), two
    tokenizers (the second padding with "!", as SDXL's), the scheduler, and a
    `model_index.json` naming `StableDiffusionXLPipeline`."""
    import diffusers
    import transformers

    from codi_eqx._tiny_tokenizer import write_tiny_clip_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_clip_tokenizer(folder / "tokenizer", model_max_length=16)
    write_tiny_clip_tokenizer(folder / "tokenizer_2", model_max_length=16)
    cfg2 = read_json(folder / "tokenizer_2" / "tokenizer_config.json")
    (folder / "tokenizer_2" / "tokenizer_config.json").write_text(
        json.dumps({**cfg2, "pad_token": "!"}))
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    for sub, width, act, cls in (
        ("text_encoder", 16, "quick_gelu", transformers.CLIPTextModel),
        ("text_encoder_2", 24, "gelu", transformers.CLIPTextModelWithProjection),
    ):
        config = transformers.CLIPTextConfig(
            vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
            hidden_act=act, projection_dim=24, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        model = cls(config).eval()
        randomize_(model, seed + width, scale=0.05)
        model.save_pretrained(folder / sub, safe_serialization=True)
    unet = make_unet(SDXL_PIPELINE_UNET, seed + 2)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae = diffusers.AutoencoderKL(**PIPELINE_VAE, scaling_factor=0.13025).eval()
    randomize_(vae, seed + 3, scale=0.05)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }))
    return folder


def diffusers_controlnet_error(adapter, folder: Path, *, seed: int = 0) -> float:
    """Load `folder` with diffusers' `ControlNetModel` and run it and `adapter` (ours) on the
    same seeded example (8x8 latents, a 64x64 condition image where the adapter takes one, at
    timestep 321). Returns the largest error over the residuals, each relative to its size."""
    import diffusers
    import equinox as eqx
    import jax.numpy as jnp
    import torch

    cfg = adapter.config.unet
    ref = diffusers.ControlNetModel.from_pretrained(folder).eval()
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((cfg.in_channels, 8, 8)).astype(np.float32)
    text = rng.standard_normal((5, cfg.cross_attention_dim[0])).astype(np.float32)
    image = rng.uniform(size=(3, 64, 64)).astype(np.float32)
    added = None  # SDXL: a pooled text embedding and the time ids
    if cfg.addition_embed_type == "text_time":
        added = {"text_embeds": rng.standard_normal((cfg.pooled_text_dim,)).astype(np.float32),
                 "time_ids": np.array([80, 72, 4, 2, 64, 64], np.float32)}
    with torch.no_grad():
        down, mid = ref(torch.from_numpy(sample)[None], 321, torch.from_numpy(text)[None],
                        torch.from_numpy(image)[None], return_dict=False,
                        added_cond_kwargs=None if added is None else
                        {k: torch.from_numpy(v)[None] for k, v in added.items()})
    with_cond = adapter.controlnet_cond_embedding is not None
    ours_down, ours_mid = eqx.filter_jit(adapter)(
        jnp.asarray(sample), 321, jnp.asarray(text), jnp.asarray(image) if with_cond else None,
        added_cond_kwargs=None if added is None else {k: jnp.asarray(v) for k, v in added.items()})
    theirs = [t[0].numpy() for t in (*down, mid)]
    assert len(ours_down) + 1 == len(theirs)
    return max(
        float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-6))
        for a, b in zip((*ours_down, ours_mid), theirs)
    )


# ==========================================================================================
# Tiny random models built directly in JAX (no PyTorch), for the training and sampling tests

UNET = UNet2DConditionConfig.from_dict(dict(
    block_out_channels=[16, 32],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=16,
    norm_num_groups=8,
    sample_size=4,
))

VAE = AutoencoderKLConfig.from_dict(dict(
    block_out_channels=[8, 8, 8, 8],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
))

TEXT = CLIPTextConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, max_position_embeddings=8,
)

SCHEDULE_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def perturb(model, key, scale: float = 0.05):
    """Add small noise to every inexact array (so that zero-initialised parts are not zero)."""
    leaves, treedef = jax.tree.flatten(model)
    keys = jax.random.split(key, len(leaves))
    out = [
        a + scale * jax.random.normal(k, a.shape, a.dtype)
        if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating) else a
        for a, k in zip(leaves, keys)
    ]
    return jax.tree.unflatten(treedef, out)


@functools.cache
def tiny_models(seed: int = 0, prediction_type: str = "epsilon"):
    """(UNet, VAE, text encoder, schedule), seeded. Built once per process: building runs
    every initialiser eagerly, one small compile each (about 170 for the three models,
    tens of seconds), and jax arrays are immutable, so the tests share them."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    unet = UNet2DConditionModel(UNET, key=k1)
    vae = AutoencoderKL(VAE, key=k2)
    text = CLIPTextModel(TEXT, key=k3)
    schedule = NoiseSchedule.from_config({**SCHEDULE_CONFIG, "prediction_type": prediction_type})
    return unet, vae, text, schedule


# ==========================================================================================
# Seeded data

def png_bytes(rng, w=40, h=24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_seed_folder(root: Path, n: int = 12, *, foreign: bool = True, captions=None) -> Path:
    """The seed's layout; with `foreign`, meta.jsonl holds absolute paths of another machine."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "processed_images").mkdir()
    lines = []
    for i in range(n):
        (root / "images" / f"image_{i}.png").write_bytes(png_bytes(rng))
        (root / "processed_images" / f"image_{i}.png").write_bytes(png_bytes(rng))
        prefix = "/data/dataset/" if foreign else ""
        caption = captions(i) if captions else f"caption {i}"
        lines.append(json.dumps({"image": f"{prefix}images/image_{i}.png",
                                 "conditioning_image": f"{prefix}processed_images/image_{i}.png",
                                 "caption": caption}))
    (root / "meta.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ==========================================================================================
# The distillation tests' set-up: a batch, the frozen models and the trained parameters, a
# float64 schedule, a few steps of the compiled train step

T = 1000
LATENT = (4, 4, 4)
COND = (3, 32, 32)


def distill_batch(n=4, seed=0, with_pixels=False):
    rng = np.random.default_rng(seed)
    b = {
        "latent_mean": rng.standard_normal((n,) + LATENT).astype(np.float32),
        "latent_logvar": rng.uniform(-4, -1, (n,) + LATENT).astype(np.float32),
        "scaling_factor": np.full((n,), 0.18215, np.float32),
        "text_embeddings": rng.standard_normal((n, 8, UNET.cross_attention_dim[0])).astype(np.float32),
        "conditioning_pixel_values": rng.uniform(0, 1, (n,) + COND).astype(np.float32),
    }
    return b


@functools.cache
def distill_setup(prediction_type="epsilon", conditioning_channels=3, perturbed=True, full=False, dtype=jnp.float32):
    """(Frozen, Trainable) for the distillation tests; built once per process per options
    (see `tiny_models`)."""
    unet, vae, text, sched = tiny_models(prediction_type=prediction_type)
    adapter = ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels, key=jax.random.key(1))
    if perturbed:
        adapter = perturb(adapter, jax.random.key(5), 0.02)
    null = jax.random.normal(jax.random.key(9), (8, UNET.cross_attention_dim[0]))
    cast = lambda m: jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, m)  # noqa: E731
    frozen = distill.make_frozen(None if full else cast(unet), None, None, sched, null_embedding=null)
    params = distill.Trainable(adapter, unet if full else None)
    return frozen, params


def np_schedule():
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas).astype(np.float32)
    return lambda t: (np.sqrt(abar[t]), np.sqrt(1 - abar[t]))


def run_train_steps(frozen, params, cfg, *, devices, accum=1, steps=2, lr=1e-3, batches=None, ema_decay=0.9):
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


def run_two_steps(share=None):
    """Two steps on the global batch of 4; `share=(start, stop)` is this process's slice."""
    unet, _, _, sched = tiny_models()
    adapter = perturb(ControlNetModel.from_unet(unet, key=jax.random.key(1)), jax.random.key(5), 0.02)
    null = jax.random.normal(jax.random.key(9), (8, UNET.cross_attention_dim[0]))
    frozen = distill.make_frozen(unet, None, None, sched, null_embedding=null)
    ocfg = distill.OptimConfig(learning_rate=1e-3)
    mesh = make_mesh()
    state = replicate(distill.init_train_state(distill.Trainable(adapter), distill.make_optimizer(ocfg),
                                               key=jax.random.key(2)), mesh)
    frozen = replicate(frozen, mesh)
    step = distill.make_train_step(distill.DistillConfig(), mesh, lr_fn=distill.lr_schedule(ocfg))
    out = []
    for i in range(2):
        batch = distill_batch(seed=i)
        if share is not None:
            batch = {k: v[share[0]:share[1]] for k, v in batch.items()}
        state, metrics = step(frozen, state, shard_batch(batch, mesh))
        out.append({k: float(v) for k, v in metrics.items()})
    return out


# ==========================================================================================
# The training tests' CLI runner and the runs they share

@functools.cache
def _train_app() -> typer.Typer:
    from cli.train import train

    app = typer.Typer()
    app.command()(train)
    return app


def invoke(*args):
    """`codi train ARGS` in this process, through Typer's test runner."""
    return CliRunner().invoke(_train_app(), [str(a) for a in args],
                              env={"COLUMNS": "240", "NO_COLOR": "1"})


def base(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data,
            "--output_dir", out, "--resolution", 32, "--max_train_steps", 4,
            "--checkpointing-steps", 2, "--distill_learning_steps", 10, *extra]


def library_run(model, data, out, hooks, **options):
    """The run of `base(model, data, out)` through the library's `train`, with `hooks`."""
    from codi_eqx.train import TrainConfig
    from codi_eqx.train import train as run

    config = TrainConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(data),
                         output_dir=str(out), resolution=32, max_train_steps=4,
                         checkpointing_steps=2, distill_learning_steps=10, **options)
    return run(config, hooks=hooks)


def signal_after(step, signum):
    """Hooks that send the run `signum` after step `step`, as a user's Ctrl-C or kill would."""
    from codi_eqx.train import TrainHooks

    def after_step(s):
        if s == step:
            os.kill(os.getpid(), signum)

    return TrainHooks(after_step=after_step)


def why(r):
    """The output of a CLI run, with the traceback of an unexpected exception."""
    import traceback

    if r.exc_info and not isinstance(r.exception, SystemExit):
        return r.output + "".join(traceback.format_exception(*r.exc_info))
    return r.output


def rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
