"""Synchronous SGD (SSGD): the baseline CROSSBOW is compared against.

Gradients are averaged over every learner on every device, one optimiser step
is taken, and every learner receives the same update, so learners that start
equal stay equal. It uses the same conventions as `sma` (leading learner axis,
`axis_name` for the device axis), so the two are interchangeable in a step.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

import jax
import optax

from crossbow_jax.transformation import _learners


class SSGDState(NamedTuple):
    """State of `ssgd`: the optimiser state, once per device (no learner axis)."""

    inner_state: optax.OptState


def ssgd(
    learner_optimizer: optax.GradientTransformation,
    *,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Synchronous SGD over stacked learners: average gradients, one step.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> import crossbow_jax
        >>> params = {"w": jnp.zeros((2, 3))}            # 2 identical learners
        >>> opt = crossbow_jax.ssgd(optax.sgd(0.1))
        >>> state = opt.init(params)
        >>> grads = {"w": jnp.stack([jnp.ones(3), 3 * jnp.ones(3)])}
        >>> updates, state = opt.update(grads, state, params)
        >>> [round(float(u), 4) for u in updates["w"][1]]  # -0.1 * mean gradient
        [-0.2, -0.2, -0.2]

    Args:
        learner_optimizer: any optax transformation, applied once to the mean
            gradient of all learners on all devices.
        axis_name: the device axis name under `jax.shard_map` / `jax.pmap`, or
            None for a single device.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose updates are the same
        for every learner. Keyword arguments of `update` go to the optimiser.
    """
    inner = _learners.as_extra_args(learner_optimizer)

    def init_fn(params):
        _learners.learners_on_device(params)
        return SSGDState(inner.init(_learners.first_learner(params)))

    def update_fn(updates, state, params=None, **extra_args):
        m = _learners.check_same_learners(params, updates)
        k = m * _learners.device_count(axis_name)
        total = _learners.sum_over_learners(updates, axis_name)
        mean = jax.tree.map(lambda g, t: (t / k).astype(g.dtype), updates, total)
        step, inner_state = inner.update(
            mean, state.inner_state, _learners.first_learner(params), **extra_args
        )
        return _learners.broadcast_to_learners(step, m), SSGDState(inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
