"""Partial participation: which learners take part in a synchronisation.

`participation` is None (every learner, every sync), a probability p in (0, 1]
(each learner drawn independently at each sync, from the run's seed and the
update count, in a stream of their own: `bernoulli(fold_in(fold_in(key(seed),
_STREAM), count), p, (k,))`), or a
function of the update count returning a 0/1 mask over all k learners (global
order: device-major, then the learners on a device). The same `(seed, count)`
gives the same draw on every device, so the devices agree on who takes part
without a collective.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from crossbow_jax.transformation import _learners

Participation = float | Callable[[jax.Array], Any] | None
_STREAM = 0x7061  # folded into the seed's key first: participation draws apart from others


def check_participation(participation: Any) -> Participation:
    """None, a probability in (0, 1], or a callable; anything else is refused."""
    if participation is None or callable(participation):
        return participation
    if isinstance(participation, bool) or not isinstance(participation, numbers.Real):
        raise TypeError(
            f"participation={participation!r} must be a probability in (0, 1], a function "
            "of the update count returning a 0/1 mask over all learners, or None"
        )
    if not 0 < participation <= 1:
        raise ValueError(
            f"participation={participation} must be in (0, 1] (the chance that a learner "
            "takes part in a sync); 1 or None: every learner"
        )
    return float(participation)


def global_mask(participation: Participation, seed: int, count: jax.Array, k: int) -> jax.Array:
    """The 0/1 float32 mask over all k learners for the sync after `count` updates."""
    if participation is None:
        return jnp.ones((k,), jnp.float32)
    if callable(participation):
        mask = jnp.asarray(participation(count))
        if mask.shape != (k,):
            raise ValueError(
                f"participation(count) returned shape {mask.shape}; it must return a 0/1 "
                f"mask of shape ({k},), one entry per learner on all devices"
            )
        return (mask != 0).astype(jnp.float32)
    # a stream of its own: not the keys the run draws from `seed` (init, dropout, data)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), count)
    return jax.random.bernoulli(key, participation, (k,)).astype(jnp.float32)


def device_index(axis_name: Hashable | None) -> jax.Array:
    """This device's index along `axis_name` (0 with no axis)."""
    if axis_name is None:
        return jnp.zeros([], jnp.int32)
    return lax.axis_index(axis_name)


def local_mask(
    participation: Participation, seed: int, count: jax.Array, m: int,
    axis_name: Hashable | None, devices: int,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(this device's (m,) mask, the number of participants on all devices as float32)."""
    mask = global_mask(participation, seed, count, m * devices)
    mine = lax.dynamic_slice(mask, (device_index(axis_name) * m,), (m,))
    return mine, jnp.sum(mask)


def for_params(
    participation: Participation, seed: Any, count: jax.Array, params: Any,
    axis_name: Hashable | None,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """`local_mask` for stacked learner `params` (m learners on each device of `axis_name`)."""
    m = _learners.learners_on_device(params)
    devices = _learners.device_count(axis_name)
    return local_mask(participation, seed, count, m, axis_name, devices)


def masked(tree: Any, mask: jax.Array) -> Any:
    """Every leaf's learner j multiplied by mask[j] (in the leaf's dtype)."""
    return jax.tree.map(
        lambda x: x * mask.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), tree
    )


def choose(mask: jax.Array, if_in: Any, if_out: Any) -> Any:
    """Per learner: `if_in` for participants, `if_out` for the others."""
    return jax.tree.map(
        lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)) > 0, a, b), if_in, if_out
    )
