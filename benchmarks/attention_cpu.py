"""Multi-head attention on this CPU: the package's two formulations (codi_eqx/nn/_attention.py:
heads-first, and blocked for long sequences; `ours` is the one `dot_product_attention` picks)
against XLA's lowering of `jax.nn.dot_product_attention` and PyTorch's
`scaled_dot_product_attention`, fp32, one example's `(tokens, heads, head_dim)` vmapped over
the batch. Forward, and forward + gradient of `sum(sin(out))` with respect to
q, k and v; median of `--repeats` calls after a warm-up, the sides in turn (the blocked one
only where it has two blocks of queries or more).

    python benchmarks/attention_cpu.py      # JSON: benchmarks/results/attention_cpu.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _bench as B
import numpy as np

SHAPES = [
    # queries, keys, head_dim, batch (8 heads): SD1.5 at 32x32 latents (self, text), 64x64
    (1024, 1024, 40, 1),
    (1024, 1024, 40, 4),
    (1024, 77, 40, 1),
    (256, 256, 80, 4),
    (64, 64, 160, 1),
    (4096, 4096, 40, 1),
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

    from codi_eqx.nn._attention import (
        BLOCK_QUERIES,
        _blocked_attention,
        _heads_first_attention,
        blocked_attention_pays,
        dot_product_attention,
    )

    B.set_torch_threads(args.torch_threads)
    info = B.machine_info()
    rows = []
    for t, s, h, b in SHAPES:
        rng = np.random.default_rng(0)
        q = rng.standard_normal((b, t, 8, h)).astype(np.float32)
        k, v = (rng.standard_normal((b, s, 8, h)).astype(np.float32) for _ in range(2))
        jq, jk, jv = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
        tq, tk, tv = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()).requires_grad_(True)
                      for a in (q, k, v))

        def jax_pair(f):
            fwd = jax.jit(f)
            grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2)))
            return fwd, grad

        ours = jax_pair(jax.vmap(dot_product_attention))
        path = "blocked" if blocked_attention_pays(jq[0], jk[0], jv[0]) else "heads-first"
        heads_first = jax_pair(jax.vmap(_heads_first_attention))
        blocked = jax_pair(jax.vmap(_blocked_attention)) if t >= 2 * BLOCK_QUERIES else None
        xla = jax_pair(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
        diff = float(jnp.max(jnp.abs(ours[0](jq, jk, jv) - xla[0](jq, jk, jv))))

        def torch_fwd():
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

        def torch_grad():
            for a in (tq, tk, tv):
                a.grad = None
            torch.sin(torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)).sum().backward()

        case = f"{t} x {s} tokens, 8 x {h}, batch {b}"
        for i, what in enumerate(("forward", "forward+backward")):
            sides = {
                "ours": lambda f=ours[i]: jax.block_until_ready(f(jq, jk, jv)),
                "heads_first": lambda f=heads_first[i]: jax.block_until_ready(f(jq, jk, jv)),
                "xla": lambda f=xla[i]: jax.block_until_ready(f(jq, jk, jv)),
                "torch": (torch_fwd, torch_grad)[i],
            }
            if blocked is not None:
                sides["blocked"] = lambda f=blocked[i]: jax.block_until_ready(f(jq, jk, jv))
            m = B.alternate(sides, args.repeats, log=lambda _: None)
            med = {n: float(np.median(x.times)) * 1e3 for n, x in m.items()}
            rows.append({"case": case, "pass": what, "ours_path": path,
                         **{f"{n}_ms": x for n, x in med.items()}, "max_abs_diff_forward": diff})
            B.log(f"{case} {what}: " + ", ".join(f"{n} {x:.1f}" for n, x in med.items()) + " ms")
    lines = ["| attention | pass | ours: path | ours (ms) | heads-first (ms) | blocked (ms) | jax.nn.dot_product_attention (ms) | PyTorch SDPA (ms) | ours / jax | ours / PyTorch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        blocked_ms = f"{r['blocked_ms']:.1f}" if "blocked_ms" in r else "n/a"
        lines.append(f"| {r['case']} | {r['pass']} | {r['ours_path']} | {r['ours_ms']:.1f} | "
                     f"{r['heads_first_ms']:.1f} | {blocked_ms} | {r['xla_ms']:.1f} | {r['torch_ms']:.1f} | "
                     f"{r['ours_ms'] / r['xla_ms']:.2f} | {r['ours_ms'] / r['torch_ms']:.2f} |")
    text = "\n".join(lines)
    print(text)
    path = Path(args.json) if args.json else B.default_json("attention_cpu")
    B.write_json(path, {"machine": info, "repeats": args.repeats, "rows": rows,
                        "table_markdown": text, "command": B.command_line()})
    print(f"\n(JSON: {path})")


if __name__ == "__main__":
    main()
