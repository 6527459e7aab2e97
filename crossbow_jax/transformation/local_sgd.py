"""Local SGD (periodic model averaging) as an optax transformation over stacked learners.

k learners in all (m per device x the devices on `axis_name`) each take their
own optimiser step `u_j`; every `every` updates all of them become the mean
of the k models (PyTorch's PostLocalSGD, HF accelerate's LocalSGD):

    w'_j = w_j + u_j
    sync step:  w_j <- (1/k) sum_i w'_i       # one all-reduce
    otherwise:  w_j <- w'_j                   # no collective

The update with t updates before it is a sync step when `(t + 1) % every == 0`.
The learners' optimiser states (momentum, Adam moments) are kept across syncs.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from crossbow_jax.transformation import _learners, _period


class LocalSGDState(NamedTuple):
    """State of `local_sgd`.

    Attributes:
        learner_state: the learner optimiser's state, one per learner.
        average: the mean of the learners at the last sync (at the start: of the
            initial learners), once per device: the model to evaluate.
        count: number of updates applied (int32).
    """

    learner_state: optax.OptState
    average: optax.Params
    count: jax.Array


def local_sgd(
    learner_optimizer: optax.GradientTransformation,
    *,
    every: int,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Local SGD: learners step alone and are averaged every `every` updates.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> import crossbow_jax
        >>> params = {"w": jnp.zeros((2, 3))}            # 2 learners, 3 weights each
        >>> opt = crossbow_jax.local_sgd(optax.sgd(0.1), every=2)
        >>> state = opt.init(params)
        >>> grads = {"w": jnp.stack([jnp.ones(3), 3 * jnp.ones(3)])}
        >>> for _ in range(2):                            # the 2nd update averages
        ...     updates, state = opt.update(grads, state, params)
        ...     params = optax.apply_updates(params, updates)
        >>> [round(float(v), 4) for v in params["w"][:, 0]]
        [-0.4, -0.4]

    Args:
        learner_optimizer: any optax transformation: each learner's own step.
        every: updates between averagings (H >= 1); 1 averages at every update.
        axis_name: the device axis name under `jax.shard_map` / `jax.pmap`, or
            None for a single device.

    Returns:
        An `optax.GradientTransformationExtraArgs` over stacked learners (every
        leaf has a leading learner axis). Keyword arguments of `update` go to
        the learner optimiser.
    """
    period = _period.check_period("every", every)
    inner = _learners.as_extra_args(learner_optimizer)

    def init_fn(params):
        average = _learners.mean_over_learners(params, axis_name)
        return LocalSGDState(
            _learners.init_per_learner(inner, params), average, jnp.zeros([], jnp.int32)
        )

    def update_fn(updates, state, params=None, **extra_args):
        _learners.check_same_learners(params, updates)
        step, learner_state = _learners.update_per_learner(
            inner, updates, state.learner_state, params, **extra_args
        )

        def average(operand):
            step, _ = operand
            mean = _learners.mean_over_learners(optax.apply_updates(params, step), axis_name)
            return _learners.apply_to_learners(params, mean), mean

        new_updates, mean = _period.on_sync(state.count, period, average, (step, state.average))
        return new_updates, LocalSGDState(learner_state, mean, optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
