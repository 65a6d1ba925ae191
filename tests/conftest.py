import gc
import os

# Several simulated CPU devices for the data-parallel tests; must be set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# CLI tests run in-process: no persistent compilation cache (tests/test_compilation_cache.py
# turns it on for its own subprocesses).
os.environ.setdefault("CODI_NO_COMPILATION_CACHE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass
    yield


# On CPU every XLA executable holds memory mappings (tens for a training step) until its jit
# cache entry goes. A whole suite in one process otherwise reaches the kernel's per-process
# limit (vm.max_map_count, 65530 by default) and XLA aborts inside a later compilation.
_MAPS_SOFT_LIMIT = 25_000


def _mapping_count() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


def _release() -> None:
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code_per_module():
    """Each test module's compiled executables are released when it ends."""
    yield
    _release()


@pytest.fixture(autouse=True)
def _release_compiled_code_when_many():
    """Within a module that compiles a lot, release them early (later tests recompile)."""
    yield
    if _mapping_count() > _MAPS_SOFT_LIMIT:
        _release()
