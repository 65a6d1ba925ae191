"""The UNet module by module, ours against diffusers: every ResnetBlock2D and
Transformer2DModel timed alone, forward and forward + backward, on the inputs it sees inside
the whole UNet.

    python benchmarks/profile_blocks.py --size sd15 --batch 1     # about 8 minutes on 2 cores
    python benchmarks/profile_blocks.py --size sd15 --only down_blocks.0 up_blocks.3

Where `unet_speed.py` says how far the whole UNet is behind, this says where: which levels
and which kind of block. The reference UNet is diffusers' (seeded random weights, written and
read into codi-eqx as in `unet_speed.py`, so both sides hold the same weights). One forward
pass of diffusers' UNet on random latents (`--latent`, batch `--batch`) records each module's
inputs (forward pre-hooks); each module is then timed alone on both sides with those inputs:

- forward: ours `eqx.filter_jit` of `jax.vmap(module)`, diffusers under `torch.inference_mode()`;
- forward + backward: the gradient of `sum(sin(output))` with respect to the module's
  parameters and its input, as inside the UNet (ours `eqx.filter_grad` of the pair; diffusers
  `.backward()` from an input leaf that requires its gradient, gradients set to None first).

Each pair alternates (ours, reference, ...) after one warm-up call each (`B.alternate`).
Reported per module: median seconds of both sides and ours / reference, and the largest
difference of the forward outputs over the largest reference value; then the sums per kind
and level. The sum over modules leaves out what lies between them (time embedding, conv_in /
conv_out, resampling, skip concatenations), and a module timed alone runs without its
neighbours' memory traffic, so the sums need not add up to `unet_speed.py`'s whole-UNet
times: a whole-UNet gap larger than the modules' says the cost is in the whole compiled
program (its memory: XLA:CPU maps one temporary buffer per call, and every first touch of
its pages faults), not in any one module.
"""

from __future__ import annotations

import argparse
import collections
import time

import _bench as B

