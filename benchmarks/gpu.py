"""One prepared run for a lent GPU (one NVIDIA H200): codi-eqx at SD1.5 size, 512x512, with
diffusers (PyTorch) on the same GPU in the same run where diffusers is importable.

    bash benchmarks/gpu.sh                     # on the GPU machine: at most ~10 minutes
    python benchmarks/gpu.py --quick           # small smoke run; works on a CPU too
    python benchmarks/gpu.py --quick --torch_cpu   # ... with the PyTorch side on the CPU

Measured (SD1.5's UNet, 859M parameters, frozen in bfloat16; its adapter, 361M, trained with
float32 master weights; random weights, attention through cuDNN where jax picks it):

1. the CoDi training step at 512x512 (64x64 latents), batch 8, cached latents and text
   embeddings (`codi_eqx.distill.make_train_step` with the default options, as `codi train
   --cache_latents` runs it): seconds per step, examples/s, `.lower().compile()` time, model
   FLOP utilisation = the FLOPs XLA's `cost_analysis()` counts for the compiled step / step time
   / the H200's dense bf16 peak of 989 TFLOP/s (custom calls, e.g. cuDNN attention, are not in
   XLA's count, so this is a lower bound), XLA's memory analysis, and the peak device memory
   (`jax.devices()[0].memory_stats()['peak_bytes_in_use']`);
2. 4-step CoDi sampling with `codi_eqx.sampling.generate` (text encoding, UNet + adapter, VAE
   decoding; no guidance), 512x512: latency at batch 1 and throughput at batch 16;
3. where diffusers imports and CUDA is there: the same step in PyTorch
   (`_bench.TorchCoDiStep`: diffusers' UNet in bfloat16, ControlNet in float32 under
   `torch.autocast`, fused AdamW) and `StableDiffusionControlNetPipeline` + `LCMScheduler` at
   4 steps (bfloat16, CoDi's timesteps, guidance 1); peak memory from
   `torch.cuda.max_memory_allocated()`; the MFU column uses ours' FLOP count for both;
4. the largest training batch that fits: 16, 32, 64, ... until one runs out of memory or the
   time budget ends.

Phases run in that order; each is skipped, with a note, when the time left (`--budget_s`,
default 480 s from the start) is less than its estimate, and the JSON result (`--json`) is
rewritten after each, so that a run stopped from outside keeps what it measured. The weights
are random and not shared between the two sides here (the CPU scripts check that both sides
compute the same; the values do not change the time).

The GPU machine has jax[cuda], equinox, optax, jaxtyping, safetensors, transformers, typer,
pillow and torch, but neither beartype nor diffusers. `import codi_eqx` does not need beartype
(only the tests' runtime type checks do); this script says so if that ever changes. For the
PyTorch side, fetch the wheels on a machine with the network, into the working tree:

    pip download beartype diffusers --no-deps -d benchmarks/.wheels

and `benchmarks/gpu.sh` installs them (`pip install --no-index --no-deps`) where present.
Environment: `XLA_PYTHON_CLIENT_PREALLOCATE=false` (jax takes memory as it needs it, so that
PyTorch can share the GPU and the peak is the step's) and `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`
unless already set.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import _bench as B  # noqa: E402

NAME = "gpu"
PEAK_FLOPS = 989e12
PEAK_NAME = "NVIDIA H200 dense bf16 peak, 989 TFLOP/s"
PROMPT = "a photo of a cat"
GIB = 2**30


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, need: float, what: str, notes: list) -> bool:
        if self.left() >= need:
            return True
        note = f"skipped {what}: {self.left():.0f} s of the budget left, needs about {need:.0f} s"
        B.log(note)
        notes.append(note)
        return False


def is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(s in text for s in ("resource_exhausted", "out of memory", "outofmemory", "oom"))


def device_memory() -> dict | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends have none
        return None
    if not stats:
        return None
    return {
        k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats
    }


def check_imports(result: dict) -> None:
    """Say what is installed; stop with a clear message if codi_eqx cannot import."""
    have = {m: importlib.util.find_spec(m) is not None for m in ("beartype", "diffusers", "torch")}
    result["installed"] = have
    try:
        import codi_eqx  # noqa: F401
        import codi_eqx.distill  # noqa: F401
        import codi_eqx.sampling  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "beartype":
            raise SystemExit(
                "codi_eqx needs beartype at import time on this machine: fetch it with `pip "
                "download beartype diffusers --no-deps -d benchmarks/.wheels` where the network "
                "is open, and run benchmarks/gpu.sh (it installs benchmarks/.wheels/*.whl)"
            ) from None
        raise
    if have["beartype"]:  # installed here: try the import with beartype hidden
        import subprocess

        probe = (
            "import sys; sys.modules['beartype'] = None; "
            f"sys.path.insert(0, {str(B.ROOT)!r}); "
            "import codi_eqx, codi_eqx.distill, codi_eqx.sampling"
        )
        needs = (
            subprocess.run(
                [sys.executable, "-c", probe], capture_output=True, check=False
            ).returncode
            != 0
        )
    else:
        needs = False  # it just imported without it
    result["codi_eqx_needs_beartype"] = needs
    B.log(f"installed: {have}; import codi_eqx needs beartype: {'yes' if needs else 'no'}")


def ours_step_phase(size, unet, adapter, schedule, batch, latent, repeats, rng):
    """Compile and time ours' training step at `batch`; returns the record."""
    ours = B.ours_train(unet, adapter, schedule, seed=0)
    arrays = ours.batch(B.train_batch(size, batch, latent, rng=rng))
    _, cinfo = B.lower_and_compile(ours.step, ours.frozen, ours.state, arrays)
    B.log(
        f"  ours step, batch {batch}: lower {cinfo['lower_s']:.1f} s, "
        f"compile {cinfo['compile_s']:.1f} s, "
        f"XLA FLOPs {cinfo['xla_flops']}"
    )
    meas = B.alternate({"ours": functools.partial(ours, arrays)}, repeats)
    s = B.stats(meas["ours"], setup_s=cinfo["lower_compile_s"])
    rec = {"batch": batch, "ours": s, "compile": cinfo, "device_memory": device_memory()}
    if s.get("median_s"):
        s["examples_per_s"] = batch / s["median_s"]
        if cinfo["xla_flops"]:
            rec["mfu"] = cinfo["xla_flops"] / s["median_s"] / PEAK_FLOPS
            rec["achieved_tflops"] = cinfo["xla_flops"] / s["median_s"] / 1e12
    del ours, arrays
    return rec


