"""`codi convert-weights`: models into this project's fast-loading format, adapters out to
diffusers' and the original ControlNet formats (the work is `weights_conversion.convert`)."""

from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ._common import note, progress, reported_errors


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Target(str, Enum):
    diffusers = "diffusers"
    single_file = "single-file"
    original = "original"


def convert_weights(
    source: str = typer.Argument(
        ..., help="A diffusers model directory, a Hugging Face Hub id in the local cache, an "
        "original single-file checkpoint (.safetensors; .ckpt/.bin with --allow-pickle), a "
        "diffusers ControlNet folder or original ControlNet file, or a trained adapter "
        "(adapter folder or training output directory).",
        show_default=False,
    ),
    output: Path = typer.Argument(
        ..., help="Where to write: a model directory in this project's format (loads fastest), "
        "an adapter folder, or with --to the exported ControlNet.", show_default=False,
    ),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Parameter dtype of the output."),
    to: Optional[Target] = typer.Option(
        None, "--to", help="Export an adapter / ControlNet: `diffusers` (a ControlNetModel "
        "folder for diffusers, ComfyUI, A1111) or `single-file` / `original` (one "
        ".safetensors in the original control_model.* layout). For a whole model, `diffusers` "
        "writes a plain diffusers directory.", show_default=False,
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Read .bin / .ckpt pickle files (torch, weights_only=True)."
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", help="For a single-file SOURCE: a diffusers unet/config.json (or "
        "ControlNet config.json), or a diffusers model directory whose unet/, vae/, "
        "text_encoder/ (SDXL: and text_encoder_2/) configs, tokenizer/ (tokenizer_2/) and "
        "scheduler/ are used instead of the inferred ones.",
        show_default=False,
    ),
) -> None:
    """Convert model weights: into this project's format (safetensors only, one file per
    component in the target dtype, a codi_eqx.json manifest), or export an adapter."""
    with reported_errors():
        _convert(source, Path(output), dtype, to, overwrite, allow_pickle, config)


def _convert(source: str, output: Path, dtype: Dtype, to: Optional[Target], overwrite: bool,
             allow_pickle: bool, config: Optional[Path]) -> None:
    from weights_conversion.convert import convert

    # The bar starts with the work, once every check on the arguments has passed.
    with contextlib.ExitStack() as stack:
        bar, task = None, None

        def advance(completed: int, total: int, info: str) -> None:
            nonlocal bar, task
            if bar is None:
                bar = stack.enter_context(progress())
                task = bar.add_task("convert", total=total, info=info)
            bar.update(task, completed=completed, total=total, info=info)

        done = convert(source, output, to=None if to is None else to.value, config=config,
                       dtype=dtype.value, allow_pickle=allow_pickle, overwrite=overwrite,
                       progress=advance)
    if not done.adapter and not done.tokenizer:
        wanted = ["tokenizer"] + (["tokenizer_2"] if (output / "text_encoder_2").is_dir() else [])
        missing = [name for name in wanted if not (output / name).is_dir()]
        folders = " and ".join(f"{output / name}" for name in missing)
        note(f"note: {output} has no {'/, '.join(missing)}/ (single-file checkpoints carry "
             f"none): copy the model family's CLIP tokenizer folders to {folders} (or convert "
             "with --config DIR, a diffusers model directory that has them) before loading it")
