"""The host allocator setting of the compiling commands (codi_eqx/_host_allocator.py)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from codi_eqx import _host_allocator as ha

# A child process allocates and touches a 256 MiB block, frees it, and does it again; it
# prints the minor page faults of the second round. Fresh pages fault once per 4 KiB page
# (65536 for 256 MiB); reused heap pages do not fault.
_CHILD = textwrap.dedent("""
    import ctypes, json, resource, sys
    sys.path.insert(0, {root!r})
    from codi_eqx import _host_allocator as ha
    applied = ha.keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
    n = 256 << 20
    def round_trip():
        p = libc.malloc(n)
        assert p
        libc.memset(p, 1, n)
        libc.free(p)
    round_trip()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    round_trip()
    print(json.dumps({{"applied": applied,
                       "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
""")


def _run_child(**env):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environ = {k: v for k, v in os.environ.items()
               if k not in ("CODI_KEEP_MALLOC", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=root)], env=environ,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _glibc_or_skip():
    if ha._glibc() is None:
        pytest.skip("not glibc: the setting does not apply")


def test_freed_memory_is_reused_without_page_faults():
    _glibc_or_skip()
    kept = _run_child()
    plain = _run_child(CODI_KEEP_MALLOC="1")
    assert kept["applied"] and not plain["applied"]
    # 256 MiB of fresh 4 KiB pages: 65536 faults without the setting (fewer with huge pages)
    assert plain["faults"] > 4000, plain
    assert kept["faults"] < 500, kept


@pytest.mark.parametrize("env, chose", [
    ({}, False),
    ({"CODI_KEEP_MALLOC": "0"}, False),
    ({"CODI_KEEP_MALLOC": "1"}, True),
    ({"MALLOC_MMAP_MAX_": "65536"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, True),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, True),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, False),
])
def test_the_users_choice_wins(env, chose):
    assert ha.user_chose(env) is chose
    if chose:
        assert ha.keep_freed_memory(env) is False


def test_compiling_commands_set_it_up_before_the_compilation_cache(monkeypatch, tmp_path):
    from cli import _common

    calls = []
    monkeypatch.setattr(ha, "keep_freed_memory", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(_common, "use_compilation_cache",
                        lambda d, disabled=False: calls.append("cache") or None)
    _common.prepare_compiled_run(tmp_path, False)
    assert calls == ["malloc", "cache"]
    # every compiling command goes through prepare_compiled_run
    cli_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cli")
    for name in ("train.py", "sample.py", "demo.py", "pretrain_toy.py"):
        text = open(os.path.join(cli_dir, name)).read()
        assert "prepare_compiled_run(" in text and "use_compilation_cache(" not in text, name
