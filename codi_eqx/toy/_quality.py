"""The shapes world's quality study: per-prompt scores of generated images, their ceilings,
and paired comparisons between methods with bootstrap intervals.

Every method samples the same prompts from the same noises (image `i` starts from the
noise of `fold_in(key(seed), i)` in `generate`), so two methods' per-prompt scores are
paired, and their ratio's interval comes from resampling the prompts
(`codi_eqx.eval.paired_ratio_interval`). The judge is `codi_eqx.toy` analysis (colour,
shape and count rules) and the shipped feature network, neither of which is a model under
test, so that numbers stay comparable across rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..eval import Interval, mean_interval, paired_ratio_interval, paired_statistic_interval
from . import _shapes
from ._analysis import caption_match_parts, edge_f1, features, frechet_distance

GUIDANCE_SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5)
"""The guidance scales each method is swept over (on the training split)."""

CAPTION_PARTS = ("all", "background", "colours", "kinds", "count")
"""Per-prompt caption checks (`caption_match_parts`); `all` is whole-caption adherence."""

HELDOUT_SEED = 5000
TRAIN_SPLIT_SEED = 7000
REAL_SEED = 6000
"""Scene seeds of the study's prompt sets and of the real images that Frechet distances are
measured against (the real set is disjoint from the prompts)."""


@dataclass(frozen=True)
class PromptSet:
    """Captions, their edge maps and the real images they were drawn from."""

    split: str
    captions: tuple[str, ...]
    edges: np.ndarray = field(repr=False)
    """`(n, H, W, 3)` uint8 edge maps (the condition images)."""
    images: np.ndarray = field(repr=False)
    """`(n, H, W, 3)` uint8: the scenes as rendered (the real images)."""

    def __len__(self) -> int:
        return len(self.captions)


def prompt_set(split: _shapes.Split, n: int, seed: Optional[int] = None) -> PromptSet:
    """`n` scenes of `split` (`heldout`: colour/shape/background combinations never trained
    on; `train`: the training distribution), drawn from `seed` (default: the study's seed of
    that split)."""
    seed = (HELDOUT_SEED if split == "heldout" else TRAIN_SPLIT_SEED) if seed is None else seed
    scenes = _shapes.scenes(seed, n, split)
    return PromptSet(split, tuple(s.caption for s in scenes), _shapes.edge_images(scenes),
                     np.stack([_shapes.render(s)[0] for s in scenes]))


@dataclass(frozen=True)
class Scores:
    """Per-prompt scores of one method on one prompt set."""

    caption: dict[str, np.ndarray]
    """Per-prompt 0/1 of each part in `CAPTION_PARTS`."""
    edge_f1: np.ndarray
    """Per-prompt F1 of the condition's edges against the image's."""
    features: np.ndarray = field(repr=False)
    """`(n, 64)` feature-network embeddings (for the Frechet distance)."""


def score_images(images: np.ndarray, prompts: PromptSet, net: Any) -> Scores:
    """Scores of `images` (`(n, H, W, 3)` uint8, image i made for prompt i)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    parts = [caption_match_parts(im, c) for im, c in zip(images, prompts.captions)]
    return Scores(
        caption={k: np.array([p[k] for p in parts], np.float64) for k in CAPTION_PARTS},
        edge_f1=np.array([edge_f1(e, im) for e, im in zip(prompts.edges, images)], np.float64),
        features=features(net, images),
    )


@eqx.filter_jit
def _round_trip_batch(vae, x):
    def one(xi):
        z = vae.encode(xi).mean
        y = jnp.clip(vae.decode(z) / 2 + 0.5, 0.0, 1.0)
        return jnp.round(jnp.transpose(y, (1, 2, 0)) * 255).astype(jnp.uint8)

    return jax.vmap(one)(x)


def vae_round_trip(vae: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Images encoded to the VAE's posterior mean and decoded again (uint8 in and out): the
    ceiling of anything that generates in the VAE's latent space."""
    out = []
    for i in range(0, len(images), batch_size):
        x = jnp.asarray(images[i:i + batch_size], jnp.float32) / 127.5 - 1.0
        out.append(np.asarray(_round_trip_batch(vae, jnp.transpose(x, (0, 3, 1, 2)))))
    return np.concatenate(out)


@dataclass(frozen=True)
class Method:
    """One way to sample: a model (`adapter` names one of the study's adapters, None: the
    teacher alone), a sampler and a step count."""

    name: str
    adapter: Optional[str]
    sampler: str
    steps: int
    uses_edges: bool

    def passes_per_image(self, guidance_scale: float) -> int:
        """Network passes (UNet, plus the adapter where there is one) per image: one per
        step, two with classifier-free guidance."""
        return self.steps * (1 if guidance_scale == 1 else 2)


def sample(pipe: Any, adapter: Any, settings: Any, method: Method, prompts: PromptSet,
           guidance_scale: float, *, seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """`method`'s images for `prompts` at `guidance_scale`; DDIM with trailing timestep
    spacing (its first step at t = T - 1, so that few-step DDIM starts from noise)."""
    from ..sampling import generate

    return generate(
        pipe, adapter, list(prompts.captions),
        control_images=prompts.edges if method.uses_edges else None,
        steps=method.steps, sampler=method.sampler, guidance_scale=guidance_scale, seed=seed,
        settings=settings, batch_size=min(batch_size, len(prompts)),
        timestep_spacing="trailing" if method.sampler == "ddim" else None)


def summarise(scores: Scores, real_features: np.ndarray, *, num_resamples: int = 1000,
              seed: int = 0) -> dict:
    """Means with bootstrap intervals: every caption part, edge F1, and the Frechet distance
    to `real_features` (its basic bootstrap interval resamples the generated images, the real
    set fixed)."""
    out = {f"caption_{k}": mean_interval(v, num_resamples=num_resamples, seed=seed).as_dict()
           for k, v in scores.caption.items()}
    out["edge_f1"] = mean_interval(scores.edge_f1, num_resamples=num_resamples,
                                   seed=seed).as_dict()
    out["fd"] = paired_statistic_interval(
        lambda f: frechet_distance(f, real_features), scores.features,
        num_resamples=min(num_resamples, 300), seed=seed, basic=True).as_dict()
    return out


def compare(scores: Scores, reference: Scores, real_features: np.ndarray, *,
            num_resamples: int = 1000, seed: int = 0) -> dict[str, Interval]:
    """Paired ratios `method / reference` on the same prompts: whole-caption adherence, edge
    F1 and Frechet distance, each with its bootstrap interval."""
    return {
        "caption_ratio": paired_ratio_interval(scores.caption["all"], reference.caption["all"],
                                               num_resamples=num_resamples, seed=seed),
        "edge_f1_ratio": paired_ratio_interval(scores.edge_f1, reference.edge_f1,
                                               num_resamples=num_resamples, seed=seed),
        "fd_ratio": paired_statistic_interval(
            lambda a, b: frechet_distance(a, real_features) / frechet_distance(b, real_features),
            scores.features, reference.features, num_resamples=min(num_resamples, 300),
            seed=seed),
    }
