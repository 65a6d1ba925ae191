"""Checkpoint keys <-> Equinox module parameters, as data.

A module's parameter at path `down_blocks[0].resnets[1].conv1.weight` has the checkpoint key
`down_blocks.0.resnets.1.conv1.weight`: the module's field names are diffusers' / transformers'
attribute names, so the mapping is that rule plus, per model, a short `NameMap` of exceptions.

Loading fills a template built with `eqx.filter_eval_shape` (nothing is randomly initialised)
and fails, naming the tensors, on anything missing, unexpected or misshapen.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import WeightsError


def _squeeze_1x1(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return a.reshape(shape)


def _unsqueeze_1x1(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape + (1, 1))


# Named tensor transforms: name -> (checkpoint -> module, module -> checkpoint).
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray, tuple[int, ...]], np.ndarray],
                            Callable[[np.ndarray], np.ndarray]]] = {
    # A 1x1 convolution stored where the module holds a linear layer (legacy VAE attention).
    "squeeze_1x1": (_squeeze_1x1, _unsqueeze_1x1),
}


@dataclass(frozen=True)
class NameMap:
    """The exceptions to `module path == checkpoint key` for one model.

    - `renames`: `(regex, replacement)` pairs applied in order to a module key to give the
      checkpoint key written on export and looked for on load.
    - `aliases`: `(regex, replacement)` pairs applied to checkpoint keys before matching, for
      older spellings of the same tensors (read only; export writes the current spelling).
    - `ignore`: regexes of checkpoint keys that hold no parameter (buffers); they are consumed.
    - `transforms`: `(regex on module key, TRANSFORMS name)` allowed where the shapes differ.
    """

    renames: tuple[tuple[str, str], ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    transforms: tuple[tuple[str, str], ...] = field(default=())

    def checkpoint_key(self, module_key: str) -> str:
        for pattern, repl in self.renames:
            module_key = re.sub(pattern, repl, module_key)
        return module_key

    def canonical(self, checkpoint_key: str) -> str:
        for pattern, repl in self.aliases:
            checkpoint_key = re.sub(pattern, repl, checkpoint_key)
        return checkpoint_key

    def ignored(self, checkpoint_key: str) -> bool:
        return any(re.fullmatch(p, checkpoint_key) for p in self.ignore)

    def transform_for(self, module_key: str) -> str | None:
        for pattern, name in self.transforms:
            if re.fullmatch(pattern, module_key):
                return name
        return None


def _path_to_key(path) -> str:
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        else:
            parts.append(str(entry))
    return ".".join(parts)


def module_keys(module: Any) -> dict[str, Any]:
    """Every array leaf of `module` by its dotted module key (`down_blocks.0.resnets.1...`)."""
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(module, eqx.is_array_like))[0]
    out = {}
    for path, leaf in leaves:
        if leaf is None:
            continue
        out[_path_to_key(path)] = leaf
    return out


def stored_axes(module: Any) -> dict[str, tuple[int, ...]]:
    """Module keys whose array is held in another layout than the checkpoint's, with the
    permutation: `module array = checkpoint array.transpose(axes)`. Declared by the layer
    class as `checkpoint_axes = {field: axes}` (e.g. `Conv2d` holds its weight HWIO)."""
    def declares(x) -> bool:
        return isinstance(x, eqx.Module) and bool(getattr(type(x), "checkpoint_axes", None))

    out: dict[str, tuple[int, ...]] = {}
    for path, node in jax.tree_util.tree_flatten_with_path(module, is_leaf=declares)[0]:
        if declares(node):
            prefix = _path_to_key(path)
            for name, axes in type(node).checkpoint_axes.items():
                if getattr(node, name, None) is not None:
                    out[f"{prefix}.{name}" if prefix else name] = tuple(axes)
    return out


def to_checkpoint_layout(a: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    """A module array in the checkpoint's layout (the inverse permutation of `axes`)."""
    return a if axes is None else np.transpose(a, np.argsort(axes))


