"""The jaxtyping annotations are checked under pytest.

`--jaxtyping-packages=codi_eqx,weights_conversion,beartype.beartype` (pyproject.toml) installs
an import hook before conftest.py runs, which decorates every function and class of those
packages with `jaxtyped(typechecker=beartype)`. Most of the library uses postponed annotations
(`from __future__ import annotations`): jaxtyping then evaluates each string when it decorates
the function, at import time, and silently checks nothing for a string it cannot resolve. These
tests call annotated public code with wrong shapes and dtypes and expect the check's error, and
audit, in a fresh interpreter, that no array annotation falls back to "unchecked". Outside the
tests nothing is checked and beartype is not needed: a last test imports the library without it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxtyping._decorator as jaxtyping_decorator
import pytest
from helpers import SCHEDULE_CONFIG, tiny_models
from jaxtyping import TypeCheckError

from codi_eqx.diffusion import NoiseSchedule, add_noise, c_skip, to_x_eps
from codi_eqx.models import ControlNetModel
from codi_eqx.models._vae import DiagonalGaussianDistribution
from codi_eqx.sampling import codi_sample, ddim_sample, decode_latents

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def _ok_and_bad(good, bad):
    """`good()` passes the checks, `bad()` is refused by them."""
    good()
    with pytest.raises(TypeCheckError):
        bad()


def test_unet_refuses_wrong_rank_dtype_and_unbatched_text(models):
    unet = models[0]
    z = jnp.zeros((4, 4, 4))
    text = jnp.zeros((3, 16))
    # All refused before any computation: the checks run on the arguments first.
    with pytest.raises(TypeCheckError, match="sample"):
        unet(z[None], 10, text)  # a batch passed without vmap
    with pytest.raises(TypeCheckError, match="sample"):
        unet(z.astype(jnp.int32), 10, text)
    with pytest.raises(TypeCheckError, match="encoder_hidden_states"):
        unet(z, 10, text[None])
    with pytest.raises(TypeCheckError, match="timestep"):
        unet(z, jnp.zeros((2,), jnp.int32), text)  # one timestep per example


def test_building_blocks_check_shapes(models):
    conv = models[0].conv_in  # 4 -> 16 channels
    _ok_and_bad(lambda: conv(jnp.zeros((4, 3, 3))), lambda: conv(jnp.zeros((3, 3))))
    norm = models[0].conv_norm_out
    _ok_and_bad(lambda: norm(jnp.zeros((16, 2, 2))),
                lambda: norm(jnp.zeros((16, 2, 2), jnp.int32)))


def test_vae_decode_and_posterior_check_shapes(models):
    vae = models[1]
    with pytest.raises(TypeCheckError, match="z"):
        vae.decode(jnp.zeros((4, 4)))
    with pytest.raises(TypeCheckError, match="x"):
        vae.encode(jnp.zeros((3, 32, 32), jnp.int32))
    _ok_and_bad(
        lambda: DiagonalGaussianDistribution(jnp.zeros((4, 2, 2)), jnp.zeros((4, 2, 2))),
        # "c h w" binds h: mean and logvar must agree
        lambda: DiagonalGaussianDistribution(jnp.zeros((4, 2, 2)), jnp.zeros((4, 2, 3))),
    )
    with pytest.raises(TypeCheckError):
        decode_latents(vae, jnp.zeros((1, 4, 4, 4)))


def test_clip_refuses_float_ids(models):
    text = models[2]
    with pytest.raises(TypeCheckError, match="input_ids"):
        text(jnp.zeros((5,), jnp.float32))
    with pytest.raises(TypeCheckError, match="input_ids"):
        text(jnp.zeros((2, 5), jnp.int32))  # a batch passed without vmap


def test_adapter_refuses_wrong_condition_rank(models):
    unet = models[0]
    adapter = ControlNetModel.from_unet(unet, conditioning_channels=3, key=jax.random.key(0))
    with pytest.raises(TypeCheckError, match="controlnet_cond"):
        adapter(jnp.zeros((4, 4, 4)), 10, jnp.zeros((3, 16)), jnp.zeros((32, 32)))


def test_diffusion_helpers_check_shapes():
    x = jnp.ones((4, 3, 2))
    _ok_and_bad(lambda: add_noise(x, x, 0.6, 0.8),
                lambda: add_noise(x, jnp.ones((4, 3, 3)), 0.6, 0.8))
    _ok_and_bad(lambda: to_x_eps(x, x, 0.6, 0.8, "epsilon"),
                lambda: to_x_eps(x, x[:, :, :1], 0.6, 0.8, "epsilon"))
    _ok_and_bad(lambda: c_skip(jnp.asarray(10)), lambda: c_skip("10"))


def test_samplers_check_shapes():
    schedule = NoiseSchedule.from_config(SCHEDULE_CONFIG)
    z = jnp.ones((4, 3, 2))
    _ok_and_bad(
        lambda: codi_sample(lambda zi, t: 0.5 * zi, schedule, z, (500, 250)),
        # a model that returns the wrong shape is caught where its output is converted
        lambda: codi_sample(lambda zi, t: zi[:, :, :1], schedule, z, (500, 250)),
    )
    with pytest.raises(TypeCheckError, match="z"):
        ddim_sample(lambda zi, t: zi, schedule, z[0], (500, 250), (250, -1))


def test_weights_conversion_is_checked():
    from weights_conversion import load_unet

    with pytest.raises(TypeCheckError, match="folder"):
        load_unet(123)


def _packages(config) -> tuple[list[str], str]:
    value = config.getoption("--jaxtyping-packages")
    assert value, "pytest runs without --jaxtyping-packages: nothing would be checked"
    *packages, checker = value.split(",")
    return packages, checker


def _run(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


_IMPORT_ALL = """
import importlib, importlib.util, pkgutil

