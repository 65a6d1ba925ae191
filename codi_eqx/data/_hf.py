"""Hugging Face `datasets` (optional extra `[hf]`): a hub id from the local cache, or a folder
written by `save_to_disk`. Image columns are read undecoded; workers decode them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ._columns import Columns, pick_columns
from ._errors import DataError
from ._records import RawExample


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading Hugging Face datasets needs the `datasets` package: "
            "pip install codi-eqx[hf]"
        ) from None
    return datasets


def _image_ref(value: Any, root: Optional[Path]):
    """An undecoded `datasets.Image` value ({"bytes", "path"}), a path string, or a decoded
    image, as an `ImageRef`."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        path = value.get("path")
        return str(path) if path else b""
    if isinstance(value, str) and root is not None and not Path(value).is_absolute():
        return str(root / value)
    return value if value is not None else b""


class HFDataset:
    """One split of a Hugging Face dataset, indexable.

    **Arguments:**

    - `name`: a hub id (read from the local cache) or, with `load_from_disk`, a `save_to_disk`
      folder (a `DatasetDict` gives its `split`).
    - `config_name`, `cache_dir`, `split`: as for `datasets.load_dataset`.
    - the column options and `max_train_samples` (the first N rows).
    """

    def __init__(
        self,
        name: str,
        *,
        load_from_disk: bool = False,
        config_name: Optional[str] = None,
        cache_dir: Optional[str] = None,
        split: str = "train",
        image_column: Optional[str] = None,
        caption_column: Optional[str] = None,
        conditioning_image_column: Optional[str] = None,
        unconditional: bool = False,
        max_train_samples: Optional[int] = None,
    ):
        datasets = _import_datasets()
        self.root = Path(name) if load_from_disk else None
        try:
            if load_from_disk:
                ds = datasets.load_from_disk(name)
            else:
                ds = datasets.load_dataset(name, config_name, cache_dir=cache_dir, split=split)
        except FileNotFoundError as e:
            raise DataError(f"{name}: dataset not found ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name}: no split '{split}' (has: {', '.join(ds)})")
            ds = ds[split]
        if max_train_samples is not None:
            ds = ds.select(range(min(len(ds), max(0, int(max_train_samples)))))
        if len(ds) == 0:
            raise DataError(f"{name}: no rows")
        self.columns: Columns = pick_columns(
            ds.column_names,
            where=name,
            image_column=image_column,
            caption_column=caption_column,
            conditioning_image_column=conditioning_image_column,
            unconditional=unconditional,
        )
        for col in (self.columns.image, self.columns.conditioning):
            if col is not None and isinstance(ds.features[col], datasets.Image):
                ds = ds.cast_column(col, datasets.Image(decode=False))
        keep = [c for c in (self.columns.image, self.columns.caption, self.columns.conditioning)
                if c is not None]
        self._ds = ds.select_columns(keep)
        self.fingerprint = f"hf-{ds._fingerprint}"[:24]

    @property
    def conditioned(self) -> bool:
        return self.columns.conditioning is not None

    def __len__(self) -> int:
        return len(self._ds)

    def raw(self, i: int) -> RawExample:
        row = self._ds[int(i)]
        c = self.columns
        image = _image_ref(row[c.image], self.root)
        name = image if isinstance(image, str) else f"row {i}"
        return RawExample(
            index=int(i),
            image=image,
            conditioning=_image_ref(row[c.conditioning], self.root) if c.conditioning else None,
            caption=row[c.caption] if row[c.caption] is not None else "",
            name=Path(name).name if isinstance(image, str) else name,
        )
