"""Weights in the canonical layout every backend shares: safetensors, fp32, torch ``state_dict`` names and
(out_features, in_features) matrices. ``docs/jax.md`` lists the names.

The JAX parameters are the same arrays with the per-layer ones stacked on a leading layer axis::

    params["layers"]["attn"]["qkv"]["weight"][i]  <->  "layers.{i}.attn.block.qkv.weight"
    params["embed"]["weight"]                     <->  "embed.weight"
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from revnet_core.errors import ConfigError

FORMAT = "revnet-zero-canonical-v1"


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def canonical_names(params) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """Canonical name -> (path in the pytree, layer index or None)."""
    out: dict[str, tuple[tuple[str, ...], int | None]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(_path_names(path))
        if names[0] == "layers":
            half, *rest = names[1:]
            for i in range(leaf.shape[0]):
                out[".".join(["layers", str(i), half, "block", *rest])] = (names, i)
        else:
            out[".".join(names)] = (names, None)
    return out


def _get(tree, names):
    for n in names:
        tree = tree[n]
    return tree


def to_canonical(params, dtype=np.float32) -> dict[str, np.ndarray]:
    """The pytree (parameters, or gradients shaped like them) as canonical name -> numpy array, C-contiguous,
    in ``dtype`` (None: as stored)."""
    out = {}
    for name, (names, layer) in canonical_names(params).items():
        a = np.asarray(jax.device_get(_get(params, names)), dtype=dtype)
        out[name] = np.ascontiguousarray(a if layer is None else a[layer])
    return out


def from_canonical(tensors: dict[str, Any], template, *, source: str = "weights") -> Any:
    """A pytree shaped like ``template`` (dtypes included) filled from canonical name -> array.

    Names or shapes that do not fit raise ConfigError listing the first few of each.
    """
    index = canonical_names(template)
    expected = {}
    for name, (names, layer) in index.items():
        shape = _get(template, names).shape
        expected[name] = tuple(shape if layer is None else shape[1:])
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad = sorted(k for k in set(expected) & set(tensors) if tuple(np.shape(tensors[k])) != expected[k])
    if missing or unexpected or bad:
        raise ConfigError(
            f"weight file {source!r} does not fit this model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {bad[:5]}"
        )
    stacked: dict[tuple[str, ...], list] = {}
    flat: dict[tuple[str, ...], Any] = {}
    for name, (names, layer) in index.items():
        if layer is None:
            flat[names] = np.asarray(tensors[name])
        else:
            stacked.setdefault(names, []).append((layer, np.asarray(tensors[name])))
    for names, parts in stacked.items():
        flat[names] = np.stack([a for _, a in sorted(parts, key=lambda t: t[0])])

    def fill(path, leaf):
        return jnp.asarray(flat[tuple(_path_names(path))], dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, template)


def save_weights(params, path: str | os.PathLike) -> None:
    """Write ``params`` as canonical fp32 safetensors, atomically (temp file, then rename)."""
    from safetensors.numpy import save_file

    tmp = f"{os.fspath(path)}.tmp"
    save_file(to_canonical(params), tmp, metadata={"format": FORMAT})
    os.replace(tmp, path)


def load_weights(path: str | os.PathLike, template):
    """Read a canonical weight file (any backend's ``save_weights``) into a pytree shaped like ``template``."""
    from safetensors.numpy import load_file

    return from_canonical(load_file(os.fspath(path)), template, source=os.fspath(path))
