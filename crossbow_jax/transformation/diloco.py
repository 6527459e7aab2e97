"""DiLoCo as an optax transformation over stacked learners.

k learners in all (m per device x the devices on `axis_name`) take their own
inner steps `u_j`; every `every` updates an outer optimiser moves the outer
parameters `theta` along the learners' mean change, and every learner restarts
from the new `theta` (Douillard et al. 2023, "DiLoCo"; maxtext, OpenDiLoCo):

    w'_j = w_j + u_j
    sync step:  delta  = theta - (1/k) sum_i w'_i           # one all-reduce
                theta <- theta + outer_optimizer.update(delta)
                w_j   <- theta
    otherwise:  w_j   <- w'_j                               # no collective

The update with t updates before it is a sync step when `(t + 1) % every == 0`.
`theta` starts as the learners' mean (their common start `w0`) and is stored
once per device; the inner (learner) optimiser states are kept across syncs.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from crossbow_jax.transformation import _learners, _period


class DiLoCoState(NamedTuple):
    """State of `diloco`.

    Attributes:
        learner_state: the inner optimiser's state, one per learner.
        theta: the outer parameters, once per device: the model to evaluate.
        outer_state: the outer optimiser's state (for `theta`).
        count: number of updates applied (int32).
    """

    learner_state: optax.OptState
    theta: optax.Params
    outer_state: optax.OptState
    count: jax.Array


def default_outer_optimizer() -> optax.GradientTransformation:
    """DiLoCo's outer optimiser: SGD with Nesterov momentum, lr 0.7, momentum 0.9."""
    return optax.sgd(0.7, momentum=0.9, nesterov=True)


def outer_step(outer, delta, outer_state, theta):
    """`theta` moved by the outer optimiser along `delta` (the outer gradient)."""
    outer_updates, outer_state = outer.update(delta, outer_state, theta)
    return optax.apply_updates(theta, outer_updates), outer_state


def check_outer(outer_optimizer) -> optax.GradientTransformationExtraArgs:
    """The outer optimiser (None: `default_outer_optimizer`), as an optax transformation."""
    if outer_optimizer is None:
        return optax.with_extra_args_support(default_outer_optimizer())
    if not (callable(getattr(outer_optimizer, "init", None))
            and callable(getattr(outer_optimizer, "update", None))):  # fmt: skip
        raise TypeError(
            f"outer_optimizer must be an optax GradientTransformation, got "
            f"{type(outer_optimizer).__name__}; e.g. optax.sgd(0.7, momentum=0.9, nesterov=True)"
        )
    return optax.with_extra_args_support(outer_optimizer)


def diloco(
    learner_optimizer: optax.GradientTransformation,
    outer_optimizer: optax.GradientTransformation | None = None,
    *,
    every: int,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """DiLoCo: inner steps by every learner, an outer step on their mean change every H.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> import crossbow_jax
        >>> params = {"w": jnp.zeros((2, 3))}            # 2 learners, 3 weights each
        >>> opt = crossbow_jax.diloco(optax.sgd(0.1), optax.sgd(1.0), every=2)
        >>> state = opt.init(params)
        >>> grads = {"w": jnp.stack([jnp.ones(3), 3 * jnp.ones(3)])}
        >>> for _ in range(2):                            # the 2nd update is an outer step
        ...     updates, state = opt.update(grads, state, params)
        ...     params = optax.apply_updates(params, updates)
        >>> [round(float(v), 4) for v in params["w"][:, 0]]   # outer sgd(1.0): the mean
        [-0.4, -0.4]
        >>> round(float(crossbow_jax.central_params(state)["w"][0]), 4)
        -0.4

    Args:
        learner_optimizer: the inner optimiser, any optax transformation (DiLoCo
            used AdamW), run on each learner separately.
        outer_optimizer: the outer optimiser, applied to `delta = theta - mean`
            as a gradient; None means `optax.sgd(0.7, momentum=0.9, nesterov=True)`.
        every: inner updates between outer steps (H >= 1).
        axis_name: the device axis name under `jax.shard_map` / `jax.pmap`, or
            None for a single device.

    Returns:
        An `optax.GradientTransformationExtraArgs` over stacked learners (every
        leaf has a leading learner axis). Keyword arguments of `update` go to
        the inner optimiser.
    """
    period = _period.check_period("every", every)
    inner = _learners.as_extra_args(learner_optimizer)
    outer = check_outer(outer_optimizer)

    def init_fn(params):
        theta = _learners.mean_over_learners(params, axis_name)
        return DiLoCoState(
            _learners.init_per_learner(inner, params),
            theta,
            outer.init(theta),
            jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _learners.check_same_learners(params, updates)
        step, learner_state = _learners.update_per_learner(
            inner, updates, state.learner_state, params, **extra_args
        )

        def outer_sync(operand):
            _, theta, outer_state = operand
            mean = _learners.mean_over_learners(optax.apply_updates(params, step), axis_name)
            delta = jax.tree.map(lambda t, w: t - w, theta, mean)
            theta, outer_state = outer_step(outer, delta, outer_state, theta)
            return _learners.apply_to_learners(params, theta), theta, outer_state

        new_updates, theta, outer_state = _period.on_sync(
            state.count, period, outer_sync, (step, state.theta, state.outer_state)
        )
        count = optax.safe_increment(state.count)
        return new_updates, DiLoCoState(learner_state, theta, outer_state, count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
