"""2 processes x 2 simulated CPU devices (jax.distributed on localhost, gloo collectives) give
the loss of one process on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one():
    if jax.device_count() < 4:
        pytest.skip("needs 4 simulated devices for the single-process reference")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "mp_worker.py"), str(port), str(i)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]
    from helpers import run_two_steps

    reference = run_two_steps()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
    for r in results:
        assert r["devices"] == 4
        for got, want in zip(r["metrics"], reference):
            print(f"[multiprocess] process {r['process']}: loss {got['loss']:.6e} vs one process {want['loss']:.6e}")
            for k in ("loss", "grad_norm"):
                assert abs(got[k] - want[k]) <= 1e-5 * abs(want[k]), (k, got[k], want[k])
