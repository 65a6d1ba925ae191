"""`codi pretrain-toy`: train the built-in shapes teacher from scratch (VAE, text encoder, UNet)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    CodiUsageError,
    CompilationCacheDirOption,
    NoCompilationCacheOption,
    note,
    progress,
    reported_errors,
    use_compilation_cache,
)


def pretrain_toy(
    output_dir: Annotated[Path, typer.Argument(
        help="Where the teacher is written: a diffusers-format Stable Diffusion directory "
             "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights and the data.")] = 0,
    vae_steps: Annotated[int, typer.Option(
        "--vae_steps", "--vae-steps", min=0, help="VAE training steps.")] = 1200,
    unet_steps: Annotated[int, typer.Option(
        "--unet_steps", "--unet-steps", min=1,
        help="Steps of the UNet and text encoder, trained together.")] = 4500,
    compilation_cache_dir: CompilationCacheDirOption = None,
    no_compilation_cache: NoCompilationCacheOption = False,
) -> None:
    """Pretrain the built-in teacher: a small Stable Diffusion (VAE, CLIP text encoder, UNet)
    trained on freshly drawn synthetic shapes with this project's models. The defaults are the
    shipped teacher's recipe (about an hour on a 2-core CPU); the same seed reproduces it.
    An interrupted run continues from its last checkpoint (every 500 steps) when started
    again with the same arguments, and ends with the same weights."""
    with reported_errors():
        if (output_dir / "model_index.json").exists():
            raise CodiUsageError(f"{output_dir} already holds a model: choose another folder")
        use_compilation_cache(compilation_cache_dir, no_compilation_cache)
        from codi_eqx.toy import PretrainConfig, pretrain_teacher

        defaults = PretrainConfig()
        if vae_steps != defaults.vae_steps or unet_steps != defaults.unet_steps:
            note("step counts differ from the shipped teacher's recipe")
        cfg = PretrainConfig(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps)
        with progress() as bar:
            vae_task = bar.add_task("VAE", total=cfg.vae_steps, info="")
            unet_task = bar.add_task("UNet + text encoder", total=cfg.unet_steps, info="")

            def advance(n: int, row: dict) -> None:
                task = vae_task if row["phase"] == "vae" else unet_task
                bar.update(task, advance=n, info=f"loss {row['loss']:.4f}")

            pretrain_teacher(output_dir, cfg, progress=advance, log=note)
        note(f"wrote the teacher to {output_dir}")
