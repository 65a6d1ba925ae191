"""`codi demo`: the whole job on the built-in default (the shapes teacher)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    CodiError,
    CodiUsageError,
    CompilationCacheDirOption,
    NoCompilationCacheOption,
    note,
    progress,
    reported_errors,
    use_compilation_cache,
)


def demo(
    output_dir: Annotated[Path, typer.Argument(
        help="Where the demo writes: run/ (the training output, with the shapes it trained on), "
             "samples.png and samples.json.")] = Path("codi-demo"),
    max_train_steps: Annotated[Optional[int], typer.Option(
        "--max_train_steps", "--max-train-steps", min=1,
        help="Distillation steps (default: the built-in run's, a few minutes on a CPU).")] = None,
    steps: Annotated[int, typer.Option(
        "--steps", min=1, help="CoDi sampling steps for samples.png.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data, training and sampling.")] = 0,
    compilation_cache_dir: CompilationCacheDirOption = None,
    no_compilation_cache: NoCompilationCacheOption = False,
) -> None:
    """Run the whole job on the built-in default: distil the shipped shapes teacher (a small
    Stable Diffusion trained on synthetic coloured shapes) into a 4-step edge-conditioned model
    with CoDi, then sample held-out captions and edge maps with it, next to the teacher's
    50-step DDIM samples. Offline, on a CPU, in a few minutes."""
    with reported_errors():
        _run(output_dir, max_train_steps, steps, seed, compilation_cache_dir, no_compilation_cache)


def _run(out: Path, max_train_steps: Optional[int], steps: int, seed: int,
         cache_dir: Optional[Path], no_cache: bool) -> None:
    from codi_eqx.toy import BuiltinMissingError
    from codi_eqx.toy._demo import run_demo

    if (out / "run").exists():
        raise CodiUsageError(f"{out / 'run'} exists: choose another OUTPUT_DIR or remove it")
    use_compilation_cache(cache_dir, no_cache)
    try:
        with progress() as bar:
            report = run_demo(out, max_train_steps=max_train_steps, steps=steps, seed=seed,
                              progress=bar, note=note)
    except BuiltinMissingError as e:
        # A usage error where a model can be given instead (`codi train`, `codi sample`);
        # the demo takes none, so here it is a broken installation.
        raise CodiError(str(e)) from None
    s = report["scores"]
    n = len(report["captions"])
    note(f"wrote {out / 'samples.png'} (rows: held-out edge maps; CoDi, {steps} steps; the "
         "teacher, 50 DDIM steps)")
    ratio = s["caption_ratio"]
    vs = ("" if ratio is None else f" (CoDi / teacher {ratio['estimate']:.2f}, 95 % interval "
          f"{ratio['low']:.2f}-{ratio['high']:.2f})")
    note(f"caption adherence on {n} held-out captions: CoDi {s['codi']['caption_adherence']:.0%}, "
         f"teacher {s['teacher_ddim50']['caption_adherence']:.0%}{vs}; edge F1: CoDi "
         f"{s['codi']['edge_f1']:.2f}, teacher (no edge input) {s['teacher_ddim50']['edge_f1']:.2f}")
