"""Checkpoints under `output_dir/checkpoints/checkpoint-{step}/`, written atomically.

A checkpoint holds:

- `adapter/`: the EMA adapter in the project's format (`codi_eqx.weights.save_adapter`), so
  that any checkpoint can be sampled from (`load_adapter(.../adapter)`);
- `state.eqx`: every array leaf of the `TrainState` (step, trained and EMA parameters, optimiser
  state, PRNG key), written with `equinox.tree_serialise_leaves`; it is read back into a state
  of the same structure rebuilt from the same configuration;
- `data.json`: the loader's position (`DataLoader.state_dict()`);
- `config.json`: the run's `TrainConfig`;
- `checkpoint.json`: the step and a format tag, written last.

The checkpoint is assembled in a temporary folder beside its final place, every file is
fsynced, and the folder is renamed into place: a crash leaves either the whole checkpoint or
none (temporary folders of a crashed write are removed by the next run)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from .._atomic import atomic_path
from ..errors import UsageError
from ..weights import save_adapter

CHECKPOINT_FORMAT = "codi-eqx-checkpoint"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(UsageError, ValueError):
    """A checkpoint that cannot be found or read."""


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, `(step, path)` by increasing step."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "checkpoint.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(spec: str, output_dir: str | os.PathLike) -> Optional[Path]:
    """`latest` (None when the run has none yet: it starts afresh), or a checkpoint folder."""
    if spec == "latest":
        return latest_checkpoint(output_dir)
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = checkpoints_dir(output_dir) / spec
    if not (path / "checkpoint.json").is_file():
        raise CheckpointError(f"resume_from_checkpoint {spec}: not a checkpoint folder "
                              "(no checkpoint.json); give `latest` or a checkpoint-STEP folder")
    return path


def clean_partial(output_dir: str | os.PathLike) -> None:
    """Remove the temporary folders of checkpoint writes that did not finish."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".checkpoint-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    output_dir: str | os.PathLike, step: int, state: Any, *, adapter: Any,
    data_state: dict, config: dict, total_limit: Optional[int] = None,
    adapter_config: Optional[dict] = None,
) -> Path:
    """Write `checkpoint-{step}` atomically, then keep only the newest `total_limit`.
    `adapter_config`: entries added to the adapter's config.json (its `AdapterSettings`)."""
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step}"
    with atomic_path(final, is_dir=True, durable=True) as tmp:
        save_adapter(adapter, tmp / "adapter", extra_config=adapter_config)
        eqx.tree_serialise_leaves(tmp / "state.eqx", state)
        (tmp / "data.json").write_text(json.dumps(data_state, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / "checkpoint.json").write_text(json.dumps(
            {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": int(step)}))
    if total_limit is not None:
        for _, path in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, like: Any) -> tuple[Any, dict, dict]:
    """`(state, data_state, config)` from a checkpoint; `like` is a state of the same
    structure (built from the same configuration) whose leaves are replaced."""
    path = Path(path)
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a codi-eqx checkpoint")
        state = eqx.tree_deserialise_leaves(path / "state.eqx", like)
        # Own copies: the state is donated to the compiled step, so it must not alias the
        # host buffers it was read into.
        state = jax.tree.map(lambda a: jnp.array(a) if isinstance(a, jax.Array) else a, state)
        data_state = json.loads((path / "data.json").read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e})") from None
    except ValueError as e:  # a state of another structure or shape
        raise CheckpointError(f"{path}: the checkpoint does not match this run's model and "
                              f"options ({e})") from None
    return state, data_state, config
