"""Sampling speed: a 4-step CoDi sample and a 50-step DDIM sample (batch 1), timed after
compilation, on the tiny test model or on an SD1.5-sized model with random weights.

    .venv/bin/python benchmarks/sample_speed.py --model tiny
    .venv/bin/python benchmarks/sample_speed.py --model sd15 --resolution 256
    .venv/bin/python benchmarks/sample_speed.py --model tiny --reference   # + diffusers, ratios

`sd15`: UNet with runwayml/stable-diffusion-v1-5's config (320/640/1280/1280, 8 heads,
cross-attention 768, 2 layers per block), CLIP ViT-L/14 text encoder (768 wide, 12 layers,
77 tokens) and SD's VAE (128/256/512/512), all random, initialised in JAX (no download).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from codi_eqx import AutoencoderKL, CLIPTextModel, Pipeline, UNet2DConditionModel  # noqa: E402
from codi_eqx import load_pipeline  # noqa: E402
from codi_eqx.diffusion import NoiseSchedule  # noqa: E402
from codi_eqx.models._clip import CLIPTextConfig  # noqa: E402
from codi_eqx.models._unet import UNet2DConditionConfig  # noqa: E402
from codi_eqx.models._vae import AutoencoderKLConfig  # noqa: E402
from codi_eqx.sampling import generate  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2,
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, sample_size=512)
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
                  "steps_offset": 1, "prediction_type": "epsilon"}


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def sd15_pipeline(tmp: Path) -> Pipeline:
    from transformers import CLIPTokenizer

    from codi_eqx._tiny_tokenizer import write_tiny_clip_tokenizer

    write_tiny_clip_tokenizer(tmp / "tokenizer", model_max_length=77)
    ku, kt, kv = jax.random.split(jax.random.key(0), 3)
    make = lambda cls, cfg, k: eqx.filter_jit(lambda k: cls(cfg, key=k))(k)  # noqa: E731
    return Pipeline(
        unet=make(UNet2DConditionModel, UNet2DConditionConfig.from_dict(SD15_UNET), ku),
        vae=make(AutoencoderKL, AutoencoderKLConfig.from_dict(SD15_VAE), kv),
        text_encoder=make(CLIPTextModel, CLIPTextConfig.from_dict(SD15_TEXT), kt),
        tokenizer=CLIPTokenizer.from_pretrained(str(tmp / "tokenizer")),
        scheduler_config=SD15_SCHEDULER, schedule=NoiseSchedule.from_config(SD15_SCHEDULER),
        path=tmp,
    )


def diffusers_pipeline(model: str, tmp: Path):
    """The reference: diffusers' StableDiffusionPipeline (PyTorch, float32) of the same
    architecture. tiny: the very same weights (loaded from the diffusers folder); sd15: random
    weights of the same configs (weights do not change the time)."""
    import diffusers
    import torch
    import transformers

    if model == "tiny":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            str(tmp / "tiny"), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    else:
        torch.manual_seed(0)
        tok = transformers.CLIPTokenizer.from_pretrained(str(tmp / "tokenizer"))
        text_cfg = {k: v for k, v in SD15_TEXT.items() if k != "vocab_size"}
        pipe = diffusers.StableDiffusionPipeline(
            vae=diffusers.AutoencoderKL(**SD15_VAE),
            text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(
                vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **text_cfg)),
            tokenizer=tok, unet=diffusers.UNet2DConditionModel(**SD15_UNET),
            scheduler=diffusers.DDIMScheduler.from_config(SD15_SCHEDULER),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def time_diffusers(pipe, name: str, steps: int, guidance: float, res: int, repeats: int):
    """First call and best later call of diffusers' pipeline. `codi` runs as diffusers'
    LCMScheduler (the same consistency-model step: one UNet pass per step, boundary scalings,
    fresh noise between steps); `ddim` as its DDIMScheduler, eta 0."""
    import diffusers
    import torch

    cls = diffusers.LCMScheduler if name == "codi" else diffusers.DDIMScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe(["a photo of a cat"], height=res, width=res, num_inference_steps=steps,
                 guidance_scale=guidance, generator=torch.Generator().manual_seed(r),
                 output_type="np")
        times.append(time.perf_counter() - t0)
    return times[0], min(times[1:], default=float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--resolution", type=int, default=None,
                    help="image size (tiny: 64; sd15: 256 by default)")
    ap.add_argument("--samplers", default="codi,ddim")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed calls after the first (0: the first call only)")
    ap.add_argument("--reference", action="store_true",
                    help="also time diffusers' StableDiffusionPipeline (PyTorch) on the same "
                         "architecture, in the same run, and print the ratios")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="codi-bench-"))
    if args.model == "tiny":
        from helpers import make_tiny_pipeline

        pipe = load_pipeline(make_tiny_pipeline(tmp / "tiny"))
        res = args.resolution or 64
    else:
        t0 = time.perf_counter()
        pipe = sd15_pipeline(tmp)
        print(f"random SD1.5-sized init: {time.perf_counter() - t0:.1f} s", flush=True)
        res = args.resolution or 256
    runs = {"codi": dict(sampler="codi", steps=4, guidance_scale=1.0),
            "ddim": dict(sampler="ddim", steps=50, guidance_scale=7.5)}
    rows = []
    compile_s = {"n": 0.0}

    def on_event(event: str, seconds: float, **_: object) -> None:
        if event in _COMPILE_EVENTS:
            compile_s["n"] += seconds

    jax.monitoring.register_event_duration_secs_listener(on_event)
    for name in args.samplers.split(","):
        kw = runs[name]
        compile_s["n"] = 0.0
        t0 = time.perf_counter()
        generate(pipe, None, ["a photo of a cat"], height=res, width=res, **kw)
        first = time.perf_counter() - t0
        # The first call alone already gives a run time: its wall time less the tracing,
        # lowering and XLA compilation that jax reports for it (useful where one sample takes
        # an hour, as a 50-step SD1.5-sized DDIM sample does on a 2-core CPU).
        print(f"{name}: first call {first:.2f} s, of which trace+lower+compile "
              f"{compile_s['n']:.2f} s -> run {first - compile_s['n']:.2f} s", flush=True)
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            generate(pipe, None, ["a photo of a cat"], height=res, width=res, seed=r + 1, **kw)
            times.append(time.perf_counter() - t0)
        rows.append((name, kw["steps"], kw["guidance_scale"], first, min(times, default=float("nan"))))
        print(f"{name}: first call {first:.2f} s, after compile {rows[-1][-1]:.3f} s", flush=True)
    ref = {}
    if args.reference:
        import torch

        t0 = time.perf_counter()
        tpipe = diffusers_pipeline(args.model, tmp)
        print(f"diffusers pipeline built: {time.perf_counter() - t0:.1f} s "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads)", flush=True)
        for name, steps, w, _, _ in rows:
            ref[name] = time_diffusers(tpipe, name, steps, w, res, max(args.repeats, 1))
            print(f"diffusers {name}: first call {ref[name][0]:.2f} s, "
                  f"later {ref[name][1]:.3f} s", flush=True)
    print()
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"model: {args.model}, {res}x{res}, batch 1, device: {jax.devices()[0].device_kind} "
          f"x{jax.device_count()}, jax {jax.__version__}")
    print(f"{'sampler':8} {'steps':>5} {'cfg':>5} {'first call (s)':>15} {'after compile (s)':>18}")
    for name, steps, w, first, best in rows:
        print(f"{name:8} {steps:5d} {w:5.1f} {first:15.2f} {best:18.3f}")
    if ref:
        print(f"\n{'sampler':8} {'diffusers first (s)':>20} {'diffusers later (s)':>20} "
              f"{'codi-eqx / diffusers':>21}")
        for name, _, _, _, best in rows:
            print(f"{name:8} {ref[name][0]:20.2f} {ref[name][1]:20.3f} {best / ref[name][1]:21.2f}")


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before timing
    main()
