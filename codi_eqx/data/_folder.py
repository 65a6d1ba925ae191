"""Folders described by a JSON-lines file: the seed's layout (`images/`, `processed_images/`,
`meta.jsonl` with `image`, `conditioning_image`, `caption`) and Hugging Face's `imagefolder`
layout (`metadata.jsonl` with `file_name` and other columns). Only byte offsets of the lines
are kept in memory; records are read on demand."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ._columns import Columns, pick_columns
from ._errors import DataError
from ._records import RawExample


def line_offsets(path: Path) -> np.ndarray:
    """Byte offsets of the non-blank lines of `path` (int64)."""
    offsets = []
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


def resolve_path(path: str, root: Path) -> Path:
    """`path` as written in the metadata, found on this machine: relative to `root`, as is, or
    (an absolute path from another machine) by its longest tail that exists under `root`
    (`/old/data/images/x.png` -> `root/images/x.png`, then `root/x.png`). Returns the best guess
    (which may not exist) when nothing is found."""
    p = Path(path)
    if not p.is_absolute():
        return root / p
    if p.exists():
        return p
    parts = p.parts[1:]
    for i in range(len(parts)):
        candidate = root.joinpath(*parts[i:])
        if candidate.exists():
            return candidate
    return p


class JsonlFolder:
    """A folder of images described by a JSON-lines metadata file (see the module docstring).

    **Arguments:**

    - `root`: the folder.
    - `meta_name`: the metadata file inside it (`meta.jsonl` or `metadata.jsonl`).
    - `file_name_aliases`: imagefolder conventions (`file_name` is the `image` column,
      `X_file_name` is image column `X`).
    - the column options and `max_train_samples` (the first N records).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        meta_name: str = "meta.jsonl",
        file_name_aliases: bool = False,
        image_column: Optional[str] = None,
        caption_column: Optional[str] = None,
        conditioning_image_column: Optional[str] = None,
        unconditional: bool = False,
        max_train_samples: Optional[int] = None,
    ):
        self.root = Path(root)
        self.meta = self.root / meta_name
        if not self.meta.is_file():
            raise DataError(f"{self.root}: no {meta_name} found")
        offsets = line_offsets(self.meta)
        if max_train_samples is not None:
            offsets = offsets[: max(0, int(max_train_samples))]
        if len(offsets) == 0:
            raise DataError(f"{self.meta}: no records")
        self._offsets = offsets
        first = self._record(0)
        self.columns: Columns = pick_columns(
            first.keys(),
            where=str(self.meta),
            image_column=image_column,
            caption_column=caption_column,
            conditioning_image_column=conditioning_image_column,
            unconditional=unconditional,
            file_name_aliases=file_name_aliases,
        )
        raw = self.raw(0)
        for ref in (raw.image, raw.conditioning):
            if ref is not None and not Path(ref).exists():
                raise DataError(
                    f"{self.meta}: first record's image {ref} not found (paths are resolved "
                    f"relative to {self.root})"
                )
        self.fingerprint = _fingerprint(self.meta, len(offsets), self.columns)

    @property
    def conditioned(self) -> bool:
        return self.columns.conditioning is not None

    def __len__(self) -> int:
        return len(self._offsets)

    def _record(self, i: int) -> dict:
        with open(self.meta, "rb") as f:
            f.seek(int(self._offsets[i]))
            line = f.readline()
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.meta}: record {i} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{self.meta}: record {i} is not a JSON object")
        return record

    def raw(self, i: int) -> RawExample:
        """The `i`-th record as a `RawExample` (no image is read)."""
        record = self._record(i)
        c = self.columns
        image = record.get(c.image)
        image_path = resolve_path(str(image), self.root) if image else Path(f"<record {i}>")
        cond = None
        if c.conditioning is not None:
            value = record.get(c.conditioning)
            cond = str(resolve_path(str(value), self.root)) if value else f"<record {i}>"
        return RawExample(
            index=i,
            image=str(image_path),
            conditioning=cond,
            caption=record.get(c.caption, ""),
            name=image_path.name,
        )


def _fingerprint(meta: Path, n: int, columns: Columns) -> str:
    h = hashlib.sha256()
    size = meta.stat().st_size
    h.update(f"jsonl:{meta.name}:{size}:{n}:{columns}".encode())
    with open(meta, "rb") as f:
        h.update(f.read(1 << 16))
        if size > 1 << 16:
            f.seek(max(0, size - (1 << 16)))
            h.update(f.read())
    return h.hexdigest()[:16]
