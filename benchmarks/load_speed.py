"""Load time of an SD1.5-sized UNet: a diffusers-style fp16-variant source against the output of
`codi convert-weights` (float32 and bfloat16).

    python benchmarks/load_speed.py [--workdir DIR] [--repeats N]

The UNet has SD 1.5's hyperparameters and random weights (nothing is downloaded). Each load is
timed until every parameter is on the device; the files are read once before timing, so the
numbers compare warm page caches (the conversion's gain: no dtype cast, one contiguous file).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from codi_eqx.models import UNet2DConditionConfig, UNet2DConditionModel
from weights_conversion import load_unet, save_unet

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=768, norm_num_groups=32,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)


def random_unet(dtype) -> UNet2DConditionModel:
    cfg = UNet2DConditionConfig.from_dict(SD15_UNET)
    template = eqx.filter_eval_shape(lambda: UNet2DConditionModel(cfg, key=jax.random.key(0)))
    leaves, treedef = jax.tree_util.tree_flatten(template, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    rng = np.random.default_rng(0)
    leaves = [
        jnp.asarray((0.02 * rng.standard_normal(x.shape, np.float32)).astype(dtype))
        if isinstance(x, jax.ShapeDtypeStruct) else x
        for x in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model = fn()
        jax.block_until_ready(eqx.filter(model, eqx.is_array))
        best = min(best, time.perf_counter() - start)
        del model
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="codi-load-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "source_unet"
        if not (src / "diffusion_pytorch_model.fp16.safetensors").is_file():
            save_unet(random_unet(np.float16), src)
            (src / "diffusion_pytorch_model.safetensors").rename(src / "diffusion_pytorch_model.fp16.safetensors")
        # What `codi convert-weights` does per component: a checked load in the target dtype,
        # then one contiguous safetensors file in that dtype.
        converted = {}
        for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            out = work / f"converted_{name}"
            if not out.is_dir():
                save_unet(load_unet(src, dtype=dt, variant="fp16"), out)
            converted[name] = (out, dt)
        params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
            eqx.filter(load_unet(converted["bfloat16"][0], dtype=jnp.bfloat16), eqx.is_array)))
        rows = []
        for name, (out, dt) in converted.items():
            t_src = timed(lambda: load_unet(src, dtype=dt, variant="fp16"), args.repeats)
            t_out = timed(lambda: load_unet(out, dtype=dt), args.repeats)
            rows.append({"dtype": name, "source_fp16_variant_s": round(t_src, 3),
                         "converted_s": round(t_out, 3), "speedup": round(t_src / t_out, 2)})
        print(json.dumps({"unet_params": params, "device": str(jax.devices()[0]), "results": rows}, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
