"""Fused (cuDNN) vs XLA attention at Stable Diffusion 1.5's shapes: agreement and time.

    python benchmarks/attention_check.py        # needs an NVIDIA GPU for the cuDNN column

For each (tokens, heads, head size) of SD1.5 at 512x512, batch 8, bfloat16: the max
difference between the two implementations (relative to the output's max) and the time of
forward + backward of each.
"""

import time

import jax
import jax.numpy as jnp

SHAPES = [(4096, 8, 40), (1024, 8, 80), (256, 8, 160), (77, 8, 64), (4096, 8, 64)]


def main() -> None:
    print(f"device: {jax.devices()[0].device_kind}")
    key = jax.random.key(0)
    for t, n, hd in SHAPES:
        q, k, v = (jax.random.normal(kk, (8, t, n, hd), jnp.bfloat16) for kk in jax.random.split(key, 3))
        row = f"tokens {t:5d} heads {n} head {hd:3d}:"
        outs = {}
        for impl in ("xla", "cudnn"):
            try:
                f = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, implementation=impl))
                g = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(
                    jax.nn.dot_product_attention(q, k, v, implementation=impl).astype(jnp.float32))))
                outs[impl] = f(q, k, v).astype(jnp.float32)
                jax.block_until_ready(g(q, k, v))
                t0 = time.perf_counter()
                for _ in range(10):
                    r = g(q, k, v)
                jax.block_until_ready(r)
                row += f" {impl} {1e3 * (time.perf_counter() - t0) / 10:.3f} ms"
            except Exception as e:  # the kernel does not take this shape
                row += f" {impl} unavailable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
        if len(outs) == 2:
            err = float(jnp.max(jnp.abs(outs["xla"] - outs["cudnn"])) / jnp.max(jnp.abs(outs["xla"])))
            row += f" rel diff {err:.2e}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
