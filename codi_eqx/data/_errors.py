"""The one error type of the data package."""

from ..errors import CodiError


class DataError(CodiError, ValueError):
    """Bad or unreadable training data, reported as one line (missing column, missing file,
    unknown format, corrupt image under `strict=True`, stale latent cache)."""
