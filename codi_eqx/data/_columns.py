"""Choosing the image / caption / condition-image columns of a dataset from its first record,
so that a missing column is a one-line error before any work starts."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Optional

from ._errors import DataError

IMAGE_DEFAULTS = ("image",)
CAPTION_DEFAULTS = ("caption", "text", "prompt")
CONDITIONING_DEFAULTS = ("conditioning_image",)


@dataclasses.dataclass(frozen=True)
class Columns:
    """The resolved column names; `conditioning` None means unconditional data."""

    image: str
    caption: str
    conditioning: Optional[str]


def _find(keys: Collection[str], wanted: str, aliases: bool) -> Optional[str]:
    if wanted in keys:
        return wanted
    if aliases:  # imagefolder: `file_name` is the image; `X_file_name` is image column X
        if wanted == "image" and "file_name" in keys:
            return "file_name"
        if f"{wanted}_file_name" in keys:
            return f"{wanted}_file_name"
    return None


def _missing(where: str, what: str, wanted: Sequence[str], keys: Collection[str], flag: str):
    names = " or ".join(repr(w) for w in wanted)
    have = ", ".join(sorted(keys)) or "none"
    return DataError(f"{where}: no {what} column {names} (columns: {have}); choose one with {flag}")


def pick_columns(
    keys: Collection[str],
    *,
    where: str,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    conditioning_image_column: Optional[str] = None,
    unconditional: bool = False,
    file_name_aliases: bool = False,
) -> Columns:
    """Resolve the columns against the keys of the first record.

    An explicitly named column must exist. Left as None, the image and caption columns fall
    back to the usual names (`image`; `caption`, `text`, `prompt`), and the condition image to
    `conditioning_image` when present, else none (unconditional)."""
    image_wanted = (image_column,) if image_column else IMAGE_DEFAULTS
    caption_wanted = (caption_column,) if caption_column else CAPTION_DEFAULTS
    image = next((c for w in image_wanted if (c := _find(keys, w, file_name_aliases))), None)
    if image is None:
        raise _missing(where, "image", image_wanted, keys, "--image_column")
    caption = next((c for w in caption_wanted if (c := _find(keys, w, False))), None)
    if caption is None:
        raise _missing(where, "caption", caption_wanted, keys, "--caption_column")
    conditioning = None
    if not unconditional:
        cond_wanted = ((conditioning_image_column,) if conditioning_image_column
                       else CONDITIONING_DEFAULTS)
        conditioning = next(
            (c for w in cond_wanted if (c := _find(keys, w, file_name_aliases))), None
        )
        if conditioning is None and conditioning_image_column:
            raise _missing(
                where, "condition image", cond_wanted, keys, "--conditioning_image_column"
            )
    return Columns(image, caption, conditioning)
