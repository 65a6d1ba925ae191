"""What a trained adapter records for sampling: the `_codi_eqx_distillation` entry of its
`config.json` (design.md, "Files on disk"). Diffusers ignores config keys starting with `_`,
so the folder stays a diffusers ControlNet."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ADAPTER_SETTINGS_KEY = "_codi_eqx_distillation"
ADAPTER_SETTINGS_VERSION = 1

_OBJECTIVES = ("codi", "controlnet")


@dataclass(frozen=True)
class AdapterSettings:
    """The training options that sampling needs (field names as in `TrainConfig`)."""

    objective: str = "codi"
    """`codi` (a few-step model) or `controlnet` (the plain diffusion loss: sample with DDIM)."""
    distill_learning_steps: int = 50
    """N of the distillation grid."""
    distill_timestep_scaling: float = 10.0
    """tau of the consistency scalings."""
    prediction_type: str = "epsilon"
    """How raw outputs were converted in training (the model's, or a forced one)."""
    prediction_type_forced: bool = False
    """Whether `prediction_type` was forced against the base model's."""
    cfg_aware_distill: bool = False
    """Trained guidance-aware, with w drawn in [distill_guidance_min, distill_guidance_max]."""
    distill_guidance_min: float = 2.0
    distill_guidance_max: float = 14.0
    distill_type: str = "conditional"
    """`conditional` (a condition image) or `unconditional`."""
    base_model: Optional[str] = None
    """The model the adapter was trained on (as given to training)."""
    guidance_embedding: bool = False
    """A guidance-conditioned adapter: it takes w (in [distill_guidance_min,
    distill_guidance_max]) through its guidance embedding, at one pass per step."""
    sample_guidance_scale: Optional[float] = None
    """The guidance scale sampling uses by default (the best measured setting for this
    adapter); None: the sampler's own default."""

    def __post_init__(self):
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}: expected codi or controlnet")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type={self.prediction_type!r}: expected epsilon, "
                             "v_prediction or sample")
        if int(self.distill_learning_steps) < 1:
            raise ValueError("distill_learning_steps must be at least 1")

    @property
    def sampler(self) -> str:
        """The sampler the adapter is made for: `codi`, or `ddim` for the `controlnet`
        objective."""
        return "codi" if self.objective == "codi" else "ddim"

    def to_dict(self) -> dict[str, Any]:
        return {"version": ADAPTER_SETTINGS_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterSettings":
        """From `to_dict`'s output; unknown keys (from a later version) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def config_entry(self) -> dict[str, Any]:
        """The entry to merge into the adapter's `config.json`."""
        return {ADAPTER_SETTINGS_KEY: self.to_dict()}


def adapter_settings(path: str | os.PathLike) -> Optional[AdapterSettings]:
    """The settings recorded in an adapter folder or a training run's output directory; None
    for an adapter without a record (a diffusers ControlNet, an untrained adapter). Raises
    `ValueError` for an unreadable config or record."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    record = config.get(ADAPTER_SETTINGS_KEY) if isinstance(config, dict) else None
    if record is None:
        return None
    try:
        if not isinstance(record, dict):
            raise TypeError("not a JSON object")
        return AdapterSettings.from_dict(record)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: unreadable {ADAPTER_SETTINGS_KEY} ({e})") from None
