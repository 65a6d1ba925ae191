"""The options of CoDi distillation and of its optimiser, validated when built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

DistillType = Literal["conditional", "unconditional"]
OneStepODE = Literal["control", "uncontrol"]
ControlParams = Literal["target", "online"]
DistillLoss = Literal["consistency_x", "consistency_epsilon"]
GuidanceDraw = Literal["per_example", "per_batch_integer"]
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
Objective = Literal["codi", "controlnet"]
RegularizerTarget = Literal["data", "guided"]
GuidanceDirectionScaling = Literal["none", "alpha"]

_CHOICES = {
    "objective": ("codi", "controlnet"),
    "distill_type": ("conditional", "unconditional"),
    "onestepode": ("control", "uncontrol"),
    "onestepode_control_params": ("target", "online"),
    "distill_loss": ("consistency_x", "consistency_epsilon"),
    "guidance_draw": ("per_example", "per_batch_integer"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "regularizer_target": ("data", "guided"),
    "regularizer_guidance_scaling": ("none", "alpha"),
}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DistillConfig:
    """CoDi's loss options (codi-algorithm.md); every field is a static choice."""

    objective: Objective = "codi"
    """`codi`: CoDi's consistency distillation; `controlnet`: the standard ControlNet
    objective, the plain diffusion loss of UNet + adapter (no teacher, no EMA target)."""
    prediction_type: str = "epsilon"
    """How raw model outputs convert to (x, eps): the base model's `prediction_type`."""
    distill_type: DistillType = "conditional"
    """`conditional`: the adapter takes a condition image; `unconditional`: none (text-to-image
    acceleration)."""
    onestepode: OneStepODE = "control"
    """Model of the one-step ODE (teacher step): UNet + adapter, or the pretrained UNet alone
    (in full CoDi too: `Frozen.unet`)."""
    onestepode_control_params: ControlParams = "target"
    """Adapter parameters for a `control` teacher step: the current EMA (`target`) or the
    current trained ones without gradient (`online`)."""
    onestepode_cfg: bool = False
    """Classifier-free guidance (scale w) in the teacher step."""
    onestepode_true_noise: bool = False
    """Step to s with the true noise instead of the predicted one (the paper's main text)."""
    cfg_aware_distill: bool = False
    """Guidance-aware distillation: target and online outputs are guided at scale w."""
    distill_guidance_min: float = 2.0
    """Lower end of the guidance-scale draw."""
    distill_guidance_max: float = 14.0
    """Upper end of the guidance-scale draw."""
    guidance_draw: GuidanceDraw = "per_example"
    """`per_example`: real-valued w per example; `per_batch_integer`: one integer w in
    [min, max) per batch, as the original drew it."""
    regularizer_guidance_scaling: GuidanceDirectionScaling = "none"
    """How the guided target's direction is scaled: `none`; `alpha`: times alpha_t, i.e.
    -(w - 1) sigma_t (eps_c - eps_u), whose size stays about constant over t, where the
    unscaled x-space direction grows like sigma_t / alpha_t (on the built-in teacher at
    w = 4: rms 0.12-0.19 for t in 200-980 scaled, 0.15-1.6 unscaled)."""
    guidance_embedding: bool = False
    """Guidance-conditioned student (as LCM): the adapter has a zero-initialised guidance
    embedding (`ControlNetModel.with_guidance_embedding`); w is drawn per example in
    [distill_guidance_min, distill_guidance_max], the one-step teacher is guided at w (its
    adapter given w = 1), and the online and target passes take `guidance_label(w)`, so that
    sampling chooses w at one pass per step. Needs `onestepode_cfg`."""
    distill_loss: DistillLoss = "consistency_x"
    """Consistency term on the x (`consistency_x`) or eps (`consistency_epsilon`) outputs."""
    snr_gamma: Optional[float] = None
    """Weight the consistency term by min(snr_t, gamma) / snr_t (None: off)."""
    x0_regularizer_weight: float = 1.0
    """Weight of mean((online_x - x0)^2); 0 turns it off."""
    regularizer_snr_gamma: Optional[float] = None
    """Weight the regulariser by min(snr_t, gamma) / gamma (None: a constant weight). At
    high noise (snr_t < gamma) the x-space error times snr_t is the noise-space error, so the
    regulariser no longer pulls the student's high-noise outputs toward the unguided
    posterior mean, and the guided teacher's trajectory reaches them through the consistency
    term."""
    regularizer_target: RegularizerTarget = "data"
    """`data`: the regulariser regresses toward x0; `guided`: toward
    x0 + (w - 1) (x_hat_cond - x_hat_uncond), the pretrained UNet's conditional and
    unconditional x-hat at z_t (no adapter) and w the teacher step's scale (needs
    `onestepode_cfg`). Given z_t its expectation is the guided denoiser's x-hat, so the term
    that teaches the condition carries the guidance too. The direction comes from the frozen
    UNet: taken from the adapter being trained, it feeds back into itself and grows."""
    distill_learning_steps: int = 50
    """N: the timestep grid has N points, k = T // N apart."""
    distill_timestep_scaling: float = 10.0
    """tau in the boundary scalings c_skip, c_out."""
    sigma_data: float = 0.5
    """sigma_data in the boundary scalings."""
    shared_timestep: bool = False
    """One timestep index for the whole batch instead of one per example."""
    conditioning_scale: float = 1.0
    """Multiplier of the adapter's residuals."""
    full_codi: bool = False
    """Train the UNet together with the adapter (full CoDi) instead of the adapter alone."""
    compute_dtype: Optional[str] = None
    """Dtype of the models' forward passes (`float32`, `bfloat16`, `float16`): the trained
    float32 master weights, and the frozen UNet, are cast to it. None: the UNet's own dtype."""

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype={self.compute_dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
        if self.distill_guidance_min > self.distill_guidance_max:
            raise ValueError(
                f"distill_guidance_min {self.distill_guidance_min} > distill_guidance_max "
                f"{self.distill_guidance_max}"
            )
        if self.distill_learning_steps < 1:
            raise ValueError("distill_learning_steps must be at least 1")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError("snr_gamma must be positive")
        if self.regularizer_snr_gamma is not None and self.regularizer_snr_gamma <= 0:
            raise ValueError("regularizer_snr_gamma must be positive")
        if self.x0_regularizer_weight < 0:
            raise ValueError("x0_regularizer_weight must be at least 0")
        if self.regularizer_guidance_scaling != "none" and self.regularizer_target != "guided":
            raise ValueError("regularizer_guidance_scaling scales the guided target's direction: "
                             "set regularizer_target='guided'")
        if self.guidance_embedding and not self.onestepode_cfg:
            raise ValueError("guidance_embedding trains the adapter to reproduce the guided "
                             "teacher at w: set onestepode_cfg")
        if self.regularizer_target == "guided" and not self.onestepode_cfg:
            raise ValueError(
                "regularizer_target='guided' takes the guidance direction from the guided "
                "one-step teacher: set onestepode_cfg")
        if self.objective == "controlnet":
            for name in _CODI_ONLY:
                value, default = getattr(self, name), _DEFAULTS[name]
                if value != default:
                    raise ValueError(
                        f"{name}={value!r} applies to objective='codi' only: "
                        f"objective='controlnet' trains with the plain diffusion loss (leave "
                        f"{name} at {default!r})")

    @property
    def needs_frozen_unet(self) -> bool:
        """Whether the step reads the pretrained UNet (`Frozen.unet`): always in PE-CoDi; in
        full CoDi as the `uncontrol` one-step teacher and for the guided regulariser's
        direction (the trained UNet is in the parameters)."""
        return (not self.full_codi or self.onestepode == "uncontrol"
                or self.regularizer_target == "guided")

    def replace(self, **kwargs) -> "DistillConfig":
        return dataclasses.replace(self, **kwargs)


# Options of CoDi's loss that mean nothing for the plain diffusion loss.
_CODI_ONLY = (
    "full_codi", "cfg_aware_distill", "onestepode", "onestepode_control_params",
    "onestepode_cfg", "onestepode_true_noise", "distill_loss", "snr_gamma",
    "x0_regularizer_weight", "shared_timestep", "regularizer_snr_gamma", "regularizer_target",
    "guidance_embedding", "regularizer_guidance_scaling",
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DistillConfig)}


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a learning-rate schedule."""

    learning_rate: float = 1e-5
    """Peak learning rate."""
    lr_scheduler: LRScheduler = "constant"
    """`constant`, `constant_with_warmup`, `linear` (decay to 0) or `cosine` (decay to 0)."""
    lr_warmup_steps: int = 0
    """Linear warm-up from 0 (all schedules but `constant`)."""
    max_train_steps: int = 1000
    """Length of the decaying schedules."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    adam_weight_decay: float = 1e-2
    max_grad_norm: Optional[float] = 1.0
    """Global-norm clipping threshold (None: no clipping)."""
    ema_decay: float = 0.999
    """mu in theta_minus <- mu * theta_minus + (1 - mu) * theta."""

    def __post_init__(self):
        if self.lr_scheduler not in ("constant", "constant_with_warmup", "linear", "cosine"):
            raise ValueError(
                f"lr_scheduler={self.lr_scheduler!r}: expected constant, constant_with_warmup, "
                "linear or cosine"
            )
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError("ema_decay must lie in [0, 1]")
