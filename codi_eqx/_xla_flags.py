"""XLA:CPU settings that the package applies when it is imported, before JAX starts its CPU
backend (XLA reads `XLA_FLAGS` once, then).

One setting: XLA:CPU's convolutions stay with its Eigen kernels instead of the YNNPACK
library fusions that jaxlib 0.10 turns on by default. Measured on a 2-core x86 CPU (median of
10 calls, fp32, 3x3, NHWC; `python benchmarks/conv_backends.py`): a 1280-channel convolution
at 8x8 ran in 76.9 ms through YNNPACK and 17.1 ms through Eigen (PyTorch/oneDNN: 48.8 ms), a
320-channel one at 32x32, batch 4, in 69.5 ms and 49.8 ms (PyTorch 59.2 ms); the weight
gradients were 1.3-2.4x faster through Eigen; the built-in teacher's whole pretraining went
from 1 h 15 min 52 s to 1 h 04 min 47 s. YNNPACK keeps the matrix products.

The flag is added to `XLA_FLAGS` (appended, nothing removed) unless `XLA_FLAGS` already names
`xla_cpu_experimental_ynn_fusion_type` (the user's own choice wins) or `$CODI_KEEP_XLA_FLAGS`
is set; it is added only for jaxlib >= 0.10, whose XLA knows it (an unknown flag aborts XLA).
The setting touches the CPU backend alone.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import MutableMapping
from typing import Optional

ENV_KEEP = "CODI_KEEP_XLA_FLAGS"
"""Set (to anything but empty, 0, false, no, off): leave `XLA_FLAGS` exactly as it is."""

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_CONVOLUTIONS_WITH_EIGEN = f"--{YNN_FLAG}=-individual_convolution"
"""Every default YNNPACK fusion type except convolutions."""

_MIN_JAXLIB = (0, 10)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def flags_to_add(xla_flags: str, jaxlib_version: Optional[str], keep: str = "") -> list[str]:
    """The flags `configure_xla_flags` appends to `xla_flags`: none where the user already
    chose (`xla_flags` names the flag, or `keep` is set), or where jaxlib is missing or older
    than 0.10."""
    if keep.strip().lower() not in ("", "0", "false", "no", "off"):
        return []
    if YNN_FLAG in xla_flags:
        return []
    if jaxlib_version is None or _version_tuple(jaxlib_version) < _MIN_JAXLIB:
        return []
    return [CPU_CONVOLUTIONS_WITH_EIGEN]


def _jaxlib_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxlib")
    except PackageNotFoundError:
        return None


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # a jax without that private helper: assume it has not started
        return False


def configure_xla_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Append the package's XLA:CPU flags to `environ["XLA_FLAGS"]`; returns what was added.
    Warns (and adds nothing) if JAX's backends already started, since XLA would not see it."""
    current = environ.get("XLA_FLAGS", "")
    add = flags_to_add(current, _jaxlib_version(), environ.get(ENV_KEEP, ""))
    if not add:
        return []
    if _backends_started():
        warnings.warn(
            "codi_eqx was imported after JAX started its backends, so XLA:CPU keeps its YNNPACK "
            f"convolutions (slower on CPU); import codi_eqx first or set XLA_FLAGS="
            f"{CPU_CONVOLUTIONS_WITH_EIGEN}", stacklevel=3)
        return []
    environ["XLA_FLAGS"] = " ".join([current, *add]).strip()
    return add
