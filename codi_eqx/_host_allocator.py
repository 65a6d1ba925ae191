"""The host allocator setting that the compiling `codi` commands (train, sample, demo,
pretrain-toy) apply when they start: glibc's malloc keeps freed memory for reuse instead of
handing large blocks back to the kernel.

Why: XLA:CPU allocates each compiled call's temporary buffer (and its outputs) anew on every
call, in one block per buffer, gigabytes for an SD1.5-sized training step. glibc serves
blocks above its mmap threshold (at most 32 MiB) with a fresh `mmap` and unmaps them on
`free`, so every call touches fresh pages, and every first touch of a page is a page fault
that zeroes it. With `mmap` off for malloc (`M_MMAP_MAX = 0`) and the heap never trimmed
(`M_TRIM_THRESHOLD` at -1, which mallopt(3) documents as "never trim"), the second call finds
the first call's pages in the heap. Measured on a 2-core x86 CPU, the small CoDi train step (`python
benchmarks/train_step_speed.py --size small --sides ours`, median of 5): 0.894 and 0.840 s per
step as glibc leaves it (two runs), 0.696 s with this setting made in the process, 0.788 s
with the same setting through glibc's environment variables (`MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=68719476736`), at the same peak RSS (365-380 MB); the SD1.5 UNet
forward + backward (`python benchmarks/unet_speed.py --size sd15 --batch 1 --what backward`,
environment variables) 8.50 -> 7.57 s (diffusers in the same process 5.81 -> 4.60 s).
A second run of the in-process setting: 0.724 s. The built-in `codi demo` (400 tiny steps,
persistent compilation cache warm) ran 1:39 with it and 1:43 without, with the same 7.46M
minor page faults: most of its faults are not these buffers'.

What it does not cover: glibc serves a block larger than a thread arena's heap (64 MiB) that
a thread other than the main one asks for with `mmap` whatever `M_MMAP_MAX` says, and XLA
allocates from its worker threads; so buffers above 64 MiB still fault on every call (a
256 MiB elementwise result: 65537 faults per call with or without the setting). Sending
every thread to the main arena as well (`M_ARENA_MAX = 1`) removed those faults in that
test (0 per call, 161 -> 107 ms) but held 1.6 GB of heap where the plain process peaked at
0.85 GB, so it is not done: at SD1.5 size that could exceed the machine's memory.

The cost: the process keeps its peak heap until it exits (a training or sampling run needs
that memory again at the next step anyway).

It is a setting of this process's C library, made through `mallopt`; nothing is changed
where glibc is absent (macOS, musl), where the user chose (`MALLOC_MMAP_MAX_`,
`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_` or a `glibc.malloc` tunable in
`GLIBC_TUNABLES` is set), or with `CODI_KEEP_MALLOC` set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping
from typing import Optional

ENV_KEEP = "CODI_KEEP_MALLOC"
"""Set (to anything but empty, 0, false, no, off): leave the C library's malloc as it is."""

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
"""glibc's `mallopt` parameter numbers (malloc.h)."""

NEVER_TRIM = -1
"""`M_TRIM_THRESHOLD`'s value that turns trimming off (mallopt(3)): free memory at the top of
the heap is never given back."""

_USER_CHOICES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def user_chose(environ: Mapping[str, str]) -> bool:
    """Whether the environment already sets glibc malloc's mmap / trim behaviour, or asks the
    package to leave malloc alone."""
    if environ.get(ENV_KEEP, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    if any(environ.get(name) for name in _USER_CHOICES):
        return True
    return "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # not glibc: its mallopt parameters would mean something else
    return libc


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Make glibc's malloc keep freed memory for reuse (`M_MMAP_MAX = 0`, `M_TRIM_THRESHOLD` =
    -1) unless the user chose otherwise (see the module docstring). Returns whether the
    setting is now in effect. Call it once, early; later allocations follow it."""
    if user_chose(environ):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
