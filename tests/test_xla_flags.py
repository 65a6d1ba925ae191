"""The package's XLA:CPU setting (codi_eqx/_xla_flags.py): convolutions through XLA's Eigen
kernels instead of YNNPACK library fusions. It is in effect in this process, the HLO check
sees the difference, and both backends compute the same convolutions."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_eqx._hlo import convolutions, slow_convolutions
from codi_eqx._xla_flags import CPU_CONVOLUTIONS_WITH_EIGEN, configure_xla_flags, flags_to_add


@pytest.mark.parametrize("xla_flags, version, keep, expected", [
    ("", "0.10.2", "", [CPU_CONVOLUTIONS_WITH_EIGEN]),
    ("--xla_force_host_platform_device_count=4", "0.11.0", "", [CPU_CONVOLUTIONS_WITH_EIGEN]),
    ("--xla_cpu_experimental_ynn_fusion_type=", "0.10.2", "", []),  # the user's choice wins
    ("", "0.10.2", "1", []),  # CODI_KEEP_XLA_FLAGS
    ("", "0.10.2", "0", [CPU_CONVOLUTIONS_WITH_EIGEN]),
    ("", "0.9.0", "", []),  # an XLA that may not know the flag
    ("", "0.10.0rc1", "", [CPU_CONVOLUTIONS_WITH_EIGEN]),
    ("", None, "", []),  # no jaxlib
])
def test_flags_to_add(xla_flags, version, keep, expected):
    assert flags_to_add(xla_flags, version, keep) == expected


def test_configure_appends_and_keeps_the_users_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    started = jax._src.xla_bridge.backends_are_initialized()
    added = configure_xla_flags(env)
    if started:  # too late for XLA to see it: nothing is added (and a warning says so)
        assert added == [] and env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    else:
        assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                    + CPU_CONVOLUTIONS_WITH_EIGEN)
    assert configure_xla_flags(env) == []  # already there: nothing added twice
    own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
    assert configure_xla_flags(own) == [] and own["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


_CONV_NET = """
import json, sys
import jax, jax.numpy as jnp, numpy as np

def net(w1, w2, x):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.silu(jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=dn))
    return jax.lax.conv_general_dilated(h, w2, (1, 1), "SAME", dimension_numbers=dn)

rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((2, 8, 8, 64)), jnp.float32)
w1 = jnp.asarray(rng.standard_normal((3, 3, 64, 64)) * 0.05, jnp.float32)
w2 = jnp.asarray(rng.standard_normal((3, 3, 64, 64)) * 0.05, jnp.float32)
loss = lambda w1, w2, x: jnp.sum(net(w1, w2, x) ** 2)
fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
hlo = fn.lower(w1, w2, x).compile().as_text()
value, grads = fn(w1, w2, x)
out = [np.asarray(value).tolist()] + [np.asarray(g).ravel()[::37].tolist() for g in grads]
print(json.dumps({"hlo": hlo, "out": out}))
"""


def _conv_net(env: dict) -> dict:
    run = subprocess.run([sys.executable, "-c", _CONV_NET], env=env, capture_output=True,
                         text=True, check=True, timeout=300)
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_convolutions_leave_ynnpack_and_compute_the_same():
    assert CPU_CONVOLUTIONS_WITH_EIGEN in os.environ["XLA_FLAGS"]  # importing codi_eqx added it
    # This process: a 64-channel convolution (YNNPACK takes those by default) is an Eigen call.
    x, w = jnp.ones((1, 8, 8, 64)), jnp.ones((3, 3, 64, 64))
    f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    hlo = f.lower(x, w).compile().as_text()
    assert len(convolutions(hlo)) == 1 and not slow_convolutions(hlo)

    # A forward and gradient of two convolutions, with the flag and with jaxlib's default.
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    eigen = _conv_net({**base, "XLA_FLAGS": CPU_CONVOLUTIONS_WITH_EIGEN})
    ynn = _conv_net({**base, "CODI_KEEP_XLA_FLAGS": "1"})
    eigen_convs, ynn_convs = convolutions(eigen["hlo"]), convolutions(ynn["hlo"])
    assert eigen_convs and not slow_convolutions(eigen["hlo"])
    # The check can fail: jaxlib's default puts these convolutions in library fusions.
    assert any(c.in_library_fusion for c in ynn_convs), [c.computation for c in ynn_convs]
    for a, b in zip(eigen["out"], ynn["out"]):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
