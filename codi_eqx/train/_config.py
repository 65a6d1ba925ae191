"""`TrainConfig`: every option of a `codi train` run (the seed's flags and this project's),
validated when built, convertible to the distillation, optimiser and data configurations.

Each field is the one definition of its option: type (a `Literal` for a choice), default,
help text, help panel and extra command-line spellings (`option(...)`). `codi train`'s flags
are generated from the fields (`training_options()`), and the sub-configurations
(`DistillConfig`, `OptimConfig`, `DataConfig`) are filled from the fields of the same name."""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..data import DataConfig
from ..distill import DistillConfig, OptimConfig
from ..distill._config import (
    ControlParams,
    DistillLoss,
    DistillType,
    GuidanceDraw,
    LRScheduler,
    Objective,
    GuidanceDirectionScaling,
    OneStepODE,
    RegularizerTarget,
)
from ..errors import UsageError

MIXED_PRECISION = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}
MixedPrecision = Literal["no", "bf16", "fp16"]
ReportTo = Literal["tensorboard", "wandb", "all", "none"]

# Help panels of `codi train --help` (None: the first, "Options").
PANEL_DATA = "Data"
PANEL_OPTIM = "Optimisation"
PANEL_DISTILL = "Distillation"
PANEL_RUN = "Logging, checkpoints, validation"

# The sub-configurations' defaults: a field that fills one takes its default from there, so
# that the library's configurations and `codi train` cannot disagree.
_DISTILL = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
_OPTIM = {f.name: f.default for f in dataclasses.fields(OptimConfig)}
_DATA = {f.name: f.default for f in dataclasses.fields(DataConfig)}


class TrainConfigError(UsageError, ValueError):
    """An option, or a combination of options, that cannot run (a usage error)."""


def option(default: Any, *, help: str, panel: str | None = None,
           choices: tuple | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A `TrainConfig` field that is also a `codi train` flag.

    **Arguments:**

    - `default`: the default value.
    - `help`: the flag's help text (and the field's documentation).
    - `panel`: the help panel that lists the flag (None: the first, "Options").
    - `choices`: the allowed values, where the type is not a `Literal` that says them.
    - `aliases`: further spellings of the flag besides `--name` and its kebab-case twin,
      e.g. `("--conditioning_image",)`; each gets its kebab-case twin too.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "panel": panel, "choices": choices, "aliases": tuple(aliases)})


@dataclass(frozen=True)
class TrainOption:
    """One `codi train` option, read from its `TrainConfig` field (`training_options()`)."""

    name: str
    type: Any
    """The field's type, resolved (`Literal[...]` for a choice, `X | None` where optional)."""
    default: Any
    help: str
    panel: str | None
    choices: tuple | None
    """The allowed values (None: any value of the type)."""
    flags: tuple[str, ...]
    """Every spelling: `--name`, its kebab-case twin, the aliases and theirs."""


