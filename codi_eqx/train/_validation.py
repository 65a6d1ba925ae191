"""Validation grids: samples of the EMA adapter for each validation prompt, and the teacher's
DDIM samples beside them at the first validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .._atomic import atomic_path
from ._config import TrainConfig
from ._metrics import Metrics


def write_png(path: Path, image: np.ndarray) -> None:
    """Write `image` (H, W, 3) uint8 atomically (a temporary name, then a rename)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


class Validation:
    """Validation grids in `out` (one row of `num_validation_images` per prompt), sampled
    with the sampler and settings the adapter is trained for (`settings`, an
    `AdapterSettings`: few CoDi steps, or DDIM for the `controlnet` objective); the first
    grid also gets the teacher's (`teacher-ddim.png`)."""

    def __init__(self, config: TrainConfig, pipe, settings, out: Path, metrics: Metrics):
        self.config, self.pipe, self.settings = config, pipe, settings
        self.out, self.metrics = out, metrics
        self.done = False

    @property
    def enabled(self) -> bool:
        return bool(self.config.validation_prompt)

    def due(self, step: int) -> bool:
        """Whether step `step` has a validation grid (every `validation_steps`)."""
        return self.enabled and step % self.config.validation_steps == 0

    def __call__(self, ema, step: int) -> None:
        """The grid of `ema` (the EMA `Trainable`) at `step`."""
        import jax

        from ..data import image_to_array
        from ..sampling import generate, image_grid

        config = self.config
        prompts = list(config.validation_prompt)
        control = None
        if config.distill_type == "conditional":
            images = [image_to_array(Path(p).read_bytes(), config.resolution, signed=False)
                      for p in config.validation_image]
            if len(images) == 1:
                images = images * len(prompts)
            control = np.stack([im.transpose(1, 2, 0) for im in images])
        pipe = self.pipe
        sample_pipe = dataclasses.replace(pipe, unet=ema.unet) if ema.unet is not None else pipe
        common = {"control_images": control, "seed": config.seed,
                  "num_images_per_prompt": config.num_validation_images,
                  "height": config.resolution, "width": config.resolution}
        self.out.mkdir(parents=True, exist_ok=True)
        with jax.numpy_dtype_promotion("standard"):  # see `_Run.step` in `_loop`
            imgs = generate(sample_pipe, ema.adapter, prompts, settings=self.settings,
                            steps=config.validation_inference_steps, **common)
        grid = image_grid(np.asarray(imgs), config.num_validation_images)
        write_png(self.out / f"step-{step:07d}.png", grid)
        self.metrics.log_images(f"validation/{self.settings.sampler}", grid, step)
        if not self.done and not (self.out / "teacher-ddim.png").exists():
            with jax.numpy_dtype_promotion("standard"):
                teacher = generate(pipe, ema.adapter if control is not None else None, prompts,
                                   sampler="ddim", steps=50, **common)
            tgrid = image_grid(np.asarray(teacher), config.num_validation_images)
            write_png(self.out / "teacher-ddim.png", tgrid)
            self.metrics.log_images("validation/teacher_ddim", tgrid, step)
        self.done = True
