"""An optional on-disk cache of encoder outputs, so that later epochs and runs skip the VAE
encoder and the text encoder.

Layout under the cache directory:

    cache.json                     {"format", "fingerprint", "resolution", "encoder"}
    latents/<xyz>/<index>.npz      the VAE posterior of example `index`: mean, logvar (float16)
    text/<ab>/<sha256>.npy         the text embedding of one caption string (float16)
    text/<ab>/<sha256>.npz         SDXL: its hidden states and pooled embedding (float16)

The posterior (not a sample) is stored so that training still samples from it. Text embeddings
are keyed by caption, not by example, so that list captions and empty prompts stay random.
Files are written atomically (temporary name, then rename), so several processes may fill the
same cache and an interrupted run leaves only whole entries. `cache.json` ties the cache to a
dataset fingerprint, a resolution and an encoder id: anything else is refused, never reused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
from jaxtyping import Float

from .._atomic import atomic_path
from ._errors import DataError

FORMAT = 1

EncodeImages = Callable[[np.ndarray], tuple]
"""(B, 3, R, R) float32 in [-1, 1] -> (mean, logvar), each (B, C, h, w)."""
EncodeTexts = Callable[[list], Union[np.ndarray, dict]]
"""B captions -> (B, seq, d) text embeddings; SDXL: a dict of those (`text_embeddings`) and
the pooled embeddings (`pooled_text_embeddings`, (B, p))."""


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


class LatentCache:
    """Encoder outputs per example index (latents) and per caption (text embeddings).

    **Arguments:**

    - `directory`: where the cache lives (created if absent).
    - `fingerprint`: the dataset's (`dataset.fingerprint`).
    - `resolution`: the training resolution.
    - `encoder`: an id of the encoders (e.g. the model path or a hash of its weights).
    - `overwrite`: empty a cache made for something else instead of refusing it.
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike],
        *,
        fingerprint: str,
        resolution: int,
        encoder: str = "",
        overwrite: bool = False,
    ):
        self.directory = Path(directory)
        self.meta = {"format": FORMAT, "fingerprint": str(fingerprint),
                     "resolution": int(resolution), "encoder": str(encoder)}
        meta_path = self.directory / "cache.json"
        if meta_path.exists():
            try:
                found = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, OSError):
                found = None
            if found != self.meta:
                if not overwrite:
                    raise DataError(
                        f"latent cache {self.directory} was made for another dataset, resolution "
                        f"or encoder ({found} != {self.meta}); use another directory or overwrite")
                for sub in ("latents", "text"):
                    shutil.rmtree(self.directory / sub, ignore_errors=True)
                meta_path.unlink()
        if not meta_path.exists():
            _atomic_write(meta_path, lambda p: p.write_text(json.dumps(self.meta)))

    def _latent_path(self, index: int) -> Path:
        return self.directory / "latents" / f"{int(index) % 4096:03x}" / f"{int(index)}.npz"

    def _text_path(self, caption: str, suffix: str = ".npy") -> Path:
        digest = hashlib.sha256(caption.encode("utf-8")).hexdigest()
        return self.directory / "text" / digest[:2] / f"{digest}{suffix}"

    def put_latents(self, index: int, mean: np.ndarray, logvar: np.ndarray) -> None:
        """Store the posterior of example `index`."""
        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez(f, mean=np.asarray(mean, np.float16),
                         logvar=np.asarray(logvar, np.float16))
        _atomic_write(self._latent_path(index), write)

    def put_text(self, caption: str, embedding: Union[np.ndarray, dict]) -> None:
        """Store the text embedding of `caption` (SDXL: a dict of arrays)."""
        if isinstance(embedding, dict):
            def write(p: Path) -> None:
                with open(p, "wb") as f:
                    np.savez(f, **{k: np.asarray(v, np.float16) for k, v in embedding.items()})
            _atomic_write(self._text_path(caption, ".npz"), write)
            return

        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, np.asarray(embedding, np.float16))
        _atomic_write(self._text_path(caption), write)

    def get_latents(self, index: int) -> Optional[tuple]:
        """(mean, logvar) float32 of example `index`, or None when not cached."""
        path = self._latent_path(index)
        if not path.is_file():
            return None
        with np.load(path) as z:
            return z["mean"].astype(np.float32), z["logvar"].astype(np.float32)

    def get_text(self, caption: str) -> Union[np.ndarray, dict, None]:
        """The text embedding (float32) of `caption` (SDXL: a dict), or None when not
        cached."""
        path = self._text_path(caption)
        if path.is_file():
            return np.load(path).astype(np.float32)
        path = self._text_path(caption, ".npz")
        if path.is_file():
            with np.load(path) as z:
                return {k: z[k].astype(np.float32) for k in z.files}
        return None

    def encode(
        self,
        batch: dict,
        encode_images: Optional[EncodeImages] = None,
        encode_texts: Optional[EncodeTexts] = None,
    ) -> dict:
        """The encoder outputs for a loader batch: cached ones read, missing ones computed by
        the given functions (on the missing examples / distinct captions only) and stored.

        **Returns:** `{"latent_mean": (B, C, h, w), "latent_logvar": (B, C, h, w),
        "text_embeddings": (B, seq, d)}` (SDXL: also `"pooled_text_embeddings": (B, p)`),
        float32."""
        indices: Sequence[int] = [int(i) for i in batch["index"]]
        captions: list = list(batch["caption"])
        latents = [self.get_latents(i) for i in indices]
        missing = [k for k, v in enumerate(latents) if v is None]
        if missing:
            if encode_images is None:
                raise DataError(f"latent cache {self.directory}: example {indices[missing[0]]} "
                                "is not cached and no image encoder was given")
            mean, logvar = encode_images(np.asarray(batch["pixel_values"])[missing])
            mean, logvar = np.asarray(mean), np.asarray(logvar)
            for j, k in enumerate(missing):
                self.put_latents(indices[k], mean[j], logvar[j])
                latents[k] = (mean[j].astype(np.float16).astype(np.float32),
                              logvar[j].astype(np.float16).astype(np.float32))
        texts = {c: self.get_text(c) for c in dict.fromkeys(captions)}
        todo = [c for c, v in texts.items() if v is None]
        if todo:
            if encode_texts is None:
                raise DataError(f"latent cache {self.directory}: caption {todo[0]!r} is not "
                                "cached and no text encoder was given")
            emb = encode_texts(todo)
            rows = ([{k: np.asarray(v)[j] for k, v in emb.items()} for j in range(len(todo))]
                    if isinstance(emb, dict) else list(np.asarray(emb)))
            for c, e in zip(todo, rows):
                self.put_text(c, e)
                texts[c] = _through_float16(e)
        out = {
            "latent_mean": _stack([m for m, _ in latents]),
            "latent_logvar": _stack([lv for _, lv in latents]),
        }
        if isinstance(texts[captions[0]], dict):
            for key in texts[captions[0]]:
                out[key] = _stack([texts[c][key] for c in captions])
        else:
            out["text_embeddings"] = _stack([texts[c] for c in captions])
        return out


def _through_float16(e):
    """What reading `e` back from the cache gives (stored as float16)."""
    if isinstance(e, dict):
        return {k: np.asarray(v).astype(np.float16).astype(np.float32) for k, v in e.items()}
    return np.asarray(e).astype(np.float16).astype(np.float32)


def _stack(arrays: list) -> Float[np.ndarray, "batch ..."]:
    return np.stack(arrays).astype(np.float32)
