"""Reading and writing safetensors files with numpy alone (no torch, bfloat16 included).

The format: 8 bytes little-endian header length, a JSON header mapping each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of the header)
plus an optional `__metadata__` of strings, then the raw little-endian tensor bytes.
Reading memory-maps the file, so only the tensors asked for are touched.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Optional

import ml_dtypes
import numpy as np

from .._atomic import atomic_path
from ._errors import WeightsError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile(Mapping):
    """A read-only, memory-mapped view of one `.safetensors` file: `name -> np.ndarray`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise WeightsError(f"{self.path}: file not found") from None
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise WeightsError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise WeightsError(
                f"{self.path}: corrupt or truncated safetensors file (header of {n} bytes, "
                f"file of {size})"
            )
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightsError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path}: corrupt safetensors header")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        data_size = size - self._base
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{self.path}: corrupt header entry for tensor {name!r}") from None
            if dtype_name not in _DTYPES:
                raise WeightsError(
                    f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name}"
                )
            dtype = _DTYPES[dtype_name]
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if end - begin != count * dtype.itemsize or begin < 0:
                raise WeightsError(
                    f"{self.path}: corrupt header: tensor {name!r} of shape {tuple(shape)} "
                    f"{dtype_name} spans {end - begin} bytes"
                )
            if end > data_size:
                raise WeightsError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte "
                    f"{self._base + end}, the file has {size}"
                )
            self._entries[name] = (dtype, tuple(int(s) for s in shape), begin, end)
        self._mmap = (
            mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        )

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        if begin == end:
            return np.zeros(shape, dtype)
        return np.frombuffer(
            self._mmap, dtype=dtype, count=(end - begin) // dtype.itemsize,
            offset=self._base + begin,
        ).reshape(shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def save_file(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """Write `tensors` to `path` (through a temporary file renamed into place)."""
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _NAMES:
            raise WeightsError(f"cannot save tensor {name!r}: unsupported dtype {a.dtype}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        header[name] = {
            "dtype": _NAMES[np.dtype(a.dtype)],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8).data if a.size else b"")
