"""`codi demo`: the whole job on a built-in tiny model and synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    CodiError,
    CodiUsageError,
    CompilationCacheDirOption,
    NoCompilationCacheOption,
    atomic_path,
    note,
    progress,
    reported_errors,
    use_compilation_cache,
)


def demo(
    output_dir: Annotated[Path, typer.Argument(
        help="Where the demo writes: model/ (a tiny random SD model), dataset/ (coloured shapes "
             "with their outlines as condition images), run/ (the training output) and "
             "samples.png.")] = Path("codi-demo"),
    max_train_steps: Annotated[int, typer.Option(
        "--max_train_steps", "--max-train-steps", min=1,
        help="Training steps (each compiles nothing new after the first).")] = 20,
    steps: Annotated[int, typer.Option(
        "--steps", min=1, help="CoDi sampling steps for samples.png.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the model, data, training and sampling.")] = 0,
    compilation_cache_dir: CompilationCacheDirOption = None,
    no_compilation_cache: NoCompilationCacheOption = False,
) -> None:
    """Run the whole job on a built-in default: make a tiny random Stable Diffusion model and
    a small edge-to-image dataset, distil it with CoDi for a few steps, then sample with the
    trained adapter. Offline, on a CPU, in a few minutes; it shows every piece working, not
    good images (the model's weights are random)."""
    with reported_errors():
        _run(output_dir, max_train_steps, steps, seed, compilation_cache_dir,
             no_compilation_cache)


def _run(out: Path, max_train_steps: int, steps: int, seed: int,
         cache_dir: Optional[Path], no_cache: bool) -> None:
    import numpy as np
    from PIL import Image

    from codi_eqx import load_adapter, load_pipeline
    from codi_eqx.demo import make_demo_dataset, make_demo_model
    from codi_eqx.sampling import generate, image_grid
    from codi_eqx.train import TrainConfig, TrainConfigError, TrainingError, plan, train

    if (out / "run").exists():
        raise CodiUsageError(f"{out / 'run'} exists: choose another OUTPUT_DIR or remove it")
    use_compilation_cache(cache_dir, no_cache)  # before the model is made (that compiles)
    note(f"making a tiny random model in {out / 'model'} and a dataset in {out / 'dataset'}")
    model = make_demo_model(out / "model", seed=seed)
    data = make_demo_dataset(out / "dataset", seed=seed)
    config = TrainConfig(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data),
        output_dir=str(out / "run"), resolution=64, train_batch_size=1,
        max_train_steps=max_train_steps, checkpointing_steps=max_train_steps,
        learning_rate=1e-4, ema_decay=0.9, seed=seed,
    )
    try:
        checked = plan(config)
        note("training (the first step compiles the model; later steps are fast)")
        with progress() as bar:
            summary = train(config, progress=bar, checked=checked)
    except TrainConfigError as e:
        raise CodiUsageError(str(e)) from None
    except TrainingError as e:
        raise CodiError(str(e)) from None
    note(f"trained {summary['step']} steps (loss {summary['loss']:.4f}); adapter in {out / 'run'}")

    pipe = load_pipeline(model)
    adapter = load_adapter(out / "run")
    prompts = ["a red circle", "a blue square"]
    conds = [np.asarray(Image.open(data / "processed_images" / f"image_{i}.png").convert("RGB"))
             for i in (0, 5)]
    note(f"sampling {len(prompts)} images in {steps} CoDi steps (compiling the sampler first)")
    images = generate(pipe, adapter, prompts, control_images=conds, steps=steps, seed=seed)
    grid = image_grid(np.concatenate([np.stack(conds), images]), cols=len(prompts))
    target = out / "samples.png"
    with atomic_path(target) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    note(f"wrote {target} (top: condition images; bottom: samples)")
