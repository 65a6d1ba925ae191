"""The CoDi training step at Stable Diffusion XL size: compile, memory, time (CPU or GPU).

    python benchmarks/sdxl_step.py                           # CPU: both phases below, 256x256
    python benchmarks/sdxl_step.py --phases run --width 0.5  # one real step, half width
    python benchmarks/sdxl_step.py --resolution 1024 --phases run --batch_search   # a GPU

The model is SDXL base 1.0's UNet architecture (`SDXL_UNET`: 2.57B parameters, blocks of
320/640/1280 channels, 1/2/10 transformer layers, the `text_time` added embedding) with random
weights, frozen in bfloat16 and rematerialised (`--gradient_checkpointing`), and its adapter
(`ControlNetModel.from_unet`, 1.25B) trained with float32 master weights, AdamW and an EMA:
the step `codi train --mixed_precision bf16 --gradient_checkpointing --cache_latents` runs
(default `DistillConfig`: one-step ODE teacher, target and online passes), on cached latents
and SDXL's cached text conditioning (2048-wide token embeddings, the 1280-wide pooled
embedding, the six micro-conditioning time ids).

Phases (`--phases`):

- `compile`: `.lower().compile()` of the step on abstract inputs (`jax.ShapeDtypeStruct`s:
  no weight is allocated), with XLA's memory analysis of the executable (arguments, outputs,
  temporaries) and its FLOP count. At full width this is how a 24 GiB CPU machine shows the
  full-size step: its weights, optimiser state and EMA alone take about 25 GB.
- `run`: build the models (random weights, nothing compiled to make them), compile and time
  real steps; the process's peak resident memory (`ru_maxrss`) and, on a GPU, the device's
  peak. `--width 0.5` halves every block's channels (heads keep their count: 32-wide), which
  keeps the architecture and quarters the parameters, so that a real step fits this CPU.
  `--batch_search` then doubles the batch until it runs out of memory (a GPU).

There is no PyTorch side here: the parity of the SDXL models with diffusers is what the tests
show (tests/test_sdxl.py); this script only says whether and how fast the step fits.
Writes `benchmarks/results/sdxl_step.json` (or `--json`) after each phase; prints one table.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
import traceback
from pathlib import Path

import _bench as B

NAME = "sdxl_step"
GIB = 2**30

SDXL_UNET = dict(
    # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (2.567B parameters).
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2,
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
POOLED_DIM = 1280  # text_encoder_2's projection: 2816 = 1280 + 6 time ids x 256
SCALING_FACTOR = 0.13025  # SDXL's VAE


def unet_config(width: float) -> dict:
    """SDXL's UNet config with every block's channels scaled by `width` (heads kept)."""
    cfg = dict(SDXL_UNET)
    cfg["block_out_channels"] = [int(round(c * width)) for c in SDXL_UNET["block_out_channels"]]
    for c, heads in zip(cfg["block_out_channels"], SDXL_UNET["attention_head_dim"]):
        if c % SDXL_UNET["norm_num_groups"] or c % heads:
            raise SystemExit(f"--width {width}: {c} channels do not split into 32 norm groups "
                             f"and {heads} heads (0.5 and 1 do)")
    return cfg


def batch_arrays(batch: int, latent: int, rng) -> dict:
    """A batch as `codi train --cache_latents` makes it for SDXL (numpy)."""
    import numpy as np

    res = 8 * latent
    return {
        "conditioning_pixel_values": rng.uniform(0, 1, (batch, 3, res, res)).astype(np.float32),
        "latent_mean": (rng.standard_normal((batch, 4, latent, latent)) / SCALING_FACTOR).astype(
            np.float32
        ),
        "latent_logvar": np.full((batch, 4, latent, latent), -3.0, np.float32),
        "scaling_factor": np.full((batch,), SCALING_FACTOR, np.float32),
        "text_embeddings": rng.standard_normal((batch, B.TEXT_LEN, 2048)).astype(np.float32),
        "pooled_text_embeddings": rng.standard_normal((batch, POOLED_DIM)).astype(np.float32),
        "time_ids": np.tile(np.asarray([res, res, 0, 0, res, res], np.float32), (batch, 1)),
    }


def null_embedding():
    """SDXL's empty prompt, as `force_zeros_for_empty_prompt` makes it: zeros."""
    import jax.numpy as jnp

    return {
        "encoder_hidden_states": jnp.zeros((B.TEXT_LEN, 2048), jnp.float32),
        "text_embeds": jnp.zeros((POOLED_DIM,), jnp.float32),
    }


