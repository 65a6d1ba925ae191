"""`codi sample`: images from a prompt with CoDi's few-step sampler or the teacher's DDIM."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

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

_DTYPES = ("float32", "bfloat16", "float16")  # the keys of codi_eqx._tree.FLOAT_DTYPES (not imported at start-up)
_IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_prompts(prompt: Optional[list[str]], prompt_file: Optional[Path]) -> list[str]:
    prompts = list(prompt or [])
    if prompt_file is not None:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CodiUsageError(f"{prompt_file}: no such prompt file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CodiUsageError(f"{prompt_file}: cannot read the prompt file ({e})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CodiUsageError("no prompt: give --prompt TEXT (repeatable) or --prompt_file FILE")
    return prompts


def _load_control_image(path: Path, resolution: Optional[int], factor: int):
    """The condition image as float32 `(H, W, 3)` in [0, 1]: kept at its own size when that
    divides by the VAE factor and no resolution is asked for; otherwise the shorter side is
    resized (bilinear) to the resolution (512 by default) and the centre cropped square."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise CodiUsageError(f"{path}: no such control image")
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise CodiUsageError(f"{path}: cannot read the control image ({e})") from None
    w, h = img.size
    if resolution is None and w % factor == 0 and h % factor == 0:
        return np.asarray(img, np.float32) / 255.0
    size = resolution or 512
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, np.float32) / 255.0


