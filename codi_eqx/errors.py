"""The project's error hierarchy: what a caller (the `codi` CLI among them) can report as one
line, and whether the user's input or the run itself is to blame.

Each error of the library subclasses one of these two and keeps its builtin base as well
(`WeightsError` is also a `ValueError`, `TrainingError` a `RuntimeError`, ...), so that code
catching the builtin keeps working."""


class CodiError(Exception):
    """A failure reported as one line, with no traceback (the CLI exits with code 1)."""


class UsageError(CodiError):
    """Bad input from the user: an option, a path or a combination of them that cannot work
    (the CLI exits with code 2)."""
