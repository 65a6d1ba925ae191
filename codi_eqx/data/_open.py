"""Open a training dataset from the seed's flags: which format a path is, and the options."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

from ._errors import DataError
from ._folder import JsonlFolder
from ._hf import HFDataset
from ._tar import TarShards

Dataset = Union[JsonlFolder, HFDataset, TarShards]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training data is and how to read it (the seed's flags).

    - `train_data_dir`: a local dataset: the seed's folder (`meta.jsonl`), an imagefolder
      (`metadata.jsonl`), a `save_to_disk` folder, a folder of `*.tar` shards, or a shard pattern
      (`shards/{00000..00099}.tar`).
    - `dataset_name`: a Hugging Face hub id (local cache), or a local path as above.
    - `load_from_disk`: `dataset_name`/`train_data_dir` is a `save_to_disk` folder (accepted and
      unneeded for the other local formats, which are recognised by their files).
    - `image_column`, `caption_column`, `conditioning_image_column`: None picks the format's
      default (`image`; `caption`/`text`/`prompt`; `conditioning_image` when present).
    - `unconditional`: ignore any condition image.
    - `resolution`: the square training size.
    - `proportion_empty_prompts`: the fraction of captions replaced by "".
    - `max_train_samples`: use the first N examples only.
    - `shuffle_buffer`: tar shards only: samples held for shuffling.
    """

    train_data_dir: Optional[str] = None
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    load_from_disk: bool = False
    cache_dir: Optional[str] = None
    image_column: Optional[str] = None
    caption_column: Optional[str] = None
    conditioning_image_column: Optional[str] = None
    unconditional: bool = False
    resolution: int = 512
    proportion_empty_prompts: float = 0.0
    max_train_samples: Optional[int] = None
    shuffle_buffer: int = 1000

    def __post_init__(self):
        if self.resolution <= 0:
            raise DataError(f"resolution must be positive (got {self.resolution})")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise DataError("proportion_empty_prompts must be in [0, 1] "
                            f"(got {self.proportion_empty_prompts})")
        if self.max_train_samples is not None and self.max_train_samples <= 0:
            raise DataError(f"max_train_samples must be positive (got {self.max_train_samples})")


def _is_tar_pattern(s: str) -> bool:
    return s.endswith(".tar") or ".tar" in s and "{" in s


def open_dataset(config: DataConfig) -> Dataset:
    """The dataset `config` names, validated on its first record (missing columns and files
    are one-line `DataError`s raised here, before any work starts)."""
    if config.train_data_dir and config.dataset_name:
        raise DataError("give --dataset_name or --train_data_dir, not both")
    location = config.train_data_dir or config.dataset_name
    if not location:
        raise DataError("no training data: give --train_data_dir or --dataset_name")
    columns = dict(
        image_column=config.image_column,
        caption_column=config.caption_column,
        conditioning_image_column=config.conditioning_image_column,
        unconditional=config.unconditional,
        max_train_samples=config.max_train_samples,
    )
    path = Path(location)
    if _is_tar_pattern(location) or (path.is_dir() and not any(
            (path / f).exists() for f in ("meta.jsonl", "metadata.jsonl", "dataset_info.json",
                                          "state.json", "dataset_dict.json"))
            and any(path.glob("*.tar"))):
        return TarShards(location, shuffle_buffer=config.shuffle_buffer, **columns)
    if path.is_dir():
        if (path / "meta.jsonl").is_file():
            return JsonlFolder(path, meta_name="meta.jsonl", **columns)
        if (path / "metadata.jsonl").is_file():
            return JsonlFolder(path, meta_name="metadata.jsonl", file_name_aliases=True, **columns)
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json",
                                               "dataset_dict.json")):
            return HFDataset(location, load_from_disk=True, **columns)
        raise DataError(f"{path}: not a dataset folder (expected meta.jsonl, metadata.jsonl, "
                        "a save_to_disk folder, or *.tar shards)")
    if config.train_data_dir:
        raise DataError(f"--train_data_dir {location}: no such folder")
    if config.load_from_disk and config.cache_dir and (Path(config.cache_dir) / location).is_dir():
        return HFDataset(str(Path(config.cache_dir) / location), load_from_disk=True, **columns)
    return HFDataset(location, config_name=config.dataset_config_name,
                     cache_dir=config.cache_dir, **columns)
