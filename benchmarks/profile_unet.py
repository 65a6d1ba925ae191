"""Where the UNet's time goes, ours against diffusers: a per-operation profile of forward and
forward + backward on this CPU, grouped by kind, side by side.

    python benchmarks/profile_unet.py --size sd15 --batch 1
    python benchmarks/profile_unet.py --size sd15 --batch 4 --what forward

Ours: `jax.profiler` traces the compiled call (after a warm-up); each event of XLA:CPU's
thunk executor is one instruction of the compiled module's entry computation, and the
module's HLO text says what it computes. Kinds: convolution forward, convolution input
gradient (the transposed convolution: no forward `jvp(...)` metadata), convolution weight
gradient (a convolution whose window spans the activation: XLA expresses the weight
gradient as a convolution of the input with the output gradient), matrix products (`dot`:
linear layers, attention), and everything else (normalisation, activations, softmax, copies
and transposes, reductions: XLA's elementwise and reduction fusions). The reference:
`torch.profiler` over the same calls of diffusers' UNet on the same weights, self CPU time per
aten operator grouped the same way (`convolution_backward` covers both convolution
gradients there). Times are the sum over `--repeats` profiled calls divided by their number,
so each column adds up to about one call (profiling adds a little overhead on both sides).
Writes `benchmarks/results/profile_unet_<size>_b<batch>.json` and prints one table per pass.

XLA:CPU's Eigen convolutions (the package's setting, codi_eqx/_xla_flags.py) run as asynchronous
thunks: their events record the launch only, and their time shows in the wall time (and the
executor's waits), not in the convolution rows; with jaxlib's YNNPACK convolutions
(`CODI_KEEP_XLA_FLAGS=1`) the rows attribute it.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import _bench as B

KINDS = (
    "convolution forward",
    "convolution input gradient",
    "convolution weight gradient",
    "convolution gradients (both)",
    "matrix products (dot / mm)",
    "other (norms, activations, softmax, copies, reductions)",
)


def hlo_kinds(hlo_text: str) -> dict[str, str]:
    """Entry-computation instruction name -> its kind, from a compiled module's HLO text."""
    computations: dict[str, list[str]] = {}
    current, entry = None, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            current = m.group(2)
            computations[current] = []
            if m.group(1):
                entry = current
            continue
        if current is not None and line.startswith(" "):
            computations[current].append(line)

    def kind_of(lines: list[str], depth: int = 0) -> str | None:
        for ln in lines:
            if " convolution(" in ln:
                win = re.search(r"window=\{size=(\d+)x(\d+)", ln)
                big = win and max(int(win.group(1)), int(win.group(2))) > 3
                if big:
                    return "convolution weight gradient"
                # The backward pass's convolutions carry no jvp metadata of their own.
                if "transpose(" in ln or "op_name=" not in ln:
                    return "convolution input gradient"
                return "convolution forward"
        for ln in lines:
            if " dot(" in ln:
                return "matrix products (dot / mm)"
        if depth < 3:
            for ln in lines:
                for called in re.findall(r"(?:calls|to_apply|body)=%?([\w.\-]+)", ln):
                    k = kind_of(computations.get(called, []), depth + 1)
                    if k:
                        return k
        return None

    out = {}
    for ln in computations.get(entry, []):
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", ln)
        if m:
            out[m.group(1)] = kind_of([ln]) or "other (norms, activations, softmax, copies, reductions)"
    return out


