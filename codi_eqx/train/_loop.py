"""The training loop of `codi train`: load, check, step, log, checkpoint, validate, resume."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from ._checkpoint import (
    CheckpointError,
    clean_partial,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from ..errors import CodiError
from ..weights import WeightsError, save_adapter, save_unet
from ._config import TrainConfig, TrainConfigError

logger = logging.getLogger("codi_eqx.train")


class TrainingError(CodiError, RuntimeError):
    """Training stopped on a failure (a non-finite loss, ...); the message says what to do."""


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- checks before any work -------------------------------------------------------------------


@dataclass
class Plan:
    """What the checks resolved: the model folder, the dataset, the batch and step counts."""

    model_path: Path
    vae_factor: int
    dataset: Any
    num_devices: int
    global_batch_size: int
    steps_per_epoch: Optional[int]
    max_train_steps: int
    prediction_type: str
    notes: list[str]

    def describe(self, config: TrainConfig) -> dict:
        return {
            "config": config.to_dict(),
            "model_path": str(self.model_path),
            "vae_scale_factor": self.vae_factor,
            "dataset": type(self.dataset).__name__,
            "dataset_size": None if self.steps_per_epoch is None else len(self.dataset),
            "conditioned": bool(self.dataset.conditioned),
            "num_devices": self.num_devices,
            "global_batch_size": self.global_batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "max_train_steps": self.max_train_steps,
            "prediction_type": self.prediction_type,
        }


def _vae_factor(root: Path) -> int:
    try:
        vae = json.loads((root / "vae" / "config.json").read_text())
        return 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return 8


def plan(config: TrainConfig) -> Plan:
    """Check everything that can be checked before loading weights: the model folder, the
    resolution against the VAE's factor, the dataset and its columns, the batch over the
    devices. Raises `TrainConfigError` (one line) on the first problem."""
    import jax

    from .._pipeline import resolve_model_path
    from ..data import DataError, open_dataset

    notes = []
    try:
        root = resolve_model_path(config.pretrained_model_name_or_path)
    except WeightsError as e:
        raise TrainConfigError(f"--pretrained_model_name_or_path: {e}") from None
    if not root.is_dir():
        raise TrainConfigError(f"--pretrained_model_name_or_path {root}: not a model directory")
    local_model = Path(config.pretrained_model_name_or_path).exists()
    if config.from_pt:
        notes.append("note: --from_pt ignored (weights are read from safetensors whatever "
                     "framework wrote them)")
    if config.revision and local_model:
        notes.append(f"note: --revision {config.revision} ignored (the model is a local folder)")
    data_location = config.train_data_dir or config.dataset_name or ""
    if config.cache_dir and (config.train_data_dir or Path(data_location).exists()):
        notes.append(f"note: --cache_dir {config.cache_dir} unused (the dataset is a local folder)")
    factor = _vae_factor(root)
    try:
        model_pred = json.loads((root / "scheduler" / "scheduler_config.json").read_text()).get(
            "prediction_type", "epsilon")
    except (OSError, json.JSONDecodeError):
        model_pred = "epsilon"
    from ..diffusion import resolve_prediction_type

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            prediction_type = resolve_prediction_type(
                model_pred, config.onestepode_sample_eps, config.force_prediction_type)
        except ValueError as e:
            raise TrainConfigError(f"--onestepode_sample_eps: {e}") from None
    notes += [f"warning: --onestepode_sample_eps: {w.message} (--force_prediction_type)"
              for w in caught]
    try:
        import numpy as np

        from ..diffusion import betas_from_config, check_epsilon_timesteps

        sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        abar = np.cumprod(1.0 - betas_from_config(sched))
    except (OSError, json.JSONDecodeError, ValueError, KeyError):
        abar = None
    if abar is not None:
        try:  # the grid's top timestep is T - 1 (the controlnet objective draws all of them)
            check_epsilon_timesteps(abar, [abar.size - 1], prediction_type)
        except ValueError as e:
            raise TrainConfigError(f"the model's noise schedule: {e}") from None
    if config.resolution % factor:
        lo = config.resolution // factor * factor
        raise TrainConfigError(
            f"--resolution {config.resolution} is not divisible by the VAE factor {factor} "
            f"(try {max(lo, factor)} or {lo + factor})")
    try:
        dataset = open_dataset(config.data_config())
    except DataError as e:
        raise TrainConfigError(str(e)) from None
    if config.distill_type == "conditional" and not dataset.conditioned:
        raise TrainConfigError(
            "the dataset has no condition image column: give --conditioning_image_column, "
            "or --distill_type unconditional")
    n_dev = jax.device_count()
    gbs = config.train_batch_size * n_dev * config.gradient_accumulation_steps
    if gbs % jax.process_count():
        raise TrainConfigError(f"the global batch {gbs} does not divide over "
                               f"{jax.process_count()} processes")
    from ..data import TarShards

    steps_per_epoch = None if isinstance(dataset, TarShards) else len(dataset) // gbs
    if steps_per_epoch == 0:
        raise TrainConfigError(
            f"the dataset has {len(dataset)} examples, fewer than one global batch of {gbs} "
            f"(--train_batch_size {config.train_batch_size} x {n_dev} devices x "
            f"--gradient_accumulation_steps {config.gradient_accumulation_steps})")
    if config.max_train_steps is not None:
        max_steps = config.max_train_steps
    elif steps_per_epoch is not None:
        max_steps = config.num_train_epochs * steps_per_epoch
    else:
        raise TrainConfigError("streamed tar shards have no known length: give --max_train_steps")
    for image in config.validation_image:
        if not Path(image).is_file():
            raise TrainConfigError(f"--validation_image {image}: no such file")
        try:
            from PIL import Image

            with Image.open(image) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            raise TrainConfigError(f"--validation_image {image}: not a readable image "
                                   f"({type(e).__name__}: {e})") from None
    p = Plan(root, factor, dataset, n_dev, gbs, steps_per_epoch, max_steps, prediction_type,
             notes)
    if config.cache_latents:
        cache_dir = Path(config.cache_latents)
        if cache_dir.exists() and not cache_dir.is_dir():
            raise TrainConfigError(f"--cache_latents {cache_dir}: not a folder")
        if (cache_dir / "cache.json").exists():
            _open_cache(config, p)  # refuses a cache made for something else; writes nothing
    return p


# --- the compiled step, shared by runs of the same options --------------------------------------

# Least recently used first. Bounded: every compiled executable holds host memory and a few
# memory mappings (on CPU), which a long-lived process must not accumulate without end.
_STEPS: "collections.OrderedDict" = collections.OrderedDict()
_MAX_STEPS = 4


def _compiled_step(distill_cfg, optim_cfg, accum: int, mesh):
    """`(tx, train_step)`, cached so that runs with the same options in one process (a resume,
    tests, notebooks) reuse one compilation; the `_MAX_STEPS` most recently used are kept."""
    from ..distill import lr_schedule, make_optimizer, make_train_step

    key = (distill_cfg, optim_cfg, accum, tuple(d.id for d in mesh.devices.flat))
    if key in _STEPS:
        _STEPS.move_to_end(key)
    else:
        tx = make_optimizer(optim_cfg)
        step = make_train_step(distill_cfg, mesh, gradient_accumulation_steps=accum,
                               ema_decay=optim_cfg.ema_decay, lr_fn=lr_schedule(optim_cfg))
        _STEPS[key] = (tx, step)
        while len(_STEPS) > _MAX_STEPS:
            _STEPS.popitem(last=False)
    return _STEPS[key]


# --- the latent cache ----------------------------------------------------------------------------


class _Encoders:
    """The frozen VAE encoder and text encoder as batched jitted functions for the latent
    cache's misses. Inputs are padded to the loader's batch size, so each compiles once."""

    def __init__(self, pipe, batch_size: int):
        import equinox as eqx
        import jax
        import jax.numpy as jnp

        self.pipe, self.batch_size = pipe, batch_size
        self.images = self.captions = 0
        dtype = pipe.vae.encoder.conv_in.weight.dtype

        def posterior(vae, x):
            def one(im):
                post = vae.encode(im.astype(dtype))
                return post.mean.astype(jnp.float32), post.logvar.astype(jnp.float32)
            return jax.vmap(one)(x)

        def texts(text_encoder, ids):
            return jax.vmap(text_encoder)(ids).astype(jnp.float32)

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

    def encode_texts(self, captions: list) -> np.ndarray:
        import jax

        n = len(captions)
        ids = np.asarray(self.pipe.tokenize(list(captions) + [""] * (self._pad(n) - n)))
        with jax.numpy_dtype_promotion("standard"):
            emb = jax.device_get(self._texts(self.pipe.text_encoder, ids))
        self.captions += n
        return emb[:n]


def _open_cache(config: TrainConfig, p: Plan):
    """The `LatentCache` of `--cache_latents` (None without it); a cache made for another
    dataset, resolution, model or precision is a usage error."""
    if not config.cache_latents:
        return None
    from ..data import DataError, LatentCache

    encoder = f"{p.model_path.resolve()}|{config.dtype_name}"
    try:
        return LatentCache(config.cache_latents, fingerprint=p.dataset.fingerprint,
                           resolution=config.resolution, encoder=encoder)
    except DataError as e:
        raise TrainConfigError(f"--cache_latents: {e}") from None
    except OSError as e:
        raise TrainConfigError(f"--cache_latents {config.cache_latents}: {e}") from None


# --- metrics and trackers ------------------------------------------------------------------------


class _Metrics:
    """`metrics.jsonl` (always, process 0) and tensorboard / wandb where asked and installed."""

    def __init__(self, config: TrainConfig, output_dir: Path, resume_step: Optional[int],
                 main: bool):
        self.main = main
        self.path = output_dir / "metrics.jsonl"
        self.writers: list = []
        if not main:
            return
        rows = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if int(row.get("step", 0)) <= resume_step:
                    rows.append(line)
        self.path.write_text("".join(line + "\n" for line in rows))
        self.file = open(self.path, "a")
        wanted = {"all": ("tensorboard", "wandb")}.get(config.report_to or "none",
                                                      (config.report_to,))
        if "tensorboard" in wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError:
                    SummaryWriter = None
            if SummaryWriter is None:
                _note("note: --report_to tensorboard: tensorboard is not installed "
                      "(pip install tensorboardX); metrics go to metrics.jsonl only")
            else:
                tb = SummaryWriter(str(output_dir / "logs"))
                self.writers.append(("tensorboard", tb))
        if "wandb" in wanted:
            try:
                import wandb
            except ImportError:
                _note("note: --report_to wandb: wandb is not installed; metrics go to "
                      "metrics.jsonl only")
            else:
                run = wandb.init(project="codi-eqx", config=config.to_dict(),
                                 dir=str(output_dir), resume="allow")
                self.writers.append(("wandb", run))

    def log(self, row: dict) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for kind, w in self.writers:
            if kind == "tensorboard":
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        w.add_scalar(f"train/{k}", v, row["step"])
            else:
                w.log(row, step=row["step"])

    def log_images(self, name: str, grid: np.ndarray, step: int) -> None:
        for kind, w in self.writers:
            if kind == "tensorboard":
                w.add_image(name, grid, step, dataformats="HWC")
            else:
                import wandb

                w.log({name: wandb.Image(grid)}, step=step)

    def close(self) -> None:
        if not self.main:
            return
        self.file.close()
        for kind, w in self.writers:
            w.close() if kind == "tensorboard" else w.finish()


# --- validation images ---------------------------------------------------------------------------


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def _validate(config: TrainConfig, pipe, ema, settings, step: int, out: Path,
              metrics: _Metrics, first: bool) -> None:
    """Samples of the EMA adapter for each validation prompt (one row of
    `num_validation_images` per prompt) with the sampler and settings it is trained for
    (`settings`, an `AdapterSettings`: few CoDi steps, or DDIM for the `controlnet`
    objective), and the teacher's DDIM samples at the first one."""
    import dataclasses

    import jax

    from ..data import image_to_array
    from ..sampling import generate, image_grid

    prompts = list(config.validation_prompt)
    control = None
    if config.distill_type == "conditional":
        images = [image_to_array(Path(p).read_bytes(), config.resolution, signed=False)
                  for p in config.validation_image]
        if len(images) == 1:
            images = images * len(prompts)
        control = np.stack([im.transpose(1, 2, 0) for im in images])
    sample_pipe = dataclasses.replace(pipe, unet=ema.unet) if ema.unet is not None else pipe
    common = dict(control_images=control, seed=config.seed,
                  num_images_per_prompt=config.num_validation_images,
                  height=config.resolution, width=config.resolution)
    out.mkdir(parents=True, exist_ok=True)
    with jax.numpy_dtype_promotion("standard"):  # see the step call in `train`
        imgs = generate(sample_pipe, ema.adapter, prompts, settings=settings,
                        steps=config.validation_inference_steps, **common)
    grid = image_grid(np.asarray(imgs), config.num_validation_images)
    _write_png(out / f"step-{step:07d}.png", grid)
    metrics.log_images(f"validation/{settings.sampler}", grid, step)
    if first and not (out / "teacher-ddim.png").exists():
        with jax.numpy_dtype_promotion("standard"):
            teacher = generate(pipe, ema.adapter if control is not None else None, prompts,
                               sampler="ddim", steps=50, **common)
        tgrid = image_grid(np.asarray(teacher), config.num_validation_images)
        _write_png(out / "teacher-ddim.png", tgrid)
        metrics.log_images("validation/teacher_ddim", tgrid, step)