def make_step(mesh):
    from codi_eqx import distill

    dcfg, ocfg = distill.DistillConfig(), distill.OptimConfig()
    step = distill.make_train_step(
        dcfg, mesh, ema_decay=ocfg.ema_decay, lr_fn=distill.lr_schedule(ocfg)
    )
    return step, dcfg, ocfg


def build(cfg: dict, *, remat: bool, random: bool):
    """(frozen, state): random models (`random`), or their abstract shapes."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from codi_eqx import distill
    from codi_eqx.diffusion import NoiseSchedule
    from codi_eqx.models import ControlNetModel, UNet2DConditionConfig, UNet2DConditionModel

    ucfg = UNet2DConditionConfig.from_dict(cfg)
    schedule = NoiseSchedule.from_config(B.SCHEDULER)
    make_unet = lambda: UNet2DConditionModel(  # noqa: E731
        ucfg, dtype=jnp.bfloat16, remat=remat, key=jax.random.key(0)
    )

    def assemble(unet):
        adapter = ControlNetModel.from_unet(unet, conditioning_channels=3, key=jax.random.key(1))
        frozen = distill.make_frozen(unet, None, None, schedule, null_embedding=null_embedding())
        state = distill.init_train_state(
            distill.Trainable(adapter), distill.make_optimizer(distill.OptimConfig()),
            key=jax.random.key(2),
        )
        return frozen, state

    if random:
        unet = B.random_eqx(make_unet, seed=0)
        return assemble(unet)
    return eqx.filter_eval_shape(lambda: assemble(make_unet()))


def is_struct(x) -> bool:
    import jax

    return isinstance(x, jax.ShapeDtypeStruct)


def compile_phase(cfg: dict, batch: int, latent: int, *, remat: bool) -> dict:
    """Lower and compile the step on abstract inputs; XLA's memory and FLOP analyses."""
    import equinox as eqx
    import jax
    import numpy as np

    from codi_eqx.parallel import make_mesh

    mesh = make_mesh(jax.devices()[:1])
    step, _, _ = make_step(mesh)
    t0 = time.perf_counter()
    frozen, state = build(cfg, remat=remat, random=False)
    f_dyn, f_static = eqx.partition(frozen, is_struct, is_leaf=is_struct)
    s_dyn, s_static = eqx.partition(state, is_struct, is_leaf=is_struct)
    arrays = batch_arrays(batch, latent, np.random.default_rng(0))
    batch_sds = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
    abstract_s = time.perf_counter() - t0

    def run(f_dyn, s_dyn, batch):
        new_state, metrics = step(
            eqx.combine(f_dyn, f_static), eqx.combine(s_dyn, s_static), batch
        )
        return eqx.filter(new_state, eqx.is_array), metrics

    sizes = {
        "params": {"unet": count_structs(f_dyn.unet), "adapter": count_structs(s_dyn.params)},
        "bytes": {"frozen": tree_bytes(f_dyn), "state": tree_bytes(s_dyn),
                  "batch": tree_bytes(batch_sds)},
    }
    B.log(f"  abstract models in {abstract_s:.1f} s: {sizes}")
    # The state is donated, as in `make_train_step`.
    _, info = B.lower_and_compile(jax.jit(run, donate_argnums=1), f_dyn, s_dyn, batch_sds)
    return {**info, **sizes, "abstract_s": abstract_s}


def count_structs(tree) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)
                   if is_struct(x) and jnp.issubdtype(x.dtype, jnp.inexact)))


def tree_bytes(tree) -> int:
    import jax
    import numpy as np

    return int(
        sum(
            int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
            for x in jax.tree_util.tree_leaves(tree)
            if hasattr(x, "shape") and hasattr(x, "dtype")
            and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        )
    )


