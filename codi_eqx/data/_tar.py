"""WebDataset-style tar shards read with the standard library's `tarfile`, streamed.

A sample is the group of consecutive members sharing a key (the member path up to the first dot
of its file name): `000123.jpg`, `000123.txt` or `000123.json`, `000123.cond.png`. Shard lists
are written with brace patterns (`data/{00000..00099}.tar`, `{a,b}`) and globs."""

from __future__ import annotations

import glob
import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np

from ._errors import DataError
from ._records import RawExample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CONDITIONING_EXTENSIONS = (
    "cond.png", "cond.jpg", "cond.jpeg", "cond.webp",
    "conditioning.png", "conditioning.jpg", "conditioning_image.png", "conditioning_image.jpg",
)
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b{x,y}` -> `a00bx a00by a01bx ...` (zero padding kept from the start bound)."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        lo, hi = range_match.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [e for opt in options for e in expand_braces(head + opt + tail)]


def list_shards(pattern: str) -> list[str]:
    """The shard files named by `pattern` (braces, then globs; a directory means its `*.tar`)."""
    if Path(pattern).is_dir():
        pattern = str(Path(pattern) / "*.tar")
    shards = []
    for p in expand_braces(pattern):
        shards.extend(sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p])
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards:
        raise DataError(f"{pattern}: no tar shards found")
    if missing:
        raise DataError(f"{pattern}: shard {missing[0]} not found ({len(missing)} missing)")
    return shards


def _split_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def iter_samples(shard: str) -> Iterator[tuple[str, dict]]:
    """(key, {extension: bytes}) per sample of one shard, in file order, streamed."""
    key, sample = None, {}
    with tarfile.open(shard, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_name(member.name)
            if k != key and sample:
                yield key, sample
                sample = {}
            key = k
            f = tar.extractfile(member)
            sample[ext] = f.read() if f is not None else b""
    if sample:
        yield key, sample


def _stable_index(shard: str, key: str) -> int:
    digest = hashlib.blake2b(f"{Path(shard).name}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TarShards:
    """A stream of `RawExample`s from tar shards; an epoch reads the shards in a seeded order
    through a seeded shuffle buffer.

    **Arguments:**

    - `pattern`: the shards (see `list_shards`).
    - `image_column`: the image's extension (default: the first of jpg, jpeg, png, webp).
    - `caption_column`: an extension holding the caption as text (default `txt`), or a key of
      the sample's `json` (default `caption`, then `text`).
    - `conditioning_image_column`: the condition image's extension (default: the first of
      `cond.png`, `cond.jpg`, ...; none present means unconditional).
    - `shuffle_buffer`: samples held (undecoded) for shuffling; 1 keeps file order.
    - `max_train_samples`: examples per epoch, at most.

    The example index is a stable 63-bit hash of the shard's file name and the sample's key."""

    def __init__(
        self,
        pattern: str,
        *,
        image_column: Optional[str] = None,
        caption_column: Optional[str] = None,
        conditioning_image_column: Optional[str] = None,
        unconditional: bool = False,
        shuffle_buffer: int = 1000,
        max_train_samples: Optional[int] = None,
    ):
        self.pattern = pattern
        self.shards = list_shards(pattern)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.max_train_samples = max_train_samples
        first = next(iter_samples(self.shards[0]), None)
        if first is None:
            raise DataError(f"{self.shards[0]}: no samples")
        key, sample = first
        where = f"{self.shards[0]} (sample {key})"
        have = ", ".join(sorted(sample)) or "none"
        if image_column:
            if image_column not in sample:
                raise DataError(f"{where}: no image '{image_column}' (has: {have}); "
                                "choose one with --image_column")
            self.image_ext = image_column
        else:
            self.image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if self.image_ext is None:
                raise DataError(f"{where}: no image ({'/'.join(IMAGE_EXTENSIONS)}; has: {have}); "
                                "choose one with --image_column")
        self.caption_ext, self.caption_key = self._pick_caption(sample, caption_column, where, have)
        self.cond_ext: Optional[str] = None
        if not unconditional:
            if conditioning_image_column:
                if conditioning_image_column not in sample:
                    raise DataError(f"{where}: no condition image '{conditioning_image_column}' "
                                    f"(has: {have}); choose one with --conditioning_image_column")
                self.cond_ext = conditioning_image_column
            else:
                self.cond_ext = next((e for e in CONDITIONING_EXTENSIONS if e in sample), None)
        h = hashlib.sha256(f"tar:{self.image_ext}:{self.caption_ext}:{self.caption_key}:"
                           f"{self.cond_ext}:{max_train_samples}".encode())
        for s in self.shards:
            h.update(f"{Path(s).name}:{Path(s).stat().st_size};".encode())
        self.fingerprint = h.hexdigest()[:16]

    @staticmethod
    def _pick_caption(sample: dict, column: Optional[str], where: str, have: str):
        if column and column in sample:
            return column, None
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
            keys = (column,) if column else ("caption", "text", "prompt")
            found = next((k for k in keys if isinstance(meta, dict) and k in meta), None)
            if found is not None:
                return "json", found
        if not column and "txt" in sample:
            return "txt", None
        raise DataError(f"{where}: no caption {repr(column) if column else '(txt or json)'} "
                        f"(has: {have}); choose one with --caption_column")

    @property
    def conditioned(self) -> bool:
        return self.cond_ext is not None

    def _raw(self, shard: str, key: str, sample: dict) -> RawExample:
        name = f"{Path(shard).name}:{key}.{self.image_ext}"
        if self.caption_key is None:
            caption = sample.get(self.caption_ext, b"").decode("utf-8", "replace").strip()
        else:
            try:
                caption = json.loads(sample.get("json", b"{}")).get(self.caption_key, "")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                caption = ""
        return RawExample(
            index=_stable_index(shard, key),
            image=sample.get(self.image_ext, b""),
            conditioning=sample.get(self.cond_ext, b"") if self.cond_ext else None,
            caption=caption,
            name=name,
        )

    def iter_raw(self, seed: int, epoch: int) -> Iterator[RawExample]:
        """The examples of `epoch`: shards in a seeded order through a seeded shuffle buffer."""
        order = np.random.default_rng([seed, epoch, 11]).permutation(len(self.shards))
        rng = np.random.default_rng([seed, epoch, 12])
        buffer: list[RawExample] = []
        limit = self.max_train_samples
        count = 0
        for s in order:
            shard = self.shards[int(s)]
            for key, sample in iter_samples(shard):
                buffer.append(self._raw(shard, key, sample))
                if len(buffer) >= self.shuffle_buffer:
                    j = int(rng.integers(len(buffer)))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
                    count += 1
                    if limit is not None and count >= limit:
                        return
        rng.shuffle(buffer)
        for raw in buffer:
            if limit is not None and count >= limit:
                return
            yield raw
            count += 1
