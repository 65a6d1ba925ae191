"""Where the built-in default lives: the shapes teacher (a diffusers-format model directory)
and its two CoDi adapters, shipped inside the package."""

from __future__ import annotations

from pathlib import Path

from .._atomic import atomic_path
from ..errors import UsageError

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
ADAPTERS = {"edges": "adapter-edges", "text": "adapter-text"}
"""The shipped adapters: `edges` (condition image: the shapes' outlines) and `text` (no
condition image: text-to-image acceleration)."""


class BuiltinMissingError(UsageError, FileNotFoundError):
    """The built-in weights are not in this installation."""


def _check(path: Path, what: str) -> Path:
    if not (path / "config.json").exists() and not (path / "model_index.json").exists():
        raise BuiltinMissingError(
            f"the built-in {what} is missing from {path.parent}: reinstall codi-eqx, or "
            "rebuild it with `codi pretrain-toy` (see the README)")
    return path


def builtin_teacher() -> Path:
    """The shapes teacher: a diffusers-format Stable Diffusion directory."""
    return _check(BUILTIN_DIR / "teacher", "teacher")


def builtin_adapter(kind: str = "edges") -> Path:
    """A shipped CoDi adapter distilled from the teacher: `edges` or `text`."""
    if kind not in ADAPTERS:
        raise ValueError(f"unknown built-in adapter {kind!r}: one of {', '.join(ADAPTERS)}")
    return _check(BUILTIN_DIR / ADAPTERS[kind], f"{kind} adapter")


TOY_TRAIN_DEFAULTS = dict(
    resolution=64, train_batch_size=8, learning_rate=1e-4, max_train_steps=400,
    ema_decay=0.95, checkpointing_steps=400, validation_steps=400, num_validation_images=2,
    onestepode_cfg=True, distill_guidance_min=4.0, distill_guidance_max=4.0,
)
"""`codi train`'s defaults when it distils the built-in teacher (no model and no data
given): the seed's defaults are for Stable Diffusion at 512x512. The teacher's one-step ODE
is guided at w = 4 (`onestepode_cfg`), so that the student follows the guided teacher in a
single pass per step (the unguided teacher follows its captions less well); give
`--distill_guidance_min 1 --distill_guidance_max 1` for an unguided teacher step."""

SHIPPED_RECIPES = {
    "edges": dict(max_train_steps=1500),
    "text": dict(max_train_steps=1500, distill_type="unconditional"),
}
"""How the shipped adapters were trained: `TOY_TRAIN_DEFAULTS` with these changes, e.g.
`codi train --max_train_steps 1500 --output_dir edges` (seed 0)."""

TOY_TRAIN_IMAGES = 2000
"""Scenes drawn for a default run (fresh for each seed)."""


def prepare_builtin_run(output_dir: str | Path, *, seed: int = 0, num_images: int = TOY_TRAIN_IMAGES,
                        num_validation: int = 2) -> dict:
    """Data for a `codi train` run on the built-in teacher: `num_images` training scenes
    in `output_dir/shapes-data` (reused when already there) and `num_validation` held-out
    scenes as validation prompts and edge maps. Returns the `TrainConfig` fields to set."""
    from . import _shapes

    out = Path(output_dir)
    data = out / "shapes-data"
    if not (data / "meta.jsonl").exists():
        with atomic_path(data, is_dir=True) as tmp:
            _shapes.write_dataset(tmp, num_images, seed=seed, split="train")
    val = out / "shapes-validation"
    prompts, images = [], []
    val.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, scene in enumerate(_shapes.scenes(seed, num_validation, "heldout")):
        path = val / f"edges_{i}.png"
        Image.fromarray(_shapes.render(scene)[1]).save(path)
        prompts.append(scene.caption)
        images.append(str(path))
    return dict(pretrained_model_name_or_path=str(builtin_teacher()), train_data_dir=str(data),
                validation_prompt=tuple(prompts), validation_image=tuple(images))
