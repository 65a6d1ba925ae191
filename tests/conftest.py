import gc
import os
import shutil
import tempfile

# Several simulated CPU devices for the data-parallel tests; must be set before jax starts.
_USER_XLA_FLAGS = "XLA_FLAGS" in os.environ
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# The default set (`-m 'not slow'`, pyproject's addopts) compiles fast: its tiny models spend
# far more time in XLA's compiler than in running. LLVM at -O0, and XLA:CPU's classic
# elemental emitters for fused loops instead of its MLIR fusion emitters; XLA's HLO
# optimisations, fusion decisions and layouts are unchanged. The tiny train step of
# test_compiled_code compiles in 16 s instead of 29 s (-O0 alone) and 28-35 s (the defaults),
# another job running on the 2 cores. Results differ from the default level's in the last
# bits (instruction selection, reduction order), within every parity bound; the slow set,
# whose long training runs and equality checks of two programs amplify such differences,
# compiles with XLA's defaults, as `codi` itself does. CODI_TESTS_OPTIMIZE=1: the defaults
# everywhere.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def pytest_configure(config):
    # Before any test module starts a jax backend (the flags are read then).
    default_set = (config.getoption("markexpr", "") or "").strip() == "not slow"
    if default_set and not _USER_XLA_FLAGS and not os.environ.get("CODI_TESTS_OPTIMIZE"):
        os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAGS


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent compilation cache for the test session (one per process, so per xdist worker):
# a program compiled again after a module released its executables, or by another module that
# builds the same tiny model, is read back instead of compiled. The in-process CLI tests find
# it through the commands' own default ($CODI_COMPILATION_CACHE_DIR);
# tests/test_compilation_cache.py gives its subprocesses their own folders.
_SESSION_CACHE = tempfile.mkdtemp(prefix="codi-tests-jax-cache-")
os.environ.pop("CODI_NO_COMPILATION_CACHE", None)
os.environ["CODI_COMPILATION_CACHE_DIR"] = _SESSION_CACHE

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


def _use_session_cache() -> None:
    """Turn the session's cache (back) on, whatever an earlier in-process command
    (`--no_compilation_cache`, another folder) left behind. codi_eqx is imported here, not at
    the top: the jaxtyping import hook must be in place before the package is first imported."""
    from codi_eqx._compilation_cache import enable_compilation_cache

    if os.environ.get("CODI_TESTS_NO_COMPILATION_CACHE"):  # to measure what the cache saves
        os.environ["CODI_NO_COMPILATION_CACHE"] = "1"
        return
    os.environ["CODI_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ.pop("CODI_NO_COMPILATION_CACHE", None)
    if (not jax.config.jax_enable_compilation_cache
            or jax.config.jax_compilation_cache_dir != _SESSION_CACHE):
        enable_compilation_cache(_SESSION_CACHE)


@pytest.fixture(autouse=True, scope="session")
def _session_compilation_cache():
    _use_session_cache()  # before any module-scoped fixture compiles
    yield


@pytest.fixture(autouse=True)
def _compilation_cache_per_test():
    _use_session_cache()
    yield


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


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


# Parametrised cases that run in the slow set only: a sibling case of the same test stays in
# the default run and covers the same code (the default run is kept to a few minutes).
_SLOW_CASES = {
    "test_conv_gradients.py::test_unet_gradients_match_diffusers[all]",
    "test_conv_gradients.py::test_unet_gradients_match_diffusers[none]",
    "test_unet.py::test_unet_with_diffusers_controlnet[sdxl-False]",
    "test_unet.py::test_fresh_adapter_leaves_unet_unchanged[sdxl-3]",
    "test_unet.py::test_fresh_adapter_leaves_unet_unchanged[sdxl-None]",
    "test_sdxl.py::test_sdxl_adapter_exports_to_diffusers[cond]",
    "test_unet.py::test_fresh_adapter_leaves_unet_unchanged[sd1-3]",
    "test_unet.py::test_fresh_adapter_leaves_unet_unchanged[sd1-None]",
    "test_unet.py::test_fresh_adapter_leaves_unet_unchanged[sd2-None]",
    "test_unet.py::test_unet_with_diffusers_controlnet[sd1-False]",
    "test_unet.py::test_unet_with_diffusers_controlnet[sd2-True]",
    "test_distill.py::test_fresh_adapter_loss_matches_the_formulas[v_prediction-options1]",
    "test_distill.py::test_fresh_adapter_loss_matches_the_formulas[sample-options2]",
    "test_distill.py::test_option_combinations_run[uncontrol-eps-snr]",
    "test_distill.py::test_option_combinations_run[online-odecfg-truenoise]",
    "test_distill.py::test_option_combinations_run[full-codi]",
    "test_distill.py::test_option_combinations_run[bf16]",
    "test_distill.py::test_option_combinations_run[unconditional-shared]",
    "test_distill.py::test_teacher_pass_shared_with_online_equals_separate[True]",
    "test_distill.py::test_teacher_pass_shared_with_online_equals_separate[False]",
    # The default set keeps the options' corner opposite to the defaults
    # (uncontrol-online-unconditional) and the full-CoDi `uncontrol` teacher (the pretrained
    # UNet, a fixed bug); the defaults' case (control-target-conditional) is below.
    *(f"test_distill.py::test_loss_with_distinct_parameters_matches_the_formulas[{case}]"
      for case in ("control-target-unconditional", "control-online-conditional",
                   "control-online-unconditional", "uncontrol-target-conditional",
                   "uncontrol-target-unconditional", "uncontrol-online-conditional")),
    "test_distill.py::test_full_codi_loss_with_distinct_parameters_matches_the_formulas[control-target]",
    "test_distill.py::test_full_codi_loss_with_distinct_parameters_matches_the_formulas[control-online]",
    *(f"test_distill.py::test_loss_option_changes_the_loss_as_the_formulas_say[{case}]"
      for case in ("true-noise", "tau", "cfg-aware-online-shared")),
    "test_controlnet_objective.py::test_diffusion_loss_matches_the_formula[v_prediction]",
    "test_unet.py::test_adapter_with_condition_loads_in_diffusers[sd2]",
    "test_unet.py::test_unet_with_diffusers_controlnet[sd2-False]",
    # The default set keeps SD1's UNet parity, SD1's UNet + ControlNet parity and SDXL's UNet
    # on its pipeline conditioning (test_sdxl.py); the other families' copies run here.
    "test_unet.py::test_unet_parity[sd2]",
    "test_unet.py::test_unet_parity[sdxl]",
    "test_unet.py::test_unet_with_diffusers_controlnet[sdxl-True]",
    "test_unet.py::test_adapter_with_condition_loads_in_diffusers[sd1]",  # sdxl stays
    "test_distill.py::test_loss_with_distinct_parameters_matches_the_formulas[control-target-conditional]",
    *(f"test_distill.py::test_loss_option_changes_the_loss_as_the_formulas_say[{case}]"
      for case in ("ode-cfg", "cfg-aware", "sample-uncontrol")),
    "test_sdxl.py::test_ddim_sampling_matches_diffusers",  # test_sampling.py's DDIM stays
    "test_sdxl.py::test_sdxl_adapter_exports_to_diffusers[nocond]",
    "test_shared_helpers.py::test_compute_dtype_casts_the_weights",  # test_pipeline's bf16 stays
    # A fresh adapter's zero residuals: test_distill's fresh-adapter loss (equal to the
    # formulas' teacher) covers it in the default set.
    "test_unet.py::test_fresh_adapter_leaves_unet_unchanged[sd2-3]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("/")[-1] in _SLOW_CASES:
            item.add_marker(pytest.mark.slow)