def jax_profile(fn, args, repeats: int, hlo_text: str) -> dict:
    import jax

    kinds = hlo_kinds(hlo_text)
    B.block(fn(*args))
    folder = Path(tempfile.mkdtemp(prefix="codi-prof-"))
    jax.profiler.start_trace(str(folder), create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(repeats):
        B.block(fn(*args))
    wall = (time.perf_counter() - t0) / repeats
    jax.profiler.stop_trace()
    trace = sorted(folder.rglob("*.trace.json.gz"))[-1]
    with gzip.open(trace) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    per_kind: dict[str, float] = collections.Counter()
    per_op: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"] not in kinds:
            continue
        us = float(e.get("dur", 0))
        per_kind[kinds[e["name"]]] += us / 1e3 / repeats
        per_op[e["name"]] += us / 1e3 / repeats
    return {"wall_ms": wall * 1e3, "kinds_ms": dict(per_kind),
            "top_ops_ms": dict(collections.Counter(per_op).most_common(15))}


def torch_kind(name: str) -> str:
    n = name.lower()
    if "conv" in n and "backward" in n:
        return "convolution gradients (both)"
    if "conv" in n:
        return "convolution forward"
    if re.search(r"aten::(addmm|mm|bmm|baddbmm|matmul|linear|_scaled_dot|scaled_dot)", n):
        return "matrix products (dot / mm)"
    return "other (norms, activations, softmax, copies, reductions)"


def torch_profile(fn, repeats: int) -> dict:
    import torch

    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        wall = (time.perf_counter() - t0) / repeats
    per_kind: dict[str, float] = collections.Counter()
    per_op = {}
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3 / repeats
        per_kind[torch_kind(ev.key)] += ms
        per_op[ev.key] = ms
    top = dict(sorted(per_op.items(), key=lambda kv: -kv[1])[:15])
    return {"wall_ms": wall * 1e3, "kinds_ms": dict(per_kind), "top_ops_ms": top}


def table(ours: dict, ref: dict) -> str:
    rows = []
    for k in KINDS:
        o, r = ours["kinds_ms"].get(k), ref["kinds_ms"].get(k)
        if o is None and r is None:
            continue
        rows.append([k, B.fmt(o), B.fmt(r), B.fmt(o / r if o and r else None)])
    o_grad = sum(ours["kinds_ms"].get(k, 0.0) for k in KINDS[1:3])
    r_grad = ref["kinds_ms"].get(KINDS[3])
    if o_grad and r_grad:
        rows.append(["convolution gradients, input + weight", B.fmt(o_grad), B.fmt(r_grad),
                     B.fmt(o_grad / r_grad)])
    so, sr = sum(ours["kinds_ms"].values()), sum(ref["kinds_ms"].values())
    rows.append(["sum of the operations", B.fmt(so), B.fmt(sr), B.fmt(so / sr)])
    rows.append(["wall time per profiled call", B.fmt(ours["wall_ms"]), B.fmt(ref["wall_ms"]),
                 B.fmt(ours["wall_ms"] / ref["wall_ms"])])
    return B.markdown_table(["kind", "ours (ms)", "diffusers (ms)", "ours / ref"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B.add_common_args(ap, repeats=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--latent", type=int, default=None, help="latent side (sd15 32, small 16)")
    ap.add_argument("--what", default="forward,backward")
    args = ap.parse_args()
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
        ref = B.write_diffusers_model(tmp, args.size, seed=args.seed, parts=("unet",))
        unet_t = ref.unet
        unet_j = load_unet(tmp / "unet")

    def forward(unet, x, t, e):
        return jax.vmap(unet)(x, t, e)

    def loss(unet, x, t, e):
        return jnp.sum(forward(unet, x, t, e))

    rng = np.random.default_rng(args.seed)
    D, L = B.cross_dim(args.size), args.latent or (32 if args.size == "sd15" else 16)
    x = rng.standard_normal((args.batch, 4, L, L)).astype(np.float32)
    t = rng.integers(0, 1000, (args.batch,)).astype(np.int64)
    e = rng.standard_normal((args.batch, B.TEXT_LEN, D)).astype(np.float32)
    jargs = (unet_j, jnp.asarray(x), jnp.asarray(t, jnp.int32), jnp.asarray(e))
    targs = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(e))
    result = {"machine": info, "size": args.size, "batch": args.batch, "latent": L,
              "repeats": args.repeats, "passes": {}}
    for what in [w.strip() for w in args.what.split(",") if w.strip()]:
        B.log(f"{args.size} UNet {what}, batch {args.batch}, {L}x{L} latents")
        jitted = eqx.filter_jit(forward if what == "forward" else eqx.filter_grad(loss))
        compiled, _ = B.lower_and_compile(jitted, *jargs)
        hlo = (getattr(compiled, "compiled", compiled)).as_text()
        ours = jax_profile(jitted, jargs, args.repeats, hlo)
        if what == "forward":
            def call():
                with torch.inference_mode():
                    unet_t(*targs, return_dict=False)
        else:
            def call():
                unet_t.zero_grad(set_to_none=True)
                unet_t(*targs, return_dict=False)[0].sum().backward()
        reference = torch_profile(call, args.repeats)
        text = table(ours, reference)
        result["passes"][what] = {"ours": ours, "reference": reference, "table_markdown": text}
        print(f"\n{args.size} UNet {what}, batch {args.batch}, {L}x{L} latents "
              f"(ms per call, {args.repeats} profiled calls)\n")
        print(text)
        print("\nours' largest operations:", {k: round(v, 1) for k, v in list(ours["top_ops_ms"].items())[:8]})
        print("diffusers' largest:", {k: round(v, 1) for k, v in list(reference["top_ops_ms"].items())[:8]})
    path = Path(args.json) if args.json else B.default_json(f"profile_unet_{args.size}_b{args.batch}")
    result["command"] = B.command_line()
    B.write_json(path, result)
    print(f"\n(JSON: {path})")


if __name__ == "__main__":
    main()
