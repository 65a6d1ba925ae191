"""The training step's batches: a loader's raw batch turned into what the step reads, either
pixels and token ids (the step encodes them) or, with `cache_latents`, the cached VAE
posterior and text embeddings (misses encoded here and stored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._config import TrainConfig, TrainConfigError


class Encoders:
    """The frozen VAE encoder and text encoder as batched jitted functions for the latent
    cache's misses. Inputs are padded to the loader's batch size, so each compiles once."""

    def __init__(self, pipe, batch_size: int):
        import equinox as eqx
        import jax
        import jax.numpy as jnp

        self.pipe, self.batch_size = pipe, batch_size
        self.text_encoders = pipe.text_encoders
        self.images = self.captions = 0

        def posterior(vae, x):
            def one(im):
                post = vae.encode_posterior(im)
                return post.mean, post.logvar
            return jax.vmap(one)(x)

        def texts(text_encoder, ids):
            out = jax.tree.map(lambda a: a.astype(jnp.float32), jax.vmap(text_encoder)(ids))
            if isinstance(out, dict):  # SDXL: the cache's names
                return {"text_embeddings": out["encoder_hidden_states"],
                        "pooled_text_embeddings": out["text_embeds"]}
            return out

        self._posterior = eqx.filter_jit(posterior)
        self._texts = eqx.filter_jit(texts)

    def _pad(self, n: int) -> int:
        return -(-n // self.batch_size) * self.batch_size

    def encode_images(self, pixels: np.ndarray) -> tuple:
        import jax

        n = len(pixels)
        padded = np.zeros((self._pad(n), *pixels.shape[1:]), np.float32)
        padded[:n] = pixels
        with jax.numpy_dtype_promotion("standard"):
            mean, logvar = jax.device_get(self._posterior(self.pipe.vae, padded))
        self.images += n
        return mean[:n], logvar[:n]

    def encode_texts(self, captions: list):
        import jax

        n = len(captions)
        ids = np.asarray(self.pipe.tokenize(list(captions) + [""] * (self._pad(n) - n)))
        with jax.numpy_dtype_promotion("standard"):
            emb = jax.device_get(self._texts(self.text_encoders, ids))
        self.captions += n
        return jax.tree.map(lambda a: a[:n], emb)


def open_cache(config: TrainConfig, model_path: Path, dataset_fingerprint: str):
    """The `LatentCache` of `cache_latents` (None without it), tied to the dataset (its
    fingerprint), the resolution, the model at `model_path` and the precision; a cache made
    for another of these is a usage error."""
    if not config.cache_latents:
        return None
    from ..data import DataError, LatentCache

    encoder = f"{Path(model_path).resolve()}|{config.dtype_name}"
    try:
        return LatentCache(config.cache_latents, fingerprint=dataset_fingerprint,
                           resolution=config.resolution, encoder=encoder)
    except DataError as e:
        raise TrainConfigError(f"cache_latents: {e}") from None
    except OSError as e:
        raise TrainConfigError(f"cache_latents {config.cache_latents}: {e}") from None


class StepBatches:
    """`batches(raw) -> batch`: the step's batch of a loader's raw batch. With a latent
    cache (`cache`), the step reads cached encoder outputs (`Encoders` fill the misses);
    without, pixels and token ids."""

    def __init__(self, config: TrainConfig, pipe, cache, local_batch_size: int):
        self.pipe, self.cache = pipe, cache
        self.conditional = config.distill_type == "conditional"
        self.sdxl = pipe.is_sdxl
        self.resolution = config.resolution
        self.encoders: Encoders | None = None
        if cache is not None:
            self.encoders = Encoders(pipe, local_batch_size)
            self.scaling = float(pipe.vae.scaling_factor)
            self.shift = pipe.vae.shift_factor

    def __call__(self, raw: dict) -> dict:
        if self.cache is None:
            batch = {"pixel_values": raw["pixel_values"],
                     "input_ids": np.asarray(self.pipe.tokenize(raw["caption"]))}
        else:
            enc = self.cache.encode(raw, self.encoders.encode_images, self.encoders.encode_texts)
            mean = enc["latent_mean"]
            batch = {"latent_mean": mean, "latent_logvar": enc["latent_logvar"],
                     "scaling_factor": np.full((len(mean),), self.scaling, np.float32),
                     "text_embeddings": enc["text_embeddings"]}
            if "pooled_text_embeddings" in enc:
                batch["pooled_text_embeddings"] = enc["pooled_text_embeddings"]
            if self.shift is not None:  # the step's example_latents applies it, as for images
                batch["shift_factor"] = np.full((len(mean),), self.shift, np.float32)
        if self.conditional:
            batch["conditioning_pixel_values"] = raw["conditioning_pixel_values"]
        if self.sdxl:
            batch["time_ids"] = time_ids(raw, self.resolution)
        return batch


def time_ids(raw: dict, resolution: int) -> np.ndarray:
    """SDXL's micro-conditioning of a loader batch, `(B, 6)` float32: each image's original
    size, its crop's top-left corner and the target size (the training resolution), as
    diffusers' SDXL training scripts record them."""
    n = len(raw["caption"])
    target = np.full((n, 2), resolution, np.float32)
    return np.concatenate([np.asarray(raw["original_size"], np.float32),
                           np.asarray(raw["crop_top_left"], np.float32), target], axis=1)
