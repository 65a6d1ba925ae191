"""`codi train`: CoDi distillation of a Stable Diffusion model into a few-step conditional
generator. The flags are the seed's (`train_codi_flax.py`), with underscores as in its README
and kebab-case twins."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    COMPILATION_CACHE_DIR_HELP,
    NO_COMPILATION_CACHE_HELP,
    CodiUsageError,
    fail,
    note,
    progress,
    reported_errors,
    use_compilation_cache,
)

_DATA = "Data"
_OPTIM = "Optimisation"
_DISTILL = "Distillation"
_RUN = "Logging, checkpoints, validation"
_CACHE = "Compilation cache"


def _opt(name: str, help: str, panel: Optional[str] = None, *aliases: str, **kw):
    names = [f"--{name}"]
    kebab = f"--{name.replace('_', '-')}"
    if kebab != names[0]:
        names.append(kebab)
    names += list(aliases)
    return typer.Option(*names, help=help, rich_help_panel=panel, **kw)


def train(
    ctx: typer.Context,
    pretrained_model_name_or_path: Annotated[str, _opt(
        "pretrained_model_name_or_path",
        "The Stable Diffusion model: a diffusers-format folder, a `codi convert-weights` folder, "
        "or a Hub id in the local cache.")] = "",
    output_dir: Annotated[str, _opt(
        "output_dir", "Where the run writes: the final EMA adapter (config.json + safetensors) "
        "at the top, checkpoints/, metrics.jsonl, validation/.")] = "codi-model",
    revision: Annotated[Optional[str], _opt(
        "revision", "Hub revision (seed flag; ignored, with a note, for a local folder).")] = None,
    from_pt: Annotated[bool, _opt(
        "from_pt", "Seed flag (PyTorch weights): accepted and ignored, weights are read from "
        "safetensors.")] = False,
    cache_dir: Annotated[Optional[str], _opt(
        "cache_dir", "Hugging Face datasets cache (for --dataset_name hub ids).", _DATA)] = None,
    dataset_name: Annotated[Optional[str], _opt(
        "dataset_name", "A Hugging Face dataset: hub id from the local cache, or a local folder "
        "(save_to_disk folder with --load_from_disk, or the layouts of --train_data_dir).",
        _DATA)] = None,
    dataset_config_name: Annotated[Optional[str], _opt(
        "dataset_config_name", "Configuration of a hub dataset.", _DATA)] = None,
    train_data_dir: Annotated[Optional[str], _opt(
        "train_data_dir", "A local dataset: the seed's folder (images/, processed_images/, "
        "meta.jsonl), an imagefolder (metadata.jsonl), a save_to_disk folder, or *.tar shards "
        "(also a brace pattern shards/{00000..00099}.tar).", _DATA)] = None,
    load_from_disk: Annotated[bool, _opt(
        "load_from_disk", "The dataset is a save_to_disk folder (accepted for the other local "
        "formats, which are recognised by their files).", _DATA)] = False,
    image_column: Annotated[Optional[str], _opt(
        "image_column", "Column of the target image (default: image).", _DATA)] = None,
    caption_column: Annotated[Optional[str], _opt(
        "caption_column", "Column of the caption (default: caption, text or prompt); a list "
        "of captions gets a random choice per example.", _DATA)] = None,
    conditioning_image_column: Annotated[Optional[str], _opt(
        "conditioning_image_column", "Column of the condition image (default: "
        "conditioning_image when present). The seed README spells it --conditioning_image.",
        _DATA, "--conditioning_image", "--conditioning-image")] = None,
    resolution: Annotated[int, _opt(
        "resolution", "Training size (bilinear resize of the short side, centre crop); must "
        "divide by the VAE factor (8).", _DATA)] = 512,
    proportion_empty_prompts: Annotated[float, _opt(
        "proportion_empty_prompts", "Fraction of captions replaced by the empty prompt.",
        _DATA)] = 0.0,
    max_train_samples: Annotated[Optional[int], _opt(
        "max_train_samples", "Use only the first N examples.", _DATA)] = None,
    dataloader_num_workers: Annotated[int, _opt(
        "dataloader_num_workers", "Background image decoders (0: decode in the main thread).",
        _DATA)] = 0,
    strict: Annotated[bool, _opt(
        "strict", "Stop on an unreadable image instead of skipping and counting it.",
        _DATA)] = False,
    cache_latents: Annotated[Optional[str], _opt(
        "cache_latents", "A folder caching each image's VAE posterior (mean, log-variance) and "
        "each caption's text embeddings: the first epoch fills it, later epochs and runs skip "
        "the VAE encoder and the text encoder. Tied to the dataset, resolution, model and "
        "--mixed_precision.", _DATA)] = None,
    train_batch_size: Annotated[int, _opt(
        "train_batch_size", "Examples per device per micro-step (as in the seed); the global "
        "batch is this x devices x --gradient_accumulation_steps.", _OPTIM)] = 1,
    gradient_accumulation_steps: Annotated[int, _opt(
        "gradient_accumulation_steps", "Micro-steps per optimiser step.", _OPTIM)] = 1,
    max_train_steps: Annotated[Optional[int], _opt(
        "max_train_steps", "Optimiser steps (default: --num_train_epochs epochs).", _OPTIM)] = None,
    num_train_epochs: Annotated[int, _opt(
        "num_train_epochs", "Epochs when --max_train_steps is not given.", _OPTIM)] = 100,
    learning_rate: Annotated[float, _opt("learning_rate", "Peak learning rate.", _OPTIM)] = 1e-5,
    scale_lr: Annotated[bool, _opt(
        "scale_lr", "Multiply the learning rate by the global batch size.", _OPTIM)] = False,
    lr_scheduler: Annotated[str, _opt(
        "lr_scheduler", "constant, constant_with_warmup, linear or cosine.", _OPTIM)] = "constant",
    lr_warmup_steps: Annotated[int, _opt(
        "lr_warmup_steps", "Linear warm-up steps (all schedules but constant).", _OPTIM)] = 0,
    adam_beta1: Annotated[float, _opt("adam_beta1", "AdamW beta1.", _OPTIM)] = 0.9,
    adam_beta2: Annotated[float, _opt("adam_beta2", "AdamW beta2.", _OPTIM)] = 0.999,
    adam_weight_decay: Annotated[float, _opt(
        "adam_weight_decay", "AdamW weight decay.", _OPTIM)] = 1e-2,
    adam_epsilon: Annotated[float, _opt("adam_epsilon", "AdamW epsilon.", _OPTIM)] = 1e-8,
    max_grad_norm: Annotated[float, _opt(
        "max_grad_norm", "Global-norm gradient clipping (0: off).", _OPTIM)] = 1.0,
    ema_decay: Annotated[float, _opt(
        "ema_decay", "EMA decay mu of the target adapter (theta_minus).", _OPTIM)] = 0.999,
    seed: Annotated[int, _opt(
        "seed", "Seed of the initialisation, data order and noise.", _OPTIM)] = 0,
    mixed_precision: Annotated[str, _opt(
        "mixed_precision", "Compute dtype: no (float32), bf16, fp16. The frozen models are "
        "held in it; trained weights stay float32 masters, cast to it for the forward pass "
        "(the UNet too in full CoDi).", _OPTIM)] = "no",
    gradient_checkpointing: Annotated[bool, _opt(
        "gradient_checkpointing", "Rematerialise the UNet's blocks in the backward pass.",
        _OPTIM)] = False,
    objective: Annotated[str, _opt(
        "objective", "codi (CoDi's consistency distillation: a few-step model) or controlnet "
        "(the standard ControlNet objective: the plain diffusion loss of the frozen UNet + "
        "adapter, sampled with DDIM; the CoDi-only flags do not apply).",
        _DISTILL)] = "codi",
    distill_type: Annotated[str, _opt(
        "distill_type", "conditional (adapter with a condition image) or unconditional "
        "(text-to-image acceleration).", _DISTILL)] = "conditional",
    distill_learning_steps: Annotated[int, _opt(
        "distill_learning_steps", "N: points of the distillation timestep grid.",
        _DISTILL)] = 50,
    distill_loss: Annotated[str, _opt(
        "distill_loss", "consistency_x or consistency_epsilon.", _DISTILL)] = "consistency_x",
    onestepode: Annotated[str, _opt(
        "onestepode", "Teacher step model: control (UNet + adapter) or uncontrol (UNet).",
        _DISTILL)] = "control",
    onestepode_control_params: Annotated[str, _opt(
        "onestepode_control_params", "Adapter parameters of a control teacher step: target "
        "(EMA) or online.", _DISTILL)] = "target",
    onestepode_sample_eps: Annotated[Optional[str], _opt(
        "onestepode_sample_eps", "Seed flag: the prediction type. The model's config decides; "
        "a contradicting value gets a warning unless --force_prediction_type.",
        _DISTILL)] = None,
    force_prediction_type: Annotated[bool, _opt(
        "force_prediction_type", "Use --onestepode_sample_eps even against the model's "
        "config.", _DISTILL)] = False,
    onestepode_cfg: Annotated[bool, _opt(
        "onestepode_cfg", "Classifier-free guidance in the teacher step.", _DISTILL)] = False,
    onestepode_true_noise: Annotated[bool, _opt(
        "onestepode_true_noise", "Teacher step with the true noise (the paper's text) instead "
        "of the predicted one.", _DISTILL)] = False,
    cfg_aware_distill: Annotated[bool, _opt(
        "cfg_aware_distill", "Guidance-aware distillation (target and online guided at w).",
        _DISTILL)] = False,
    distill_guidance_min: Annotated[float, _opt(
        "distill_guidance_min", "Lower end of the guidance-scale draw.", _DISTILL)] = 2.0,
    distill_guidance_max: Annotated[float, _opt(
        "distill_guidance_max", "Upper end of the guidance-scale draw.", _DISTILL)] = 14.0,
    guidance_draw: Annotated[str, _opt(
        "guidance_draw", "per_example (real w per example) or per_batch_integer (the "
        "original's).", _DISTILL)] = "per_example",
    snr_gamma: Annotated[Optional[float], _opt(
        "snr_gamma", "Min-SNR weighting of the consistency term.", _DISTILL)] = None,
    regularizer_weight: Annotated[float, _opt(
        "regularizer_weight", "Weight of the x0 regulariser (0: off).", _DISTILL,
        "--x0_regularizer_weight")] = 1.0,
    distill_timestep_scaling: Annotated[float, _opt(
        "distill_timestep_scaling", "tau of the boundary scalings c_skip, c_out.",
        _DISTILL)] = 10.0,
    shared_timestep: Annotated[bool, _opt(
        "shared_timestep", "One timestep for the whole batch (the paper's choice for 1-4 "
        "steps).", _DISTILL)] = False,
    full_codi: Annotated[bool, _opt(
        "full_codi", "Train the UNet with the adapter (full CoDi) instead of the adapter "
        "alone.", _DISTILL)] = False,
    report_to: Annotated[Optional[str], _opt(
        "report_to", "tensorboard, wandb or all, when installed (metrics.jsonl always).",
        _RUN)] = None,
    logging_steps: Annotated[int, _opt(
        "logging_steps", "Steps between metrics.jsonl rows.", _RUN)] = 1,
    checkpointing_steps: Annotated[int, _opt(
        "checkpointing_steps", "Steps between checkpoints.", _RUN)] = 500,
    checkpoints_total_limit: Annotated[Optional[int], _opt(
        "checkpoints_total_limit", "Keep only the newest N checkpoints.", _RUN)] = None,
    resume_from_checkpoint: Annotated[Optional[str], _opt(
        "resume_from_checkpoint", "latest, or a checkpoint folder, to continue a run exactly.",
        _RUN)] = None,
    validation_prompt: Annotated[Optional[list[str]], _opt(
        "validation_prompt", "Prompt of the validation images (repeatable).", _RUN)] = None,
    validation_image: Annotated[Optional[list[str]], _opt(
        "validation_image", "Condition image: one for all prompts or one per prompt "
        "(repeatable).", _RUN)] = None,
    validation_steps: Annotated[int, _opt(
        "validation_steps", "Steps between validation grids.", _RUN)] = 100,
    num_validation_images: Annotated[int, _opt(
        "num_validation_images", "Images per validation prompt.", _RUN)] = 4,
    validation_inference_steps: Annotated[Optional[int], _opt(
        "validation_inference_steps", "Sampling steps of the validation images (default: 4 "
        "CoDi steps; 50 DDIM steps with --objective controlnet).", _RUN)] = None,
    dry_run: Annotated[bool, _opt(
        "dry_run", "Check the flags, model folder and dataset, print the resolved "
        "configuration as JSON, and stop.", _RUN)] = False,
    distributed: Annotated[bool, _opt(
        "distributed", "Multi-host run: start jax.distributed with the cluster detected "
        "from the environment (TPU pods, SLURM, ...). Each process reads its share of every "
        "global batch; only process 0 writes.", "Multi-host")] = False,
    coordinator_address: Annotated[Optional[str], _opt(
        "coordinator_address", "Multi-host run with an explicit coordinator HOST:PORT "
        "(with --num_processes and --process_id).", "Multi-host")] = None,
    num_processes: Annotated[Optional[int], _opt(
        "num_processes", "Number of processes of an explicit multi-host run.", "Multi-host",
        min=1)] = None,
    process_id: Annotated[Optional[int], _opt(
        "process_id", "This process's index in an explicit multi-host run.", "Multi-host",
        min=0)] = None,
    compilation_cache_dir: Annotated[Optional[Path], _opt(
        "compilation_cache_dir", COMPILATION_CACHE_DIR_HELP, _CACHE)] = None,
    no_compilation_cache: Annotated[bool, _opt(
        "no_compilation_cache", NO_COMPILATION_CACHE_HELP, _CACHE)] = False,
    debug_nan_at_step: Annotated[Optional[int], _opt(
        "debug_nan_at_step", "Testing hook: make step N's batch NaN.", hidden=True)] = None,
    debug_signal_at_step: Annotated[Optional[int], _opt(
        "debug_signal_at_step", "Testing hook: a signal after step N.", hidden=True)] = None,
    debug_signal: Annotated[str, _opt(
        "debug_signal", "Testing hook: the signal of --debug_signal_at_step (SIGINT or "
        "SIGTERM).", hidden=True)] = "SIGINT",
) -> None:
    """Distil a Stable Diffusion model with CoDi into a few-step conditional generator.

    The seed README's commands run as they stand (with `codi train` for the script and local
    paths). Ctrl-C or SIGTERM writes a checkpoint and stops; resume with
    --resume_from_checkpoint latest.
    """
    values = dict(locals())
    values.pop("ctx")
    values.pop("dry_run")
    given = _given_on_the_command_line(ctx, values)
    for name in ("distributed", "coordinator_address", "num_processes", "process_id",
                 "compilation_cache_dir", "no_compilation_cache"):
        values.pop(name)
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        fail("--coordinator_address, --num_processes and --process_id go together", 2)
    if not dry_run:  # before anything compiles
        use_compilation_cache(compilation_cache_dir, no_compilation_cache)
    if distributed or coordinator_address is not None:
        from codi_eqx.parallel import initialize_distributed

        try:
            initialize_distributed(coordinator_address, num_processes, process_id,
                                   cpu_collectives="gloo")
        except Exception as e:  # the cluster could not be joined
            fail(f"cannot start jax.distributed: {str(e).splitlines()[0]}", 1)
    values["max_grad_norm"] = values["max_grad_norm"] or None
    values["validation_prompt"] = tuple(values["validation_prompt"] or ())
    values["validation_image"] = tuple(values["validation_image"] or ())
    if values["report_to"] == "none":
        values["report_to"] = None
    with reported_errors():
        _run(values, dry_run, given)


def _builtin_run(values: dict, given: set[str]) -> dict:
    """No model and no data: distil the built-in shapes teacher on freshly drawn shapes,
    with the built-in run's defaults for every option not given."""
    from codi_eqx.toy import TOY_TRAIN_DEFAULTS, BuiltinMissingError, prepare_builtin_run

    values = dict(values)
    for name, value in TOY_TRAIN_DEFAULTS.items():
        if name not in given:
            values[name] = value
    try:
        with progress(transient=True) as bar:
            bar.add_task("drawing shapes", total=None, info="")
            values.update(prepare_builtin_run(values["output_dir"], seed=values["seed"]))
    except BuiltinMissingError as e:
        raise CodiUsageError(f"{e}; or give --pretrained_model_name_or_path and data") from None
    note(f"no model or data given: distilling the built-in shapes teacher on "
         f"{values['train_data_dir']} ({values['max_train_steps']} steps of batch "
         f"{values['train_batch_size']} at {values['resolution']}px)")
    return values


