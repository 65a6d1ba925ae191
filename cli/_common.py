"""What every `codi` command shares: one-line errors with the right exit code, progress bars,
and outputs that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

USAGE_ERROR = 2
FAILURE = 1


class CodiError(Exception):
    """A failure to report as one line (exit code 1)."""


class CodiUsageError(CodiError):
    """Bad input from the user (exit code 2)."""


def fail(message: str, code: int = FAILURE) -> "typer.Exit":
    """Print `message` as one line on stderr and exit with `code` (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the library's expected errors into one-line messages and exit codes."""
    from weights_conversion import WeightsError

    try:
        yield
    except CodiUsageError as e:
        fail(str(e), USAGE_ERROR)
    except (CodiError, WeightsError) as e:
        fail(str(e), FAILURE)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except MemoryError:
        fail("out of memory (try a smaller batch or resolution)", FAILURE)
    except OSError as e:
        fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), FAILURE)


@contextlib.contextmanager
def atomic_path(target: Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`,
    on failure removed, so no half-written output is ever left where a good one stood."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent,
                                    suffix=target.suffix)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


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
