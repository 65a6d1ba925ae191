"""Shared helpers of the side-by-side benchmarks (codi-eqx against diffusers / transformers).

One place for what every script needs, so that nothing is duplicated across them:

- configurations (`UNET`, `TEXT`, `VAE`, `SCHEDULER`) at two sizes, `sd15` and `small`;
- the same random weights on both sides: the reference models are built in PyTorch with a
  seeded random init (their zero-initialised parts given small random values), written with
  `save_pretrained` in diffusers' format, and read back into codi-eqx through the project's own
  loaders (`write_diffusers_model`, `load_ours_*`); and, where diffusers is not installed (the
  GPU machine), random codi-eqx models made without compiling anything (`random_eqx`);
- timing: `alternate` runs the sides in turn (ours, reference, ours, reference, ...) after a
  warm-up call each, sampling the resident memory of the process during every call
  (`PeakRSS`), and `jax_compile_events` adds up the trace / lower / compile durations jax
  reports; `lower_and_compile` times `.lower(...)` and `.compile()` of a jitted function and
  reads XLA's memory and cost analyses;
- output: `machine_info`, `stats`, `markdown_table`, `write_json`, `finish`.

Not a script: imported by the `benchmarks/*_speed.py` scripts and `benchmarks/gpu.py`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository, also where the package is not installed
    sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"

# --- configurations ------------------------------------------------------------------------------

UNET = {
    # runwayml/stable-diffusion-v1-5's unet/config.json (859M parameters).
    "sd15": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=[320, 640, 1280, 1280],
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
    ),
    # The same architecture, narrower and one level shallower.
    "small": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=[64, 128, 256],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=64,
        norm_num_groups=32,
    ),
}
TEXT = {
    # CLIP ViT-L/14's text tower (SD 1.x); the vocabulary size only sizes the embedding table.
    "sd15": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    ),
    "small": dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    ),
}
VAE = {
    "sd15": dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    ),
    "small": dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=[32, 32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=128,
    ),
}
SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
TEXT_LEN = 77
SIZES = tuple(UNET)


def cross_dim(size: str) -> int:
    return int(UNET[size]["cross_attention_dim"])


# --- the machine ---------------------------------------------------------------------------------


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine_info() -> dict:
    """CPU model, cores, memory, Python and library versions, jax's devices, torch's threads."""
    info: dict[str, Any] = {}
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info["cpu"] = cpu
    info["cpu_cores"] = os.cpu_count()
    with contextlib.suppress(AttributeError):
        info["cpu_cores_usable"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = [
            ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
        ]
        info["memory_gib"] = round(int(mem[0].split()[1]) / 2**20, 1)
    info["nice"] = os.nice(0)
    info["python"] = platform.python_version()
    for name in ("jax", "jaxlib", "equinox", "optax", "torch", "diffusers", "transformers"):
        info[name] = _version(name)
    try:
        import jax

        devs = jax.devices()
        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = f"{len(devs)} x {devs[0].device_kind}"
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        info["jax_backend"] = f"unavailable ({e})"
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return info


def machine_line(info: dict) -> str:
    """The machine in one line, for under a table."""
    parts = [
        f"CPU {info.get('cpu')} ({info.get('cpu_cores_usable', info.get('cpu_cores'))} cores"
        f", {info.get('memory_gib')} GiB)"
    ]
    if info.get("jax_backend"):
        parts.append(f"jax {info.get('jax')} on {info.get('jax_devices', info['jax_backend'])}")
    if info.get("torch"):
        dev = info.get("torch_cuda") or f"CPU, {info.get('torch_threads')} threads"
        parts.append(f"torch {info['torch']} ({dev})")
    for name in ("equinox", "diffusers", "transformers"):
        if info.get(name):
            parts.append(f"{name} {info[name]}")
    if info.get("nice"):
        parts.append(f"nice {info['nice']}")
    return "; ".join(parts)


# --- memory --------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    """The resident set size of this process (VmRSS)."""
    return _status_kib(b"VmRSS:") * 1024


_LIBC: Any = None


def trim_heap() -> None:
    """Return the C heap's free memory to the system (glibc `malloc_trim`), so that the RSS
    before a call does not count memory that earlier calls freed (PyTorch's CPU tensors come
    from malloc and stay in the process after being freed; XLA's buffers mostly do not)."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) where allowed (Linux `clear_refs` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory of the process during a `with` block, above its RSS at entry.

    At entry the C heap's free memory is returned to the system (`trim_heap`); then a
    background thread reads VmRSS from /proc/self/status every `interval` seconds, and where
    the kernel lets the peak counter be reset, VmHWM at exit (the exact peak) is taken too.
    `.delta` is in bytes. Host memory only (on a GPU the device memory is not in it).
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.before = self.peak = self.delta = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = rss_bytes()
            if rss > self.peak:
                self.peak = rss

    def __enter__(self) -> "PeakRSS":
        trim_heap()
        self._hwm = _reset_hwm()
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if self._hwm:
            self.peak = max(self.peak, _status_kib(b"VmHWM:") * 1024)
        self.delta = self.peak - self.before


# --- jax: compile time, XLA analyses -------------------------------------------------------------

_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_compile_s",
}


