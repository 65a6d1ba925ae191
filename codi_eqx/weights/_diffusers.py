"""Reading the components of a diffusers-format model directory.

A component folder (`unet/`, `vae/`, `text_encoder/`, a ControlNet folder) holds `config.json`
and its weights as one safetensors file, an fp16 (or other) variant
(`diffusion_pytorch_model.fp16.safetensors`), or shards listed in a
`*.safetensors.index.json`. Pickle files (`.bin`, `.ckpt`) are refused here with a pointer to
the conversion command.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._errors import WeightsError
from ._mapping import NameMap, load_state
from ._safetensors import SafetensorsFile

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


class TensorSource(Mapping):
    """Several safetensors files seen as one `name -> np.ndarray` mapping."""

    def __init__(self, files: list[SafetensorsFile]):
        self.files = files
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for name in f:
                if name in self._where:
                    raise WeightsError(f"tensor {name!r} is in both {self._where[name].path} and {f.path}")
                self._where[name] = f

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_config(folder: str | Path) -> dict:
    """`folder/config.json` as a dict, with a one-line error when it is missing or corrupt."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{path}: not found (is {folder} a diffusers model component?)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def find_weight_files(folder: str | Path, variant: Optional[str] = None) -> list[Path]:
    """The safetensors file(s) of a component folder, preferring `variant` when it exists."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a directory")
    variants = [variant] if variant else []
    variants += [None, "fp16", "bf16", "fp32"]
    for name in WEIGHT_NAMES:
        for v in variants:
            stem = f"{name}.{v}" if v else name
            single = folder / f"{stem}.safetensors"
            if single.is_file():
                return [single]
            index = folder / f"{stem}.safetensors.index.json"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise WeightsError(f"{index}: corrupt shard index (no weight_map)") from None
                shards = sorted(set(weight_map.values()))
                missing = [s for s in shards if not (folder / s).is_file()]
                if missing:
                    raise WeightsError(f"{index}: shard(s) missing: {', '.join(missing)}")
                return [folder / s for s in shards]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
    if pickles:
        raise WeightsError(
            f"{folder}: only pickle weights ({pickles[0]}); convert them first with "
            "`codi convert-weights SOURCE OUTPUT --allow-pickle`"
        )
    raise WeightsError(f"{folder}: no safetensors weights found")


def read_tensors(folder: str | Path, variant: Optional[str] = None) -> TensorSource:
    """All tensors of a component folder, memory-mapped."""
    return TensorSource([SafetensorsFile(p) for p in find_weight_files(folder, variant)])


def load_folder(
    folder: str | Path, config_class: Any, build: Callable[[Any], Any], name_map: NameMap, *,
    dtype: Any = jnp.float32, variant: Optional[str] = None,
    tensors: Optional[Callable[[], Mapping[str, np.ndarray]]] = None,
) -> Any:
    """The model of a component folder: its `config.json` read as `config_class`, the model
    `build(config)` traced as a template, filled by `load_state` from the folder's tensors
    (`tensors()` where given, else its safetensors weights, preferring `variant`)."""
    folder = Path(folder)
    try:
        config = config_class.from_dict(read_config(folder))
    except (TypeError, ValueError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{folder / 'config.json'}: unsupported config: {e}") from None
    template = eqx.filter_eval_shape(lambda: build(config))
    source = read_tensors(folder, variant) if tensors is None else tensors()
    return load_state(template, source, name_map, dtype=dtype, what=str(folder))
