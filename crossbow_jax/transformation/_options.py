"""Options that `sma` and `local_sgd` share: integer settings and the participation mask."""

from __future__ import annotations

import numbers
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crossbow_jax.transformation import _learners, _participation


def check_int(name: str, value: Any, minimum: int, hint: str) -> int | jax.Array:
    """An int >= `minimum`, or a 0-d integer array as `optax.inject_hyperparams` passes it
    (a concrete one becomes an int; a traced one is kept unchecked, as `_period.check_period`
    keeps a traced period)."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(
                f"{name}={value!r} must be an int >= {minimum} ({hint}); got an array of "
                f"shape {value.shape} and dtype {value.dtype}"
            )
        if isinstance(value, jax.core.Tracer):
            return value
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an int >= {minimum} ({hint})")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum} ({hint})")
    return int(value)


def participants(
    participation: _participation.Participation, seed: Any, count: jax.Array, params: Any,
    axis_name: Hashable | None,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(the (m,) 0/1 mask of this device's learners, the participants on all devices) for
    the sync after `count` updates."""
    m = _learners.learners_on_device(params)
    devices = _learners.device_count(axis_name)
    return _participation.local_mask(participation, seed, count, m, axis_name, devices)