def import_all(packages):
    names = []
    for pkg in packages:
        if importlib.util.find_spec(pkg) is None:
            continue
        module = importlib.import_module(pkg)
        names.append(pkg)
        for info in pkgutil.walk_packages(module.__path__, pkg + "."):
            importlib.import_module(info.name)
            names.append(info.name)
    return names
"""


def test_every_array_annotation_resolves_when_decorated(request):
    """jaxtyping resolves a postponed annotation when the hook decorates the function (import
    time); one it cannot resolve becomes `Any`, unchecked. Record those, importing every
    module under the same hook as pytest's: only a class naming itself in its own methods
    (e.g. `from_dict(...) -> "Config"`) may remain, never an array annotation."""
    packages, checker = _packages(request.config)
    code = _IMPORT_ALL + """
import json, sys, typing
import jaxtyping._decorator as decorator
from jaxtyping import install_import_hook

unresolved = []
resolve = decorator._destring_annotation

def recording(ann, ns):
    out = resolve(ann, ns)
    if isinstance(ann, str) and out is typing.Any and ann.strip("'\\"") != "Any":
        fn = sys._getframe(1).f_locals.get("fn")
        unresolved.append([getattr(fn, "__qualname__", "?"), ann])
    return out

decorator._destring_annotation = recording
packages = sys.argv[1].split(",")
with install_import_hook(packages, sys.argv[2]):
    names = import_all(packages)
print(json.dumps({"modules": names, "unresolved": unresolved}))
"""
    if not hasattr(jaxtyping_decorator, "_destring_annotation"):
        pytest.skip("this jaxtyping resolves annotations differently")
    out = json.loads(_run(code, ",".join(packages), checker).splitlines()[-1])
    assert "codi_eqx.models._unet" in out["modules"] and len(out["modules"]) > 40
    for qualname, ann in out["unresolved"]:
        owner = qualname.split(".")[0]
        assert ann.strip("'\"") == owner, f"{qualname}: annotation {ann!r} is not checked"


def test_library_imports_without_beartype(request):
    """beartype is only the tests' checker: the library imports (and the GPU machine runs it)
    without it."""
    packages, _ = _packages(request.config)
    code = _IMPORT_ALL + """
import sys
sys.modules["beartype"] = None  # any import of it now fails
names = import_all(sys.argv[1].split(","))
assert "codi_eqx.models._unet" in names, names
"""
    _run(code, ",".join(packages))