NAME = "profile_blocks"
KINDS = ("ResnetBlock2D", "Transformer2DModel")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B.add_common_args(ap, repeats=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--latent", type=int, default=None, help="latent side (sd15 32, small 16)")
    ap.add_argument(
        "--only", nargs="+", default=None,
        help="time only the modules whose diffusers name contains one of these strings",
    )
    args = ap.parse_args()
    if B.parse_sides(args.sides) != ("ours", "reference"):
        raise SystemExit("--sides: this benchmark compares both sides; leave --sides at its default")

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from weights_conversion import load_unet

    B.no_persistent_compilation_cache()
    B.set_torch_threads(args.torch_threads)
    info = B.machine_info()
    with B.workdir() as tmp:
        t0 = time.perf_counter()
        ref = B.write_diffusers_model(tmp, args.size, seed=args.seed, parts=("unet",))
        unet_t = ref.unet
        unet_j = load_unet(tmp / "unet")
        B.log(f"built the diffusers UNet and loaded it into codi-eqx: {time.perf_counter() - t0:.1f} s")

    captured: dict[str, tuple] = {}
    modules = {}
    for name, module in unet_t.named_modules():
        if type(module).__name__ in KINDS and (
            not args.only or any(part in name for part in args.only)
        ):
            modules[name] = module

            def hook(mod, a, kw, name=name):
                captured.setdefault(name, (a, kw))

            module.register_forward_pre_hook(hook, with_kwargs=True)
    if not modules:
        raise SystemExit(f"--only {' '.join(args.only or [])}: no module of the UNet matches")

    rng = np.random.default_rng(args.seed)
    L = args.latent or (32 if args.size == "sd15" else 16)
    x = torch.from_numpy(rng.standard_normal((args.batch, 4, L, L)).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, 1000, (args.batch,)).astype(np.int64))
    e = torch.from_numpy(
        rng.standard_normal((args.batch, B.TEXT_LEN, B.cross_dim(args.size))).astype(np.float32))
    with torch.inference_mode():
        unet_t(x, t, e)

    def ours_module(name):
        obj = unet_j
        for part in name.split("."):
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        return obj

    def forward_j(mod, a, b):
        return jax.vmap(mod)(a, b)

    fwd_j = eqx.filter_jit(forward_j)
    # the gradient with respect to the module's parameters and its input, as inside the UNet
    bwd_j = eqx.filter_jit(eqx.filter_grad(
        lambda module_and_input, b: jnp.sum(jnp.sin(forward_j(*module_and_input, b)))))

    rows, results = [], []
    sums = collections.defaultdict(lambda: {"forward": [0.0, 0.0], "backward": [0.0, 0.0]})
    for name, module_t in modules.items():
        a, kw = captured[name]
        kind = type(module_t).__name__
        if kind == "ResnetBlock2D":
            xt, other = a[0].clone(), a[1].clone()

            def call_t(h, o, m=module_t):
                return m(h, o)
        else:
            xt, other = a[0].clone(), kw["encoder_hidden_states"].clone()

            def call_t(h, o, m=module_t):
                return m(h, encoder_hidden_states=o, return_dict=False)[0]
        module_j = ours_module(name)
        jx, jo = jnp.asarray(xt.numpy()), jnp.asarray(other.numpy())
        xt_leaf = xt.clone().requires_grad_()
        B.log(f"{name} {kind} {tuple(xt.shape)}")
        row = {"module": name, "kind": kind, "input_shape": list(xt.shape)}
        last = {}
        for what in ("forward", "backward"):
            if what == "forward":
                def ours(last=last):
                    last["ours"] = B.block(fwd_j(module_j, jx, jo))

                def reference(last=last):
                    with torch.inference_mode():
                        last["reference"] = call_t(xt, other)
            else:
                def ours():
                    B.block(bwd_j((module_j, jx), jo))

                def reference():
                    module_t.zero_grad(set_to_none=True)
                    torch.sin(call_t(xt_leaf, other)).sum().backward()
            meas = B.alternate({"ours": ours, "reference": reference}, args.repeats,
                               log=lambda _msg: None)
            s_o, s_r = B.stats(meas["ours"]), B.stats(meas["reference"])
            row[what] = {"ours": s_o, "reference": s_r, "ours_over_reference": B.ratio(s_o, s_r)}
            if what == "forward":
                row["parity"] = B.rel_diff(np.asarray(last["ours"]), last["reference"].numpy())
            level = name.rsplit(".", 2)[0]  # down_blocks.0, mid_block, up_blocks.3
            for label in (kind, level, "all modules"):
                sums[label][what][0] += s_o["median_s"]
                sums[label][what][1] += s_r["median_s"]
        module_t.zero_grad(set_to_none=True)
        results.append(row)
        rows.append([
            name, kind, "x".join(map(str, xt.shape)),
            B.fmt(row["forward"]["ours"]["median_s"] * 1e3),
            B.fmt(row["forward"]["reference"]["median_s"] * 1e3),
            B.fmt(row["forward"]["ours_over_reference"]),
            B.fmt(row["backward"]["ours"]["median_s"] * 1e3),
            B.fmt(row["backward"]["reference"]["median_s"] * 1e3),
            B.fmt(row["backward"]["ours_over_reference"]),
            B.fmt(row["parity"]["rel"], 2),
        ])
    for label in sorted(sums, key=lambda x: (x == "all modules", x not in KINDS, x)):
        by_pass = sums[label]
        cells = []
        for o, r in (by_pass["forward"], by_pass["backward"]):
            cells += [B.fmt(o * 1e3), B.fmt(r * 1e3), B.fmt(o / r)]
        rows.append([f"sum: {label}", "", "", *cells, ""])
    headers = ["module", "kind", "input", "fwd ours (ms)", "fwd ref (ms)", "fwd ours/ref",
               "fwd+bwd ours (ms)", "fwd+bwd ref (ms)", "fwd+bwd ours/ref",
               "max abs diff / max abs ref"]
    config = {"size": args.size, "unet": B.UNET[args.size], "latent": L, "batch": args.batch,
              "repeats": args.repeats, "dtype": "float32", "only": args.only}
    B.finish(
        NAME if args.json else f"{NAME}_{args.size}_b{args.batch}",
        args.json, info,
        {"config": config, "modules": results,
         "sums": {label: {what: {"ours_s": o, "reference_s": r, "ours_over_reference": o / r}
                          for what, (o, r) in by_pass.items()}
                  for label, by_pass in sums.items()}},
        B.markdown_table(headers, rows),
        notes=("Median milliseconds per call (the whole batch) of each module alone; sums add "
               "the medians.",),
    )


if __name__ == "__main__":
    main()
