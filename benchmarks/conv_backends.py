"""XLA:CPU's convolution backends against PyTorch: one 3x3 convolution (forward, and the
gradient of a squared sum with respect to the weights), NHWC in JAX, NCHW in PyTorch, fp32.

The XLA side runs in child processes, one per `XLA_FLAGS` setting (XLA reads its flags once per
process): `ynnpack` is jaxlib's default (convolutions in YNNPACK library fusions), `eigen` the
package's setting (codi_eqx/_xla_flags.py: convolutions through XLA's Eigen kernels). PyTorch
runs in this process after them. Median of `--repeats` calls after a warm-up call.

    python benchmarks/conv_backends.py            # JSON: benchmarks/results/conv_backends.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = [(320, 32, 1), (640, 16, 1), (1280, 8, 1), (320, 32, 4)]
"""(channels, side, batch): SD1.5's UNet levels at 32x32 latents."""

SETTINGS = {
    "ynnpack": "",
    "eigen": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
}


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _xla_child(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    for c, s, b in SHAPES:
        x = jnp.asarray(np.random.default_rng(0).standard_normal((b, s, s, c)), jnp.float32)
        w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, c, c)) * 0.02, jnp.float32)

        def conv(x, w):
            return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

        fwd = jax.jit(conv)
        dw = jax.jit(jax.grad(lambda w, x: jnp.sum(conv(x, w) ** 2)))
        out[f"{c}ch {s}x{s} b{b}"] = {
            "forward_ms": _median_ms(lambda: fwd(x, w).block_until_ready(), repeats),
            "weight_grad_ms": _median_ms(lambda: dw(w, x).block_until_ready(), repeats),
        }
    return out


def _torch(repeats: int) -> dict:
    import torch

    out = {}
    for c, s, b in SHAPES:
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        x = torch.randn(b, c, s, s)

        def fwd():
            with torch.no_grad():
                conv(x)

        def dw():
            conv.zero_grad()
            (conv(x) ** 2).sum().backward()

        out[f"{c}ch {s}x{s} b{b}"] = {"forward_ms": _median_ms(fwd, repeats),
                                      "weight_grad_ms": _median_ms(dw, repeats)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "conv_backends.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_xla_child(args.repeats)))
        return
    results = {}
    for name, flags in SETTINGS.items():
        env = {**os.environ, "XLA_FLAGS": flags, "CODI_KEEP_XLA_FLAGS": "1"}
        run = subprocess.run([sys.executable, __file__, "--child", name, "--repeats",
                              str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    results["pytorch"] = _torch(args.repeats)
    print("| convolution | pass | XLA YNNPACK (ms) | XLA Eigen (ms) | PyTorch (ms) | Eigen / PyTorch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in results["pytorch"]:
        for kind in ("forward_ms", "weight_grad_ms"):
            y, e, t = (results[k][shape][kind] for k in ("ynnpack", "eigen", "pytorch"))
            print(f"| {shape} | {kind[:-3].replace('_', ' ')} | {y:.1f} | {e:.1f} | {t:.1f} | {e / t:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"repeats": args.repeats, "cpu_count": os.cpu_count(),
                                           "results": results}, indent=2) + "\n")
    print(f"\n(JSON: {args.json})")


if __name__ == "__main__":
    main()
