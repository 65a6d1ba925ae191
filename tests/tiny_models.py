"""Tiny random Stable Diffusion components built with diffusers / transformers (PyTorch) for
the parity tests, saved in diffusers' format so that the real loading code is exercised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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

    from tiny_tokenizer import write_tiny_clip_tokenizer

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
    with torch.no_grad():
        down, mid = ref(torch.from_numpy(sample)[None], 321, torch.from_numpy(text)[None],
                        torch.from_numpy(image)[None], return_dict=False)
    with_cond = adapter.controlnet_cond_embedding is not None
    ours_down, ours_mid = eqx.filter_jit(adapter)(
        jnp.asarray(sample), 321, jnp.asarray(text), jnp.asarray(image) if with_cond else None)
    theirs = [t[0].numpy() for t in (*down, mid)]
    assert len(ours_down) + 1 == len(theirs)
    return max(
        float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-6))
        for a, b in zip((*ours_down, ours_mid), theirs)
    )
