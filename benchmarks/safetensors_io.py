"""Reading and writing safetensors files: the project's reader (`codi_eqx.weights`, numpy +
ml_dtypes, memory-mapped) against the `safetensors` package's numpy backend.

    python benchmarks/safetensors_io.py [--size_mb 500] [--repeats 3] [--workdir DIR]

Writes a float32 file of about `--size_mb` MB (tensors of SD-like shapes: 1280x1280 matrices and
1280-element vectors) and the same tensors in float16 and bfloat16, then, each in a fresh
process so that peak memory is its own, times:

- `hand`: `SafetensorsFile(path)`, every tensor taken (zero-copy views of the mapping);
- `hand+copy`: the same, every tensor copied into its own array (what a loader that
  keeps the weights does; `load_state` copies onto the device likewise);
- `safe_open`: `safetensors.safe_open(path, framework="numpy")`, `get_tensor` for each;
- `load_file`: `safetensors.numpy.load_file(path)`;

and the writes (`save_file` of each). Two times per read: until every tensor is an array in
hand (a memory map makes this almost free), and until every byte has also been read once (a
checksum; the work any use of the weights does). Files are read once before timing (warm page cache:
both readers then read the same memory). Peak RSS is the child's peak resident memory (VmHWM, reset once the
imports are done) minus its resident memory then; pages of the memory-mapped file count. Prints a markdown table and writes
`benchmarks/results/safetensors_io.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
READERS = ("hand", "hand+copy", "safe_open", "load_file")
WRITERS = ("hand", "safetensors")
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

_CHILD = r"""
import json, sys, time
import numpy as np
from codi_eqx.weights import SafetensorsFile
import safetensors, safetensors.numpy

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

method, path = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident memory
before = status_kb("VmRSS")
t0 = time.perf_counter()
if method in ("hand", "hand+copy"):
    f = SafetensorsFile(path)
    tensors = {k: f[k] for k in f}
    if method == "hand+copy":
        tensors = {k: np.array(v) for k, v in tensors.items()}
        del f
elif method == "safe_open":
    with safetensors.safe_open(path, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
else:
    tensors = safetensors.numpy.load_file(path)
loaded = time.perf_counter() - t0
# Read every byte (a checksum), so that lazily mapped pages count as loaded.
total = sum(float(np.asarray(v).view(np.uint8).sum(dtype=np.uint64)) for v in tensors.values())
seconds = time.perf_counter() - t0
peak = status_kb("VmHWM")
dtypes = sorted({str(v.dtype) for v in tensors.values()})
print(json.dumps({"seconds": seconds, "loaded_seconds": loaded, "peak_rss_mb": (peak - before) / 1024,
                  "checksum": total, "dtypes": dtypes}))
"""


def tensors_of(size_mb: float, dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n_mat = max(1, round(size_mb * 2**20 / (1280 * 1280 * 4)))
    out = {}
    for i in range(n_mat):
        out[f"blocks.{i}.proj.weight"] = rng.standard_normal((1280, 1280), np.float32).astype(dtype)
        out[f"blocks.{i}.proj.bias"] = rng.standard_normal(1280, np.float32).astype(dtype)
        out[f"blocks.{i}.norm.weight"] = np.ones(1280, dtype)
    return out


def run_child(method: str, path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, method, str(path)],
                            capture_output=True, text=True, cwd=ROOT, check=False,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1]}
    return json.loads(result.stdout)


def time_write(writer: str, tensors: dict, path: Path) -> float:
    import safetensors.numpy

    from codi_eqx.weights import save_file

    t0 = time.perf_counter()
    if writer == "hand":
        save_file(tensors, path)
    else:
        safetensors.numpy.save_file(tensors, str(path))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size_mb", type=float, default=500.0, help="size of the float32 file")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "safetensors_io.json")
    args = ap.parse_args()
    import safetensors

    work = Path(args.workdir or tempfile.mkdtemp(prefix="safetensors-io-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, record = [], {"command": " ".join(["python", *sys.argv]),
                        "machine": {"cpu": platform.processor() or platform.machine(),
                                    "python": platform.python_version(),
                                    "numpy": np.__version__,
                                    "safetensors": safetensors.__version__},
                        "results": {}}
    for name, dtype in DTYPES.items():
        tensors = tensors_of(args.size_mb, dtype)
        mb = sum(a.nbytes for a in tensors.values()) / 2**20
        writes = {w: [] for w in WRITERS}
        path = work / f"{name}.safetensors"
        for _ in range(args.repeats):
            for w in WRITERS:
                writes[w].append(time_write(w, tensors, work / f"{name}.{w}.safetensors"))
        # Both writers must write files the other reads: the hand-written file is the one read.
        (work / f"{name}.hand.safetensors").replace(path)
        (work / f"{name}.safetensors.safetensors").unlink()
        del tensors
        path.read_bytes()  # warm the page cache
        reads = {}
        for method in READERS:
            runs = [run_child(method, path) for _ in range(args.repeats)]
            if any("error" in r for r in runs):
                reads[method] = {"error": next(r["error"] for r in runs if "error" in r)}
                continue
            reads[method] = {
                "seconds": [r["seconds"] for r in runs],
                "loaded_seconds": [r["loaded_seconds"] for r in runs],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "dtypes": runs[0]["dtypes"],
                "checksum": runs[0]["checksum"],
            }
        sums = {m: r["checksum"] for m, r in reads.items() if "checksum" in r}
        record["results"][name] = {"file_mb": mb, "write_seconds": writes, "read": reads,
                                   "same_bytes": len(set(sums.values())) == 1}
        for method, r in reads.items():
            if "error" in r:
                rows.append(f"| {name} | {mb:.0f} | read: {method} | failed: {r['error']} | | | |")
                continue
            s, lo = r["seconds"], r["loaded_seconds"]
            rows.append(f"| {name} | {mb:.0f} | read: {method} | {statistics.median(lo):.3f} | "
                        f"{statistics.median(s):.3f} [{min(s):.3f}-{max(s):.3f}] | "
                        f"{r['peak_rss_mb']:.0f} | {', '.join(r['dtypes'])} |")
        for w, s in writes.items():
            rows.append(f"| {name} | {mb:.0f} | write: {w} | | {statistics.median(s):.3f} "
                        f"[{min(s):.3f}-{max(s):.3f}] | | |")
        path.unlink()
    print(f"command: {record['command']}")
    print(f"machine: {record['machine']}")
    print("| file | MB | what | arrays in hand, s | every byte read (or written), s: median "
          "[min-max] | peak RSS MB | dtype read |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
