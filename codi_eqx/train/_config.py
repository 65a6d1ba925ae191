"""`TrainConfig`: every option of a `codi train` run (the seed's flags and this project's),
validated when built, convertible to the distillation, optimiser and data configurations."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from ..data import DataConfig
from ..distill import DistillConfig, OptimConfig
from ..errors import UsageError

MIXED_PRECISION = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TrainConfigError(UsageError, ValueError):
    """An option, or a combination of options, that cannot run (a usage error)."""


@dataclass(frozen=True)
class TrainConfig:
    """The options of a training run; the fields are the `codi train` flags."""

    # --- model and output ---------------------------------------------------------------
    pretrained_model_name_or_path: str = ""
    output_dir: str = "codi-model"
    revision: Optional[str] = None
    """Hub revision: meaningless for a local folder (accepted with a note)."""
    from_pt: bool = False
    """Seed flag (weights were PyTorch): weights are always read from safetensors here."""
    cache_dir: Optional[str] = None
    # --- data ---------------------------------------------------------------------------
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    train_data_dir: Optional[str] = None
    load_from_disk: bool = False
    image_column: Optional[str] = None
    caption_column: Optional[str] = None
    conditioning_image_column: Optional[str] = None
    resolution: int = 512
    proportion_empty_prompts: float = 0.0
    max_train_samples: Optional[int] = None
    dataloader_num_workers: int = 0
    strict: bool = False
    cache_latents: Optional[str] = None
    """A folder caching each image's VAE posterior and each caption's text embeddings: the
    first epoch fills it, later epochs and runs skip both encoders."""
    # --- schedule -----------------------------------------------------------------------
    train_batch_size: int = 1
    """Per device, as in the seed; the global batch is this x devices x accumulation steps."""
    gradient_accumulation_steps: int = 1
    max_train_steps: Optional[int] = None
    num_train_epochs: int = 100
    """Used when `max_train_steps` is not given."""
    learning_rate: float = 1e-5
    scale_lr: bool = False
    """Multiply the learning rate by the global batch size (as the seed did)."""
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    mixed_precision: str = "no"
    """Dtype of the frozen models: no (float32), bf16, fp16; trained weights stay float32."""
    gradient_checkpointing: bool = False
    """Rematerialise the UNet's blocks in the backward pass (less memory, more compute)."""
    # --- distillation (codi-algorithm.md) -----------------------------------------------
    objective: str = "codi"
    """`codi` (CoDi's consistency distillation) or `controlnet` (the standard ControlNet
    objective: the plain diffusion loss of UNet + adapter)."""
    distill_type: str = "conditional"
    distill_learning_steps: int = 50
    distill_loss: str = "consistency_x"
    onestepode: str = "control"
    onestepode_control_params: str = "target"
    onestepode_sample_eps: Optional[str] = None
    """Seed flag: the prediction type; the model's config decides unless forced."""
    force_prediction_type: bool = False
    onestepode_cfg: bool = False
    onestepode_true_noise: bool = False
    cfg_aware_distill: bool = False
    distill_guidance_min: float = 2.0
    distill_guidance_max: float = 14.0
    guidance_draw: str = "per_example"
    snr_gamma: Optional[float] = None
    regularizer_weight: float = 1.0
    distill_timestep_scaling: float = 10.0
    shared_timestep: bool = False
    full_codi: bool = False
    # --- logging, checkpoints, validation -----------------------------------------------
    report_to: Optional[str] = None
    logging_steps: int = 1
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    validation_prompt: tuple[str, ...] = ()
    validation_image: tuple[str, ...] = ()
    validation_steps: int = 100
    num_validation_images: int = 4
    validation_inference_steps: Optional[int] = None
    """Sampling steps of the validation images (None: 4 CoDi steps, or 50 DDIM steps for the
    `controlnet` objective)."""
    # --- testing hooks (not for users) --------------------------------------------------
    debug_nan_at_step: Optional[int] = field(default=None)
    """Testing hook: the batch of this step (1-based) is made NaN, to exercise the guard."""
    debug_signal_at_step: Optional[int] = field(default=None)
    """Testing hook: after this step the run sends itself `debug_signal`, to exercise the
    handler."""
    debug_signal: str = field(default="SIGINT")
    """Testing hook: the signal of `debug_signal_at_step`: SIGINT or SIGTERM."""

    def __post_init__(self):
        object.__setattr__(self, "validation_prompt", tuple(self.validation_prompt or ()))
        object.__setattr__(self, "validation_image", tuple(self.validation_image or ()))
        if not self.pretrained_model_name_or_path:
            raise TrainConfigError("--pretrained_model_name_or_path is required")
        if self.mixed_precision not in MIXED_PRECISION:
            raise TrainConfigError(f"--mixed_precision {self.mixed_precision!r}: expected no, bf16 or fp16")
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                     "logging_steps", "checkpointing_steps", "validation_steps",
                     "num_validation_images", "validation_inference_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TrainConfigError(f"--{name} must be at least 1 (got {getattr(self, name)})")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise TrainConfigError(f"--max_train_steps must be at least 1 (got {self.max_train_steps})")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise TrainConfigError("--checkpoints_total_limit must be at least 1")
        if self.dataloader_num_workers < 0:
            raise TrainConfigError("--dataloader_num_workers must be 0 or more")
        if self.report_to not in (None, "none", "tensorboard", "wandb", "all"):
            raise TrainConfigError(f"--report_to {self.report_to!r}: expected tensorboard, wandb, all or none")
        if self.validation_image and self.validation_prompt and len(self.validation_image) not in (
                1, len(self.validation_prompt)):
            raise TrainConfigError(
                f"{len(self.validation_image)} --validation_image for {len(self.validation_prompt)} "
                "--validation_prompt: give one image, or one per prompt")
        if self.debug_signal not in ("SIGINT", "SIGTERM"):
            raise TrainConfigError(
                f"--debug_signal {self.debug_signal!r}: expected SIGINT or SIGTERM")
        if self.validation_image and not self.validation_prompt:
            raise TrainConfigError("--validation_image needs --validation_prompt")
        if self.validation_prompt and self.distill_type == "conditional" and not self.validation_image:
            raise TrainConfigError("--validation_prompt with --distill_type conditional needs "
                                   "--validation_image (the condition image)")
        try:
            self.distill_config("epsilon")
            self.optim_config(1, 1)
            self.data_config()
        except ValueError as e:
            raise TrainConfigError(str(e)) from None

    # --- derived configurations -----------------------------------------------------------

    @property
    def dtype_name(self) -> str:
        return MIXED_PRECISION[self.mixed_precision]

    def distill_config(self, prediction_type: str) -> DistillConfig:
        return DistillConfig(
            objective=self.objective, prediction_type=prediction_type,
            distill_type=self.distill_type,
            onestepode=self.onestepode, onestepode_control_params=self.onestepode_control_params,
            onestepode_cfg=self.onestepode_cfg, onestepode_true_noise=self.onestepode_true_noise,
            cfg_aware_distill=self.cfg_aware_distill,
            distill_guidance_min=self.distill_guidance_min,
            distill_guidance_max=self.distill_guidance_max, guidance_draw=self.guidance_draw,
            distill_loss=self.distill_loss, snr_gamma=self.snr_gamma,
            x0_regularizer_weight=self.regularizer_weight,
            distill_learning_steps=self.distill_learning_steps,
            distill_timestep_scaling=self.distill_timestep_scaling,
            shared_timestep=self.shared_timestep, full_codi=self.full_codi,
            compute_dtype=self.dtype_name,
        )

    def optim_config(self, global_batch: int, max_train_steps: int) -> OptimConfig:
        lr = self.learning_rate * (global_batch if self.scale_lr else 1)
        return OptimConfig(
            learning_rate=lr, lr_scheduler=self.lr_scheduler, lr_warmup_steps=self.lr_warmup_steps,
            max_train_steps=max_train_steps, adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2, adam_epsilon=self.adam_epsilon,
            adam_weight_decay=self.adam_weight_decay, max_grad_norm=self.max_grad_norm,
            ema_decay=self.ema_decay,
        )

    def data_config(self) -> DataConfig:
        return DataConfig(
            train_data_dir=self.train_data_dir, dataset_name=self.dataset_name,
            dataset_config_name=self.dataset_config_name, load_from_disk=self.load_from_disk,
            cache_dir=self.cache_dir, image_column=self.image_column,
            caption_column=self.caption_column,
            conditioning_image_column=self.conditioning_image_column,
            unconditional=self.distill_type == "unconditional", resolution=self.resolution,
            proportion_empty_prompts=self.proportion_empty_prompts,
            max_train_samples=self.max_train_samples,
        )

    # --- (de)serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["validation_prompt"] = list(self.validation_prompt)
        d["validation_image"] = list(self.validation_image)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **kwargs) -> "TrainConfig":
        return dataclasses.replace(self, **kwargs)
