"""The CoDi training step of codi-eqx against the same step in PyTorch with diffusers' models.

    python benchmarks/train_step_speed.py --size small --repeats 3    # 128x128, batch 4
    python benchmarks/train_step_speed.py --size small --repeats 3 --with_encoders
    python benchmarks/train_step_speed.py --size sd15 --repeats 3     # 256x256, batch 1

Ours: `codi_eqx.distill.make_train_step` as `codi train` builds it (one device, the default
`DistillConfig` and `OptimConfig`: conditional distillation with a condition image, epsilon
prediction, one-step ODE with the UNet + EMA adapter and the predicted noise, EMA target,
online pass, consistency_x + x0 regulariser weight 1, N 50, tau 10, sigma_data 0.5, clipping
at 1.0, AdamW lr 1e-5 / weight decay 1e-2, EMA 0.999; the step is compiled whole, the state
donated). Reference: `_bench.TorchCoDiStep`, the same formulas in PyTorch with diffusers'
`UNet2DConditionModel` (frozen) and `ControlNetModel` (trained, plus an EMA copy),
`torch.optim.AdamW` and `clip_grad_norm_`, float32, CPU.

Both sides hold the same weights: the diffusers UNet and ControlNet (random, the ControlNet's
zero convs randomised), written with `save_pretrained` and read with `weights_conversion.load_unet`
and `codi_eqx.load_adapter`. Batches carry cached latents and text embeddings by default (the
VAE and text encoder are left out, as with `codi train --cache_latents`); `--with_encoders`
feeds images and token ids instead, so that both sides also run the VAE encoder and the CLIP
text encoder each step. The first step of each side uses the same random draws (ours', taken
from its step key), and their loss and gradient norm are compared; later steps draw their own.

Sizes: `small` (UNet 64/128/256, latents 16x16, i.e. 128x128 images, batch 4) and `sd15`
(SD1.5's UNet and its adapter, latents 32x32, batch 1; `--latent`, `--batch` override).
Reported: seconds per step (median [min-max]), examples/s, ours/reference, compile time
(first step minus the median; ours' `.lower().compile()` as timed here), peak RSS above the RSS
before each step (per side), XLA's temp + argument bytes, and the parity of the first step (the
largest relative difference of its loss, loss terms and gradient norm; in the JSON also the
share of adapter elements whose first update differs by more than 1% of the learning rate).
At SD1.5 size ours alone peaked at 18 GB (README), so both sides need roughly 30 GB or more;
`--sides` runs one side alone where that does not fit.
"""

from __future__ import annotations

import argparse
import time

import _bench as B

