"""UNet forward, and forward + backward, of codi-eqx against diffusers (PyTorch), same weights.

    python benchmarks/unet_speed.py --size small --repeats 3           # a few minutes on 2 cores
    python benchmarks/unet_speed.py --size sd15 --repeats 3            # SD1.5's UNet (859M)
    python benchmarks/unet_speed.py --size sd15 --batch 1 --what forward

The reference is diffusers' `UNet2DConditionModel` in PyTorch (CPU, float32), built with a
seeded random init, written with `save_pretrained` and read into codi-eqx with
`weights_conversion.load_unet` (the loader behind `codi_eqx.load_pipeline`), so both sides
hold the same weights. Inputs: latents `(B, 4, L, L)` (`--latent`), timesteps,
text embeddings `(B, 77, cross_attention_dim)`, float32. `--latent` defaults to 32 (256x256
images) for sd15 and 16 for small.

- forward: ours `eqx.filter_jit` of `jax.vmap(unet)`; diffusers under `torch.inference_mode()`.
- backward: the gradient of the sum of the output with respect to every UNet parameter; ours
  `eqx.filter_jit(eqx.filter_grad(...))` over the vmapped UNet, diffusers `.backward()`
  (gradients set to None before each call).

Both sides are called in turn (ours, reference, ours, ...) after one warm-up call each.
Reported per case: median and [min-max] seconds, ours/reference, compile time (first call
minus median; ours also `.lower().compile()` as timed here), peak RSS above the RSS before each
call (a thread sampling VmRSS every 2 ms, per side), XLA's temp + argument bytes, and the
largest difference of the outputs (forward) or of all parameter gradients (backward) over the
largest reference value. At SD1.5 size, backward holds two copies of the UNet and of its
gradients (4 x 3.4 GB) plus activations; `--sides` runs one side alone where that does not fit.
"""

from __future__ import annotations

import argparse
import time

import _bench as B

NAME = "unet_speed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B.add_common_args(ap, repeats=5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument(
        "--latent",
        type=int,
        default=None,
        help="latent side (default: 32, i.e. 256x256 images, for sd15; 16 for small)",
    )
    ap.add_argument("--what", default="forward,backward", help="forward, backward, or both")
    args = ap.parse_args()
    sides = B.parse_sides(args.sides)
    passes = [w.strip() for w in args.what.split(",") if w.strip()]
    if not passes or any(p not in ("forward", "backward") for p in passes):
        raise SystemExit(f"--what: expected forward and/or backward, got {args.what!r}")

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from weights_conversion import UNET_NAME_MAP, export_state, load_unet

    B.no_persistent_compilation_cache()
    B.set_torch_threads(args.torch_threads)
    info = B.machine_info()
    cases, rows = [], []
    with B.workdir() as tmp:
        t0 = time.perf_counter()
        ref = B.write_diffusers_model(tmp, args.size, seed=args.seed, parts=("unet",))
        unet_t = ref.unet
        unet_j = load_unet(tmp / "unet")
        B.log(
            f"built and saved the diffusers UNet, loaded it into codi-eqx: "
            f"{time.perf_counter() - t0:.1f} s, {B.count_params(unet_j) / 1e6:.1f}M parameters"
        )

    def forward(unet, x, t, e):
        return jax.vmap(unet)(x, t, e)

    def loss(unet, x, t, e):
        return jnp.sum(forward(unet, x, t, e))

    fwd_j = eqx.filter_jit(forward)
    bwd_j = eqx.filter_jit(eqx.filter_grad(loss))
    rng = np.random.default_rng(args.seed)
    D, L = B.cross_dim(args.size), args.latent or (32 if args.size == "sd15" else 16)
    for batch in args.batch:
        x = rng.standard_normal((batch, 4, L, L)).astype(np.float32)
        t = rng.integers(0, 1000, (batch,)).astype(np.int64)
        e = rng.standard_normal((batch, B.TEXT_LEN, D)).astype(np.float32)
        jargs = (unet_j, jnp.asarray(x), jnp.asarray(t, jnp.int32), jnp.asarray(e))
        targs = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(e))
        for what in passes:
            case = f"{args.size} UNet {what}, batch {batch}, {L}x{L} latents"
            B.log(case)
            last = {}
            jitted = fwd_j if what == "forward" else bwd_j
            compile_info = None
            fns = {}
            if "ours" in sides:
                _, compile_info = B.lower_and_compile(jitted, *jargs)
                B.log(
                    f"  ours: lower {compile_info['lower_s']:.2f} s, compile "
                    f"{compile_info['compile_s']:.2f} s"
                )

                def ours(jitted=jitted, jargs=jargs, last=last):
                    last["ours"] = B.block(jitted(*jargs))

                fns["ours"] = ours
            if "reference" in sides:
                if what == "forward":

                    def reference(targs=targs, last=last):
                        with torch.inference_mode():
                            last["reference"] = unet_t(*targs).sample
                else:

                    def reference(targs=targs):
                        unet_t.zero_grad(set_to_none=True)
                        unet_t(*targs).sample.sum().backward()

                fns["reference"] = reference
            meas = B.alternate(fns, args.repeats)
            s_ours = (
                B.stats(meas["ours"], setup_s=compile_info["lower_compile_s"])
                if "ours" in meas
                else None
            )
            s_ref = B.stats(meas["reference"]) if "reference" in meas else None
            parity = None
            if len(sides) == 2:
                if what == "forward":
                    parity = B.rel_diff(np.asarray(last["ours"]), last["reference"].numpy())
                else:
                    g_ours = export_state(last["ours"], UNET_NAME_MAP)
                    g_ref = {
                        n: p.grad.numpy()
                        for n, p in unet_t.named_parameters()
                        if p.grad is not None
                    }
                    parity = B.rel_diff_dicts(g_ours, g_ref)
                    del g_ours, g_ref
                B.log(
                    f"  max abs diff / max abs ref: {parity['rel']:.2e} "
                    f"(max abs diff {parity['max_abs_diff']:.3e}, "
                    f"max abs ref {parity['max_abs_ref']:.3e})"
                )
            last.clear()
            unet_t.zero_grad(set_to_none=True)
            cases.append(
                {
                    "case": case,
                    "pass": what,
                    "batch": batch,
                    "latent": L,
                    "ours": s_ours,
                    "reference": s_ref,
                    "ours_over_reference": B.ratio(s_ours, s_ref),
                    "ours_compile": compile_info,
                    "parity": parity,
                }
            )
            rows.append(
                B.comparison_row(
                    case,
                    s_ours,
                    s_ref,
                    jax_compile_s=compile_info["lower_compile_s"] if compile_info else None,
                    xla_mem=compile_info["xla_memory"] if compile_info else None,
                    parity=parity["rel"] if parity else None,
                )
            )

    config = {
        "size": args.size,
        "unet": B.UNET[args.size],
        "latent": L,
        "text_len": B.TEXT_LEN,
        "batches": args.batch,
        "what": passes,
        "repeats": args.repeats,
        "dtype": "float32",
        "sides": sides,
        "unet_params": B.count_params(unet_j),
    }
    B.finish(
        NAME,
        args.json,
        info,
        {"config": config, "cases": cases},
        B.markdown_table(B.COMPARISON_HEADERS, rows),
        notes=(
            "Times in seconds per call (the whole batch). Peak RSS: host memory above "
            "the RSS before the call, the largest over the timed calls.",
        ),
    )


if __name__ == "__main__":
    main()