def device_peak() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU backends have none
        return None
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def max_rss() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib * 1024)


def run_phase(cfg, batch, latent, repeats, *, remat, models=None) -> tuple[dict, tuple]:
    """Real steps on random weights (built once; `models` reuses them)."""
    import jax
    import numpy as np

    from codi_eqx.parallel import make_mesh, replicate, shard_batch

    mesh = make_mesh(jax.devices()[:1])
    step, _, _ = make_step(mesh)
    t0 = time.perf_counter()
    if models is None:
        models = build(cfg, remat=remat, random=True)
        B.block(models)
    frozen, state = models
    build_s = time.perf_counter() - t0
    frozen, state = replicate(frozen, mesh), replicate(state, mesh)
    arrays = shard_batch(batch_arrays(batch, latent, np.random.default_rng(0)), mesh)
    _, cinfo = B.lower_and_compile(step, frozen, state, arrays)
    B.log(f"  batch {batch}: lower {cinfo['lower_s']:.1f} s, compile {cinfo['compile_s']:.1f} s")
    box = {"state": state}

    def call():
        box["state"], metrics = step(frozen, box["state"], arrays)
        return B.block(metrics)

    meas = B.alternate({"ours": call}, repeats)
    s = B.stats(meas["ours"], setup_s=cinfo["lower_compile_s"])
    if s.get("median_s"):
        s["examples_per_s"] = batch / s["median_s"]
    rec = {
        "batch": batch,
        "build_s": build_s,
        "ours": s,
        "compile": cinfo,
        "max_rss_bytes": max_rss(),
        "device_peak_bytes": device_peak(),
    }
    frozen_out = models[0]
    return rec, (frozen_out, box["state"])


