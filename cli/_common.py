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
        transient=False,
        disable=kwargs.pop("disable", False),
        **kwargs,
    )


def note(message: str) -> None:
    """A one-line note on stderr."""
    print(message, file=sys.stderr)