@dataclass(frozen=True)
class TrainConfig:
    """The options of a training run; the fields are the `codi train` flags (each field's
    help is in its `option(...)`; `training_options()` lists them)."""

    # --- model and output ---------------------------------------------------------------
    pretrained_model_name_or_path: str = option(
        "", help="The Stable Diffusion model: a diffusers-format folder, a `codi "
        "convert-weights` folder, or a Hub id in the local cache.")
    output_dir: str = option(
        "codi-model", help="Where the run writes: the final EMA adapter (config.json + "
        "safetensors) at the top, checkpoints/, metrics.jsonl, validation/.")
    revision: str | None = option(
        None, help="Hub revision (seed flag; ignored, with a note, for a local folder).")
    from_pt: bool = option(
        False, help="Seed flag (PyTorch weights): accepted and ignored, weights are read from "
        "safetensors.")
    cache_dir: str | None = option(
        _DATA["cache_dir"], help="Hugging Face datasets cache (for --dataset_name hub ids).",
        panel=PANEL_DATA)
    # --- data ---------------------------------------------------------------------------
    dataset_name: str | None = option(
        _DATA["dataset_name"], help="A Hugging Face dataset: hub id from the local cache, or a "
        "local folder (save_to_disk folder with --load_from_disk, or the layouts of "
        "--train_data_dir).", panel=PANEL_DATA)
    dataset_config_name: str | None = option(
        _DATA["dataset_config_name"], help="Configuration of a hub dataset.", panel=PANEL_DATA)
    train_data_dir: str | None = option(
        _DATA["train_data_dir"], help="A local dataset: the seed's folder (images/, "
        "processed_images/, meta.jsonl), an imagefolder (metadata.jsonl), a save_to_disk "
        "folder, or *.tar shards (also a brace pattern shards/{00000..00099}.tar).",
        panel=PANEL_DATA)
    load_from_disk: bool = option(
        _DATA["load_from_disk"], help="The dataset is a save_to_disk folder (accepted for the "
        "other local formats, which are recognised by their files).", panel=PANEL_DATA)
    image_column: str | None = option(
        _DATA["image_column"], help="Column of the target image (default: image).",
        panel=PANEL_DATA)
    caption_column: str | None = option(
        _DATA["caption_column"], help="Column of the caption (default: caption, text or "
        "prompt); a list of captions gets a random choice per example.", panel=PANEL_DATA)
    conditioning_image_column: str | None = option(
        _DATA["conditioning_image_column"], help="Column of the condition image (default: "
        "conditioning_image when present). The seed README spells it --conditioning_image.",
        panel=PANEL_DATA, aliases=("--conditioning_image",))
    resolution: int | None = option(
        None, help="Training size (bilinear resize of the short side, centre crop); must "
        "divide by the VAE factor (8). Default: the UNet's own size (sample_size x the VAE "
        "factor: 1024 for SDXL) for SDXL models, 512 for SD 1.x / 2.x.", panel=PANEL_DATA)
    proportion_empty_prompts: float = option(
        _DATA["proportion_empty_prompts"], help="Fraction of captions replaced by the empty "
        "prompt.", panel=PANEL_DATA)
    max_train_samples: int | None = option(
        _DATA["max_train_samples"], help="Use only the first N examples.", panel=PANEL_DATA)
    dataloader_num_workers: int = option(
        0, help="Background image decoders (0: decode in the main thread).", panel=PANEL_DATA)
    strict: bool = option(
        False, help="Stop on an unreadable image instead of skipping and counting it.",
        panel=PANEL_DATA)
    cache_latents: str | None = option(
        None, help="A folder caching each image's VAE posterior (mean, log-variance) and each "
        "caption's text embeddings: the first epoch fills it, later epochs and runs skip the "
        "VAE encoder and the text encoder. Tied to the dataset, resolution, model and "
        "--mixed_precision.", panel=PANEL_DATA)
    # --- schedule -----------------------------------------------------------------------
    train_batch_size: int = option(
        1, help="Examples per device per micro-step (as in the seed); the global batch is "
        "this x devices x --gradient_accumulation_steps.", panel=PANEL_OPTIM)
    gradient_accumulation_steps: int = option(
        1, help="Micro-steps per optimiser step.", panel=PANEL_OPTIM)
    max_train_steps: int | None = option(
        None, help="Optimiser steps (default: --num_train_epochs epochs).", panel=PANEL_OPTIM)
    num_train_epochs: int = option(
        100, help="Epochs when --max_train_steps is not given.", panel=PANEL_OPTIM)
    learning_rate: float = option(
        _OPTIM["learning_rate"], help="Peak learning rate.", panel=PANEL_OPTIM)
    scale_lr: bool = option(
        False, help="Multiply the learning rate by the global batch size.", panel=PANEL_OPTIM)
    lr_scheduler: LRScheduler = option(
        _OPTIM["lr_scheduler"], help="The learning-rate schedule: constant, constant_with_warmup, "
        "linear or cosine (the last two decay to 0 at the last step).",
        panel=PANEL_OPTIM)
    lr_warmup_steps: int = option(
        _OPTIM["lr_warmup_steps"], help="Linear warm-up steps (all schedules but constant).",
        panel=PANEL_OPTIM)
    adam_beta1: float = option(_OPTIM["adam_beta1"], help="AdamW beta1.", panel=PANEL_OPTIM)
    adam_beta2: float = option(_OPTIM["adam_beta2"], help="AdamW beta2.", panel=PANEL_OPTIM)
    adam_weight_decay: float = option(
        _OPTIM["adam_weight_decay"], help="AdamW weight decay.", panel=PANEL_OPTIM)
    adam_epsilon: float = option(
        _OPTIM["adam_epsilon"], help="AdamW epsilon.", panel=PANEL_OPTIM)
    max_grad_norm: float | None = option(
        _OPTIM["max_grad_norm"], help="Global-norm gradient clipping (0: off).",
        panel=PANEL_OPTIM)
    ema_decay: float = option(
        _OPTIM["ema_decay"], help="EMA decay mu of the target adapter (theta_minus).",
        panel=PANEL_OPTIM)
    seed: int = option(0, help="Seed of the initialisation, data order and noise.",
                       panel=PANEL_OPTIM)
    mixed_precision: MixedPrecision = option(
        "no", help="Compute dtype: no (float32), bf16, fp16. The frozen models are held in it; "
        "trained weights stay float32 masters, cast to it for the forward pass (the UNet too "
        "in full CoDi).", panel=PANEL_OPTIM)
    gradient_checkpointing: bool = option(
        False, help="Rematerialise the UNet's blocks in the backward pass.", panel=PANEL_OPTIM)
    # --- distillation (codi-algorithm.md) -----------------------------------------------
    objective: Objective = option(
        _DISTILL["objective"], help="codi (CoDi's consistency distillation: a few-step model) "
        "or controlnet (the standard ControlNet objective: the plain diffusion loss of the "
        "frozen UNet + adapter, sampled with DDIM; the CoDi-only flags do not apply).",
        panel=PANEL_DISTILL)
    distill_type: DistillType = option(
        _DISTILL["distill_type"], help="conditional (adapter with a condition image) or "
        "unconditional (text-to-image acceleration).", panel=PANEL_DISTILL)
    distill_learning_steps: int = option(
        _DISTILL["distill_learning_steps"], help="N: points of the distillation timestep grid.",
        panel=PANEL_DISTILL)
    distill_loss: DistillLoss = option(
        _DISTILL["distill_loss"], help="consistency_x or consistency_epsilon.",
        panel=PANEL_DISTILL)
    onestepode: OneStepODE = option(
        _DISTILL["onestepode"], help="Teacher step model: control (UNet + adapter) or "
        "uncontrol (UNet).", panel=PANEL_DISTILL)
    onestepode_control_params: ControlParams = option(
        _DISTILL["onestepode_control_params"], help="Adapter parameters of a control teacher "
        "step: target (EMA) or online.", panel=PANEL_DISTILL)
    onestepode_sample_eps: str | None = option(
        None, help="Seed flag: the prediction type. The model's config decides; a "
        "contradicting value gets a warning unless --force_prediction_type.",
        panel=PANEL_DISTILL)
    force_prediction_type: bool = option(
        False, help="Use --onestepode_sample_eps even against the model's config.",
        panel=PANEL_DISTILL)
    onestepode_cfg: bool = option(
        _DISTILL["onestepode_cfg"], help="Classifier-free guidance in the teacher step.",
        panel=PANEL_DISTILL)
    onestepode_true_noise: bool = option(
        _DISTILL["onestepode_true_noise"], help="Teacher step with the true noise (the "
        "paper's text) instead of the predicted one.", panel=PANEL_DISTILL)
    cfg_aware_distill: bool = option(
        _DISTILL["cfg_aware_distill"], help="Guidance-aware distillation (target and online "
        "guided at w).", panel=PANEL_DISTILL)
    distill_guidance_min: float = option(
        _DISTILL["distill_guidance_min"], help="Lower end of the guidance-scale draw.",
        panel=PANEL_DISTILL)
    distill_guidance_max: float = option(
        _DISTILL["distill_guidance_max"], help="Upper end of the guidance-scale draw.",
        panel=PANEL_DISTILL)
    guidance_draw: GuidanceDraw = option(
        _DISTILL["guidance_draw"], help="per_example (real w per example) or "
        "per_batch_integer (the original's).", panel=PANEL_DISTILL)
    snr_gamma: float | None = option(
        _DISTILL["snr_gamma"], help="Min-SNR weighting of the consistency term.",
        panel=PANEL_DISTILL)
    regularizer_weight: float = option(
        _DISTILL["x0_regularizer_weight"], help="Weight of the x0 regulariser (0: off).",
        panel=PANEL_DISTILL, aliases=("--x0_regularizer_weight",))
    regularizer_guidance_scaling: GuidanceDirectionScaling = option(
        _DISTILL["regularizer_guidance_scaling"], help="none, or alpha: the guided target's "
        "direction times alpha_t (about constant in size over t).", panel=PANEL_DISTILL)
    guidance_embedding: bool = option(
        _DISTILL["guidance_embedding"], help="Guidance-conditioned student: w drawn in "
        "[--distill_guidance_min, --distill_guidance_max] goes to the adapter through a "
        "zero-initialised embedding, so that `codi sample --guidance_scale w` picks it at one "
        "pass per step (needs --onestepode_cfg).", panel=PANEL_DISTILL)
    sample_guidance_scale: float | None = option(
        None, help="The guidance scale the trained adapter samples at by default (recorded "
        "with it; default: the sampler's).", panel=PANEL_DISTILL)
    regularizer_snr_gamma: float | None = option(
        _DISTILL["regularizer_snr_gamma"], help="Weight the x0 regulariser by "
        "min(snr_t, gamma) / gamma, so that it stops overriding the guided teacher at high "
        "noise (None: constant).", panel=PANEL_DISTILL)
    regularizer_target: RegularizerTarget = option(
        _DISTILL["regularizer_target"], help="data (x0) or guided (x0 + (w - 1) times the "
        "guided teacher's x-hat difference; needs --onestepode_cfg).", panel=PANEL_DISTILL)
    distill_timestep_scaling: float = option(
        _DISTILL["distill_timestep_scaling"], help="tau of the boundary scalings c_skip, "
        "c_out.", panel=PANEL_DISTILL)
    shared_timestep: bool = option(
        _DISTILL["shared_timestep"], help="One timestep for the whole batch (the paper's "
        "choice for 1-4 steps).", panel=PANEL_DISTILL)
    full_codi: bool = option(
        _DISTILL["full_codi"], help="Train the UNet with the adapter (full CoDi) instead of "
        "the adapter alone.", panel=PANEL_DISTILL)
    # --- logging, checkpoints, validation -----------------------------------------------
    report_to: ReportTo | None = option(
        None, help="tensorboard, wandb or all, when installed (metrics.jsonl always).",
        panel=PANEL_RUN)
    logging_steps: int = option(1, help="Steps between metrics.jsonl rows.", panel=PANEL_RUN)
    checkpointing_steps: int = option(
        500, help="Steps between checkpoints.", panel=PANEL_RUN)
    checkpoints_total_limit: int | None = option(
        None, help="Keep only the newest N checkpoints.", panel=PANEL_RUN)
    resume_from_checkpoint: str | None = option(
        None, help="latest, or a checkpoint folder, to continue a run exactly.",
        panel=PANEL_RUN)
    validation_prompt: tuple[str, ...] = option(
        (), help="Prompt of the validation images (repeatable).", panel=PANEL_RUN)
    validation_image: tuple[str, ...] = option(
        (), help="Condition image: one for all prompts or one per prompt (repeatable).",
        panel=PANEL_RUN)
    validation_steps: int = option(100, help="Steps between validation grids.",
                                   panel=PANEL_RUN)
    num_validation_images: int = option(4, help="Images per validation prompt.",
                                        panel=PANEL_RUN)
    validation_inference_steps: int | None = option(
        None, help="Sampling steps of the validation images (default: 4 CoDi steps; 50 DDIM "
        "steps with --objective controlnet).", panel=PANEL_RUN)

    def __post_init__(self):
        # Spellings with one meaning: a list of prompts, `report_to none`, no clipping at 0.
        object.__setattr__(self, "validation_prompt", tuple(self.validation_prompt or ()))
        object.__setattr__(self, "validation_image", tuple(self.validation_image or ()))
        if self.report_to == "none":
            object.__setattr__(self, "report_to", None)
        if not self.max_grad_norm:
            object.__setattr__(self, "max_grad_norm", None)
        if not self.pretrained_model_name_or_path:
            raise TrainConfigError("pretrained_model_name_or_path is required")
        for opt in training_options():
            value = getattr(self, opt.name)
            if opt.choices is not None and value is not None and value not in opt.choices:
                raise TrainConfigError(f"{opt.name} {value!r}: expected one of "
                                       f"{', '.join(map(str, opt.choices))}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                     "logging_steps", "checkpointing_steps", "validation_steps",
                     "num_validation_images", "validation_inference_steps", "max_train_steps",
                     "checkpoints_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.dataloader_num_workers < 0:
            raise TrainConfigError("dataloader_num_workers must be 0 or more")
        if self.validation_image and self.validation_prompt and len(self.validation_image) not in (
                1, len(self.validation_prompt)):
            raise TrainConfigError(
                f"{len(self.validation_image)} validation_image for "
                f"{len(self.validation_prompt)} validation_prompt: give one image, or one per "
                "prompt")
        if self.validation_image and not self.validation_prompt:
            raise TrainConfigError("validation_image needs validation_prompt")
        if self.validation_prompt and self.distill_type == "conditional" and not self.validation_image:
            raise TrainConfigError("validation_prompt with distill_type conditional needs "
                                   "validation_image (the condition image)")
        try:
            self.distill_config("epsilon")
            self.optim_config(1, 1)
            # (an unset resolution, filled from the model later, checks as the data default)
            (self if self.resolution is not None else
             dataclasses.replace(self, resolution=_DATA["resolution"])).data_config()
        except ValueError as e:
            raise TrainConfigError(str(e)) from None

    # --- derived configurations -----------------------------------------------------------

    @property
    def dtype_name(self) -> str:
        return MIXED_PRECISION[self.mixed_precision]

    def distill_config(self, prediction_type: str) -> DistillConfig:
        return sub_config(self, DistillConfig, prediction_type=prediction_type,
                          compute_dtype=self.dtype_name)

    def optim_config(self, global_batch: int, max_train_steps: int) -> OptimConfig:
        lr = self.learning_rate * (global_batch if self.scale_lr else 1)
        return sub_config(self, OptimConfig, learning_rate=lr, max_train_steps=max_train_steps)

    def data_config(self) -> DataConfig:
        if self.resolution is None:
            raise TrainConfigError("resolution is not set (train.with_model_defaults(config) "
                                   "fills it from the model)")
        return sub_config(self, DataConfig, unconditional=self.distill_type == "unconditional")

    # --- (de)serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["validation_prompt"] = list(self.validation_prompt)
        d["validation_image"] = list(self.validation_image)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **kwargs) -> TrainConfig:
        return dataclasses.replace(self, **kwargs)


