"""What every `codi` command shares: one-line errors with the right exit code, progress bars,
and outputs that appear whole or not at all."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from codi_eqx import errors
from codi_eqx._atomic import atomic_path as atomic_path  # re-exported for the commands

USAGE_ERROR = 2
FAILURE = 1


CodiError = errors.CodiError
"""A failure to report as one line (exit code 1): the library's own base class."""
CodiUsageError = errors.UsageError
"""Bad input from the user (exit code 2): the library's `UsageError`."""


def fail(message: str, code: int = FAILURE) -> "typer.Exit":
    """Print `message` as one line on stderr and exit with `code` (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the library's expected errors into one-line messages and exit codes: a
    `UsageError` exits with 2, any other `CodiError` with 1."""
    try:
        yield
    except errors.UsageError as e:
        fail(str(e), USAGE_ERROR)
    except errors.CodiError as e:
        fail(str(e), FAILURE)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except MemoryError:
        fail("out of memory (try a smaller batch or resolution)", FAILURE)
    except OSError as e:
        fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), FAILURE)


def progress(**kwargs):
    """A progress bar on stderr (rich), quiet when stderr is not a terminal unless forced."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        transient=kwargs.pop("transient", False),
        disable=kwargs.pop("disable", False),
        **kwargs,
    )


def note(message: str) -> None:
    """A one-line note on stderr."""
    print(message, file=sys.stderr)


COMPILATION_CACHE_DIR_HELP = (
    "JAX's persistent compilation cache: compiled programs are kept in this folder, so that a "
    "later run with the same shapes skips compiling them. Default: "
    "$CODI_COMPILATION_CACHE_DIR (or jax's $JAX_COMPILATION_CACHE_DIR), else "
    "$XDG_CACHE_HOME/codi-eqx/jax or ~/.cache/codi-eqx/jax.")
NO_COMPILATION_CACHE_HELP = (
    "Compile afresh and keep nothing on disk (also with the environment variable "
    "CODI_NO_COMPILATION_CACHE=1).")
# The two options, for commands that declare them in the default help panel.
CompilationCacheDirOption = Annotated[Optional[Path], typer.Option(
    "--compilation_cache_dir", "--compilation-cache-dir", help=COMPILATION_CACHE_DIR_HELP)]
NoCompilationCacheOption = Annotated[bool, typer.Option(
    "--no_compilation_cache", "--no-compilation-cache", help=NO_COMPILATION_CACHE_HELP)]


def use_compilation_cache(directory: Path | None, disabled: bool = False) -> Path | None:
    """Turn JAX's persistent compilation cache on (in `directory`, or the default one) or off
    (`disabled`, or $CODI_NO_COMPILATION_CACHE); call it before anything compiles. A folder
    that cannot be written gets a one-line note and the run goes on without the cache.
    Returns the folder in use, or None."""
    from codi_eqx._compilation_cache import (
        compilation_cache_disabled_by_env,
        default_compilation_cache_dir,
        disable_compilation_cache,
        enable_compilation_cache,
    )

    if disabled or compilation_cache_disabled_by_env():
        disable_compilation_cache()
        return None
    try:
        return enable_compilation_cache(directory)
    except OSError as e:
        disable_compilation_cache()  # also one configured through jax's own variables
        where = directory if directory is not None else default_compilation_cache_dir()
        note(f"note: compilation cache off (cannot write to {where}: {e.strerror or e}); "
             "choose another with --compilation_cache_dir or silence this with "
             "--no_compilation_cache")
        return None
