"""The persistent compilation cache of `codi train / sample / demo`: a second process with the
same shapes loads every program from disk (jax's own hit counter says so), the off switches
write nothing, and a folder that cannot be written costs a note, not the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import make_tiny_pipeline
from PIL import Image

from codi_eqx._compilation_cache import (
    compilation_cache_disabled_by_env,
    default_compilation_cache_dir,
    enable_compilation_cache,
)

REPO = Path(__file__).parents[1]
_ENV_NAMES = ("CODI_COMPILATION_CACHE_DIR", "CODI_NO_COMPILATION_CACHE",
              "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME", "JAX_ENABLE_COMPILATION_CACHE",
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")

# Runs `codi ARGS...` in a fresh process and writes what jax.monitoring saw to EVENTS.json.
_DRIVER = """
import atexit, collections, json, sys, time
from jax import monitoring
start = time.monotonic()
events, seconds = collections.Counter(), collections.Counter()
monitoring.register_event_listener(lambda name, **kw: events.update([name]))
monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: seconds.update({name: secs}))
out = sys.argv[1]
atexit.register(lambda: json.dump(
    {"events": events, "seconds": seconds, "wall": time.monotonic() - start}, open(out, "w")))
sys.argv = ["codi", *sys.argv[2:]]
from cli.main import app
app()
"""

HITS = "/jax/compilation_cache/cache_hits"
MISSES = "/jax/compilation_cache/cache_misses"  # jax counts one per entry written
REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
COMPILE = "/jax/core/compile/backend_compile_duration"


def start(folder: Path, name: str, *args, env=None):
    """`codi ARGS` in a fresh process (no jit cache carried over), recording jax's events."""
    child_env = {k: v for k, v in os.environ.items() if k not in _ENV_NAMES}
    child_env.update(env or {})
    events = folder / f"events-{name}.json"
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(events), *map(str, args)],
                            cwd=REPO, env=child_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    return proc, events


def finish(started):
    """(stderr, jax's event counts, durations in seconds, wall time) of a started run."""
    proc, events = started
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    got = json.loads(events.read_text())
    return err, got["events"], got["seconds"], got["wall"]


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_tiny_pipeline(root / "model")
    (root / "a-file").write_text("")
    return root


def _sample(root, name, *extra, env=None):
    return start(root, name, "sample", "--model", root / "model", "--prompt", "a cat",
                 "--steps", 2, "--output", root / f"{name}.png", *extra, env=env)


@pytest.fixture(scope="module")
def runs(root):
    """A tiny `codi sample` twice, each in its own process: into an empty cache, then the
    same again (the kebab-case spelling of the flag)."""
    first = finish(_sample(root, "first", "--compilation_cache_dir", root / "cache"))
    written = entries(root / "cache")
    second = finish(_sample(root, "second", "--compilation-cache-dir", root / "cache"))
    return dict(root=root, first=first, second=second, written=written)


@pytest.fixture(scope="module")
def switches(root):
    """Two more, side by side (compiling is single-threaded): with --no-compilation-cache,
    and with a cache folder that cannot be made."""
    # The off switch wins over every way of naming a folder, jax's own variable included.
    off = _sample(root, "off", "--no-compilation-cache", env={
        "CODI_COMPILATION_CACHE_DIR": str(root / "off"),
        "JAX_COMPILATION_CACHE_DIR": str(root / "off")})
    bad = root / "a-file" / "cache"  # cannot be made, even by root
    unwritable = _sample(root, "unwritable", "--compilation_cache_dir", bad)
    return dict(root=root, off=finish(off), unwritable=finish(unwritable), bad=bad)


@pytest.mark.slow  # two `codi` processes, each compiling: 18 s of the default set's budget
def test_second_process_loads_every_program_from_the_cache(runs):
    _, first, first_s, first_wall = runs["first"]
    _, second, second_s, second_wall = runs["second"]
    print(f"\n[compilation cache] tiny `codi sample` (beside another run): {first[REQUESTS]} "
          f"programs; first process {first_wall:.1f} s ({first_s[COMPILE]:.1f} s compiling), "
          f"second {second_wall:.1f} s ({second_s.get(COMPILE, 0):.1f} s; "
          f"{second.get(HITS, 0)} cache hits)")
    assert first.get(MISSES, 0) > 0 and first.get(HITS, 0) == 0, first
    assert len(runs["written"]) == first[MISSES], (sorted(runs["written"]), first)
    # Nothing XLA runs in the second process was compiled there.
    assert second.get(HITS, 0) == second[REQUESTS] == first[REQUESTS], second
    assert second.get(MISSES, 0) == 0, second
    assert entries(runs["root"] / "cache") == runs["written"]
    with Image.open(runs["root"] / "first.png") as a, Image.open(runs["root"] / "second.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_no_compilation_cache_writes_nothing(switches):
    runs = switches
    err, events, _, _ = runs["off"]
    assert not (runs["root"] / "off").exists(), sorted(entries(runs["root"] / "off"))
    assert events.get(REQUESTS, 0) == 0 and events.get(HITS, 0) == 0, events
    assert "/jax/compilation_cache/task_disabled_cache" in events, events
    assert (runs["root"] / "off.png").is_file() and "compilation cache" not in err


@pytest.mark.slow
def test_unwritable_folder_is_a_note_and_the_run_goes_on(switches):
    runs = switches
    err, events, _, _ = runs["unwritable"]
    notes = [line for line in err.splitlines() if "compilation cache" in line]
    assert len(notes) == 1 and notes[0].startswith("note:") and str(runs["bad"]) in notes[0], err
    assert events.get(REQUESTS, 0) == 0 and events.get(HITS, 0) == 0, events
    assert "/jax/compilation_cache/task_disabled_cache" in events, events
    assert (runs["root"] / "unwritable.png").is_file() and not runs["bad"].exists()


def test_enable_refuses_an_unwritable_folder_and_leaves_jax_alone(tmp_path):
    (tmp_path / "f").write_text("")
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache,
              jax.config.jax_persistent_cache_min_compile_time_secs)
    with pytest.raises(OSError):
        enable_compilation_cache(tmp_path / "f" / "cache")
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache,
            jax.config.jax_persistent_cache_min_compile_time_secs) == before


def test_default_folder_and_off_switch(monkeypatch, tmp_path):
    for name in _ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_compilation_cache_dir() == tmp_path / "home" / ".cache" / "codi-eqx" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_compilation_cache_dir() == tmp_path / "home" / ".cache" / "codi-eqx" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_compilation_cache_dir() == tmp_path / "xdg" / "codi-eqx" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert default_compilation_cache_dir() == tmp_path / "jax"
    monkeypatch.setenv("CODI_COMPILATION_CACHE_DIR", str(tmp_path / "codi"))
    assert default_compilation_cache_dir() == tmp_path / "codi"

    for value, off in [("", False), ("0", False), ("false", False), ("No", False),
                       ("off", False), ("1", True), ("true", True), ("yes", True)]:
        monkeypatch.setenv("CODI_NO_COMPILATION_CACHE", value)
        assert compilation_cache_disabled_by_env() is off, value
