"""`codi convert-weights`: models into this project's fast-loading format, adapters out to
diffusers' and the original ControlNet formats."""

from __future__ import annotations

import json
import shutil
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from ._common import CodiError, CodiUsageError, atomic_path, note, progress, reported_errors

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Target(str, Enum):
    diffusers = "diffusers"
    single_file = "single-file"
    original = "original"


# ------------------------------------------------------------------------------------------
# Reading sources


def read_pickle(path: Path) -> dict:
    """The tensors of a `.bin` / `.ckpt` pickle, read with torch's `weights_only=True` (no code
    from the file runs), as numpy arrays (a `state_dict` entry is unwrapped)."""
    try:
        import torch
    except ImportError:
        raise CodiError(
            f"{path}: reading pickle weights needs PyTorch, which is not installed "
            "(pip install torch, or use a .safetensors file)"
        ) from None
    import ml_dtypes
    import numpy as np

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CodiError(f"{path}: file not found") from None
    except Exception as e:  # torch raises many kinds for corrupt or unsafe files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CodiError(f"{path}: cannot read as a weights-only pickle ({msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CodiError(f"{path}: not a state dict (a {type(obj).__name__})")
    out = {}
    for name, t in obj.items():
        if not torch.is_tensor(t):
            continue  # counters such as global_step
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        elif t.dtype in (torch.float32, torch.float16, torch.float64, torch.int64, torch.int32,
                         torch.int16, torch.int8, torch.uint8, torch.bool):
            out[name] = t.numpy()
        else:
            raise CodiError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
    return out


def _tensors_of_folder(folder: Path, allow_pickle: bool):
    from weights_conversion import WeightsError, read_tensors

    try:
        return read_tensors(folder)
    except WeightsError:
        pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.ckpt"))
        if not pickles or not (folder.is_dir() and not list(folder.glob("*.safetensors"))):
            raise
        if not allow_pickle:
            raise CodiUsageError(
                f"{folder}: only pickle weights ({pickles[0].name}); pass --allow-pickle to read "
                "them (with torch's weights_only=True)"
            ) from None
        out: dict = {}
        for p in pickles:
            out.update(read_pickle(p))
        return out