def _given_on_the_command_line(ctx: typer.Context, values: dict) -> set[str]:
    """The options the user set (on the command line or through the environment)."""
    given = set()
    for name in values:
        try:
            source = ctx.get_parameter_source(name)
        except Exception:  # not a parameter of this command
            continue
        # By name: Typer may bring its own copy of click's ParameterSource enum.
        if getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP"):
            given.add(name)
    return given


def _run(values: dict, dry_run: bool, given: set[str] = frozenset()) -> None:
    import json
    import signal

    from codi_eqx.train import TrainConfig, plan
    from codi_eqx.train import train as run_training

    # TrainConfigError and CheckpointError (usage), TrainingError and DataError (failures)
    # reach `reported_errors`, which gives each its exit code.
    if not values["pretrained_model_name_or_path"] and not (
            values["train_data_dir"] or values["dataset_name"]):
        values = _builtin_run(values, given)
    config = TrainConfig(**values)
    p = plan(config)  # every check that needs no weights, before the progress bar starts
    if dry_run:
        for line in p.notes:
            note(line)
        print(json.dumps(p.describe(config), indent=2))
        return
    with progress() as bar:
        summary = run_training(config, progress=bar, checked=p)
    if summary["interrupted"] is not None:
        note(f"interrupted at step {summary['step']}: checkpoint {summary['checkpoint']}; "
             "continue with --resume_from_checkpoint latest")
        raise typer.Exit(130 if summary["interrupted"] == signal.SIGINT else 143)
    note(f"trained {summary['step']} steps (loss {summary['loss']:.4f}); adapter in "
         f"{summary['output_dir']}")