# --- the loop ------------------------------------------------------------------------------------


def _adapter_settings(config: TrainConfig, p: Plan, model_prediction_type: str):
    """The `AdapterSettings` this run records in the adapters it saves."""
    from .._adapter_settings import AdapterSettings

    given = config.pretrained_model_name_or_path
    return AdapterSettings(
        objective=config.objective, distill_learning_steps=config.distill_learning_steps,
        distill_timestep_scaling=config.distill_timestep_scaling,
        prediction_type=p.prediction_type,
        prediction_type_forced=p.prediction_type != model_prediction_type,
        cfg_aware_distill=config.cfg_aware_distill,
        distill_guidance_min=config.distill_guidance_min,
        distill_guidance_max=config.distill_guidance_max, distill_type=config.distill_type,
        base_model=str(Path(given).resolve()) if Path(given).exists() else given,
    )


class _Stop:
    """SIGINT / SIGTERM set a flag that the loop reads after each step (a second signal of the
    same kind acts as it would without the handler)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.old: dict = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def train(config: TrainConfig, *, progress: Any = None,
          on_plan: Optional[Callable[[Plan], None]] = None,
          checked: Optional[Plan] = None) -> dict:
    """Train the adapter as `config` says (CoDi distillation, or the `controlnet`
    objective); returns a summary dict (`step`, `loss`, `output_dir`, `interrupted` (the
    signal number or None), `skipped_images`, `checkpoint`).

    `progress`: a rich `Progress` (or None for no bar). `checked`: the `plan(config)` already
    made by the caller (made here when None). Raises `TrainConfigError` for bad
    options or inputs (before any work), `CheckpointError` for an unreadable checkpoint, and
    `TrainingError` when the loss stops being finite."""
    import jax
    import jax.numpy as jnp

    from .._pipeline import load_pipeline
    from ..data import DataLoader
    from ..distill import Trainable, init_train_state, make_frozen
    from ..models import ControlNetModel
    from ..parallel import is_main_process, make_mesh, replicate, shard_batch

    p = plan(config) if checked is None else checked
    for line in p.notes:
        _note(line)
    cache = _open_cache(config, p)
    if on_plan is not None:
        on_plan(p)
    main = is_main_process()
    out = Path(config.output_dir)
    resume_path = None
    if config.resume_from_checkpoint:
        resume_path = resolve_checkpoint(config.resume_from_checkpoint, out)
        if resume_path is None:
            _note(f"note: no checkpoint in {out / 'checkpoints'} yet; starting afresh")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        clean_partial(out)

    # Model, adapter, state.
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[
        config.dtype_name]
    pipe = load_pipeline(p.model_path, dtype=dtype, remat=config.gradient_checkpointing)
    settings = _adapter_settings(config, p, pipe.prediction_type)
    distill_cfg = config.distill_config(p.prediction_type)
    optim_cfg = config.optim_config(p.global_batch_size, p.max_train_steps)
    mesh = make_mesh()
    tx, train_step = _compiled_step(distill_cfg, optim_cfg, config.gradient_accumulation_steps, mesh)
    key = jax.random.PRNGKey(config.seed)
    adapter_key, state_key = jax.random.split(key)
    adapter = ControlNetModel.from_unet(
        pipe.unet, conditioning_channels=3 if config.distill_type == "conditional" else None,
        vae_scale_factor=pipe.vae_scale_factor, key=adapter_key)
    # Full CoDi trains a float32 copy of the UNet (`init_train_state`); the pretrained one
    # stays in `Frozen` only where the step reads it (the `uncontrol` teacher).
    params = Trainable(adapter, unet=pipe.unet if config.full_codi else None)
    frozen = make_frozen(pipe.unet if distill_cfg.needs_frozen_unet else None, pipe.vae,
                         pipe.text_encoder, pipe.schedule, null_input_ids=pipe.tokenize([""])[0])
    if cache is not None:
        # The step reads cached latents / embeddings: it never sees the encoders.
        frozen = make_frozen(frozen.unet, None, None, frozen.schedule,
                             null_embedding=frozen.null_embedding)
    state = init_train_state(params, tx, key=state_key)
    del adapter, params

    loader = DataLoader(
        p.dataset, global_batch_size=p.global_batch_size, resolution=config.resolution,
        seed=config.seed, proportion_empty_prompts=config.proportion_empty_prompts,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=config.dataloader_num_workers, strict=config.strict)
    encoders = None
    if cache is not None:
        encoders = _Encoders(pipe, loader.local_batch_size)
        scaling = float(pipe.vae.scaling_factor)
        shift = pipe.vae.shift_factor

    def to_step_batch(raw: dict) -> dict:
        """The step's batch: cached encoder outputs with --cache_latents (misses encoded and
        stored), else pixels and token ids (the step encodes them)."""
        if cache is None:
            batch = {"pixel_values": raw["pixel_values"],
                     "input_ids": np.asarray(pipe.tokenize(raw["caption"]))}
        else:
            enc = cache.encode(raw, encoders.encode_images, encoders.encode_texts)
            mean = enc["latent_mean"]
            if shift is not None:  # (z - shift) * scaling == (mean - shift + std eps) * scaling
                mean = mean - np.float32(shift)
            batch = {"latent_mean": mean, "latent_logvar": enc["latent_logvar"],
                     "scaling_factor": np.full((len(mean),), scaling, np.float32),
                     "text_embeddings": enc["text_embeddings"]}
        if config.distill_type == "conditional":
            batch["conditioning_pixel_values"] = raw["conditioning_pixel_values"]
        return batch

    start = 0
    if resume_path is not None:
        state, data_state, _ = load_checkpoint(resume_path, state)
        loader.load_state_dict(data_state)
        start = int(state.step)
        _note(f"resuming from {resume_path} (step {start})")
    frozen = replicate(frozen, mesh)
    state = replicate(state, mesh)
    metrics_log = _Metrics(config, out, start if resume_path is not None else None, main)

    def checkpoint(step: int) -> Path:
        return save_checkpoint(out, step, state, adapter=state.ema.adapter,
                               data_state=loader.state_dict(), config=config.to_dict(),
                               total_limit=config.checkpoints_total_limit,
                               adapter_config=settings.config_entry())

    step, loss, last_ckpt = start, float("nan"), latest_checkpoint(out)
    validated = False
    task = None
    if progress is not None:
        task = progress.add_task("training", total=p.max_train_steps, completed=start, info="")
    it = iter(loader)
    t0, window, window_t = time.perf_counter(), 0, 0.0
    try:
        with _Stop() as stop:
            while step < p.max_train_steps and stop.signum is None:
                epoch = loader.state_dict()["epoch"]
                raw = next(it)
                batch = to_step_batch(raw)
                if config.debug_nan_at_step == step + 1:
                    first = "latent_mean" if cache is not None else "pixel_values"
                    batch[first] = batch[first] * np.float32("nan")
                # Promotion mode is a trace-time setting: the library's code is explicit about
                # dtypes, but JAX's own bf16 attention backward mixes bf16 and f32, which a
                # user's strict mode would refuse.
                with jax.numpy_dtype_promotion("standard"):
                    state, metrics = train_step(frozen, state, shard_batch(batch, mesh))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                step += 1
                t1 = time.perf_counter()
                dt, t0 = t1 - t0, t1
                window, window_t = window + 1, window_t + dt
                loss = metrics["loss"]
                if not math.isfinite(loss) or not math.isfinite(metrics["grad_norm"]):
                    kept = (f"the last good checkpoint, {last_ckpt}, is untouched: resume with "
                            "--resume_from_checkpoint latest" if last_ckpt else
                            "no checkpoint was written yet")
                    raise TrainingError(
                        f"non-finite loss at step {step} (loss {loss}, grad_norm "
                        f"{metrics['grad_norm']}); training stopped, {kept} (a lower "
                        "--learning_rate or --mixed_precision no may help)")
                eps = p.global_batch_size / dt
                if step % config.logging_steps == 0 or step == p.max_train_steps:
                    metrics_log.log({
                        "step": step, "epoch": epoch,
                        # The controlnet objective has no consistency / regulariser terms
                        # and no guidance scale (`distill.metric_names`).
                        **{k: metrics[k] for k in ("loss", "loss_consistency",
                                                   "loss_regularizer", "grad_norm", "lr",
                                                   "timestep", "guidance_scale")
                           if k in metrics},
                        "examples_per_sec": p.global_batch_size * window / window_t,
                        "skipped_images": loader.skipped,
                    })
                    window, window_t = 0, 0.0
                if task is not None:
                    progress.update(task, completed=step, info=f"loss {loss:.4f}  {eps:.1f} ex/s")
                if step % config.checkpointing_steps == 0 and main:
                    last_ckpt = checkpoint(step)
                if config.validation_prompt and step % config.validation_steps == 0 and main:
                    _validate(config, pipe, state.ema, settings, step, out / "validation",
                              metrics_log, first=not validated)
                    validated = True
                if config.debug_signal_at_step == step:
                    os.kill(os.getpid(), getattr(signal, config.debug_signal))
            interrupted = stop.signum
        if interrupted is not None and main and not (
                last_ckpt is not None and last_ckpt.name == f"checkpoint-{step}"):
            last_ckpt = checkpoint(step)
        if interrupted is None and main:
            tmp = out / f".adapter.tmp-{os.getpid()}"
            save_adapter(state.ema.adapter, tmp, extra_config=settings.config_entry())
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
            shutil.rmtree(tmp, ignore_errors=True)
            if state.ema.unet is not None:
                save_unet(state.ema.unet, out / "unet")
            if config.validation_prompt and step % config.validation_steps:
                _validate(config, pipe, state.ema, settings, step, out / "validation",
                          metrics_log, first=not validated)
    finally:
        it.close()  # stops the loader's background workers
        metrics_log.close()
        if loader.skipped:
            _note(f"note: skipped {loader.skipped} unreadable image(s), e.g. "
                  f"{', '.join(loader.skipped_names[:3])}")
        if encoders is not None:
            _note(f"note: latent cache {config.cache_latents}: encoded {encoders.images} "
                  f"image(s) and {encoders.captions} caption(s) in this run")
    return {"step": step, "loss": loss, "output_dir": str(out), "interrupted": interrupted,
            "skipped_images": loader.skipped,
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            "encoded_images": None if encoders is None else encoders.images,
            "encoded_captions": None if encoders is None else encoders.captions}


__all__ = ["CheckpointError", "Plan", "TrainingError", "plan", "train"]