def table(result: dict) -> str:
    rows = []
    width = result["config"]["width"]
    res = result["config"]["resolution"]
    c = result.get("compile")
    if c:
        if "error" in c:
            rows.append([f"compile, width {width}", f"error: {c['error'][:80]}", "", ""])
        else:
            m = c.get("xla_memory") or {}
            args, temp = m.get("argument_bytes"), m.get("temp_bytes")
            out, alias = m.get("output_bytes"), m.get("alias_bytes") or 0
            peak = None if None in (args, temp, out) else args + temp + out - alias
            rows.append(
                [
                    f"step compile only, width {width}, {res}x{res}, batch {c['batch']}",
                    f"{c['lower_s']:.0f} s lower + {c['compile_s']:.0f} s compile",
                    f"{B.fmt(peak / GIB if peak else None)} GiB XLA peak (args "
                    f"{B.fmt(args / GIB if args else None)}, temp "
                    f"{B.fmt(temp / GIB if temp else None)})",
                    B.fmt(c.get("xla_flops") and c["xla_flops"] / 1e12) + " TFLOP",
                ]
            )
    for r in result.get("runs", []):
        if "error" in r:
            rows.append([f"step, batch {r['batch']}", f"error: {r['error'][:80]}", "", ""])
            continue
        s = r["ours"]
        mem = r.get("device_peak_bytes") or r.get("max_rss_bytes")
        where = "device peak" if r.get("device_peak_bytes") else "process peak RSS"
        m = r["compile"].get("xla_memory") or {}
        if m.get("temp_plus_argument_bytes"):
            where += f"; XLA args + temp {m['temp_plus_argument_bytes'] / GIB:.1f} GiB"
        rows.append(
            [
                f"step, width {width}, {res}x{res}, batch {r['batch']}",
                f"{B.fmt_time(s)} s/step (compile {r['compile']['lower_compile_s']:.0f} s)",
                f"{B.fmt(mem / GIB)} GiB {where}",
                B.fmt(r["compile"].get("xla_flops") and r["compile"]["xla_flops"] / 1e12)
                + " TFLOP",
            ]
        )
    return B.markdown_table(["measurement", "time", "memory", "XLA FLOPs / step"], rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=256, help="image side (latents: / 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--width", type=float, default=None,
        help="channel scale of the UNet (1 = SDXL); default: 1 for compile, 0.5 for run on a "
        "CPU, 1 elsewhere",
    )
    ap.add_argument("--phases", nargs="+", default=["compile", "run"], choices=["compile", "run"])
    ap.add_argument("--repeats", type=int, default=2, help="timed steps after the first")
    ap.add_argument("--no_remat", action="store_true", help="no gradient checkpointing")
    ap.add_argument("--batch_search", action="store_true",
                    help="after the run phase, double the batch until out of memory")
    ap.add_argument("--max_batch", type=int, default=64)
    ap.add_argument("--json", default=None, help="JSON result (default results/sdxl_step.json)")
    args = ap.parse_args(argv)
    if args.resolution % 8:
        raise SystemExit("--resolution must be a multiple of 8")
    import jax

    cpu = jax.devices()[0].platform == "cpu"
    latent = args.resolution // 8
    remat = not args.no_remat
    B.no_persistent_compilation_cache()
    json_path = Path(args.json) if args.json else B.default_json(NAME)
    info = B.machine_info()
    result: dict = {"benchmark": NAME, "command": B.command_line(), "machine": info,
                    "config": {"resolution": args.resolution, "latent": latent,
                               "batch": args.batch, "remat": remat,
                               "frozen_dtype": "bfloat16", "adapter_master_dtype": "float32"},
                    "runs": []}
    B.log(f"machine: {B.machine_line(info)}")

    def save():
        B.write_json(json_path, result)

    widths = {}
    for phase in args.phases:
        widths[phase] = args.width if args.width else (0.5 if cpu and phase == "run" else 1.0)
    if "compile" in args.phases:
        w = widths["compile"]
        cfg = unet_config(w)
        result["config"]["width"] = w
        B.log(f"compile only: width {w}, {args.resolution}x{args.resolution}, batch {args.batch}")
        try:
            info_c = compile_phase(cfg, args.batch, latent, remat=remat)
            info_c["batch"] = args.batch
            info_c["width"] = w
            result["compile"] = info_c
            result["params"] = info_c["params"]
            B.log(f"  lower {info_c['lower_s']:.1f} s, compile {info_c['compile_s']:.1f} s, "
                  f"memory {info_c['xla_memory']}")
        except Exception as e:  # noqa: BLE001 - recorded; the run phase still goes
            traceback.print_exc()
            result["compile"] = {"batch": args.batch, "error": f"{type(e).__name__}: {e}"[:2000]}
        gc.collect()
        jax.clear_caches()
        save()
    if "run" in args.phases:
        w = widths["run"]
        cfg = unet_config(w)
        result["config"]["width"] = w
        B.log(f"real steps: width {w}, {args.resolution}x{args.resolution}")
        models = None
        b = args.batch
        while True:
            try:
                rec, models = run_phase(cfg, b, latent, args.repeats, remat=remat, models=models)
                rec["width"] = w
                result["runs"].append(rec)
                result.setdefault("params_run", {
                    "unet": B.count_params(models[0].unet),
                    "adapter": B.count_params(models[1].params),
                })
                B.log(f"  batch {b}: {rec['ours'].get('median_s')} s/step, "
                      f"peak RSS {rec['max_rss_bytes'] / GIB:.1f} GiB, "
                      f"device peak {rec['device_peak_bytes']}")
            except Exception as e:  # noqa: BLE001
                oom = any(s in str(e).lower() for s in ("resource_exhausted", "out of memory"))
                if not oom:
                    traceback.print_exc()
                result["runs"].append({"batch": b, "width": w, "oom": oom,
                                       "error": f"{type(e).__name__}: {e}"[:2000]})
                save()
                break
            save()
            jax.clear_caches()
            b *= 2
            if not args.batch_search or b > args.max_batch:
                break
    result["table_markdown"] = table(result)
    save()
    print()
    print(f"command: `{B.command_line()}`")
    print(f"machine: {B.machine_line(info)}")
    print()
    print(result["table_markdown"])
    print(f"\n(JSON: {json_path})")


if __name__ == "__main__":
    sys.exit(main())
