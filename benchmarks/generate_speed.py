"""Prompt to image: `codi_eqx.sampling.generate` against diffusers' pipelines, same weights.

    python benchmarks/generate_speed.py --size small --repeats 2                   # 128x128
    python benchmarks/generate_speed.py --size sd15 --repeats 2 --samplers codi    # 256x256
    python benchmarks/generate_speed.py --size sd15 --repeats 1 --samplers ddim    # hours on a CPU

Two cases, each timed end to end (tokenising, text encoding, sampling, VAE decoding, the
images back as numpy), batch 1:

- `codi`: ours `generate(pipe, adapter, prompt, control_images=..., steps=4)` (CoDi's 4-step
  sampler, UNet + adapter, no guidance) against `StableDiffusionControlNetPipeline` with
  `LCMScheduler` at 4 steps (the same consistency-model step: boundary scalings c_skip /
  c_out with sigma_data 0.5 and tau 10, one UNet + ControlNet pass per step), given CoDi's
  timesteps 980, 720, 460, 200, `guidance_scale=1` (no classifier-free guidance),
  `output_type="np"`, no safety checker. The two differ only in how they re-noise between
  steps (CoDi: the predicted noise; LCM: fresh noise), which costs the same.
- `ddim`: ours `generate(pipe, None, prompt, sampler="ddim", steps=50, guidance_scale=7.5)`
  (the teacher, UNet alone, 100 UNet passes) against `StableDiffusionPipeline` with
  `DDIMScheduler`, 50 steps, guidance 7.5.

Same weights: the UNet, ControlNet, VAE and CLIP text encoder are built in PyTorch (random,
seeded; the ControlNet's zero convs randomised), written in diffusers' format and read with
`codi_eqx.load_pipeline` / `codi_eqx.load_adapter`; the tokenizer is the offline tiny CLIP
tokenizer (77 tokens). Same output: after the timing, each case is run once more on both sides
from the same initial latents (ours' documented noise, `fold_in(key(seed), 0)`, given to
diffusers as `latents`) with 1 CoDi step (where LCM and CoDi coincide) or 2 DDIM steps, and
the 8-bit images are compared.

Sizes: `sd15` (SD1.5's UNet, CLIP ViT-L/14's text tower: 768 wide, 12 layers, 12 heads, MLP
3072; SD's VAE 128/256/512/512; 256x256 by default) and `small` (128x128 by default);
`--resolution` overrides. Reported: seconds per image (median [min-max]), ours/reference,
compile time (first call minus median, and the trace + lower + compile durations jax reports
for the first call), peak RSS above the RSS before each call, the parity of the images.
"""

from __future__ import annotations

import argparse
import time

import _bench as B