def _png_info(meta: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in meta.items():
        if v is not None:
            info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    return info


_FLAGS = {"sampler": "--sampler", "distill_learning_steps": "--distill_learning_steps",
          "timestep_scaling": "--distill_timestep_scaling",
          "prediction_type": "--prediction_type", "guidance_scale": "--guidance_scale"}


def _adapter_settings(adapter: Optional[Path]):
    """The adapter's training record (None without an adapter or a record)."""
    from codi_eqx import adapter_settings

    if adapter is None:
        return None
    try:
        return adapter_settings(adapter)
    except ValueError as e:
        raise CodiError(f"--adapter {adapter}: {e}") from None


def _sampling_options(settings, model_prediction_type: str, sampler, distill_learning_steps,
                      timestep_scaling, prediction_type):
    """The options the flags and the adapter's record give (as `generate` resolves them)."""
    from codi_eqx.sampling import sampling_options

    try:
        return sampling_options(
            settings, model_prediction_type, sampler=sampler,
            distill_learning_steps=distill_learning_steps, timestep_scaling=timestep_scaling,
            prediction_type=prediction_type)
    except ValueError as e:
        raise CodiUsageError(f"--prediction_type {prediction_type}: {e}") from None


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def _note_contradictions(settings, options, guidance_scale: float) -> None:
    """A one-line note for each option that goes against the adapter's training record."""
    from codi_eqx.sampling import contradictions

    for name, value, recorded in contradictions(settings, options, guidance_scale):
        if name == "guidance_scale":
            note(f"note: {_FLAGS[name]} {value} lies outside [{recorded[0]}, {recorded[1]}], "
                 "the range the adapter was trained guidance-aware for")
        else:
            note(f"note: {_FLAGS[name]} {value} overrides the adapter's {recorded} (the value "
                 "it was trained with)")


def _builtin_inputs(adapter, sampler, prompt, prompt_file, control_image, seed):
    """The built-in default: (model, adapter, prompts, edge maps or None)."""
    import numpy as np

    from codi_eqx.toy import BuiltinMissingError, builtin_adapter, builtin_teacher, shapes

    try:
        model = str(builtin_teacher())
        if adapter is None and sampler != "ddim":
            adapter = builtin_adapter("edges")
    except BuiltinMissingError as e:
        raise CodiUsageError(f"{e}; or give --model") from None
    prompts = list(prompt or [])
    if prompt_file is not None:
        prompts = _read_prompts(prompts, prompt_file)
    if not prompts:
        prompts = [shapes.scenes(seed, 1, "heldout")[0].caption]
        note(f"no prompt given: a held-out caption of the built-in shapes world, {prompts[0]!r}")
    needs_edges = adapter is not None and control_image is None and _has_condition(adapter)
    if not needs_edges:
        return model, adapter, prompts, None
    rng = np.random.default_rng(seed)
    try:
        scenes = [shapes.scene_for_caption(p, rng) for p in prompts]
    except ValueError as e:
        raise CodiUsageError(f"{e}; or give --control_image") from None
    return model, adapter, prompts, shapes.edge_images(scenes)


def _has_condition(adapter) -> bool:
    try:
        config = json.loads((Path(adapter) / "config.json").read_text())
    except (OSError, ValueError):
        return True
    return config.get("conditioning_channels", 3) is not None


def sample(
    prompt: Optional[list[str]] = typer.Option(
        None, "--prompt", help="A prompt; repeat the flag for several."),
    prompt_file: Optional[Path] = typer.Option(
        None, "--prompt_file", "--prompt-file", help="A text file with one prompt per line."),
    model: Optional[str] = typer.Option(
        None, "--model", "--pretrained_model_name_or_path", "--pretrained-model-name-or-path",
        help="The base model: a diffusers directory, a `codi convert-weights` directory, or a "
             "Hub id in the local cache. Default: the built-in shapes teacher, with its edge "
             "adapter (unless --sampler ddim), a held-out caption when no prompt is given, and "
             "an edge map drawn for each caption when no --control_image is given (written "
             "beside the output as NAME-edges.png)."),
    adapter: Optional[Path] = typer.Option(
        None, "--adapter", "--controlnet", help="A trained adapter (this project's format, a "
        "diffusers ControlNet folder, or a training run's output directory). Without one: "
        "DDIM of the teacher, or CoDi steps of the bare UNet."),
    negative_prompt: str = typer.Option(
        "", "--negative_prompt", "--negative-prompt",
        help="The unconditional half of classifier-free guidance."),
    control_image: Optional[Path] = typer.Option(
        None, "--control_image", "--control-image", help="The condition image (resized with "
        "bilinear filtering and centre-cropped to --resolution)."),
    resolution: Optional[int] = typer.Option(
        None, "--resolution", help="Image size (square), a multiple of 8. Default: the control "
        "image's own size when divisible by 8, else 512; without a control image the model's "
        "native size."),
    steps: Optional[int] = typer.Option(
        None, "--steps", "--num_inference_steps", "--num-inference-steps",
        help="Sampling steps (default 4 for codi, 50 for ddim)."),
    guidance_scale: Optional[float] = typer.Option(
        None, "--guidance_scale", "--guidance-scale", help="Classifier-free guidance scale "
        "(default: the adapter's recorded setting, else 1.0 for codi, a single conditional "
        "pass, and 7.5 for ddim); a guidance-conditioned adapter takes it at one pass per "
        "step."),
    seed: int = typer.Option(0, "--seed", help="Random seed; image i uses fold_in(seed, i)."),
    num_images: int = typer.Option(
        1, "--num_images", "--num-images", "--num_images_per_prompt",
        help="Images per prompt."),
    sampler: Optional[str] = typer.Option(
        None, "--sampler", help="codi (few-step consistency sampler) or ddim (teacher). "
        "Default: the one the adapter was trained for (ddim for --objective controlnet), "
        "else codi."),
    distill_learning_steps: Optional[int] = typer.Option(
        None, "--distill_learning_steps", "--distill-learning-steps",
        help="N of the distillation grid (codi). Default: the adapter's, else 50."),
    timestep_scaling: Optional[float] = typer.Option(
        None, "--distill_timestep_scaling", "--distill-timestep-scaling", "--timestep_scaling",
        help="tau of the consistency scalings (codi). Default: the adapter's, else 10."),
    prediction_type: Optional[str] = typer.Option(
        None, "--prediction_type", "--prediction-type", help="How raw outputs convert: "
        "epsilon, v_prediction or sample. Default: the one the adapter was trained with, "
        "else the model's."),
    controlnet_conditioning_scale: float = typer.Option(
        1.0, "--controlnet_conditioning_scale", "--controlnet-conditioning-scale",
        help="Multiplies the adapter's residuals."),
    dtype: str = typer.Option(
        "float32", "--dtype", help="Parameter dtype: float32, bfloat16 or float16."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch_size", "--batch-size", help="Images per compiled batch (default: all)."),
    output: Path = typer.Option(
        Path("sample.png"), "--output", "-o", help="An image file, .png (with the settings as "
        "text chunks), .jpg / .jpeg or .webp (one image, or a grid of several), or a folder "
        "(one PNG per image)."),
    compilation_cache_dir: CompilationCacheDirOption = None,
    no_compilation_cache: NoCompilationCacheOption = False,
) -> None:
    """Generate images with a CoDi adapter (1-4 steps) or the teacher (DDIM)."""
    with reported_errors():
        _sample(**locals())


def _sample(
    *, prompt, prompt_file, model, adapter, negative_prompt, control_image, resolution, steps,
    guidance_scale, seed, num_images, sampler, distill_learning_steps, timestep_scaling,
    prediction_type, controlnet_conditioning_scale, dtype, batch_size, output,
    compilation_cache_dir, no_compilation_cache,
) -> None:
    # Everything checkable without the model first, so that mistakes cost nothing.
    if sampler is not None and sampler not in ("codi", "ddim"):
        raise CodiUsageError(f"--sampler {sampler}: expected codi or ddim")
    builtin_edges = None
    builtin_default = model is None
    if model is None:
        model, adapter, prompt, builtin_edges = _builtin_inputs(
            adapter, sampler, prompt, prompt_file, control_image, seed)
        prompt_file = None
    if dtype not in _DTYPES:
        raise CodiUsageError(f"--dtype {dtype}: expected one of {', '.join(_DTYPES)}")
    if adapter is not None and not Path(adapter).exists():
        raise CodiUsageError(f"--adapter {adapter}: no such adapter directory")
    settings = _adapter_settings(adapter)
    flags = (sampler, distill_learning_steps, timestep_scaling, prediction_type)
    # The model's prediction type matters only without a record and a flag: "epsilon" stands
    # in for it until the model is loaded.
    options = _sampling_options(settings, "epsilon", *flags)
    sampler, distill_learning_steps = options.sampler, options.distill_learning_steps
    steps = (4 if sampler == "codi" else 50) if steps is None else steps
    if guidance_scale is None:
        from codi_eqx.sampling import default_guidance_scale

        guidance_scale = default_guidance_scale(settings, sampler)
    if steps < 1:
        raise CodiUsageError(f"--steps {steps}: must be at least 1")
    if distill_learning_steps < 1:
        raise CodiUsageError(f"--distill_learning_steps {distill_learning_steps}: must be >= 1")
    if sampler == "codi" and steps > distill_learning_steps:
        grid = ("--distill_learning_steps" if flags[1] is not None
                else "the adapter's distill_learning_steps")
        raise CodiUsageError(
            f"--steps {steps} exceeds {grid} {distill_learning_steps} "
            "(the CoDi grid has that many points); lower --steps or use --sampler ddim"
        )
    if num_images < 1:
        raise CodiUsageError(f"--num_images {num_images}: must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise CodiUsageError(f"--batch_size {batch_size}: must be at least 1")
    factor = 8
    if resolution is not None and (resolution < factor or resolution % factor):
        raise CodiUsageError(
            f"--resolution {resolution} is not a positive multiple of the VAE factor {factor}"
        )
    prompts = _read_prompts(prompt, prompt_file)
    if not Path(model).expanduser().exists() and not _HUB_ID.match(model):
        raise CodiUsageError(f"--model {model}: no such model directory")
    if control_image is not None and adapter is None:
        raise CodiUsageError("--control_image needs --adapter (an adapter with a condition encoder)")
    control = None
    if control_image is not None:
        control = _load_control_image(control_image, resolution, factor)
    elif builtin_edges is not None:
        control = builtin_edges.astype("float32") / 255.0
    file_format = _IMAGE_FORMATS.get(output.suffix.lower())
    as_file = file_format is not None
    if not as_file and output.suffix and not output.is_dir():
        raise CodiUsageError(f"--output {output}: unknown image type {output.suffix!r} (use "
                             ".png, .jpg, .jpeg or .webp, or a folder without a suffix)")
    if not as_file and output.exists() and not output.is_dir():
        raise CodiUsageError(f"--output {output}: exists and is not a folder (give a .png path "
                             "or a folder)")

    # Every check passed: say where the options go against the adapter's training record.
    _note_contradictions(settings, options, guidance_scale)
    if (settings is not None and settings.base_model and not builtin_default
            and not _same_model(model, settings.base_model)):
        note(f"note: the adapter was trained on {settings.base_model}; sampling with --model "
             f"{model}")

    use_compilation_cache(compilation_cache_dir, no_compilation_cache)  # before any compilation
    import dataclasses

    from codi_eqx import load_adapter, load_pipeline, load_trained_unet
    from codi_eqx._tree import FLOAT_DTYPES
    from codi_eqx.sampling import generate, image_grid

    jdtype = FLOAT_DTYPES[dtype]
    try:
        pipe = load_pipeline(model, dtype=jdtype)
    except ValueError as e:  # a config this project cannot read
        raise CodiError(f"--model {model}: {e}") from None
    if pipe.vae_scale_factor != factor and resolution is not None and resolution % pipe.vae_scale_factor:
        raise CodiUsageError(f"--resolution {resolution} is not a multiple of the VAE factor "
                             f"{pipe.vae_scale_factor}")
    limit = pipe.tokenizer.model_max_length
    for p in dict.fromkeys(prompts):
        n_tokens = len(pipe.tokenizer(p).input_ids)
        if n_tokens > limit:
            note(f"note: the prompt {p[:40]!r}... has {n_tokens} tokens; the text encoder reads "
                 f"the first {limit} (the rest is cut off)")
    net, trained_unet = None, None
    if adapter is not None:
        try:
            net = load_adapter(adapter, dtype=jdtype)
        except ValueError as e:
            raise CodiError(f"--adapter {adapter}: {e}") from None
        needs = net.controlnet_cond_embedding is not None
        if needs and control is None:
            raise CodiUsageError(f"--adapter {adapter} needs a condition image: give --control_image")
        if not needs and control is not None:
            raise CodiUsageError(f"--adapter {adapter} has no condition encoder: drop --control_image")
        # A full-CoDi run trains the UNet too and writes its EMA weights beside the adapter.
        try:
            trained_unet = load_trained_unet(adapter, dtype=jdtype)
        except ValueError as e:
            raise CodiError(f"--adapter {adapter}: {e}") from None
        if trained_unet is not None:
            pipe = dataclasses.replace(pipe, unet=trained_unet)
            note(f"using the UNet trained with the adapter: {Path(adapter) / 'unet'}")
    if sampler == "ddim" and steps > pipe.schedule.num_train_timesteps:
        raise CodiUsageError(f"--steps {steps} exceeds the model's "
                             f"{pipe.schedule.num_train_timesteps} training timesteps")
    options = _sampling_options(settings, pipe.prediction_type, *flags)
    size = resolution if control is None else None
    total = len(prompts) * num_images
    bs = total if batch_size is None else min(batch_size, total)
    n_batches = math.ceil(total / bs)

    note("compiling the sampler (first batch only)...")
    with progress() as bar:
        task = bar.add_task("sampling", total=n_batches, info=f"{total} image(s)")
        try:
            images = generate(
                pipe, net, prompts, negative_prompt=negative_prompt, control_images=control,
                steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
                num_images_per_prompt=num_images, distill_learning_steps=distill_learning_steps,
                timestep_scaling=options.timestep_scaling,
                prediction_type=options.prediction_type,
                controlnet_conditioning_scale=controlnet_conditioning_scale, batch_size=bs,
                height=size, width=size,
                progress=lambda done, n: bar.update(task, completed=done),
            )
        except ValueError as e:
            raise CodiUsageError(str(e)) from None

    from PIL import Image

    base = {
        "negative_prompt": negative_prompt, "seed": str(seed), "steps": str(steps),
        "sampler": sampler, "guidance_scale": str(guidance_scale), "model": str(model),
        "prediction_type": options.prediction_type,
        "distill_learning_steps": str(distill_learning_steps) if sampler == "codi" else None,
        "distill_timestep_scaling": str(options.timestep_scaling) if sampler == "codi" else None,
        "adapter": None if adapter is None else str(adapter),
        "unet": None if trained_unet is None else str(Path(adapter) / "unet"),
        "controlnet_conditioning_scale": str(controlnet_conditioning_scale),
        "software": "codi-eqx",
    }
    image_prompts = [p for p in prompts for _ in range(num_images)]
    if builtin_edges is not None:
        edges_path = (output.with_name(f"{output.stem}-edges.png") if as_file
                      else output.with_name(f"{output.name}-edges.png"))
        edge_img = builtin_edges[0] if len(builtin_edges) == 1 else image_grid(builtin_edges)
        with atomic_path(edges_path) as tmp:
            Image.fromarray(edge_img).save(tmp, format="PNG")
        note(f"wrote the edge map(s) drawn for the prompt(s) to {edges_path}")
    if as_file:
        img = images[0] if total == 1 else image_grid(images)
        meta = {**base, "prompt": image_prompts[0] if len(set(prompts)) == 1 else prompts}
        if total > 1:
            meta["grid"] = f"{total} images, prompt by prompt, {num_images} per prompt"
        with atomic_path(output) as tmp:
            if file_format == "PNG":
                Image.fromarray(img).save(tmp, format="PNG", pnginfo=_png_info(meta))
            else:
                Image.fromarray(img).save(tmp, format=file_format, quality=95)
        note(f"wrote {output}")
    else:
        with atomic_path(output, is_dir=True) as tmp:
            for i, (img, p) in enumerate(zip(images, image_prompts)):
                meta = {**base, "prompt": p, "image_index": str(i)}
                Image.fromarray(img).save(tmp / f"{i:04d}.png", format="PNG",
                                          pnginfo=_png_info(meta))
        note(f"wrote {total} image(s) to {output}/")
