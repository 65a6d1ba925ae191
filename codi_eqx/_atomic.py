"""Outputs that appear whole or not at all: write to a temporary name beside the target, then
rename it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync(path: Path) -> None:
    """Flush `path` (a file, or a folder's entries) to disk; a no-op where the platform
    cannot open folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    if root.is_file():
        _fsync(root)
        return
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, is_dir: bool = False,
                durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target` (a file, or an empty folder with `is_dir`) to
    write to. When the block ends without an exception it is renamed onto `target`
    (replacing what was there); otherwise it is removed, so no half-written output is ever
    left where a good one stood.

    **Arguments:**

    - `target`: the final path; its parent folder is created.
    - `is_dir`: yield a folder rather than a file.
    - `durable`: fsync every file written, and the parent folder after the rename, so that
      a crash of the machine also leaves the old output or the whole new one (checkpoints).

    The temporary names start with `.{target.name}.tmp-` (and `.{target.name}.old-` for the
    folder being replaced), so that a crashed write can be recognised and cleaned up."""
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
        if durable:
            _fsync_tree(tmp)
        if is_dir and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        if durable:
            _fsync(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