def torch_phase(
    size, latent, step_batch, sample_batches, control, repeats, budget, notes, flops, device
):
    """The PyTorch reference on `device`: train step and 4-step ControlNet + LCM sampling."""
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    from codi_eqx.diffusion import codi_sampling_timesteps

    diffusers.utils.logging.set_verbosity_error()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    out: dict = {"device": str(dev)}
    t0 = time.perf_counter()
    unet = B.torch_unet(size, seed=0, device=dev)
    cn = B.torch_controlnet(unet, seed=1, device=dev)
    unet = unet.to(torch.bfloat16)
    out["build_s"] = time.perf_counter() - t0
    B.log(f"  torch models built on {dev}: {out['build_s']:.1f} s")
    step = B.TorchCoDiStep(unet, cn, seed=0)
    rng = np.random.default_rng(0)
    batch_t = step.tensors(B.train_batch(size, step_batch, latent, rng=rng))
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    meas = B.alternate({"reference": functools.partial(step, batch_t)}, repeats)
    s = B.stats(meas["reference"])
    rec = {"batch": step_batch, "reference": s}
    if s.get("median_s"):
        s["examples_per_s"] = step_batch / s["median_s"]
        if flops:
            rec["mfu_with_ours_flops"] = flops / s["median_s"] / PEAK_FLOPS
    if cuda:
        rec["max_memory_allocated"] = int(torch.cuda.max_memory_allocated(dev))
        rec["max_memory_reserved"] = int(torch.cuda.max_memory_reserved(dev))
    out["train_step"] = rec
    del step, batch_t
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    out["sampling"] = {}
    if budget.allows(60, "PyTorch sampling", notes):
        tok = B.write_tokenizer(Path(tempfile.mkdtemp(prefix="codi-gpu-tok-")))
        vae = B.torch_vae(size, seed=2, device=dev).to(torch.bfloat16)
        text = B.torch_text_encoder(size, tok, seed=3, device=dev).to(torch.bfloat16)
        pipe = diffusers.StableDiffusionControlNetPipeline(
            vae=vae,
            text_encoder=text,
            tokenizer=tok,
            unet=unet,
            controlnet=cn.to(torch.bfloat16),
            scheduler=diffusers.LCMScheduler.from_config(B.SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        ts = [int(t) for t in codi_sampling_timesteps(1000, 50, 4)]
        image = Image.fromarray(control)
        res = control.shape[0]
        for b in sample_batches:
            if not budget.allows(30, f"PyTorch sampling at batch {b}", notes):
                break
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)

            def call(b=b):
                with torch.inference_mode():
                    return pipe(
                        [PROMPT] * b,
                        image=image,
                        height=res,
                        width=res,
                        timesteps=ts,
                        guidance_scale=1.0,
                        output_type="np",
                    ).images

            meas = B.alternate({"reference": call}, repeats if b == 1 else max(repeats // 2, 1))
            s = B.stats(meas["reference"])
            if s.get("median_s"):
                s["images_per_s"] = b / s["median_s"]
            r = {"batch": b, "reference": s}
            if cuda:
                r["max_memory_allocated"] = int(torch.cuda.max_memory_allocated(dev))
            out["sampling"][str(b)] = r
        del pipe, vae, text
    del unet, cn
    gc.collect()  # diffusers' modules hold reference cycles; free their memory now
    if cuda:
        torch.cuda.empty_cache()
    return out


def table(result: dict) -> str:
    step = result.get("train_step") or {}
    torch_r = result.get("torch") or {}
    tstep = torch_r.get("train_step") or {}
    o, r = step.get("ours"), tstep.get("reference")
    mem = (step.get("device_memory") or {}).get("peak_bytes_in_use")
    tmem = tstep.get("max_memory_allocated")
    b = step.get("batch", "?")
    rows = [
        [
            f"train step, batch {b} (s/step, median [min-max])",
            B.fmt_time(o),
            B.fmt_time(r),
            B.fmt(B.ratio(o, r)),
        ],
        [
            "train examples/s",
            B.fmt(o and o.get("examples_per_s")),
            B.fmt(r and r.get("examples_per_s")),
            "",
        ],
        [
            f"MFU ({PEAK_NAME}; XLA's FLOP count of our step)",
            B.fmt(step.get("mfu")),
            B.fmt(tstep.get("mfu_with_ours_flops")),
            "",
        ],
        [
            "step compile (s): first-median / lower+compile",
            f"{B.fmt(o and o.get('compile_s'))} / "
            f"{B.fmt((step.get('compile') or {}).get('lower_compile_s'))}",
            B.fmt(r and r.get("compile_s")),
            "",
        ],
        [
            f"peak device memory at batch {b} (GiB)",
            B.fmt(mem / GIB if mem else None),
            B.fmt(tmem / GIB if tmem else None),
            "",
        ],
        [
            "largest training batch that fits",
            str(result.get("largest_batch", {}).get("text", "n/a")),
            "",
            "",
        ],
    ]
    for key, s_ours in (result.get("sampling") or {}).items():
        s_ref = ((torch_r.get("sampling") or {}).get(key) or {}).get("reference")
        so = s_ours.get("ours")
        rows.append(
            [
                f"4-step sampling, batch {key} (s, median [min-max])",
                B.fmt_time(so),
                B.fmt_time(s_ref),
                B.fmt(B.ratio(so, s_ref)),
            ]
        )
        rows.append(
            [
                f"4-step sampling, batch {key} (images/s)",
                B.fmt(so and so.get("images_per_s")),
                B.fmt(s_ref and s_ref.get("images_per_s")),
                "",
            ]
        )
        rows.append(
            [
                f"sampling compile, batch {key} (s): first-median / jax events",
                f"{B.fmt(so and so.get('compile_s'))} / {B.fmt(s_ours.get('jax_compile_s'))}",
                "",
                "",
            ]
        )
    return B.markdown_table(
        ["measurement", "codi-eqx (JAX)", "diffusers (PyTorch)", "ours/ref"], rows
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="small model, 128x128, batch 2: a smoke run (CPU too)"
    )
    ap.add_argument(
        "--budget_s",
        type=float,
        default=480.0,
        help="skip phases that would not fit in this many seconds from the start",
    )
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed calls per measurement (5; quick 2)"
    )
    ap.add_argument(
        "--torch_cpu",
        action="store_true",
        help="without CUDA, run the PyTorch side on the CPU (to smoke-test it)",
    )
    ap.add_argument("--no_torch", action="store_true", help="skip the PyTorch side")
    ap.add_argument("--max_batch", type=int, default=256, help="stop the batch search here")
    ap.add_argument(
        "--json", default=None, help="JSON result (default benchmarks/results/gpu.json)"
    )
    args = ap.parse_args()
    budget = Budget(args.budget_s)
    size = "small" if args.quick else "sd15"
    latent = 16 if args.quick else 64
    step_batch = 2 if args.quick else 8
    sample_batches = (1, 2) if args.quick else (1, 16)
    repeats = args.repeats or (2 if args.quick else 5)
    json_path = (
        Path(args.json) if args.json else B.default_json(NAME + ("_quick" if args.quick else ""))
    )
    notes: list[str] = []
    result: dict = {
        "benchmark": NAME,
        "command": B.command_line(),
        "quick": args.quick,
        "peak_flops": PEAK_FLOPS,
        "peak_flops_source": PEAK_NAME,
        "notes": notes,
    }

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - budget.t0
        B.write_json(json_path, result)

    check_imports(result)
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from codi_eqx._tree import cast_floating
    from codi_eqx.models import ControlNetModel
    from codi_eqx.sampling import generate

    B.no_persistent_compilation_cache()
    result["machine"] = info = B.machine_info()
    result["config"] = {
        "size": size,
        "unet": B.UNET[size],
        "latent": latent,
        "resolution": 8 * latent,
        "train_batch": step_batch,
        "sample_batches": list(sample_batches),
        "frozen_dtype": "bfloat16",
        "adapter_master_dtype": "float32",
        "repeats": repeats,
        "budget_s": args.budget_s,
        "xla_env": {
            k: os.environ.get(k)
            for k in (
                "XLA_PYTHON_CLIENT_PREALLOCATE",
                "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "XLA_FLAGS",
            )
        },
    }
    B.log(f"machine: {B.machine_line(info)}")
    save()

    # Models: random, bfloat16 frozen; the adapter's float32 masters copied from the UNet.
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="codi-gpu-"))
    pipe = B.random_eqx_pipeline(size, tmp, dtype=jnp.bfloat16)
    adapter = ControlNetModel.from_unet(pipe.unet, conditioning_channels=3, key=jax.random.key(1))
    B.block(eqx.filter(adapter, eqx.is_array))
    result["init_s"] = time.perf_counter() - t0
    result["params"] = {
        "unet": B.count_params(pipe.unet),
        "adapter": B.count_params(adapter),
        "vae": B.count_params(pipe.vae),
        "text_encoder": B.count_params(pipe.text_encoder),
    }
    B.log(
        f"random models on {jax.devices()[0].device_kind}: {result['init_s']:.1f} s, "
        f"{result['params']}"
    )
    save()
    rng = np.random.default_rng(0)

    # 1. Ours' training step at batch 8.
    B.log(f"train step, batch {step_batch}, {8 * latent}x{8 * latent}")
    try:
        result["train_step"] = ours_step_phase(
            size, pipe.unet, adapter, pipe.schedule, step_batch, latent, repeats, rng
        )
    except Exception as e:  # noqa: BLE001 - recorded; the other phases still run
        traceback.print_exc()
        result["train_step"] = {
            "batch": step_batch,
            "error": f"{type(e).__name__}: {str(e)[:2000]}",
        }
    save()
    step_rec = result["train_step"]
    compile_est = (step_rec.get("compile") or {}).get("lower_compile_s") or 120.0
    step_s = (step_rec.get("ours") or {}).get("median_s") or 1.0
    flops = (step_rec.get("compile") or {}).get("xla_flops")

    # 2. Ours' 4-step sampling: latency at batch 1, throughput at batch 16.
    adapter_bf16 = cast_floating(adapter, jnp.bfloat16)
    control = rng.integers(0, 256, (8 * latent, 8 * latent, 3), dtype=np.uint8)
    result["sampling"] = {}
    for b in sample_batches:
        if not budget.allows(max(0.4 * compile_est, 30), f"ours' sampling at batch {b}", notes):
            continue
        B.log(f"4-step sampling, batch {b}")
        try:
            with B.jax_compile_events() as events:
                meas = B.alternate(
                    {
                        "ours": functools.partial(
                            generate,
                            pipe,
                            adapter_bf16,
                            [PROMPT] * b,
                            control_images=control,
                            steps=4,
                            sampler="codi",
                        )
                    },
                    repeats if b == 1 else max(repeats // 2, 1) + 1,
                )
            s = B.stats(meas["ours"])
            if s.get("median_s"):
                s["images_per_s"] = b / s["median_s"]
            result["sampling"][str(b)] = {
                "batch": b,
                "ours": s,
                "jax_compile_s": events["total_s"],
                "jax_compile_events": dict(events),
                "device_memory": device_memory(),
            }
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["sampling"][str(b)] = {
                "batch": b,
                "error": f"{type(e).__name__}: {str(e)[:2000]}",
            }
        save()
    del adapter_bf16

    # 3. The PyTorch reference on the same GPU.
    torch_device = None
    if (
        not args.no_torch
        and result["installed"].get("diffusers")
        and result["installed"].get("torch")
    ):
        import torch

        if torch.cuda.is_available():
            torch_device = "cuda"
        elif args.torch_cpu:
            torch_device = "cpu"
        else:
            notes.append("PyTorch side skipped: no CUDA device (--torch_cpu runs it on the CPU)")
    elif not args.no_torch:
        notes.append(
            "PyTorch side skipped: diffusers is not installed (see the docstring: "
            "benchmarks/.wheels)"
        )
    if torch_device and budget.allows(90, "the PyTorch side", notes):
        B.log(f"PyTorch reference on {torch_device}")
        try:
            result["torch"] = torch_phase(
                size,
                latent,
                step_batch,
                sample_batches,
                control,
                repeats,
                budget,
                notes,
                flops,
                torch_device,
            )
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["torch"] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
        save()
    for n in notes:
        if "PyTorch side skipped" in n:
            B.log(n)

    # 4. The largest training batch that fits: double until out of memory (or out of time).
    largest = {"tried": []}
    result["largest_batch"] = largest
    fits = step_batch if step_rec.get("ours") else None
    last_b, last_s = step_batch, step_s
    b = step_batch * 2
    stopped = "max_batch"
    while b <= args.max_batch and fits:
        need = 1.3 * compile_est + 4 * last_s * b / last_b + 15
        if not budget.allows(need, f"the batch-{b} try", notes):
            stopped = "time budget"
            break
        B.log(f"batch search: {b}")
        try:
            rec = ours_step_phase(size, pipe.unet, adapter, pipe.schedule, b, latent, 1, rng)
            largest["tried"].append(
                {
                    "batch": b,
                    "fits": True,
                    "median_s": rec["ours"].get("median_s"),
                    "examples_per_s": rec["ours"].get("examples_per_s"),
                    "mfu": rec.get("mfu"),
                    "device_memory": rec["device_memory"],
                    "lower_compile_s": rec["compile"]["lower_compile_s"],
                    "xla_memory": rec["compile"]["xla_memory"],
                }
            )
            fits, compile_est = b, rec["compile"]["lower_compile_s"]
            last_b, last_s = b, rec["ours"].get("median_s") or last_s * 2
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                traceback.print_exc()
            largest["tried"].append(
                {
                    "batch": b,
                    "fits": False,
                    "oom": is_oom(e),
                    "error": f"{type(e).__name__}: {str(e)[:500]}",
                }
            )
            stopped = "out of memory" if is_oom(e) else "error"
            break
        finally:
            jax.clear_caches()
            save()
        b *= 2
    largest["largest_fitting"] = fits
    largest["stopped_by"] = stopped
    largest["text"] = (
        f"{fits}" + ("" if stopped == "out of memory" else f" (search stopped: {stopped})")
        if fits
        else "n/a"
    )
    result["table_markdown"] = table(result)
    save()
    print()
    print(f"command: `{B.command_line()}`")
    print(f"machine: {B.machine_line(info)}")
    print(f"peak used for MFU: {PEAK_NAME}")
    print()
    print(result["table_markdown"])
    for n in notes:
        print(f"\nnote: {n}")
    print(f"\n(JSON: {json_path}; {result['elapsed_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
