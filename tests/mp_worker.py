"""One process of the multi-process test: 2 processes x 2 CPU devices, jax.distributed on
localhost with CPU collectives; prints this process's view of the step's metrics as JSON."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from helpers import xla_flags  # noqa: E402  (imports jax; its backend starts later)

# 2 devices, and otherwise the test session's flags (tests/conftest.py).
os.environ["XLA_FLAGS"] = xla_flags(2)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from codi_eqx.parallel import initialize_distributed  # noqa: E402


def main(port: int, process_id: int) -> None:
    initialize_distributed(f"127.0.0.1:{port}", 2, process_id, cpu_collectives="gloo")
    from helpers import run_two_steps

    metrics = run_two_steps(share=(process_id * 2, process_id * 2 + 2))
    print("RESULT " + json.dumps({"process": process_id, "devices": jax.device_count(), "metrics": metrics}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