@contextlib.contextmanager
def jax_compile_events() -> Iterator[dict]:
    """Adds up, into the dict it yields, the trace / lowering / XLA compilation durations
    that jax reports while the block runs (`trace_s`, `lower_s`, `backend_compile_s`,
    `total_s`)."""
    import jax

    acc = {"trace_s": 0.0, "lower_s": 0.0, "backend_compile_s": 0.0, "total_s": 0.0}

    def listener(event: str, seconds: float, **_: Any) -> None:
        name = _COMPILE_EVENTS.get(event)
        if name is not None:
            acc[name] += seconds
            acc["total_s"] += seconds

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield acc
    finally:
        with contextlib.suppress(Exception):
            jax.monitoring.unregister_event_duration_listener(listener)


def no_persistent_compilation_cache() -> None:
    """Compile for real: turn jax's persistent compilation cache off in this process."""
    import jax

    with contextlib.suppress(Exception):
        jax.config.update("jax_enable_compilation_cache", False)


def xla_memory(compiled: Any) -> Optional[dict]:
    """XLA's `memory_analysis()` of a compiled executable, in bytes (None where unavailable)."""
    inner = getattr(compiled, "compiled", compiled)  # equinox's Compiled wraps jax's
    try:
        m = inner.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    names = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    out = {n.replace("_size_in_bytes", "_bytes"): int(getattr(m, n, 0) or 0) for n in names}
    out["temp_plus_argument_bytes"] = out["temp_bytes"] + out["argument_bytes"]
    return out


def xla_flops(compiled: Any) -> Optional[float]:
    """The FLOPs XLA's `cost_analysis()` counts for one call (None where unavailable)."""
    inner = getattr(compiled, "compiled", compiled)
    try:
        cost = inner.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def lower_and_compile(jitted: Any, *args: Any) -> tuple[Any, dict]:
    """Time `jitted.lower(*args)` and `.compile()`; jax keeps the executable, so the next
    ordinary call of `jitted` with arguments of the same shapes runs without compiling.

    **Returns:** `(compiled, info)`; `info` has `lower_s`, `compile_s`, `lower_compile_s`,
    jax's own durations (`jax_events`), `xla_memory` and `xla_flops`.
    """
    with jax_compile_events() as events:
        t0 = time.perf_counter()
        lowered = jitted.lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return compiled, {
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "lower_compile_s": t2 - t0,
        "jax_events": dict(events),
        "xla_memory": xla_memory(compiled),
        "xla_flops": xla_flops(compiled),
    }


def block(tree: Any) -> Any:
    """Wait for every jax array in `tree`."""
    import jax

    leaves = [x for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)]
    jax.block_until_ready(leaves)
    return tree