def summarise_keys(names, limit: int = 6) -> str:
    """The first `limit` of `names` in sorted order, and how many more there are (for the
    one-line messages that list tensors)."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_param(x) -> bool:
    return isinstance(x, (jax.ShapeDtypeStruct, jax.Array, np.ndarray))


def template_shapes(template: Any) -> dict[str, tuple[int, ...]]:
    """Module key -> shape of every parameter of an `eqx.filter_eval_shape` template."""
    leaves = jax.tree_util.tree_flatten_with_path(template, is_leaf=_is_param)[0]
    return {_path_to_key(p): tuple(x.shape) for p, x in leaves if _is_param(x)}


def load_state(
    template: Any, tensors: Mapping[str, np.ndarray], name_map: NameMap, *,
    dtype: Any = jnp.float32, what: str = "model",
) -> Any:
    """Fill `template` (from `eqx.filter_eval_shape`) with `tensors`.

    Every tensor must be consumed (or ignored by `name_map`), every parameter filled, every
    shape equal; otherwise a `WeightsError` names the offending tensors. Floating-point tensors
    are cast to `dtype`.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=_is_param)
    layouts = stored_axes(template)
    by_key: dict[str, str] = {}
    unexpected: list[str] = []
    for key in tensors:
        if name_map.ignored(key):
            continue
        canon = name_map.canonical(key)
        if canon in by_key:
            raise WeightsError(f"{what}: tensors {by_key[canon]!r} and {key!r} hold the same parameter")
        by_key[canon] = key
    filled = []
    missing: list[str] = []
    misshapen: list[str] = []
    used: set[str] = set()
    for path, leaf in leaves:
        if not _is_param(leaf):
            filled.append(leaf)
            continue
        mkey = _path_to_key(path)
        ckey = name_map.checkpoint_key(mkey)
        if ckey not in by_key:
            missing.append(ckey)
            filled.append(leaf)
            continue
        used.add(ckey)
        src = tensors[by_key[ckey]]
        axes = layouts.get(mkey)
        # The shape the checkpoint holds this parameter in.
        shape = tuple(leaf.shape) if axes is None else tuple(
            leaf.shape[i] for i in np.argsort(axes))
        if tuple(src.shape) != shape:
            transform = name_map.transform_for(mkey)
            if transform is not None and int(np.prod(src.shape)) == int(np.prod(shape)):
                src = TRANSFORMS[transform][0](np.asarray(src), shape)
            else:
                misshapen.append(f"{by_key[ckey]} {tuple(src.shape)} (expected {shape})")
                filled.append(leaf)
                continue
        src = np.asarray(src)
        if axes is not None:
            src = np.transpose(src, axes)
        # jnp.array copies: the parameters must not alias the memory-mapped file (or any
        # host buffer the caller may free), since training donates them to XLA.
        if np.issubdtype(src.dtype, np.floating) or src.dtype.name == "bfloat16":
            filled.append(jnp.array(src.astype(jnp.dtype(dtype), copy=False)))
        else:
            filled.append(jnp.array(src))
    unexpected = [by_key[k] for k in by_key if k not in used]
    check_matched(what, missing=missing, unexpected=unexpected, misshapen=misshapen)
    return jax.tree_util.tree_unflatten(treedef, filled)


def check_matched(what: str, *, missing=(), unexpected=(), misshapen=()) -> None:
    """Raise one `WeightsError` naming the `missing`, `unexpected` and `misshapen` tensors of
    `what`, if there are any."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {summarise_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {summarise_keys(unexpected)}")
    if misshapen:
        problems.append(f"{len(misshapen)} tensor(s) of the wrong shape: {summarise_keys(misshapen)}")
    if problems:
        raise WeightsError(f"{what}: weights do not match the config: " + "; ".join(problems))


def export_state(module: Any, name_map: NameMap, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """The checkpoint tensors of `module` (the inverse of `load_state`), as numpy arrays."""
    out: dict[str, np.ndarray] = {}
    layouts = stored_axes(module)
    for mkey, leaf in module_keys(module).items():
        a = np.ascontiguousarray(to_checkpoint_layout(np.asarray(leaf), layouts.get(mkey)))
        if dtype is not None and (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
            a = a.astype(jnp.dtype(dtype))
        out[name_map.checkpoint_key(mkey)] = a
    return out