# --- the options, as the command line sees them ------------------------------------------------


def _choices(tp: Any) -> tuple | None:
    """The values of a `Literal` type (or of `Literal[...] | None`), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    literals = [a for a in typing.get_args(tp) if typing.get_origin(a) is Literal]
    return typing.get_args(literals[0]) if len(literals) == 1 else None


def flag_spellings(name: str, aliases: tuple[str, ...] = ()) -> tuple[str, ...]:
    """`--name`, its kebab-case twin, and each alias with its twin."""
    flags: list[str] = []
    for flag in (f"--{name}", *aliases):
        for spelling in (flag, "--" + flag[2:].replace("_", "-")):
            if spelling not in flags:
                flags.append(spelling)
    return tuple(flags)


@functools.cache
def training_options() -> tuple[TrainOption, ...]:
    """Every `TrainConfig` field as a `TrainOption`, in field order: what `codi train`'s flags
    are generated from."""
    hints = typing.get_type_hints(TrainConfig)
    return tuple(
        TrainOption(name=f.name, type=hints[f.name], default=f.default,
                    help=f.metadata["help"], panel=f.metadata["panel"],
                    choices=f.metadata["choices"] or _choices(hints[f.name]),
                    flags=flag_spellings(f.name, f.metadata["aliases"]))
        for f in dataclasses.fields(TrainConfig))


# --- the sub-configurations, filled by field name -----------------------------------------------

SUB_CONFIG_FIELDS: dict[type, dict[str, Any]] = {
    DistillConfig: {
        "renamed": {"x0_regularizer_weight": "regularizer_weight"},
        "computed": ("prediction_type", "compute_dtype"),
        "library_only": ("sigma_data", "conditioning_scale"),
    },
    OptimConfig: {
        "renamed": {},
        "computed": ("learning_rate", "max_train_steps"),
        "library_only": (),
    },
    DataConfig: {
        "renamed": {},
        "computed": ("unconditional",),
        "library_only": ("shuffle_buffer",),
    },
}
"""How each sub-configuration's fields are filled from a `TrainConfig`: from the field of the
same name, or of the name in `renamed`; `computed` ones are given by the caller (derived from
several options or from the run: the model's prediction type, the global batch ...);
`library_only` ones keep their default (no `codi train` flag sets them)."""


def mapped_fields(cls: type) -> dict[str, str]:
    """`{sub-config field: TrainConfig field}` of the fields of `cls` taken from a
    `TrainConfig` as they are."""
    spec = SUB_CONFIG_FIELDS[cls]
    skipped = set(spec["computed"]) | set(spec["library_only"])
    return {f.name: spec["renamed"].get(f.name, f.name)
            for f in dataclasses.fields(cls) if f.name not in skipped}


def sub_config(config: TrainConfig, cls: type, **computed: Any) -> Any:
    """`cls` (`DistillConfig`, `OptimConfig` or `DataConfig`) filled from `config` by field
    name (`SUB_CONFIG_FIELDS`), with the `computed` fields given here."""
    expected = set(SUB_CONFIG_FIELDS[cls]["computed"])
    if set(computed) != expected:
        raise TypeError(f"{cls.__name__}: give exactly the computed fields {sorted(expected)}")
    values = {sub: getattr(config, name) for sub, name in mapped_fields(cls).items()}
    return cls(**values, **computed)