def _load_component(kind: str, folder: Path, dtype, allow_pickle: bool):
    """A diffusers component folder as a model in `dtype` (every tensor checked)."""
    import equinox as eqx
    import jax

    from codi_eqx.models import (
        AutoencoderKL,
        AutoencoderKLConfig,
        CLIPTextConfig,
        CLIPTextModel,
        ControlNetConfig,
        ControlNetModel,
        UNet2DConditionConfig,
        UNet2DConditionModel,
    )
    from weights_conversion import (
        CLIP_NAME_MAP,
        CONTROLNET_NAME_MAP,
        UNET_NAME_MAP,
        VAE_NAME_MAP,
        WeightsError,
        load_state,
        read_config,
    )

    config = read_config(folder)
    key = jax.random.key(0)
    try:
        if kind == "unet":
            cfg = UNet2DConditionConfig.from_dict(config)
            build, name_map = (lambda: UNet2DConditionModel(cfg, key=key)), UNET_NAME_MAP
        elif kind == "vae":
            cfg = AutoencoderKLConfig.from_dict(config)
            build, name_map = (lambda: AutoencoderKL(cfg, key=key)), VAE_NAME_MAP
        elif kind == "text_encoder":
            cfg = CLIPTextConfig.from_dict(config)
            build, name_map = (lambda: CLIPTextModel(cfg, dtype=dtype, key=key)), CLIP_NAME_MAP
        else:
            cfg = ControlNetConfig.from_dict(config)
            build, name_map = (lambda: ControlNetModel(cfg, key=key)), CONTROLNET_NAME_MAP
    except (TypeError, ValueError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{folder / 'config.json'}: unsupported config: {e}") from None
    template = eqx.filter_eval_shape(build)
    tensors = _tensors_of_folder(folder, allow_pickle)
    return load_state(template, tensors, name_map, dtype=dtype, what=str(folder))


def _classify(source: str, allow_pickle: bool) -> tuple[str, Path]:
    """(`pipeline` | `adapter` | `single` | `pickle`, path) of SOURCE."""
    from codi_eqx._pipeline import MODEL_MANIFEST, resolve_model_path
    from weights_conversion import WeightsError

    p = Path(source).expanduser()
    if not p.exists():
        if "/" in source and not source.startswith((".", "/", "~")) and not Path(source).suffix:
            p = resolve_model_path(source)  # a Hub id in the local cache (or a clear error)
        else:
            raise CodiError(f"{source}: no such file or directory")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".safetensors":
            return "single", p
        if suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise CodiUsageError(
                    f"{p}: a pickle file; pass --allow-pickle to read it (with torch's "
                    "weights_only=True), or use a .safetensors file"
                )
            return "pickle", p
        raise CodiUsageError(f"{p}: unknown file type {suffix or '(none)'} (expected .safetensors, "
                             "or .bin/.ckpt with --allow-pickle)")
    if (p / MODEL_MANIFEST).is_file() or (p / "model_index.json").is_file() or (p / "unet").is_dir():
        return "pipeline", p
    if (p / "config.json").is_file():
        try:
            config = json.loads((p / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{p / 'config.json'}: not valid JSON ({e})") from None
        if config.get("_class_name") == "ControlNetModel" or "_codi_eqx_format" in config \
                or "conditioning_embedding_out_channels" in config:
            return "adapter", p
        raise CodiUsageError(
            f"{p}: a single {config.get('_class_name', 'model')} component; give the whole model "
            "directory (with model_index.json) or a ControlNet / adapter folder"
        )
    raise CodiError(f"{p}: not a model directory (no model_index.json, unet/ or config.json)")


# ------------------------------------------------------------------------------------------
# Writing


def _write_model(tmp: Path, parts: dict, *, dtype_name: str, tokenizer: Optional[Path],
                 scheduler: dict, manifest: bool, step) -> None:
    """The model directory: diffusers' layout (so diffusers reads it as well), one contiguous
    safetensors file per component in the target dtype, and `codi_eqx.json`."""
    from codi_eqx._pipeline import MODEL_FORMAT, MODEL_FORMAT_VERSION, MODEL_MANIFEST
    from weights_conversion import save_text_encoder, save_unet, save_vae

    save_unet(parts["unet"], tmp / "unet")
    step("unet")
    save_vae(parts["vae"], tmp / "vae")
    step("vae")
    save_text_encoder(parts["text_encoder"], tmp / "text_encoder")
    step("text_encoder")
    components = ["unet", "vae", "text_encoder"]
    if tokenizer is not None:
        shutil.copytree(tokenizer, tmp / "tokenizer")
        components.append("tokenizer")
    step("tokenizer")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    components.append("scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", scheduler.get("_class_name", "DDIMScheduler")],
        "tokenizer": ["transformers", "CLIPTokenizer"] if tokenizer is not None else [None, None],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    if manifest:
        (tmp / MODEL_MANIFEST).write_text(json.dumps({
            "format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION,
            "components": components, "dtype": dtype_name,
        }, indent=2))
    step("scheduler")


def _adapter_record(path: Path) -> Optional[dict]:
    """The training record of an adapter folder, as config.json entries (None without one)."""
    from codi_eqx import adapter_settings

    try:
        settings = adapter_settings(path)
    except ValueError as e:
        raise CodiError(str(e)) from None
    return None if settings is None else settings.config_entry()


def _write_adapter(adapter, output: Path, to: Optional[Target], dtype_name: str,
                   extra_config: Optional[dict] = None) -> None:
    """`extra_config`: config.json entries to carry over (a trained adapter's record)."""
    from weights_conversion import CONTROLNET_NAME_MAP, export_state, save_adapter, save_file
    from weights_conversion.single_file import (
        CODI_CONFIG_KEY,
        controlnet_to_original,
        with_zero_condition_encoder,
    )

    if to is None:
        with atomic_path(output, is_dir=True) as tmp:
            save_adapter(adapter, tmp, extra_config=extra_config)
        return
    if to == Target.diffusers:
        if adapter.config.conditioning_channels is None:
            adapter = with_zero_condition_encoder(adapter)
        with atomic_path(output, is_dir=True) as tmp:
            config = {**adapter.config.to_dict(), **(extra_config or {})}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            save_file(export_state(adapter, CONTROLNET_NAME_MAP),
                      tmp / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        return
    metadata = {"format": "pt", CODI_CONFIG_KEY: json.dumps(adapter.config.to_dict())}
    with atomic_path(output) as tmp:
        save_file(controlnet_to_original(adapter), tmp, metadata=metadata)


def _single_file_configs(config: Optional[Path], family: str, tensors) -> dict[str, Any]:
    """unet / vae / text_encoder config dicts, tokenizer folder, scheduler config for a
    single-file model: from `--config` where it gives them, else inferred from the weights."""
    from weights_conversion import read_config
    from weights_conversion import single_file as sf

    out: dict[str, Any] = {"tokenizer": None, "scheduler": dict(sf.SD_SCHEDULER)}
    if config is not None:
        if not config.exists():
            raise CodiUsageError(f"--config {config}: no such file or directory")
        if config.is_file():
            out["unet"] = _read_json(config)
        else:
            for part in ("unet", "vae", "text_encoder"):
                if (config / part / "config.json").is_file():
                    out[part] = read_config(config / part)
            if "unet" not in out and (config / "config.json").is_file():
                out["unet"] = read_config(config)
            if (config / "tokenizer").is_dir():
                out["tokenizer"] = config / "tokenizer"
            sched = config / "scheduler" / "scheduler_config.json"
            if sched.is_file():
                out["scheduler"] = _read_json(sched)
            if not any(k in out for k in ("unet", "vae", "text_encoder")):
                raise CodiUsageError(f"--config {config}: no unet/, vae/ or text_encoder/ config.json in it")
    if out.get("unet") is None:
        out["unet"] = sf.infer_unet_config(tensors)
    if out.get("vae") is None:
        out["vae"] = sf.infer_vae_config(tensors)
    if out.get("text_encoder") is None:
        out["text_encoder"] = sf.infer_text_config(tensors, family)
    return out


def _read_json(path: Path) -> dict:
    from weights_conversion import WeightsError

    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


# ------------------------------------------------------------------------------------------
# The command


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
        "text_encoder/ configs, tokenizer/ and scheduler/ are used instead of the inferred ones.",
        show_default=False,
    ),
) -> None:
    """Convert model weights: into this project's format (safetensors only, one file per
    component in the target dtype, a codi_eqx.json manifest), or export an adapter."""
    with reported_errors():
        _convert(source, Path(output), dtype, to, overwrite, allow_pickle, config)


def _convert(source: str, output: Path, dtype: Dtype, to: Optional[Target], overwrite: bool,
             allow_pickle: bool, config: Optional[Path]) -> None:
    import jax.numpy as jnp

    if output.exists() and not overwrite:
        raise CodiUsageError(f"{output} exists; pass --overwrite to replace it")
    src_path = Path(source).expanduser()
    if src_path.exists() and output.exists() and src_path.resolve() == output.resolve():
        raise CodiUsageError("SOURCE and OUTPUT are the same path")
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype.value]
    kind, path = _classify(source, allow_pickle)
    if config is not None and kind not in ("single", "pickle"):
        raise CodiUsageError("--config applies to a single-file SOURCE only")

    if kind == "adapter":
        with progress() as bar:
            task = bar.add_task("convert", total=2, info="adapter")
            adapter = _load_component("controlnet", path, dt, allow_pickle)
            bar.advance(task)
            _write_adapter(adapter, output, to, dtype.value, _adapter_record(path))
            bar.advance(task)
        return

    if kind == "pipeline":
        if to is not None and to != Target.diffusers:
            raise CodiUsageError(f"--to {to.value} exports an adapter; {path} is a whole model")
        from codi_eqx._pipeline import read_manifest
        read_manifest(path)  # a corrupt or too new manifest fails here, by name
        names = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
        for part in ("unet", "vae", "text_encoder"):
            if not (path / part).is_dir():
                raise CodiError(f"{path}: no {part}/ folder (expected a diffusers-format model directory)")
        sched_file = path / "scheduler" / "scheduler_config.json"
        scheduler = _read_json(sched_file) if sched_file.is_file() else None
        if scheduler is None:
            raise CodiError(f"{sched_file}: not found")
        tokenizer = path / "tokenizer" if (path / "tokenizer").is_dir() else None
        with progress() as bar:
            task = bar.add_task("convert", total=2 * len(names), info="")
            parts = {}
            for part in ("unet", "vae", "text_encoder"):
                bar.update(task, info=f"reading {part}")
                parts[part] = _load_component(part, path / part, dt, allow_pickle)
                bar.advance(task)
            bar.advance(task, 2)  # tokenizer and scheduler: copied
            with atomic_path(output, is_dir=True) as tmp:
                _write_model(tmp, parts, dtype_name=dtype.value, tokenizer=tokenizer,
                             scheduler=scheduler, manifest=to is None,
                             step=lambda name: bar.update(task, advance=1, info=f"wrote {name}"))
        if tokenizer is None:
            _no_tokenizer_note(output)
        return

    # A single-file checkpoint (safetensors, or a pickle with --allow-pickle).
    from weights_conversion import SafetensorsFile
    from weights_conversion import single_file as sf

    if kind == "single":
        tensors = SafetensorsFile(path)
        metadata = tensors.metadata
    else:
        tensors, metadata = read_pickle(path), {}
    family = sf.detect_family(tensors)
    if family == "controlnet":
        cfg = None
        if config is not None:
            cfg = _read_json(config if config.is_file() else config / "config.json")
        with progress() as bar:
            task = bar.add_task("convert", total=2, info="controlnet")
            adapter = sf.load_controlnet_original(tensors, cfg, metadata=metadata, dtype=dt, what=str(path))
            bar.advance(task)
            _write_adapter(adapter, output, to, dtype.value)
            bar.advance(task)
        return
    if to is not None and to != Target.diffusers:
        raise CodiUsageError(f"--to {to.value} exports an adapter; {path} is a whole model")
    sf.check_prefixes(tensors, (sf.UNET_PREFIX, sf.VAE_PREFIX, sf.CLIP_PREFIX, sf.OPENCLIP_PREFIX),
                      str(path))
    configs = _single_file_configs(config, family, tensors)
    with progress() as bar:
        task = bar.add_task("convert", total=8, info="")
        parts = {}
        bar.update(task, info="reading unet")
        parts["unet"] = sf.load_unet_original(tensors, configs["unet"], dtype=dt, what=f"{path} (unet)")
        bar.advance(task)
        bar.update(task, info="reading vae")
        parts["vae"] = sf.load_vae_original(tensors, configs["vae"], dtype=dt, what=f"{path} (vae)")
        bar.advance(task)
        bar.update(task, info="reading text_encoder")
        parts["text_encoder"] = sf.load_text_encoder_original(
            tensors, configs["text_encoder"], family, dtype=dt, what=f"{path} (text_encoder)")
        bar.advance(task)
        with atomic_path(output, is_dir=True) as tmp:
            _write_model(tmp, parts, dtype_name=dtype.value, tokenizer=configs["tokenizer"],
                         scheduler=configs["scheduler"], manifest=to is None,
                         step=lambda name: bar.update(task, advance=1, info=f"wrote {name}"))
    if configs["tokenizer"] is None:
        _no_tokenizer_note(output)


def _no_tokenizer_note(output: Path) -> None:
    note(f"note: {output} has no tokenizer/ (single-file checkpoints carry none): copy the model "
         f"family's CLIP tokenizer folder to {output / 'tokenizer'} (or convert with --config "
         "DIR, a diffusers model directory that has one) before loading it")