# --- timing --------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """The calls of one side: the first (warm-up) and the timed ones, with their peak RSS
    above the RSS before each call."""

    name: str
    first_s: float = math.nan
    first_rss: int = 0
    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)


def _timed(fn: Callable[[], Any], interval: float) -> tuple[float, int]:
    with PeakRSS(interval) as mem:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
    return dt, mem.delta


def alternate(
    sides: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    rss_interval: float = 0.002,
    after_first: Optional[dict[str, Callable[[], Any]]] = None,
    log: Callable[[str], None] = print,
) -> dict[str, Measurement]:
    """Time the sides in turn after a warm-up.

    Each side's `fn()` is one call that returns once its results are ready (it blocks on
    them). Warm-up: each side once, in order (the first call, compilation included, is kept
    as `first_s`), then `warmup - 1` more untimed rounds. Then `repeats` rounds of one call
    per side, in order: ours, reference, ours, reference, ... so that slow drifts of the
    machine (other processes, thermal state) fall on both sides alike. `after_first[name]()`,
    where given, runs right after that side's first call, untimed (e.g. to keep its results).
    """
    out = {name: Measurement(name) for name in sides}
    for name, fn in sides.items():
        out[name].first_s, out[name].first_rss = _timed(fn, rss_interval)
        log(f"  {name}: first call {out[name].first_s:.3f} s")
        if after_first and name in after_first:
            after_first[name]()
    for _ in range(max(warmup - 1, 0)):
        for fn in sides.values():
            fn()
    for r in range(repeats):
        for name, fn in sides.items():
            dt, rss = _timed(fn, rss_interval)
            out[name].times.append(dt)
            out[name].rss.append(rss)
        log(
            "  round %d/%d: %s"
            % (r + 1, repeats, ", ".join(f"{n} {m.times[-1]:.3f} s" for n, m in out.items()))
        )
    return out


def stats(m: Measurement, *, setup_s: float = 0.0) -> dict:
    """Median, spread and warm-up of one side's calls.

    `setup_s` is time spent for the side before its first call (e.g. `.lower().compile()`),
    added to the first call: `compile_s` = first call (with setup) minus the median call.
    """
    t = np.asarray(m.times, np.float64)
    first = m.first_s + setup_s
    if t.size == 0:
        return {"n": 0, "first_s": first, "median_s": None, "compile_s": None}
    med = float(np.median(t))
    return {
        "n": int(t.size),
        "median_s": med,
        "min_s": float(t.min()),
        "max_s": float(t.max()),
        "q1_s": float(np.percentile(t, 25)),
        "q3_s": float(np.percentile(t, 75)),
        "first_s": first,
        "compile_s": first - med,
        "times_s": [float(x) for x in t],
        "peak_rss_mb": max(m.rss) / 2**20 if m.rss else None,
        "first_call_peak_rss_mb": m.first_rss / 2**20,
    }


def ratio(ours: Optional[dict], ref: Optional[dict]) -> Optional[float]:
    if not ours or not ref or not ours.get("median_s") or not ref.get("median_s"):
        return None
    return ours["median_s"] / ref["median_s"]


def rel_diff(ours: Any, ref: Any) -> dict:
    """max |ours - ref|, max |ref| and their ratio (float64)."""
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: ours {a.shape}, reference {b.shape}")
    d, m = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
    return {"max_abs_diff": d, "max_abs_ref": m, "rel": d / m if m else math.inf}


def rel_diff_dicts(ours: dict, ref: dict) -> dict:
    """`rel_diff` over all shared keys at once (e.g. gradients by parameter name): the largest
    difference over the largest reference value. Shapes of equal size are compared flat."""
    keys = sorted(set(ours) & set(ref))
    d = m = 0.0
    for k in keys:
        a = np.asarray(ours[k], np.float64).reshape(-1)
        b = np.asarray(ref[k], np.float64).reshape(-1)
        d, m = max(d, float(np.max(np.abs(a - b)))), max(m, float(np.max(np.abs(b))))
    return {
        "max_abs_diff": d,
        "max_abs_ref": m,
        "rel": d / m if m else math.inf,
        "compared": len(keys),
        "only_ours": len(set(ours) - set(ref)),
        "only_ref": len(set(ref) - set(ours)),
    }


# --- output --------------------------------------------------------------------------------------


def fmt(x: Optional[float], digits: int = 3) -> str:
    """A number with `digits` significant digits ('n/a' for None / nan)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 10**digits or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{max(digits - 1 - int(math.floor(math.log10(abs(x)))), 0)}f}"


def fmt_time(s: Optional[dict]) -> str:
    """'median [min-max]' of a `stats` dict."""
    if not s or s.get("median_s") is None:
        return "n/a"
    return f"{fmt(s['median_s'])} [{fmt(s['min_s'])}-{fmt(s['max_s'])}]"


