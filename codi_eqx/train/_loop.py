"""The training loop of `codi train`: plan, load, build the state, then for each step
batch -> step -> log -> checkpoint -> validate; on a signal, checkpoint and stop; at the end,
the final adapter."""

from __future__ import annotations

import collections
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._tree import FLOAT_DTYPES
from ..errors import CodiError
from ..weights import save_adapter, save_unet
from ._batches import StepBatches, open_cache
from ._checkpoint import (
    clean_partial,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from ._config import TrainConfig
from ._metrics import Metrics, Throughput, metrics_row, note
from ._plan import Plan, adapter_settings, plan, with_model_defaults
from ._signals import StopOnSignal
from ._validation import Validation


class TrainingError(CodiError, RuntimeError):
    """Training stopped on a failure (a non-finite loss, ...); the message says what to do."""


@dataclass(frozen=True)
class TrainHooks:
    """Calls into a running `train`, for tests and tools (none changes a run by default).

    - `on_plan(plan)`: once, with the `Plan`, before any weights are loaded.
    - `on_batch(step, batch) -> batch`: the step's batch (`step` 1-based, the step about to
      run), which the returned batch replaces.
    - `after_step(step)`: after step `step` is logged, checkpointed and validated (a signal
      sent here stops the run as a user's would).
    """

    on_plan: Callable[[Plan], None] | None = None
    on_batch: Callable[[int, dict], dict] | None = None
    after_step: Callable[[int], None] | None = None


def train(config: TrainConfig, *, progress: Any = None, checked: Plan | None = None,
          hooks: TrainHooks | None = None) -> dict:
    """Train the adapter as `config` says (CoDi distillation, or the `controlnet`
    objective); returns a summary dict (`step`, `loss`, `output_dir`, `interrupted` (the
    signal number or None), `skipped_images`, `checkpoint`, `encoded_images`,
    `encoded_captions`).

    `progress`: a rich `Progress` (or None for no bar). `checked`: the `plan(config)` already
    made by the caller (made here when None). `hooks`: a `TrainHooks`. Raises
    `TrainConfigError` for bad options or inputs (before any work), `CheckpointError` for an
    unreadable checkpoint, and `TrainingError` when the loss stops being finite."""
    from ..parallel import is_main_process

    hooks = hooks or TrainHooks()
    config = with_model_defaults(config)
    p = plan(config) if checked is None else checked
    for line in p.notes:
        note(line)
    cache = open_cache(config, p.model_path, p.dataset.fingerprint)
    if hooks.on_plan is not None:
        hooks.on_plan(p)
    main, out = is_main_process(), Path(config.output_dir)
    resume_path = _resume_path(config, out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        clean_partial(out)

    run = _Run(config, p, cache, out)
    start = run.resume(resume_path) if resume_path is not None else 0
    run.replicate()
    metrics = Metrics(config, out, start if resume_path is not None else None, main)
    validate = Validation(config, run.pipe, run.settings, out / "validation", metrics)
    step, loss, last_ckpt = start, float("nan"), latest_checkpoint(out)
    task = None if progress is None else progress.add_task(
        "training", total=p.max_train_steps, completed=start, info="")
    it, speed = iter(run.loader), Throughput(p.global_batch_size)
    try:
        with StopOnSignal() as stop:
            while step < p.max_train_steps and stop.signum is None:
                epoch = run.loader.state_dict()["epoch"]
                batch = run.batches(next(it))
                if hooks.on_batch is not None:
                    batch = hooks.on_batch(step + 1, batch)
                step_metrics = run.step(batch)
                step, loss = step + 1, step_metrics["loss"]
                speed.tick()
                _check_finite(step, step_metrics, last_ckpt)
                if step % config.logging_steps == 0 or step == p.max_train_steps:
                    metrics.log(metrics_row(step, epoch, step_metrics, speed.window(),
                                            run.loader.skipped))
                if task is not None:
                    progress.update(task, completed=step,
                                    info=f"loss {loss:.4f}  {speed.last:.1f} ex/s")
                if step % config.checkpointing_steps == 0 and main:
                    last_ckpt = run.checkpoint(step)
                if validate.due(step) and main:
                    validate(run.state.ema, step)
                if hooks.after_step is not None:
                    hooks.after_step(step)
            interrupted = stop.signum
        if interrupted is not None and main and not (
                last_ckpt is not None and last_ckpt.name == f"checkpoint-{step}"):
            last_ckpt = run.checkpoint(step)
        if interrupted is None and main:
            run.save_final()
            if validate.enabled and not validate.due(step):
                validate(run.state.ema, step)
    finally:
        it.close()  # stops the loader's background workers
        metrics.close()
        run.report()
    encoders = run.batches.encoders
    return {"step": step, "loss": loss, "output_dir": str(out), "interrupted": interrupted,
            "skipped_images": run.loader.skipped,
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            "encoded_images": None if encoders is None else encoders.images,
            "encoded_captions": None if encoders is None else encoders.captions}


def _resume_path(config: TrainConfig, out: Path) -> Path | None:
    if not config.resume_from_checkpoint:
        return None
    path = resolve_checkpoint(config.resume_from_checkpoint, out)
    if path is None:
        note(f"note: no checkpoint in {out / 'checkpoints'} yet; starting afresh")
    return path


def _check_finite(step: int, metrics: dict, last_ckpt: Path | None) -> None:
    loss = metrics["loss"]
    if math.isfinite(loss) and math.isfinite(metrics["grad_norm"]):
        return
    kept = (f"the last good checkpoint, {last_ckpt}, is untouched: resume with "
            "resume_from_checkpoint latest" if last_ckpt else "no checkpoint was written yet")
    raise TrainingError(
        f"non-finite loss at step {step} (loss {loss}, grad_norm {metrics['grad_norm']}); "
        f"training stopped, {kept} (a lower learning_rate or mixed_precision no may help)")


# --- what a run holds: model, state, step, data ------------------------------------------------


class _Run:
    """The loaded pipeline, the compiled step, the frozen weights and the train state
    (replicated over the mesh), the loader and its step batches, of one run."""

    def __init__(self, config: TrainConfig, p: Plan, cache, out: Path):
        import jax

        from .._pipeline import load_pipeline
        from ..data import DataLoader
        from ..distill import Trainable, init_train_state, make_frozen
        from ..models import ControlNetModel
        from ..parallel import make_mesh

        self.config, self.out = config, out
        dtype = FLOAT_DTYPES[config.dtype_name]
        pipe = self.pipe = load_pipeline(p.model_path, dtype=dtype,
                                         remat=config.gradient_checkpointing)
        self.settings = adapter_settings(config, p, pipe.prediction_type)
        distill_cfg = config.distill_config(p.prediction_type)
        optim_cfg = config.optim_config(p.global_batch_size, p.max_train_steps)
        self.mesh = make_mesh()
        tx, self.train_step = _compiled_step(distill_cfg, optim_cfg,
                                             config.gradient_accumulation_steps, self.mesh)
        adapter_key, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
        adapter = ControlNetModel.from_unet(
            pipe.unet, conditioning_channels=3 if config.distill_type == "conditional" else None,
            vae_scale_factor=pipe.vae_scale_factor, key=adapter_key)
        if distill_cfg.guidance_embedding:
            adapter = adapter.with_guidance_embedding(key=jax.random.fold_in(adapter_key, 1))
        # Full CoDi trains a float32 copy of the UNet (`init_train_state`); the pretrained one
        # stays in `Frozen` only where the step reads it (the `uncontrol` teacher).
        params = Trainable(adapter, unet=pipe.unet if config.full_codi else None)
        frozen = make_frozen(pipe.unet if distill_cfg.needs_frozen_unet else None, pipe.vae,
                             pipe.text_encoders, pipe.schedule,
                             null_input_ids=pipe.tokenize([""])[0])
        if cache is not None:
            # The step reads cached latents / embeddings: it never sees the encoders.
            frozen = make_frozen(frozen.unet, None, None, frozen.schedule,
                                 null_embedding=frozen.null_embedding)
        self.frozen, self.state = frozen, init_train_state(params, tx, key=state_key)
        self.loader = DataLoader(
            p.dataset, global_batch_size=p.global_batch_size, resolution=config.resolution,
            seed=config.seed, proportion_empty_prompts=config.proportion_empty_prompts,
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_workers=config.dataloader_num_workers, strict=config.strict)
        self.batches = StepBatches(config, pipe, cache, self.loader.local_batch_size)

    def resume(self, path: Path) -> int:
        """Continue from the checkpoint at `path`: its state and data position; returns its
        step."""
        state, data_state, _ = load_checkpoint(path, self.state)
        self.state = state
        self.loader.load_state_dict(data_state)
        start = int(state.step)
        note(f"resuming from {path} (step {start})")
        return start

    def replicate(self) -> None:
        """Place the frozen weights and the state on every device of the mesh."""
        from ..parallel import replicate

        self.frozen = replicate(self.frozen, self.mesh)
        self.state = replicate(self.state, self.mesh)

    def step(self, batch: dict) -> dict:
        """One optimiser step on `batch`; returns its metrics as floats."""
        import jax

        from ..parallel import shard_batch

        # Promotion mode is a trace-time setting: the library's code is explicit about dtypes,
        # but JAX's own bf16 attention backward mixes bf16 and f32, which a user's strict mode
        # would refuse.
        with jax.numpy_dtype_promotion("standard"):
            self.state, metrics = self.train_step(self.frozen, self.state,
                                                  shard_batch(batch, self.mesh))
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def checkpoint(self, step: int) -> Path:
        config = self.config
        return save_checkpoint(self.out, step, self.state, adapter=self.state.ema.adapter,
                               data_state=self.loader.state_dict(), config=config.to_dict(),
                               total_limit=config.checkpoints_total_limit,
                               adapter_config=self.settings.config_entry())

    def save_final(self) -> None:
        """The EMA adapter at the top of the output folder (and the EMA UNet in `unet/` in
        full CoDi). The output folder holds the run's other files too, so the adapter is
        written whole into a temporary folder beside them, then each file is renamed into
        place (the temporary folder goes whatever happens)."""
        with tempfile.TemporaryDirectory(prefix=".adapter.tmp-", dir=self.out) as tmp:
            save_adapter(self.state.ema.adapter, tmp, extra_config=self.settings.config_entry())
            for f in sorted(Path(tmp).iterdir()):
                os.replace(f, self.out / f.name)
        if self.state.ema.unet is not None:
            save_unet(self.state.ema.unet, self.out / "unet")

    def report(self) -> None:
        """Notes on what the data side did: skipped images, latent-cache encodings."""
        loader, encoders = self.loader, self.batches.encoders
        if loader.skipped:
            note(f"note: skipped {loader.skipped} unreadable image(s), e.g. "
                 f"{', '.join(loader.skipped_names[:3])}")
        if encoders is not None:
            note(f"note: latent cache {self.config.cache_latents}: encoded {encoders.images} "
                 f"image(s) and {encoders.captions} caption(s) in this run")


# --- the compiled step, shared by runs of the same options --------------------------------------

# Least recently used first. Bounded: every compiled executable holds host memory and a few
# memory mappings (on CPU), which a long-lived process must not accumulate without end.
_STEPS: collections.OrderedDict = collections.OrderedDict()
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


__all__ = ["Plan", "TrainHooks", "TrainingError", "plan", "train"]
