"""The one error type of the data package."""


class DataError(ValueError):
    """Bad or unreadable training data, reported as one line (missing column, missing file,
    unknown format, corrupt image under `strict=True`, stale latent cache)."""
