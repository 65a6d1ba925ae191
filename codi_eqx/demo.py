"""The built-in demo: a tiny random Stable Diffusion model and a synthetic edge-to-image
dataset, made on the spot, so that the whole job (train, then sample) runs right after
installation, offline and on a CPU, in a few minutes. The images it makes are not meant to be
pretty: random weights learn little in a few steps. It shows the tool working end to end."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from ._tiny_tokenizer import write_tiny_clip_tokenizer
from .models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionConfig,
    UNet2DConditionModel,
)

DEMO_UNET = dict(
    block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
    attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8, sample_size=8,
)
DEMO_VAE = dict(
    block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, norm_num_groups=4,
    latent_channels=4, sample_size=64,
)
DEMO_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220)}


def make_demo_model(folder: str | Path, *, seed: int = 0) -> Path:
    """A complete tiny random model in diffusers' directory format (UNet, VAE with SD's
    8x downsampling, CLIP text encoder, tokenizer, scheduler)."""
    from weights_conversion import save_text_encoder, save_unet, save_vae

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = write_tiny_clip_tokenizer(folder / "tokenizer", model_max_length=16)
    del tok
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    save_unet(UNet2DConditionModel(UNet2DConditionConfig.from_dict(DEMO_UNET), key=k1), folder / "unet")
    save_vae(AutoencoderKL(AutoencoderKLConfig.from_dict(DEMO_VAE), key=k2), folder / "vae")
    save_text_encoder(CLIPTextModel(text_config, key=k3), folder / "text_encoder")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(DEMO_SCHEDULER, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
    }, indent=2))
    return folder


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    r = rng.uniform(0.15, 0.3) * size
    if kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)


def make_demo_dataset(folder: str | Path, *, n: int = 16, size: int = 64, seed: int = 0) -> Path:
    """A dataset in the seed's layout (images/, processed_images/, meta.jsonl): coloured
    circles and squares, their outlines as the condition image, captions naming both."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "processed_images").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        kind = ("circle", "square")[(i // len(COLOURS)) % 2]
        mask = _shape_mask(kind, size, rng)
        image = np.full((size, size, 3), 235, np.uint8)
        image[mask] = COLOURS[colour]
        edge = mask ^ (
            np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
        )
        cond = np.repeat((edge * 255).astype(np.uint8)[..., None], 3, axis=2)
        Image.fromarray(image).save(folder / "images" / f"image_{i}.png")
        Image.fromarray(cond).save(folder / "processed_images" / f"image_{i}.png")
        lines.append(json.dumps({
            "image": f"images/image_{i}.png",
            "conditioning_image": f"processed_images/image_{i}.png",
            "caption": f"a {colour} {kind}",
        }))
    (folder / "meta.jsonl").write_text("\n".join(lines) + "\n")
    return folder
