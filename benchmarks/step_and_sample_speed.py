"""Speed of the CoDi training step and of few-step vs multi-step sampling, with random weights.

    python benchmarks/step_and_sample_speed.py --size sd15 --latent 32 --batch 1        # CPU
    python benchmarks/step_and_sample_speed.py --size sd15 --latent 64 --batch 8 --dtype bfloat16  # GPU

`--size sd15` is Stable Diffusion 1.5's UNet (859M parameters) and its adapter (361M);
`tiny` the test models. Batches carry cached latents and text embeddings (the
`--cache_latents` path of `codi train`), so the step is UNet + adapter work alone. Attention
uses the fused cuDNN kernel where it applies (GPU, half precision); `--attention xla` forces
XLA's lowering for comparison. Prints one table; times are after compilation, mean of
`--repeats` calls, with `block_until_ready`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import codi_eqx.nn._attention as attention_module  # noqa: E402
from codi_eqx import distill  # noqa: E402
from codi_eqx.diffusion import NoiseSchedule, codi_sampling_timesteps, ddim_previous_timesteps, ddim_timesteps  # noqa: E402
from codi_eqx.models import ControlNetModel, UNet2DConditionConfig, UNet2DConditionModel  # noqa: E402
from codi_eqx.parallel import make_mesh, replicate, shard_batch  # noqa: E402
from codi_eqx.sampling import codi_sample, ddim_sample, guided_model_output  # noqa: E402

SD15 = dict(
    block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
    layers_per_block=2, sample_size=64,
)
TINY = dict(
    block_out_channels=[16, 32], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
    attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8, sample_size=4,
)
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False}


def timed(fn, repeats):
    out = fn()
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["sd15", "tiny"], default="tiny")
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", choices=["auto", "xla"], default="auto")
    ap.add_argument("--what", default="step,sample", help="step, cfg (guidance-aware step too), sample")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.attention == "xla":
        attention_module.attention_implementation = lambda q, k=None: None
    dtype = jnp.dtype(args.dtype)
    cfg = UNet2DConditionConfig.from_dict(SD15 if args.size == "sd15" else TINY)
    t0 = time.perf_counter()
    unet = eqx.filter_jit(lambda k: UNet2DConditionModel(cfg, dtype=dtype, key=k))(jax.random.key(0))
    adapter = ControlNetModel.from_unet(unet, key=jax.random.key(1))
    init_s = time.perf_counter() - t0
    print(f"init {init_s:.1f} s", flush=True)
    n_unet = sum(a.size for a in jax.tree.leaves(eqx.filter(unet, eqx.is_array)))
    n_adapter = sum(a.size for a in jax.tree.leaves(eqx.filter(adapter, eqx.is_array)))
    sched = NoiseSchedule.from_config(SCHEDULER)
    D, L, h, B = cfg.cross_attention_dim[0], 77 if args.size == "sd15" else 8, args.latent, args.batch
    rng = np.random.default_rng(0)
    rows = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "size": args.size, "latent": h, "batch": B, "dtype": args.dtype,
            "attention": args.attention, "unet_params": int(n_unet), "adapter_params": int(n_adapter),
            "init_s": round(init_s, 2)}
    text = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
    cond = jnp.asarray(rng.uniform(0, 1, (B, 3, 8 * h, 8 * h)), jnp.float32)

    if "step" in args.what:
        null = jnp.zeros((L, D), jnp.float32)
        frozen = distill.make_frozen(unet, None, None, sched, null_embedding=null)
        mesh = make_mesh(jax.devices()[:1])
        variants = [("step", distill.DistillConfig())]
        if "cfg" in args.what:
            variants.append(("step_cfg_aware", distill.DistillConfig(cfg_aware_distill=True)))
        for name, dcfg in variants:
            ocfg = distill.OptimConfig()
            state = replicate(distill.init_train_state(distill.Trainable(adapter), distill.make_optimizer(ocfg),
                                                       key=jax.random.key(2)), mesh)
            frz = replicate(frozen, mesh)
            step = distill.make_train_step(dcfg, mesh, lr_fn=distill.lr_schedule(ocfg))
            batch = shard_batch({
                "latent_mean": rng.standard_normal((B, 4, h, h)).astype(np.float32),
                "latent_logvar": np.full((B, 4, h, h), -3.0, np.float32),
                "scaling_factor": np.full((B,), 0.18215, np.float32),
                "text_embeddings": np.asarray(text),
                "conditioning_pixel_values": np.asarray(cond),
            }, mesh)
            t0 = time.perf_counter()
            with jax.numpy_dtype_promotion("standard"):
                state, m = step(frz, state, batch)
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t0
                holder = [state]

                def run():
                    holder[0], metrics = step(frz, holder[0], batch)
                    return metrics

                sec = timed(run, args.repeats)
            rows[f"{name}_compile_s"] = round(compile_s, 2)
            rows[f"{name}_s"] = round(sec, 4)
            rows[f"{name}_examples_per_s"] = round(B / sec, 2)
            rows[f"{name}_compiles"] = step.num_traces()
            print({k: rows[k] for k in rows if k.startswith(name)}, flush=True)
            del state, holder

    if "sample" in args.what:
        z0 = jnp.asarray(rng.standard_normal((B, 4, h, h)), jnp.float32)
        codi_ts = tuple(codi_sampling_timesteps(1000, 50, 4))
        ddim_ts = ddim_timesteps(50, SCHEDULER)
        ddim_prev = ddim_previous_timesteps(ddim_ts, 1000)

        def sampler(kind, guidance):
            @eqx.filter_jit
            def go(unet, adapter, z0, text, cond, ts, prev):
                def one(z, c, img):
                    fn = lambda z, t: guided_model_output(  # noqa: E731
                        unet, adapter, z, t, c, jnp.zeros_like(c), img, guidance_scale=guidance)
                    if kind == "codi":
                        return codi_sample(fn, sched, z, codi_ts)[0]
                    # Traced timesteps (arguments of `go`): one lax.scan body, not 50
                    # unrolled UNets (fine on GPUs; on CPU use generate_speed.py).
                    return ddim_sample(fn, sched, z, ts, prev)[0]
                return jax.vmap(one)(z0, text, cond)
            ts = jnp.asarray(ddim_ts, jnp.int32)
            prev = jnp.asarray(ddim_prev, jnp.int32)
            return lambda: go(unet, adapter, z0, text, cond, ts, prev)

        with jax.numpy_dtype_promotion("standard"):
            for kind, steps, g in (("codi", 4, 1.0), ("ddim", 50, 7.5)):
                fn = sampler(kind, g)
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                rows[f"sample_{kind}{steps}_compile_s"] = round(time.perf_counter() - t0, 2)
                rows[f"sample_{kind}{steps}_s"] = round(timed(fn, args.repeats), 4)
                print({k: rows[k] for k in rows if k.startswith(f"sample_{kind}")}, flush=True)

    print("command: python " + " ".join(sys.argv))
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
