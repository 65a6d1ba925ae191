"""JAX's persistent compilation cache: compiled programs kept on disk, so that a later process
compiling the same program (same shapes, dtypes, devices and jax version) loads it instead.

The `codi` commands that compile (train, sample, demo) turn it on by default."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

ENV_DIR = "CODI_COMPILATION_CACHE_DIR"
"""Environment variable naming the default cache directory."""
ENV_DISABLE = "CODI_NO_COMPILATION_CACHE"
"""Environment variable that turns the commands' cache off (`1`, `true`, `yes` or `on`)."""

# jax's own options that a user may already have set through the environment; those win.
_THRESHOLDS = {
    "jax_persistent_cache_min_compile_time_secs": 0.0,  # also the programs compiled in < 1 s
    "jax_persistent_cache_min_entry_size_bytes": -1,  # every size, and no filesystem override
}


def default_compilation_cache_dir() -> Path:
    """Where the cache lives unless told otherwise: `$CODI_COMPILATION_CACHE_DIR`, else jax's
    own `$JAX_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/codi-eqx/jax` (an absolute
    `XDG_CACHE_HOME` only, as the XDG specification asks), else `~/.cache/codi-eqx/jax`."""
    for name in (ENV_DIR, "JAX_COMPILATION_CACHE_DIR"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "codi-eqx" / "jax"


def compilation_cache_disabled_by_env() -> bool:
    """Whether `$CODI_NO_COMPILATION_CACHE` asks for no cache (anything but empty, 0, false,
    no or off)."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache in `path` and cache every program, however
    quick to compile or small (jax's defaults skip those under a second, i.e. most CPU ones).
    Call it before the first compilation that should be cached; called again with another
    directory, later compilations use the new one.

    **Arguments:**

    - `path`: the cache directory, created if missing (mode 0700: whoever can write to it can
      make this process run code). Default: `default_compilation_cache_dir()`.

    **Returns:** the directory used, absolute.

    **Raises:** `OSError` if the directory cannot be created or written to; jax's
    configuration is then left as it was.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    directory = Path(path).expanduser() if path is not None else default_compilation_cache_dir()
    directory = directory.absolute()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".codi-write-check-", dir=directory)
    os.close(fd)
    os.unlink(probe)

    changed = (jax.config.jax_compilation_cache_dir != str(directory)
               or not jax.config.jax_enable_compilation_cache)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    for name, value in _THRESHOLDS.items():
        if name.upper() not in os.environ:
            jax.config.update(name, value)
    if changed:  # jax opens its cache once per process; make it reopen at the new place
        compilation_cache.reset_cache()
    return directory


def disable_compilation_cache() -> None:
    """Turn JAX's persistent compilation cache off for the rest of the process (also one
    configured through jax's own `JAX_COMPILATION_CACHE_DIR`)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_enable_compilation_cache:
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
