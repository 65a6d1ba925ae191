import gc
import os

# Several simulated CPU devices for the data-parallel tests; must be set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Each test module's compiled executables are released when it ends. On CPU every XLA
    executable holds a few memory mappings until its jit cache entry goes; a whole suite run in
    one process otherwise reaches the kernel's per-process limit (vm.max_map_count, 65530 by
    default) and XLA aborts inside a later compilation."""
    yield
    jax.clear_caches()
    gc.collect()
