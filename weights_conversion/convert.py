"""Converting whole sources: a model into this project's fast-loading format, or an adapter /
ControlNet out to diffusers' and the original single-file layouts.

`convert(source, output, ...)` is what `codi convert-weights` runs. The source is detected
(`classify`): a diffusers model directory (or one this project wrote, or a Hub id in the local
cache), an adapter or diffusers ControlNet folder (a training run's output directory among
them), an original single-file checkpoint (SD 1.x, 2.x or SDXL, or a ControlNet in the
original or diffusers' names; `.safetensors`; `.bin` / `.ckpt` / `.pt` pickles only with
`allow_pickle`). Every tensor is checked against the model's config, and the output appears
whole or not at all. Bad arguments raise `UsageError`; unreadable or inconsistent
weights `WeightsError` (a `CodiError`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from codi_eqx._adapter_settings import adapter_settings
from codi_eqx._atomic import atomic_path
from codi_eqx._pipeline import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    MODEL_MANIFEST,
    read_manifest,
    resolve_model_path,
)
from codi_eqx._tree import FLOAT_DTYPES
from codi_eqx.errors import CodiError, UsageError
from codi_eqx.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    ControlNetConfig,
    ControlNetModel,
    UNet2DConditionConfig,
    UNet2DConditionModel,
)
from codi_eqx.weights import (
    CLIP_NAME_MAP,
    CLIP_PROJECTION_NAME_MAP,
    CONTROLNET_NAME_MAP,
    UNET_NAME_MAP,
    VAE_NAME_MAP,
    SafetensorsFile,
    WeightsError,
    export_state,
    load_folder,
    read_config,
    read_tensors,
    save_adapter,
    save_file,
    save_text_encoder,
    save_unet,
    save_vae,
)

from . import single_file as sf

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
DTYPES = FLOAT_DTYPES
TARGETS = ("diffusers", "single-file", "original")
"""`to=`: `diffusers` (a ControlNetModel folder; for a whole model, a plain diffusers
directory without this project's manifest), `single-file` / `original` (one safetensors file
in the original `control_model.*` layout, adapters only)."""

Progress = Callable[[int, int, str], None]
"""`progress(completed, total, info)`, called as the conversion goes."""


@dataclass(frozen=True)
class Conversion:
    """What `convert` did: the kind of source (`pipeline`, `adapter`, `single`, `pickle`),
    whether it was an adapter / ControlNet (else a whole model), and for a whole model
    whether the output has its tokenizers (`tokenizer/`, SDXL's `tokenizer_2/` too; a
    single-file checkpoint carries none)."""

    kind: str
    output: Path
    adapter: bool
    tokenizer: bool = True


# ------------------------------------------------------------------------------------------
# Reading sources


def read_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a `.bin` / `.ckpt` pickle, read with torch's `weights_only=True` (no code
    from the file runs), as numpy arrays (a `state_dict` entry is unwrapped; entries that are
    not tensors, such as step counters, are skipped)."""
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise CodiError(
            f"{path}: reading pickle weights needs PyTorch, which is not installed "
            "(pip install torch, or use a .safetensors file)"
        ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CodiError(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for corrupt or unsafe files)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CodiError(f"{path}: cannot read as a weights-only pickle ({msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CodiError(f"{path}: not a state dict (a {type(obj).__name__})")
    plain = (torch.float32, torch.float16, torch.float64, torch.int64, torch.int32,
             torch.int16, torch.int8, torch.uint8, torch.bool)
    out = {}
    for name, t in obj.items():
        if not torch.is_tensor(t):
            continue
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        elif t.dtype in plain:
            out[name] = t.numpy()
        else:
            raise CodiError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
    return out


def _pickle_refused(path: Path, what: str) -> UsageError:
    return UsageError(
        f"{path}: {what}; pass allow_pickle (`--allow-pickle`) to read it with torch's "
        "weights_only=True, or use a .safetensors file")


def _tensors_of_folder(folder: Path, allow_pickle: bool) -> Mapping[str, np.ndarray]:
    try:
        return read_tensors(folder)
    except WeightsError:
        pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.ckpt"))
        if not pickles or list(folder.glob("*.safetensors")):
            raise
        if not allow_pickle:
            raise _pickle_refused(folder, f"only pickle weights ({pickles[0].name})") from None
        out: dict = {}
        for p in pickles:
            out.update(read_pickle(p))
        return out


# kind -> (config class, model builder given the config and the dtype, name table)
_COMPONENTS = {
    "unet": (UNet2DConditionConfig,
             lambda cfg, dtype: UNet2DConditionModel(cfg, key=jax.random.key(0)), UNET_NAME_MAP),
    "vae": (AutoencoderKLConfig,
            lambda cfg, dtype: AutoencoderKL(cfg, key=jax.random.key(0)), VAE_NAME_MAP),
    "text_encoder": (CLIPTextConfig,
                     lambda cfg, dtype: CLIPTextModel(cfg, dtype=dtype, key=jax.random.key(0)),
                     CLIP_NAME_MAP),
    "text_encoder_2": (CLIPTextConfig,
                       lambda cfg, dtype: CLIPTextModelWithProjection(cfg, dtype=dtype,
                                                                      key=jax.random.key(0)),
                       CLIP_PROJECTION_NAME_MAP),
    "controlnet": (ControlNetConfig,
                   lambda cfg, dtype: ControlNetModel(cfg, key=jax.random.key(0)),
                   CONTROLNET_NAME_MAP),
}


def load_component(kind: str, folder: str | Path, *, dtype: Any = jnp.float32,
                   allow_pickle: bool = False) -> Any:
    """A diffusers component folder (`unet`, `vae`, `text_encoder`, SDXL's `text_encoder_2`
    or `controlnet`) as a model with parameters in `dtype`, every tensor checked; pickle weights are read where the
    folder has no safetensors and `allow_pickle` is set."""
    folder = Path(folder)
    config_class, build, name_map = _COMPONENTS[kind]
    return load_folder(folder, config_class, lambda cfg: build(cfg, dtype), name_map,
                       dtype=dtype, tensors=lambda: _tensors_of_folder(folder, allow_pickle))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def classify(source: str | Path, *, allow_pickle: bool = False) -> tuple[str, Path]:
    """`(kind, path)` of a source: `pipeline` (a model directory), `adapter` (an adapter or
    ControlNet folder), `single` (a single safetensors file) or `pickle`. A name that is no
    local path but looks like a Hub id is resolved through the local Hugging Face cache."""
    source = str(source)
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
                raise _pickle_refused(p, "a pickle file")
            return "pickle", p
        raise UsageError(f"{p}: unknown file type {suffix or '(none)'} (expected .safetensors, "
                         "or .bin/.ckpt with allow_pickle, `--allow-pickle`)")
    if (p / MODEL_MANIFEST).is_file() or (p / "model_index.json").is_file() or (p / "unet").is_dir():
        return "pipeline", p
    if (p / "config.json").is_file():
        config = _read_json(p / "config.json")
        if config.get("_class_name") == "ControlNetModel" or "_codi_eqx_format" in config \
                or "conditioning_embedding_out_channels" in config:
            return "adapter", p
        raise UsageError(
            f"{p}: a single {config.get('_class_name', 'model')} component; give the whole model "
            "directory (with model_index.json) or a ControlNet / adapter folder"
        )
    raise CodiError(f"{p}: not a model directory (no model_index.json, unet/ or config.json)")


def single_file_configs(config: Path | None, family: str,
                        tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The config dicts of a single-file model's components (`unet`, `vae`, and the family's
    text encoders: `text_encoder`, SDXL's `text_encoder_2`), its `tokenizers` (name -> folder,
    those found), the `scheduler` config and the `index` entries to keep (SDXL's
    `force_zeros_for_empty_prompt`): from `config` (a unet `config.json`, or a diffusers model
    directory) where it gives them, else inferred from the weights."""
    texts = [layout.part for layout in sf.TEXT_ENCODERS[family]]
    out: dict[str, Any] = {"tokenizers": {}, "scheduler": dict(sf.SD_SCHEDULER), "index": {}}
    if config is not None:
        config = Path(config)
        if not config.exists():
            raise UsageError(f"config {config}: no such file or directory")
        if config.is_file():
            out["unet"] = _read_json(config)
        else:
            for part in ("unet", "vae", *texts):
                if (config / part / "config.json").is_file():
                    out[part] = read_config(config / part)
            if "unet" not in out and (config / "config.json").is_file():
                out["unet"] = read_config(config)
            out["tokenizers"] = {sf.TOKENIZER_OF[t]: config / sf.TOKENIZER_OF[t] for t in texts
                                 if (config / sf.TOKENIZER_OF[t]).is_dir()}
            sched = config / "scheduler" / "scheduler_config.json"
            if sched.is_file():
                out["scheduler"] = _read_json(sched)
            out["index"] = _kept_index(config)
            if not any(k in out for k in ("unet", "vae", *texts)):
                raise UsageError(
                    f"config {config}: no unet/, vae/ or {'/, '.join(texts)}/ config.json in it")
    if out.get("unet") is None:
        out["unet"] = sf.infer_unet_config(tensors)
    if out.get("vae") is None:
        out["vae"] = sf.infer_vae_config(tensors, family=family)
    for part in texts:
        if out.get(part) is None:
            out[part] = sf.infer_text_config(tensors, family, part)
    return out


INDEX_KEPT = ("force_zeros_for_empty_prompt",)
"""model_index.json entries carried from a source (or `--config`) directory to the output."""


def _kept_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        return {}
    return {k: v for k, v in _read_json(index).items() if k in INDEX_KEPT}


# ------------------------------------------------------------------------------------------
# Writing


_SAVERS = {"unet": save_unet, "vae": save_vae, "text_encoder": save_text_encoder,
           "text_encoder_2": save_text_encoder}


def write_model(folder: Path, parts: dict, *, dtype_name: str, tokenizers: Mapping[str, Path],
                scheduler: dict, manifest: bool = True, index: Mapping[str, Any] | None = None,
                step: Callable[[str], None] = lambda name: None) -> None:
    """Write a model directory into the (empty) `folder`: diffusers' layout (so that diffusers
    reads it as well), one safetensors file per component of `parts` (`unet`, `vae`,
    `text_encoder`, and for SDXL `text_encoder_2`), the `tokenizers` folders copied (name ->
    source folder: `tokenizer`, `tokenizer_2`), the scheduler config, `model_index.json`
    (a `StableDiffusionXLPipeline` where there is `text_encoder_2`; `index`'s entries added)
    and with `manifest` this project's `codi_eqx.json`. `step(name)` follows each part."""
    folder = Path(folder)
    sdxl = "text_encoder_2" in parts
    components = []
    for part, model in parts.items():
        _SAVERS[part](model, folder / part)
        components.append(part)
        step(part)
    texts = [p for p in parts if p in sf.TOKENIZER_OF]
    for name in (sf.TOKENIZER_OF[t] for t in texts):
        if name in tokenizers:
            shutil.copytree(tokenizers[name], folder / name)
            components.append(name)
    step("tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    components.append("scheduler")
    entries = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        **({"force_zeros_for_empty_prompt": True} if sdxl else {}),
        **(index or {}),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler.get("_class_name", "DDIMScheduler")],
    }
    for t in texts:
        entries[t] = ["transformers", type(parts[t]).__name__]
        tok = sf.TOKENIZER_OF[t]
        entries[tok] = ["transformers", "CLIPTokenizer"] if tok in tokenizers else [None, None]
    if not sdxl:
        entries.update(safety_checker=[None, None], feature_extractor=[None, None])
    (folder / "model_index.json").write_text(json.dumps(entries, indent=2))
    if manifest:
        (folder / MODEL_MANIFEST).write_text(json.dumps({
            "format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION,
            "components": components, "dtype": dtype_name,
        }, indent=2))
    step("scheduler")


def trained_adapter_record(path: str | Path) -> dict | None:
    """The training record of an adapter folder (or training output directory), as the
    config.json entries to carry over to a copy of it; None without one."""
    try:
        settings = adapter_settings(path)
    except ValueError as e:
        raise CodiError(str(e)) from None
    return None if settings is None else settings.config_entry()


def write_adapter(adapter: ControlNetModel, output: str | Path, *, to: str | None = None,
                  extra_config: dict | None = None) -> None:
    """Write `adapter` atomically: this project's adapter folder (`to=None`), a diffusers
    ControlNetModel folder (`to="diffusers"`; an adapter without a condition encoder gets an
    all-zero one, which leaves its output unchanged) or one safetensors file in the original
    `control_model.*` layout (`to="single-file"` or `"original"`). `extra_config`: config.json
    entries to carry over (a trained adapter's record)."""
    output = Path(output)
    if to is None:
        with atomic_path(output, is_dir=True) as tmp:
            save_adapter(adapter, tmp, extra_config=extra_config)
        return
    if to == "diffusers":
        if adapter.config.conditioning_channels is None:
            adapter = sf.with_zero_condition_encoder(adapter)
        with atomic_path(output, is_dir=True) as tmp:
            config = {**adapter.config.to_dict(), **(extra_config or {})}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            save_file(export_state(adapter, CONTROLNET_NAME_MAP),
                      tmp / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        return
    metadata = {"format": "pt", sf.CODI_CONFIG_KEY: json.dumps(adapter.config.to_dict())}
    with atomic_path(output) as tmp:
        save_file(sf.controlnet_to_original(adapter), tmp, metadata=metadata)


# ------------------------------------------------------------------------------------------
# The whole conversion


def _whole_model_target(to: str | None, path: Path) -> None:
    if to is not None and to != "diffusers":
        raise UsageError(f"to={to!r} (`--to {to}`) exports an adapter; {path} is a whole model")


def convert(
    source: str | Path, output: str | Path, *, to: str | None = None,
    config: str | Path | None = None, dtype: str = "float32", allow_pickle: bool = False,
    overwrite: bool = False, progress: Progress | None = None,
) -> Conversion:
    """Convert `source` into `output`.

    **Arguments:**

    - `source`: a diffusers model directory, a Hub id in the local cache, an original
      single-file checkpoint, a diffusers ControlNet folder or original ControlNet file, or
      a trained adapter (adapter folder or training output directory).
    - `output`: the path to write: a model directory in this project's format, an adapter
      folder, or with `to` the exported ControlNet.
    - `to`: one of `TARGETS`, or None for this project's format.
    - `config`: for a single-file source only, a diffusers `unet/config.json` (or ControlNet
      `config.json`) or a diffusers model directory whose configs, tokenizer and scheduler
      are used instead of the inferred ones.
    - `dtype`: the output's parameter dtype, a key of `DTYPES`.
    - `allow_pickle`: read `.bin` / `.ckpt` pickles (torch, `weights_only=True`).
    - `overwrite`: replace `output` if it exists (only once the new one is complete).
    - `progress`: called as `progress(completed, total, info)`.

    **Returns:** a `Conversion` saying what was converted."""
    output = Path(output)
    report: Progress = progress or (lambda completed, total, info: None)
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if to is not None and to not in TARGETS:
        raise UsageError(f"to={to!r}: expected one of {', '.join(TARGETS)}")
    if output.exists() and not overwrite:
        raise UsageError(f"{output} exists; pass overwrite (`--overwrite`) to replace it")
    src_path = Path(source).expanduser()
    if src_path.exists() and output.exists() and src_path.resolve() == output.resolve():
        raise UsageError("the source and the output are the same path")
    dt = DTYPES[dtype]
    kind, path = classify(source, allow_pickle=allow_pickle)
    if config is not None and kind not in ("single", "pickle"):
        raise UsageError("config (`--config`) applies to a single-file source only")

    if kind == "adapter":
        report(0, 2, "adapter")
        adapter = load_component("controlnet", path, dtype=dt, allow_pickle=allow_pickle)
        report(1, 2, "adapter")
        write_adapter(adapter, output, to=to, extra_config=trained_adapter_record(path))
        report(2, 2, "adapter")
        return Conversion(kind, output, adapter=True)

    if kind == "pipeline":
        _whole_model_target(to, path)
        read_manifest(path)  # a corrupt or too new manifest fails here, by name
        for part in ("unet", "vae", "text_encoder"):
            if not (path / part).is_dir():
                raise CodiError(
                    f"{path}: no {part}/ folder (expected a diffusers-format model directory)")
        sched_file = path / "scheduler" / "scheduler_config.json"
        if not sched_file.is_file():
            raise CodiError(f"{sched_file}: not found")
        scheduler = _read_json(sched_file)
        names = ["unet", "vae", "text_encoder"] + (
            ["text_encoder_2"] if (path / "text_encoder_2").is_dir() else [])  # SDXL
        tokenizers = {sf.TOKENIZER_OF[t]: path / sf.TOKENIZER_OF[t] for t in names
                      if t in sf.TOKENIZER_OF and (path / sf.TOKENIZER_OF[t]).is_dir()}
        index = _kept_index(path)
        total, done = 2 * len(names) + 4, 0
        parts = {}
        for part in names:
            report(done, total, f"reading {part}")
            parts[part] = load_component(part, path / part, dtype=dt, allow_pickle=allow_pickle)
            done += 1
        done += 2  # tokenizer and scheduler: copied
        report(done, total, "")
    else:
        # A single-file checkpoint (safetensors, or a pickle with allow_pickle).
        if kind == "single":
            tensors: Mapping[str, np.ndarray] = SafetensorsFile(path)
            metadata = tensors.metadata
        else:
            tensors, metadata = read_pickle(path), {}
        family = sf.detect_family(tensors)
        if family == "controlnet":
            cfg = None
            if config is not None:
                config = Path(config)
                cfg = _read_json(config if config.is_file() else config / "config.json")
            report(0, 2, "controlnet")
            adapter = sf.load_controlnet_original(tensors, cfg, metadata=metadata, dtype=dt,
                                                  what=str(path))
            report(1, 2, "controlnet")
            write_adapter(adapter, output, to=to)
            report(2, 2, "controlnet")
            return Conversion(kind, output, adapter=True)
        _whole_model_target(to, path)
        layouts = sf.TEXT_ENCODERS[family]
        sf.check_prefixes(tensors, (sf.UNET_PREFIX, sf.VAE_PREFIX, *(t.prefix for t in layouts)),
                          str(path))
        configs = single_file_configs(None if config is None else Path(config), family, tensors)
        tokenizers, scheduler, index = configs["tokenizers"], configs["scheduler"], configs["index"]
        names = ["unet", "vae", *(t.part for t in layouts)]
        total, done = 2 * len(names) + 2, 0
        parts = {}
        for part in names:
            report(done, total, f"reading {part}")
            what = f"{path} ({part})"
            if part == "unet":
                parts[part] = sf.load_unet_original(tensors, configs[part], dtype=dt, what=what)
            elif part == "vae":
                parts[part] = sf.load_vae_original(tensors, configs[part], dtype=dt, what=what)
            else:
                parts[part] = sf.load_text_encoder_original(
                    tensors, configs[part], family, part=part, dtype=dt, what=what)
            done += 1
        report(done, total, "")

    written = [done]

    def step(name: str) -> None:
        written[0] += 1
        report(written[0], total, f"wrote {name}")

    with atomic_path(output, is_dir=True) as tmp:
        write_model(tmp, parts, dtype_name=dtype, tokenizers=tokenizers, scheduler=scheduler,
                    manifest=to is None, index=index, step=step)
    wanted = {sf.TOKENIZER_OF[p] for p in parts if p in sf.TOKENIZER_OF}
    return Conversion(kind, output, adapter=False, tokenizer=wanted <= tokenizers.keys())
