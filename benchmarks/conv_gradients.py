"""One convolution's gradients three ways: the package's matrix-product gradients
(codi_eqx/nn/_conv.py), XLA's own convolution gradients, and PyTorch, fp32, on this CPU.

Per shape (SD1.5's UNet layers at 32x32 latents, per example `(C, H, W)`, vmapped over the
batch as the models run): the forward convolution alone; forward + gradient with respect to
input and weight (a trained layer); forward + input gradient (a frozen layer, as the frozen
UNet in CoDi's step). The loss is `sum(conv(x, w) * probe)`. Median of `--repeats` calls after
a warm-up, alternating the three sides; `policy` says which formulation `codi_eqx.nn.Conv2d`
uses for the shape on this backend. The forward row runs the same compiled convolution on
both JAX sides (the custom JVP only changes derivatives): its ratio shows the measurement's
noise, the side timed right after PyTorch's call starting on colder caches.

    python benchmarks/conv_gradients.py     # JSON: benchmarks/results/conv_gradients.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _bench as B
import numpy as np

SHAPES = [
    # cin, cout, side, batch, stride
    (2560, 1280, 8, 1, 1),
    (1280, 1280, 8, 1, 1),
    (1280, 1280, 4, 1, 1),
    (1280, 1280, 16, 1, 2),
    (1280, 1280, 8, 4, 1),
    (1280, 1280, 4, 4, 1),
    (1280, 1280, 16, 1, 1),
    (640, 640, 16, 1, 1),
    (640, 640, 16, 4, 1),
    (320, 320, 32, 1, 1),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch_threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import torch

    from codi_eqx.nn._conv import _conv, conv2d_matmul_gradient, matmul_gradient_pays

    B.set_torch_threads(args.torch_threads)
    info = B.machine_info()
    rows = []
    for cin, cout, side, batch, stride in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, cin, side, side)).astype(np.float32)
        w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
        out_side = (side + 2 - 3) // stride + 1
        probe = rng.standard_normal((batch, cout, out_side, out_side)).astype(np.float32)
        xj, wj, pj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(probe)

        def jax_fns(conv):
            def fwd(x, w):
                return jax.vmap(lambda e: conv(e, w, stride, 1))(x)

            def loss(x, w):
                return jnp.sum(fwd(x, w) * pj)

            return {
                "forward": jax.jit(fwd),
                "grad input+weight": jax.jit(jax.grad(loss, argnums=(0, 1))),
                "grad input": jax.jit(jax.grad(loss, argnums=0)),
            }

        ours, plain = jax_fns(conv2d_matmul_gradient), jax_fns(_conv)
        tx = torch.from_numpy(x).requires_grad_(True)
        tw = torch.nn.Parameter(torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
        tp = torch.from_numpy(probe)

        def torch_fn(what):
            def run():
                tx.grad, tw.grad = None, None
                if what == "forward":
                    with torch.no_grad():
                        torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1)
                    return
                tw.requires_grad_(what == "grad input+weight")
                (torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1) * tp).sum().backward()
            return run

        case = f"{cin}->{cout} {side}x{side} b{batch}" + (f" stride {stride}" if stride > 1 else "")
        pays = matmul_gradient_pays((cin, side, side), w.shape, stride, 1, jax.default_backend())
        g_ours = ours["grad input+weight"](xj, wj)
        g_plain = plain["grad input+weight"](xj, wj)
        diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(g_ours, g_plain))
        for what in ("forward", "grad input+weight", "grad input"):
            sides = {
                "ours": lambda f=ours[what]: jax.block_until_ready(f(xj, wj)),
                "xla": lambda f=plain[what]: jax.block_until_ready(f(xj, wj)),
                "torch": torch_fn(what),
            }
            times = B.alternate(sides, args.repeats, log=lambda _: None)
            med = {k: float(np.median(m.times)) * 1e3 for k, m in times.items()}
            rows.append({"case": case, "pass": what, "policy": "matmul" if pays else "xla",
                         **{f"{k}_ms": v for k, v in med.items()},
                         "max_grad_diff_rel": diff})
            B.log(f"{case} {what}: ours {med['ours']:.1f} xla {med['xla']:.1f} torch {med['torch']:.1f} ms")
    lines = [
        "| convolution | pass | Conv2d uses | matmul gradients (ms) | XLA gradients (ms) | PyTorch (ms) | matmul / XLA | matmul / PyTorch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['pass']} | {r['policy']} | {r['ours_ms']:.1f} | {r['xla_ms']:.1f} | "
            f"{r['torch_ms']:.1f} | {r['ours_ms'] / r['xla_ms']:.2f} | {r['ours_ms'] / r['torch_ms']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    path = Path(args.json) if args.json else B.default_json("conv_gradients")
    B.write_json(path, {"machine": info, "repeats": args.repeats, "rows": rows,
                        "table_markdown": text, "command": B.command_line()})
    print(f"\n(JSON: {path})")


if __name__ == "__main__":
    main()