NAME = "train_step_speed"
DEFAULTS = {"small": (16, 4), "sd15": (32, 1)}  # (latent side, batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B.add_common_args(ap, repeats=5)
    ap.add_argument("--latent", type=int, default=None, help="latent side (small 16, sd15 32)")
    ap.add_argument("--batch", type=int, default=None, help="batch (small 4, sd15 1)")
    ap.add_argument(
        "--with_encoders",
        action="store_true",
        help="images and token ids in the batch: VAE encode + text encoding each step",
    )
    args = ap.parse_args()
    sides = B.parse_sides(args.sides)
    latent = args.latent or DEFAULTS[args.size][0]
    batch = args.batch or DEFAULTS[args.size][1]

    import numpy as np

    import codi_eqx
    from weights_conversion import CONTROLNET_NAME_MAP, export_state, load_unet

    B.no_persistent_compilation_cache()
    B.set_torch_threads(args.torch_threads)
    info = B.machine_info()
    parts = ("unet", "controlnet") + (("vae", "text_encoder") if args.with_encoders else ())
    with B.workdir() as tmp:
        t0 = time.perf_counter()
        ref = B.write_diffusers_model(tmp, args.size, seed=args.seed, parts=parts)
        if args.with_encoders:
            pipe = codi_eqx.load_pipeline(tmp)
            unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        else:
            pipe, vae, text_encoder = None, None, None
            unet = load_unet(tmp / "unet")
        adapter = codi_eqx.load_adapter(tmp / "controlnet")
        B.log(
            f"built and saved the diffusers models, loaded them into codi-eqx: "
            f"{time.perf_counter() - t0:.1f} s; UNet {B.count_params(unet) / 1e6:.1f}M, "
            f"adapter {B.count_params(adapter) / 1e6:.1f}M parameters"
        )
    from codi_eqx.diffusion import NoiseSchedule

    schedule = NoiseSchedule.from_config(B.SCHEDULER)
    rng = np.random.default_rng(args.seed)
    arrays = B.train_batch(
        args.size, batch, latent, rng=rng, with_encoders=args.with_encoders, tokenizer=ref.tokenizer
    )
    null_ids = None
    if args.with_encoders:
        null_ids = np.asarray(pipe.tokenize([""]))[0]
    ours = B.ours_train(
        unet,
        adapter,
        schedule,
        vae=vae,
        text_encoder=text_encoder,
        null_input_ids=null_ids,
        seed=args.seed,
    )
    del unet, adapter, vae, text_encoder, pipe
    batch_j = ours.batch(arrays)
    draws = ours.draws(batch, (4, latent, latent))
    p0 = export_state(ours.state.params.adapter, CONTROLNET_NAME_MAP)
    ref_step = (
        B.TorchCoDiStep(
            ref.unet, ref.controlnet, vae=ref.vae, text_encoder=ref.text_encoder, seed=args.seed
        )
        if "reference" in sides
        else None
    )
    batch_t = ref_step.tensors(arrays) if ref_step else None
    del ref

    fns, keep, first = {}, {}, {}
    compile_info = None
    case = f"{args.size} CoDi train step, batch {batch}, {8 * latent}x{8 * latent} images, " + (
        "VAE + text encoder in the step" if args.with_encoders else "cached latents + text"
    )
    B.log(case)
    if "ours" in sides:
        _, compile_info = B.lower_and_compile(ours.step, ours.frozen, ours.state, batch_j)
        B.log(
            f"  ours: lower {compile_info['lower_s']:.2f} s, "
            f"compile {compile_info['compile_s']:.2f} s"
        )

        def run_ours():
            first.setdefault("ours_metrics", ours(batch_j))

        def keep_ours():  # the adapter after the first step, before the next one donates it
            first["ours_params"] = export_state(ours.state.params.adapter, CONTROLNET_NAME_MAP)

        fns["ours"], keep["ours"] = run_ours, keep_ours
    if ref_step is not None:

        def run_ref():
            if "reference_metrics" not in first:
                first["reference_metrics"] = ref_step(batch_t, draws=draws)
            else:
                ref_step(batch_t)

        def keep_ref():
            first["reference_params"] = {
                n: p.detach().cpu().numpy().copy() for n, p in ref_step.cn.named_parameters()
            }

        fns["reference"], keep["reference"] = run_ref, keep_ref
    meas = B.alternate(fns, args.repeats, after_first=keep)
    s_ours = (
        B.stats(meas["ours"], setup_s=compile_info["lower_compile_s"]) if "ours" in meas else None
    )
    s_ref = B.stats(meas["reference"]) if "reference" in meas else None
    for s in (s_ours, s_ref):
        if s and s.get("median_s"):
            s["examples_per_s"] = batch / s["median_s"]
    parity = None
    if len(sides) == 2:
        m_o, p_o = first["ours_metrics"], first["ours_params"]
        m_r, p_r = first["reference_metrics"], first["reference_params"]
        metrics = {}
        for k in ("loss", "loss_consistency", "loss_regularizer", "grad_norm"):
            a, b = float(np.asarray(m_o[k])), float(m_r[k])
            metrics[k] = {"ours": a, "reference": b, "rel": abs(a - b) / abs(b)}
        # Adam's first update is lr * g / (|g| + eps) (+ weight decay): about lr * sign(g),
        # so compare it in units of lr; elements whose gradient is near zero may flip.
        lr = ours.optim_cfg.learning_rate
        shared = sorted(set(p_o) & set(p_r) & set(p0))
        n_el = n_off = 0
        worst = 0.0
        for k in shared:
            d = np.abs((p_o[k] - p0[k]) - (p_r[k].reshape(p0[k].shape) - p0[k]))
            n_el, n_off = n_el + d.size, n_off + int(np.count_nonzero(d > 0.01 * lr))
            worst = max(worst, float(d.max()) / lr)
        update = {
            "tensors": len(shared),
            "elements": n_el,
            "max_abs_diff_over_lr": worst,
            "fraction_off_by_over_1pct_of_lr": n_off / max(n_el, 1),
        }
        parity = {
            "rel": max(v["rel"] for v in metrics.values()),
            "metrics": metrics,
            "adapter_update_after_first_step": update,
        }
        B.log(
            "  first step, ours vs reference: "
            + ", ".join(f"{k} {v['ours']:.6g} / {v['reference']:.6g}" for k, v in metrics.items())
            + f"; adapter update: {100 * update['fraction_off_by_over_1pct_of_lr']:.4f}% of "
            f"{n_el} elements differ by more than 1% of lr (max {worst:.2f} lr)"
        )
    headers = B.COMPARISON_HEADERS[:4] + ["ours ex/s", "ref ex/s"] + B.COMPARISON_HEADERS[4:]
    row = B.comparison_row(
        case,
        s_ours,
        s_ref,
        jax_compile_s=compile_info["lower_compile_s"] if compile_info else None,
        xla_mem=compile_info["xla_memory"] if compile_info else None,
        parity=parity["rel"] if parity else None,
    )
    row = (
        row[:4]
        + [
            B.fmt(s_ours.get("examples_per_s")) if s_ours else "n/a",
            B.fmt(s_ref.get("examples_per_s")) if s_ref else "n/a",
        ]
        + row[4:]
    )
    config = {
        "size": args.size,
        "unet": B.UNET[args.size],
        "latent": latent,
        "resolution": 8 * latent,
        "batch": batch,
        "with_encoders": args.with_encoders,
        "text_len": B.TEXT_LEN,
        "repeats": args.repeats,
        "dtype": "float32",
        "sides": sides,
        "distill_config": vars(ours.distill_cfg),
        "optim_config": vars(ours.optim_cfg),
        "unet_params": B.count_params(ours.frozen.unet),
        "adapter_params": B.count_params(ours.state.params.adapter),
    }
    B.finish(
        NAME,
        args.json,
        info,
        {
            "config": config,
            "ours": s_ours,
            "reference": s_ref,
            "ours_over_reference": B.ratio(s_ours, s_ref),
            "ours_compile": compile_info,
            "parity": parity,
        },
        B.markdown_table(headers, [row]),
        notes=(
            "Seconds per training step (the whole batch). Parity: the largest relative "
            "difference of the first step's loss, its two terms and the gradient norm "
            "(same weights, same draws).",
        ),
    )


if __name__ == "__main__":
    main()
