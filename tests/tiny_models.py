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