NAME = "generate_speed"
PROMPT = "a photo of a cat"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B.add_common_args(ap, repeats=3)
    ap.add_argument("--samplers", default="codi,ddim", help="codi, ddim, or both")
    ap.add_argument("--resolution", type=int, default=None, help="image side (sd15 256, small 128)")
    args = ap.parse_args()
    sides = B.parse_sides(args.sides)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    if not samplers or any(s not in ("codi", "ddim") for s in samplers):
        raise SystemExit(f"--samplers: expected codi and/or ddim, got {args.samplers!r}")
    res = args.resolution or (256 if args.size == "sd15" else 128)

    import diffusers
    import jax
    import numpy as np
    import torch
    from PIL import Image

    import codi_eqx
    from codi_eqx.diffusion import codi_sampling_timesteps
    from codi_eqx.sampling import generate

    diffusers.utils.logging.set_verbosity_error()  # LCM warns about custom timesteps each call
    B.no_persistent_compilation_cache()
    B.set_torch_threads(args.torch_threads)
    info = B.machine_info()
    with B.workdir() as tmp:
        t0 = time.perf_counter()
        ref = B.write_diffusers_model(tmp, args.size, seed=args.seed)
        pipe = codi_eqx.load_pipeline(tmp)
        adapter = codi_eqx.load_adapter(tmp / "controlnet")
        B.log(
            f"built and saved the diffusers models, loaded them into codi-eqx: "
            f"{time.perf_counter() - t0:.1f} s"
        )
    common = dict(
        vae=ref.vae,
        text_encoder=ref.text_encoder,
        tokenizer=ref.tokenizer,
        unet=ref.unet,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    cn_pipe = diffusers.StableDiffusionControlNetPipeline(
        controlnet=ref.controlnet,
        scheduler=diffusers.LCMScheduler.from_config(B.SCHEDULER),
        **common,
    )
    sd_pipe = diffusers.StableDiffusionPipeline(
        scheduler=diffusers.DDIMScheduler.from_config(B.SCHEDULER), **common
    )
    for p in (cn_pipe, sd_pipe):
        p.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(args.seed)
    control = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
    control_pil = Image.fromarray(control)
    codi_ts = [int(t) for t in codi_sampling_timesteps(1000, 50, 4)]

    def ours_call(sampler: str, steps: int, seed: int = 0):
        if sampler == "codi":
            return generate(
                pipe,
                adapter,
                [PROMPT],
                control_images=control,
                steps=steps,
                sampler="codi",
                guidance_scale=1.0,
                seed=seed,
            )
        return generate(
            pipe,
            None,
            [PROMPT],
            sampler="ddim",
            steps=steps,
            guidance_scale=7.5,
            height=res,
            width=res,
            seed=seed,
        )

    def ref_call(sampler: str, steps: int, latents=None, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            if sampler == "codi":
                ts = [int(t) for t in codi_sampling_timesteps(1000, 50, steps)]
                return cn_pipe(
                    PROMPT,
                    image=control_pil,
                    height=res,
                    width=res,
                    timesteps=ts,
                    guidance_scale=1.0,
                    generator=gen,
                    latents=latents,
                    output_type="np",
                ).images
            return sd_pipe(
                PROMPT,
                height=res,
                width=res,
                num_inference_steps=steps,
                guidance_scale=7.5,
                generator=gen,
                latents=latents,
                output_type="np",
            ).images

    cases, rows = [], []
    for sampler in samplers:
        steps = 4 if sampler == "codi" else 50
        case = (
            f"{args.size} {sampler} {steps} steps, "
            + ("adapter + control image, no CFG" if sampler == "codi" else "UNet alone, CFG 7.5")
            + f", {res}x{res}, batch 1"
        )
        B.log(case)
        fns = {}
        if "ours" in sides:
            fns["ours"] = lambda sampler=sampler, steps=steps: ours_call(sampler, steps)
        if "reference" in sides:
            fns["reference"] = lambda sampler=sampler, steps=steps: ref_call(sampler, steps)
        with B.jax_compile_events() as events:
            meas = B.alternate(fns, args.repeats)
        s_ours = B.stats(meas["ours"]) if "ours" in meas else None
        s_ref = B.stats(meas["reference"]) if "reference" in meas else None
        parity = None
        if len(sides) == 2:
            # One more run each from the same initial latents: 1 CoDi step (LCM's step equals
            # CoDi's where no re-noising happens) or 2 DDIM steps with guidance.
            check_steps = 1 if sampler == "codi" else 2
            latent_shape = (pipe.unet.config.in_channels, res // 8, res // 8)
            z = jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), latent_shape)
            img_o = np.asarray(ours_call(sampler, check_steps, seed=0))[0].astype(np.float64)
            img_r = ref_call(
                sampler, check_steps, latents=torch.from_numpy(np.asarray(z)[None].copy())
            )[0]
            img_r = np.round(np.clip(img_r, 0, 1) * 255.0)
            parity = B.rel_diff(img_o, img_r)
            parity.update(
                steps=check_steps,
                max_level_diff=parity["max_abs_diff"],
                mean_level_diff=float(np.mean(np.abs(img_o - img_r))),
                ref_image_std=float(np.std(img_r)),
                ref_clipped_fraction=float(np.mean((img_r == 0) | (img_r == 255))),
            )
            B.log(
                f"  parity ({check_steps} step(s), same latents): max |ours - ref| "
                f"{parity['max_abs_diff']:.0f} of 255 levels, "
                f"mean {parity['mean_level_diff']:.3f}; "
                f"reference image std {parity['ref_image_std']:.1f} levels, "
                f"{100 * parity['ref_clipped_fraction']:.1f}% clipped"
            )
        cases.append(
            {
                "case": case,
                "sampler": sampler,
                "steps": steps,
                "resolution": res,
                "ours": s_ours,
                "reference": s_ref,
                "ours_over_reference": B.ratio(s_ours, s_ref),
                "ours_jax_compile_events_first_call": dict(events),
                "parity": parity,
            }
        )
        rows.append(
            B.comparison_row(
                case,
                s_ours,
                s_ref,
                jax_compile_s=events["total_s"] if "ours" in sides else None,
                parity=parity["rel"] if parity else None,
            )
        )

    config = {
        "size": args.size,
        "resolution": res,
        "samplers": samplers,
        "repeats": args.repeats,
        "dtype": "float32",
        "sides": sides,
        "prompt": PROMPT,
        "unet": B.UNET[args.size],
        "text_encoder": B.TEXT[args.size],
        "vae": B.VAE[args.size],
        "codi_timesteps": codi_ts,
        "reference_codi": "StableDiffusionControlNetPipeline + LCMScheduler",
        "reference_ddim": "StableDiffusionPipeline + DDIMScheduler",
        "params": {
            "unet": B.count_params(pipe.unet),
            "adapter": B.count_params(adapter),
            "vae": B.count_params(pipe.vae),
            "text_encoder": B.count_params(pipe.text_encoder),
        },
    }
    B.finish(
        NAME,
        args.json,
        info,
        {"config": config, "cases": cases},
        B.markdown_table(B.COMPARISON_HEADERS, rows),
        notes=(
            "Seconds per image, text encoding and VAE decoding included. Ours' compile: "
            "first call minus median / trace + lower + XLA compile as jax reports them "
            "(XLA's memory analysis is not reachable through `generate`). Parity: 8-bit "
            "images from the same initial latents (1 CoDi step, 2 DDIM steps), max "
            "|ours - ref| / max |ref| in levels.",
        ),
    )


if __name__ == "__main__":
    main()
