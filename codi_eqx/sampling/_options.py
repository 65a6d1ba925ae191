"""The sampling options a run uses: explicit values first, then the adapter's training record
(`AdapterSettings`), then the defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .._adapter_settings import AdapterSettings
from ..diffusion import canonical_prediction_type

SAMPLERS = ("codi", "ddim")


@dataclass(frozen=True)
class SamplingOptions:
    """What `generate` samples with."""

    sampler: str
    """`"codi"` or `"ddim"`."""
    distill_learning_steps: int
    """N of the CoDi grid."""
    timestep_scaling: float
    """tau of the consistency scalings (CoDi)."""
    prediction_type: str
    """How raw outputs convert to (x, eps)."""


def sampling_options(
    settings: Optional[AdapterSettings], model_prediction_type: str, *,
    sampler: Optional[str] = None, distill_learning_steps: Optional[int] = None,
    timestep_scaling: Optional[float] = None, prediction_type: Optional[str] = None,
) -> SamplingOptions:
    """Each option: the value given, else the adapter's record (`settings`), else the
    default (`codi`, N = 50, tau = 10, the model's prediction type). Raises `ValueError` for
    an unknown sampler or prediction type."""
    rec = settings if settings is not None else AdapterSettings(
        prediction_type=canonical_prediction_type(model_prediction_type))
    sampler = rec.sampler if sampler is None else sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    return SamplingOptions(
        sampler=sampler,
        distill_learning_steps=int(rec.distill_learning_steps if distill_learning_steps is None
                                   else distill_learning_steps),
        timestep_scaling=float(rec.distill_timestep_scaling if timestep_scaling is None
                               else timestep_scaling),
        prediction_type=canonical_prediction_type(
            rec.prediction_type if prediction_type is None else prediction_type),
    )


def default_guidance_scale(settings: Optional[AdapterSettings], sampler: str) -> float:
    """The guidance scale a run uses when none is given: the adapter's recorded
    `sample_guidance_scale` (for the sampler it was recorded for), else 1.0 for `codi` (a
    single conditional pass) and 7.5 for `ddim`."""
    if (settings is not None and settings.sample_guidance_scale is not None
            and sampler == settings.sampler):
        return float(settings.sample_guidance_scale)
    return 1.0 if sampler == "codi" else 7.5


def contradictions(
    settings: Optional[AdapterSettings], options: SamplingOptions,
    guidance_scale: Optional[float] = None,
) -> list[tuple[str, Any, Any]]:
    """`(option, value, recorded)` for each option of `options` (and `guidance_scale`) that
    goes against the adapter's record: another sampler or prediction type; another N or tau
    for the CoDi sampler; a guidance scale outside a guidance-aware adapter's training range
    or guidance-conditioned adapter's training range (`recorded` is then `(min, max)`). Empty
    without a record."""
    if settings is None:
        return []
    found = []
    if options.sampler != settings.sampler:
        found.append(("sampler", options.sampler, settings.sampler))
    if options.sampler == "codi":
        if options.distill_learning_steps != settings.distill_learning_steps:
            found.append(("distill_learning_steps", options.distill_learning_steps,
                          settings.distill_learning_steps))
        if options.timestep_scaling != settings.distill_timestep_scaling:
            found.append(("timestep_scaling", options.timestep_scaling,
                          settings.distill_timestep_scaling))
    if options.prediction_type != settings.prediction_type:
        found.append(("prediction_type", options.prediction_type, settings.prediction_type))
    lo, hi = settings.distill_guidance_min, settings.distill_guidance_max
    trained_on_range = settings.cfg_aware_distill or settings.guidance_embedding
    if trained_on_range and guidance_scale is not None and not lo <= guidance_scale <= hi:
        found.append(("guidance_scale", guidance_scale, (lo, hi)))
    return found