def fmt_mb(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


COMPARISON_HEADERS = [
    "case",
    "ours (s) median [min-max]",
    "reference (s) median [min-max]",
    "ours/ref",
    "ours compile (s): first-median / jax lower+compile",
    "ref warm-up (s): first-median",
    "ours peak RSS (MB)",
    "ref peak RSS (MB)",
    "XLA temp+args (MB)",
    "max abs diff / max abs ref",
]


def comparison_row(
    case: str,
    ours: Optional[dict],
    ref: Optional[dict],
    *,
    jax_compile_s: Optional[float] = None,
    xla_mem: Optional[dict] = None,
    parity: Optional[float] = None,
) -> list[str]:
    """One row under `COMPARISON_HEADERS`."""
    compile_cell = "n/a" if not ours else (f"{fmt(ours.get('compile_s'))} / {fmt(jax_compile_s)}")
    return [
        case,
        fmt_time(ours),
        fmt_time(ref),
        fmt(ratio(ours, ref)),
        compile_cell,
        fmt(ref.get("compile_s")) if ref else "n/a",
        fmt_mb(ours.get("peak_rss_mb")) if ours else "n/a",
        fmt_mb(ref.get("peak_rss_mb")) if ref else "n/a",
        fmt_mb(xla_mem["temp_plus_argument_bytes"] / 2**20) if xla_mem else "n/a",
        fmt(parity, 2) if parity is not None else "n/a",
    ]


def default_json(name: str) -> Path:
    return RESULTS / f"{name}.json"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` as JSON (through a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def command_line() -> str:
    return " ".join(["python", *sys.argv])


def finish(
    name: str,
    json_path: Optional[str],
    info: dict,
    payload: dict,
    table: str,
    notes: tuple[str, ...] = (),
) -> None:
    """Print the command, the machine and the table; write the JSON result."""
    path = Path(json_path) if json_path else default_json(name)
    payload = {
        "benchmark": name,
        "command": command_line(),
        "machine": info,
        **payload,
        "table_markdown": table,
    }
    write_json(path, payload)
    print()
    print(f"command: `{command_line()}`")
    print(f"machine: {machine_line(info)}")
    print()
    print(table)
    for note in notes:
        print(f"\n{note}")
    print(f"\n(JSON: {path})")


def add_common_args(ap: Any, *, repeats: int = 5) -> None:
    ap.add_argument(
        "--size",
        choices=SIZES,
        default="small",
        help="sd15: Stable Diffusion 1.5's architecture; small: a narrow one (default)",
    )
    ap.add_argument(
        "--repeats", type=int, default=repeats, help="timed calls per side after the warm-up call"
    )
    ap.add_argument(
        "--sides",
        default="ours,reference",
        help="ours, reference, or both (default; alternated in one process)",
    )
    ap.add_argument(
        "--torch_threads",
        type=int,
        default=None,
        help="PyTorch's intra-op threads (default: PyTorch's own choice, one per core); on a "
        "loaded machine 1 can be much faster, since OpenMP waits for its slowest thread",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--json",
        default=None,
        help="where the JSON result goes (default benchmarks/results/<name>.json)",
    )


def set_torch_threads(n: Optional[int]) -> None:
    """Apply `--torch_threads` (before `machine_info`, which records the count)."""
    if n:
        import torch

        torch.set_num_threads(int(n))


def parse_sides(text: str) -> tuple[str, ...]:
    sides = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in sides if s not in ("ours", "reference")]
    if bad or not sides:
        raise SystemExit(f"--sides: expected ours and/or reference, got {text!r}")
    return sides


def log(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def workdir(prefix: str = "codi-bench-") -> Iterator[Path]:
    """A temporary folder, removed afterwards (the saved weights can be gigabytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- the same random weights on both sides ------------------------------------------------------


def randomize_zero_init_(module: Any, *, seed: int, scale: float = 0.1) -> list[str]:
    """Give every all-zero floating parameter of a PyTorch module (ControlNet zero convs and
    condition-encoder output conv, norm and linear biases) small seeded random values,
    `scale / sqrt(fan_in)` standard deviation, so that nothing compared is trivially zero
    (the adapter's residuals then change the UNet's output). Returns the names changed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.is_floating_point() and not bool(torch.any(p)):
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
                p.copy_((noise * (scale / math.sqrt(fan_in))).to(device=p.device, dtype=p.dtype))
                changed.append(name)
    return changed


def _on(device: Any):
    """Build PyTorch modules directly on `device` (None: the default, CPU)."""
    import torch

    return contextlib.nullcontext() if device is None else torch.device(device)


def torch_unet(size: str, *, seed: int, device: Any = None):
    """diffusers' `UNet2DConditionModel` of `UNET[size]`, seeded default init, fp32, eval."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    with _on(device):
        unet = diffusers.UNet2DConditionModel(**UNET[size]).eval()
    randomize_zero_init_(unet, seed=seed + 100)
    return unet


def torch_controlnet(unet: Any, *, seed: int, device: Any = None):
    """diffusers' `ControlNetModel.from_unet(unet)` (3-channel condition image) with its zero
    convs and condition-encoder output randomised."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    with _on(device):
        cn = diffusers.ControlNetModel.from_unet(unet, conditioning_channels=3).eval()
    randomize_zero_init_(cn, seed=seed + 100)
    return cn


def write_tokenizer(folder: Path):
    """The offline tiny CLIP tokenizer (77 tokens, padded with `<|endoftext|>`), loaded."""
    from transformers import CLIPTokenizer

    from codi_eqx._tiny_tokenizer import write_tiny_clip_tokenizer

    write_tiny_clip_tokenizer(folder, model_max_length=TEXT_LEN)
    return CLIPTokenizer.from_pretrained(str(folder))


def torch_text_encoder(size: str, tokenizer: Any, *, seed: int, device: Any = None):
    import torch
    import transformers

    cfg = dict(TEXT[size])
    cfg["vocab_size"] = max(cfg["vocab_size"], len(tokenizer))
    torch.manual_seed(seed)
    with _on(device):
        model = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **cfg,
            )
        ).eval()
    randomize_zero_init_(model, seed=seed + 100)
    return model


def torch_vae(size: str, *, seed: int, device: Any = None):
    import diffusers
    import torch

    torch.manual_seed(seed)
    with _on(device):
        vae = diffusers.AutoencoderKL(**VAE[size]).eval()
    randomize_zero_init_(vae, seed=seed + 100)
    return vae


@dataclass
class TorchModels:
    """The reference models, and the diffusers-format folder they were written to."""

    folder: Path
    unet: Any = None
    controlnet: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None


def write_diffusers_model(
    folder: Path,
    size: str,
    *,
    seed: int = 0,
    parts: tuple[str, ...] = ("unet", "controlnet", "vae", "text_encoder"),
) -> TorchModels:
    """Build the reference models of `size` in PyTorch (random, seeded) and write them in
    diffusers' format: `unet/`, `vae/`, `text_encoder/` (safetensors), `tokenizer/`,
    `scheduler/`, `model_index.json` (a model directory `codi_eqx.load_pipeline` reads), and
    `controlnet/` (a ControlNet folder `codi_eqx.load_adapter` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = TorchModels(folder=folder)
    out.tokenizer = write_tokenizer(folder / "tokenizer")
    if "unet" in parts or "controlnet" in parts:
        out.unet = torch_unet(size, seed=seed)
        out.unet.save_pretrained(folder / "unet", safe_serialization=True)
    if "controlnet" in parts:
        out.controlnet = torch_controlnet(out.unet, seed=seed + 1)
        out.controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
    if "vae" in parts:
        out.vae = torch_vae(size, seed=seed + 2)
        out.vae.save_pretrained(folder / "vae", safe_serialization=True)
    if "text_encoder" in parts:
        out.text_encoder = torch_text_encoder(size, out.tokenizer, seed=seed + 3)
        out.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    return out


def count_params(tree: Any) -> int:
    """Parameters of an Equinox model (its inexact arrays) or of a torch module."""
    if hasattr(tree, "parameters") and callable(tree.parameters):
        return int(sum(p.numel() for p in tree.parameters()))
    import equinox as eqx
    import jax

    return int(
        sum(a.size for a in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array)))
    )


# --- random codi-eqx models without diffusers (the GPU machine) ---------------------------------


def random_eqx(make: Callable[[], Any], *, seed: int = 0) -> Any:
    """An Equinox model with random weights, compiling nothing: the template of `make()` from
    `eqx.filter_eval_shape`, every floating leaf a slice of one seeded normal buffer (so the
    host draws only as many numbers as the largest leaf holds) scaled by 1/sqrt(fan_in);
    1-D leaves named `weight` (norm scales) around 1; each leaf keeps the template's dtype.
    For timing: the values are arbitrary."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    template = eqx.filter_eval_shape(make)
    is_struct = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    flat, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=is_struct)
    biggest = max((int(np.prod(x.shape)) for _, x in flat if is_struct(x)), default=1)
    base = np.random.default_rng(seed).standard_normal(biggest + 7919, np.float32)
    leaves = []
    for i, (path, x) in enumerate(flat):
        if not is_struct(x):
            leaves.append(x)
            continue
        if not jnp.issubdtype(x.dtype, jnp.floating):
            leaves.append(jnp.zeros(x.shape, x.dtype))
            continue
        n = int(np.prod(x.shape))
        start = (i * 7919) % (base.size - n + 1)
        a = base[start : start + n].reshape(x.shape)
        name = str(path[-1]) if path else ""
        if a.ndim == 1:
            a = (1.0 + 0.02 * a) if "weight" in name else 0.02 * a
        else:
            a = a / math.sqrt(max(int(np.prod(x.shape[1:])), 1))
        leaves.append(jax.device_put(np.asarray(a, dtype=x.dtype)))  # cast on the host
    return jax.tree_util.tree_unflatten(treedef, leaves)


def random_eqx_pipeline(size: str, folder: Path, *, dtype: Any, seed: int = 0) -> Any:
    """A codi-eqx `Pipeline` of `size` with random weights (`random_eqx`) and the tiny
    offline tokenizer written to `folder`."""
    from codi_eqx import Pipeline
    from codi_eqx.diffusion import NoiseSchedule
    from codi_eqx.models import (
        AutoencoderKL,
        AutoencoderKLConfig,
        CLIPTextConfig,
        CLIPTextModel,
        UNet2DConditionConfig,
        UNet2DConditionModel,
    )
    import jax

    tokenizer = write_tokenizer(Path(folder) / "tokenizer")
    text_cfg = dict(TEXT[size])
    text_cfg["vocab_size"] = max(text_cfg["vocab_size"], len(tokenizer))
    ucfg = UNet2DConditionConfig.from_dict(UNET[size])
    vcfg = AutoencoderKLConfig.from_dict(VAE[size])
    tcfg = CLIPTextConfig.from_dict(text_cfg)
    key = jax.random.key(0)
    return Pipeline(
        unet=random_eqx(lambda: UNet2DConditionModel(ucfg, dtype=dtype, key=key), seed=seed),
        vae=random_eqx(lambda: AutoencoderKL(vcfg, dtype=dtype, key=key), seed=seed + 1),
        text_encoder=random_eqx(lambda: CLIPTextModel(tcfg, dtype=dtype, key=key), seed=seed + 2),
        tokenizer=tokenizer,
        scheduler_config=dict(SCHEDULER),
        schedule=NoiseSchedule.from_config(SCHEDULER),
        path=Path(folder),
    )


# --- the CoDi training step on both sides --------------------------------------------------------


def train_batch(
    size: str,
    batch: int,
    latent: int,
    *,
    rng: np.random.Generator,
    with_encoders: bool = False,
    tokenizer: Any = None,
) -> dict:
    """A training batch as numpy arrays, in the formats of `codi_eqx.distill.make_train_step`:
    cached latents (`latent_mean`, `latent_logvar`, `scaling_factor`) and text embeddings
    (`text_embeddings`), or, `with_encoders`, images `pixel_values` in [-1, 1] and token ids
    `input_ids`; always a condition image `conditioning_pixel_values` in [0, 1]."""
    res = 8 * latent
    out = {"conditioning_pixel_values": rng.uniform(0, 1, (batch, 3, res, res)).astype(np.float32)}
    if with_encoders:
        out["pixel_values"] = rng.uniform(-1, 1, (batch, 3, res, res)).astype(np.float32)
        prompts = [
            ("a photo of a cat", "a red dog", "a photo of a dog", "a cat")[i % 4]
            for i in range(batch)
        ]
        out["input_ids"] = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=TEXT_LEN, return_tensors="np"
        ).input_ids.astype(np.int32)
    else:
        out["latent_mean"] = (rng.standard_normal((batch, 4, latent, latent)) / 0.18215).astype(
            np.float32
        )
        out["latent_logvar"] = np.full((batch, 4, latent, latent), -3.0, np.float32)
        out["scaling_factor"] = np.full((batch,), 0.18215, np.float32)
        out["text_embeddings"] = rng.standard_normal((batch, TEXT_LEN, cross_dim(size))).astype(
            np.float32
        )
    return out


@dataclass
class OursTrain:
    """codi-eqx's training step as `codi train` builds it, with its inputs."""

    step: Any
    frozen: Any
    state: Any
    mesh: Any
    distill_cfg: Any
    optim_cfg: Any

    def batch(self, arrays: dict) -> dict:
        from codi_eqx.parallel import shard_batch

        return shard_batch(arrays, self.mesh)

    def draws(self, n: int, latent_shape: tuple[int, ...]) -> dict:
        """The random draws of the next step's examples, as the step makes them: the step
        key is `fold_in(state.key, state.step)` split into (example key, batch key), example i
        folds in its position (see `make_train_step`)."""
        import jax

        from codi_eqx.distill import draw_example

        step_key, batch_key = jax.random.split(jax.random.fold_in(self.state.key, self.state.step))
        T = self.frozen.schedule.num_train_timesteps
        ds = [
            draw_example(
                jax.random.fold_in(step_key, i), batch_key, latent_shape, T, self.distill_cfg
            )
            for i in range(n)
        ]
        return {
            "t": np.stack([np.asarray(d.t) for d in ds]),
            "s": np.stack([np.asarray(d.s) for d in ds]),
            "noise": np.stack([np.asarray(d.noise) for d in ds]),
            "posterior_noise": np.stack([np.asarray(d.posterior_noise) for d in ds]),
        }

    def __call__(self, batch: dict) -> dict:
        self.state, metrics = self.step(self.frozen, self.state, batch)
        return block(metrics)


def ours_train(
    unet: Any,
    adapter: Any,
    schedule: Any,
    *,
    vae: Any = None,
    text_encoder: Any = None,
    null_input_ids: Any = None,
    seed: int = 0,
) -> OursTrain:
    """The default CoDi step (`DistillConfig()`: conditional, epsilon, one-step ODE with the
    EMA adapter, predicted noise, consistency_x + x0 regulariser weight 1, N 50, tau 10) with
    `OptimConfig()` (clip 1.0, AdamW lr 1e-5, weight decay 1e-2, EMA 0.999), on one device,
    as `codi train` builds it. Without `text_encoder` the batches carry text embeddings (the
    empty prompt's embedding is then unused by the default options: zeros)."""
    import jax
    import jax.numpy as jnp

    from codi_eqx import distill
    from codi_eqx.parallel import make_mesh, replicate

    if text_encoder is not None:
        frozen = distill.make_frozen(
            unet, vae, text_encoder, schedule, null_input_ids=jnp.asarray(null_input_ids, jnp.int32)
        )
    else:
        dim = unet.config.cross_attention_dim
        dim = dim[0] if isinstance(dim, (tuple, list)) else dim
        frozen = distill.make_frozen(
            unet, vae, None, schedule, null_embedding=jnp.zeros((TEXT_LEN, int(dim)), jnp.float32)
        )
    mesh = make_mesh(jax.devices()[:1])
    dcfg, ocfg = distill.DistillConfig(), distill.OptimConfig()
    state = distill.init_train_state(
        distill.Trainable(adapter), distill.make_optimizer(ocfg), key=jax.random.key(seed)
    )
    step = distill.make_train_step(
        dcfg, mesh, ema_decay=ocfg.ema_decay, lr_fn=distill.lr_schedule(ocfg)
    )
    return OursTrain(step, replicate(frozen, mesh), replicate(state, mesh), mesh, dcfg, ocfg)


class TorchCoDiStep:
    """The reference: the same CoDi training step written in PyTorch with diffusers' models.

    codi-algorithm.md with the defaults of `DistillConfig` / `OptimConfig`: epsilon
    prediction; x0 = (mean + exp(logvar / 2) posterior_noise) * scaling; n ~ U{0..N-1} per
    example, t = n k, s = max(n - 1, 0) k, k = T // N (N 50); z_t = alpha_t x0 + sigma_t eps;
    one-step ODE t -> s with UNet + EMA ControlNet and the predicted noise (no gradient);
    target f_ema(z_s, s) (no gradient); online f(z_t, t); loss mean((online_x - target_x)^2) +
    1.0 mean((online_x - x0)^2) with c_skip / c_out (sigma_data 0.5, tau 10); gradients into
    the ControlNet only (the UNet, VAE and text encoder are frozen, requires_grad False);
    global-norm clipping at 1.0, `torch.optim.AdamW` (lr 1e-5, betas 0.9 / 0.999, eps 1e-8,
    weight decay 1e-2), EMA 0.999. `alphas_cumprod` from diffusers' `DDPMScheduler`.

    With a UNet in bfloat16 the model passes run under `torch.autocast` (the ControlNet's
    master weights stay float32), as diffusers' ControlNet training script does.
    """

    def __init__(
        self,
        unet: Any,
        controlnet: Any,
        *,
        vae: Any = None,
        text_encoder: Any = None,
        scheduler_config: Optional[dict] = None,
        seed: int = 0,
        lr: float = 1e-5,
        weight_decay: float = 1e-2,
        max_grad_norm: float = 1.0,
        ema_decay: float = 0.999,
        distill_learning_steps: int = 50,
        timestep_scaling: float = 10.0,
        sigma_data: float = 0.5,
        x0_weight: float = 1.0,
    ):
        import copy

        import diffusers
        import torch

        self.torch = torch
        self.unet = unet.eval().requires_grad_(False)
        self.cn = controlnet.eval().requires_grad_(True)
        self.ema = copy.deepcopy(controlnet).requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.text_encoder = (
            text_encoder.eval().requires_grad_(False) if text_encoder is not None else None
        )
        self.device = next(self.cn.parameters()).device
        self.compute_dtype = next(self.unet.parameters()).dtype
        sched = diffusers.DDPMScheduler.from_config(scheduler_config or SCHEDULER)
        abar = sched.alphas_cumprod.to(torch.float32).to(self.device)
        self.alpha, self.sigma = abar.sqrt(), (1 - abar).sqrt()
        self.T = int(sched.config.num_train_timesteps)
        self.N, self.k = distill_learning_steps, self.T // distill_learning_steps
        self.tau, self.sigma_data, self.x0_weight = timestep_scaling, sigma_data, x0_weight
        self.max_grad_norm, self.ema_decay = max_grad_norm, ema_decay
        self.params = [p for p in self.cn.parameters()]
        self.ema_params = [p for p in self.ema.parameters()]
        kw = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        self.opt = torch.optim.AdamW(
            self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, **kw
        )
        self.gen = torch.Generator(self.device).manual_seed(seed)

    def _autocast(self):
        torch = self.torch
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def draws(self, n: int, shape: tuple[int, ...]) -> dict:
        torch = self.torch
        nn = torch.randint(0, self.N, (n,), generator=self.gen, device=self.device)
        return {
            "t": nn * self.k,
            "s": (nn - 1).clamp(min=0) * self.k,
            "noise": torch.randn((n, *shape), generator=self.gen, device=self.device),
            "posterior_noise": torch.randn((n, *shape), generator=self.gen, device=self.device),
        }

    def _scalings(self, t):
        st = self.tau * t.to(self.torch.float32)
        c_skip = self.sigma_data**2 / (st**2 + self.sigma_data**2)
        c_out = st / (st**2 + self.sigma_data**2).sqrt()
        return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)

    def _f(self, cn: Any, z, t, text, cond):
        with self._autocast():
            down, mid = cn(z, t, text, controlnet_cond=cond, return_dict=False)
            out = self.unet(
                z.to(self.compute_dtype),
                t,
                text.to(self.compute_dtype),
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]
        return out.to(self.torch.float32)

    def tensors(self, arrays: dict) -> dict:
        """A numpy batch (`train_batch`) as tensors on the models' device."""
        torch = self.torch
        out = {}
        for k, v in arrays.items():
            t = torch.from_numpy(np.ascontiguousarray(v))
            out[k] = (t.long() if k == "input_ids" else t).to(self.device)
        return out

    def __call__(self, batch: dict, draws: Optional[dict] = None) -> dict:
        torch = self.torch
        cond = batch["conditioning_pixel_values"]
        n = cond.shape[0]
        view = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
        with torch.no_grad():
            if "latent_mean" in batch:
                mean, logvar = batch["latent_mean"], batch["latent_logvar"]
                scaling = view(batch["scaling_factor"])
            else:
                with self._autocast():
                    post = self.vae.encode(batch["pixel_values"].to(self.compute_dtype)).latent_dist
                mean, logvar = post.mean.float(), post.logvar.float()
                scaling = self.vae.config.scaling_factor
            if "text_embeddings" in batch:
                text = batch["text_embeddings"]
            else:
                with self._autocast():
                    text = self.text_encoder(batch["input_ids"])[0].float()
            if draws is None:
                draws = self.draws(n, tuple(mean.shape[1:]))
            else:
                draws = {k: torch.as_tensor(v).to(self.device) for k, v in draws.items()}
                draws["t"], draws["s"] = draws["t"].long(), draws["s"].long()
            t, s = draws["t"], draws["s"]
            x0 = (
                mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * draws["posterior_noise"]
            ) * scaling
            a_t, s_t, a_s, s_s = (
                view(self.alpha[t]),
                view(self.sigma[t]),
                view(self.alpha[s]),
                view(self.sigma[s]),
            )
            z_t = a_t * x0 + s_t * draws["noise"]
            # One-step ODE t -> s with the EMA adapter ("target" parameters), predicted noise.
            f = self._f(self.ema, z_t, t, text, cond)
            z_s = a_s * ((z_t - s_t * f) / a_t) + s_s * f
            # Target: f_ema(z_s, s).
            f = self._f(self.ema, z_s, s, text, cond)
            cs, co = self._scalings(s)
            target_x = cs * z_s + co * ((z_s - s_s * f) / a_s)
        f = self._f(self.cn, z_t, t, text, cond)
        cs, co = self._scalings(t)
        online_x = cs * z_t + co * ((z_t - s_t * f) / a_t)
        consistency = torch.mean((online_x - target_x) ** 2)
        regularizer = torch.mean((online_x - x0) ** 2)
        loss = consistency + self.x0_weight * regularizer
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.ema_decay)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {
            "loss": loss.detach(),
            "loss_consistency": consistency.detach(),
            "loss_regularizer": regularizer.detach(),
            "grad_norm": grad_norm.detach(),
        }
