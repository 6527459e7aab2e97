"""Local SGD (periodic model averaging) as an optax transformation over stacked learners.

k learners in all (m per device x the devices on `axis_name`) each take their
own optimiser step `u_j`; every `every` updates all of them become the mean
of the k models (PyTorch's PostLocalSGD, HF accelerate's LocalSGD):

    w'_j = w_j + u_j
    sync step:  w_j <- (1/k) sum_i w'_i       # one all-reduce
    otherwise:  w_j <- w'_j                   # no collective

The update with t updates before it is a sync step when `(t + 1) % every == 0`,
or when t < `warmup_steps` (post-local SGD's warm-up of every-step averaging;
`_period.sync_branch`, which the engine's byte accounting counts with too).
With partial participation only the learners drawn for a sync are averaged
and take the mean; the others keep their own `w'_j`.
The learners' optimiser states (momentum, Adam moments) are kept across syncs.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from crossbow_jax.transformation import _learners, _participation, _period


class LocalSGDState(NamedTuple):
    """State of `local_sgd`.

    Attributes:
        learner_state: the learner optimiser's state, one per learner.
        average: the mean of the (participating) learners at the last sync (at
            the start: of the initial learners), once per device, in
            `average_dtype`: the model to evaluate.
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
    warmup_steps: int = 0,
    participation: _participation.Participation = None,
    seed: int = 0,
    average_dtype: Any | None = None,
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
        >>> opt = crossbow_jax.local_sgd(                 # learner 1 sits out every sync
        ...     optax.sgd(0.1), every=1, participation=lambda count: jnp.array([1, 0]))
        >>> params = {"w": jnp.zeros((2, 3))}
        >>> updates, state = opt.update(grads, opt.init(params), params)
        >>> [round(float(v), 4) for v in optax.apply_updates(params, updates)["w"][:, 0]]
        [-0.1, -0.3]

    Args:
        learner_optimizer: any optax transformation: each learner's own step.
        every: updates between averagings (H >= 1); 1 averages at every update.
        axis_name: the device axis name under `jax.shard_map` / `jax.pmap`, or
            None for a single device.
        warmup_steps: the first this many updates all average (every update),
            then every `every` (post-local SGD, Lin et al. 2020; PyTorch's
            `start_localSGD_iter` warms up with gradient all-reduces instead).
            0: no warm-up.
        participation: who takes part in a sync. None: every learner. A
            probability p in (0, 1]: each learner independently at each sync,
            drawn from `seed` and the update count (the same draw on every device).
            A function of the update count returning a 0/1 mask of shape (k,)
            over all k learners (device-major order). At a sync the average is
            over the participants only, and they become it; a non-participant
            contributes nothing and keeps its own weights `w'_j` (its step taken,
            no reset) and its optimiser state. A sync with no participant changes
            nothing: every learner keeps `w'_j` and `average` stays.
        seed: the seed of the participation draws (an int >= 0).
        average_dtype: dtype of the stored `average`; None keeps the parameters'
            dtype. A sync's sum, all-reduce and division run in this dtype (with
            `jnp.float32` over bfloat16 learners: a float32 mean, an all-reduce of
            twice the bytes), and the learners take the mean in their own dtype.

    Returns:
        An `optax.GradientTransformationExtraArgs` over stacked learners (every
        leaf has a leading learner axis). Keyword arguments of `update` go to
        the learner optimiser.

    Raises:
        TypeError, ValueError: a bad `every`, `warmup_steps` (an int >= 0),
            `participation` or `seed`, at construction; a participation function
            whose mask is not of shape (k,), at the first update.
    """
    period = _period.check_period("every", every)
    warmup = _period.check_int(
        "warmup_steps", warmup_steps, 0, "updates that all average before the period starts"
    )
    if isinstance(warmup, int) and warmup and isinstance(period, int) and period == 1:
        raise ValueError(
            f"warmup_steps={warmup} does nothing with every=1 (every update averages "
            "already); leave it out or raise every"
        )
    participation = _participation.check_participation(participation)
    seed = _period.check_int("seed", seed, 0, "the seed of the participation draws")
    inner = _learners.as_extra_args(learner_optimizer)

    def cast(tree):
        if average_dtype is None:
            return tree
        return jax.tree.map(lambda x: x.astype(average_dtype), tree)

    def init_fn(params):
        average = _learners.mean_over_learners(cast(params), axis_name)
        return LocalSGDState(
            _learners.init_per_learner(inner, params), average, jnp.zeros([], jnp.int32)
        )

    def update_fn(updates, state, params=None, **extra_args):
        _learners.check_same_learners(params, updates)
        step, learner_state = _learners.update_per_learner(
            inner, updates, state.learner_state, params, **extra_args
        )

        def average(operand):
            step, last = operand
            moved = cast(optax.apply_updates(params, step))
            if participation is None:
                mean = _learners.mean_over_learners(moved, axis_name)
                return _learners.apply_to_learners(params, mean), mean
            mine, n = _participation.for_params(participation, seed, state.count, params, axis_name)
            total = _learners.sum_over_learners(_participation.masked(moved, mine), axis_name)
            mean = jax.tree.map(
                lambda s, a: jnp.where(n > 0, s / n.astype(s.dtype), a), total, last
            )  # no participant: the average stays (and everyone keeps w'_j below)
            onto_mean = _learners.apply_to_learners(params, mean)
            return _participation.choose(mine, onto_mean, step), mean

        new_updates, mean = _on_sync(state.count, period, warmup, average, (step, state.average))
        return new_updates, LocalSGDState(learner_state, mean, optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _on_sync(count, period, warmup, sync_fn, operand):
    """`_period.on_sync` with the warm-up: with none (or period 1) that call as it is."""
    if (isinstance(period, int) and period == 1) or (isinstance(warmup, int) and warmup == 0):
        return _period.on_sync(count, period, sync_fn, operand)
    return _period.on_pred(_period.sync_branch(count, period, 1, warmup) > 0, sync_fn, operand)
