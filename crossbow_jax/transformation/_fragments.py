"""Fragments of a model for Streaming DiLoCo: which parameters sync together.

A layer is the leaves under one parent in the parameter tree (a Dense layer's
kernel and bias); a leaf at the top of the tree is a layer of its own. Layers,
in depth order (their paths with numbers compared as numbers: Dense_2 before
Dense_10), go to fragments in strided order: layer i to fragment i % F (Douillard et al. 2025, "Streaming DiLoCo": strided fragments spread
each fragment over the model's depth). Fragments therefore have similar sizes
only where the layers do: a model whose one layer holds most of the weights
keeps most of them in one fragment (`fragment_sizes` says).
"""

from __future__ import annotations

import re
from typing import Any

import jax


def _layer_key(path: tuple) -> tuple:
    return tuple(path[:-1]) if len(path) > 1 else tuple(path)


def _depth(layer: tuple) -> tuple:
    """A layer's sort key: its path with numbers compared as numbers, so that Dense_2 comes
    before Dense_10 (the tree's own order is alphabetical: Dense_10 first)."""
    parts = re.split(r"(\d+)", jax.tree_util.keystr(layer))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def assign(tree: Any, fragments: int) -> tuple[tuple[int, ...], ...]:
    """For each fragment, the indices of its leaves in `jax.tree.leaves(tree)` order."""
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    layers: dict[tuple, list[int]] = {}
    for i, path in enumerate(paths):
        layers.setdefault(_layer_key(path), []).append(i)
    if len(layers) < fragments:
        raise ValueError(
            f"fragments={fragments} but the parameters have {len(layers)} layers (groups of "
            f"leaves under one parent); use fragments <= {len(layers)}"
        )
    out: list[list[int]] = [[] for _ in range(fragments)]
    for i, key in enumerate(sorted(layers, key=_depth)):
        leaves = layers[key]
        out[i % fragments].extend(leaves)
    return tuple(tuple(sorted(f)) for f in out)


def fragment_sizes(tree: Any, fragments: int) -> list[int]:
    """The number of values in each of `fragments` fragments of a parameter tree, as
    `diloco(..., fragments=F)` splits it (`crossbow_jax.transformation.fragment_sizes`).

    Examples:
        >>> import jax.numpy as jnp
        >>> from crossbow_jax.transformation import fragment_sizes
        >>> params = {"Dense_0": {"kernel": jnp.zeros((8, 32)), "bias": jnp.zeros(32)},
        ...           "Dense_1": {"kernel": jnp.zeros((32, 4)), "bias": jnp.zeros(4)}}
        >>> fragment_sizes(params, 2)
        [288, 132]

    Raises:
        ValueError: more fragments than layers.
    """
    leaves = jax.tree.leaves(tree)
    return [sum(leaves[i].size for i in f) for f in assign(tree, fragments)]


def take(leaves: list, indices: tuple[int, ...]) -> list:
    """The leaves of one fragment."""
    return [leaves[i] for i in indices]


def put(leaves: list, indices: tuple[int, ...], values: list) -> list:
    """`leaves` with the fragment's leaves replaced by `values`."""
    out = list(leaves)
    for i, v in zip(indices, values, strict=True):
        out[i] = v
    return out
