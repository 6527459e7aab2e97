"""Synchronous Model Averaging (SMA), CROSSBOW's Algorithm 1, as an optax transform.

k learners in all (m per device x the devices on `axis_name`), each with its own
parameters `w_j` and its own optimiser state, are pulled toward a central
average model `z`, and `z` follows them with heavy-ball momentum:

    c_j    = alpha * (w_j - z)                     # w_j before this step
    w_j   <- w_j + u_j - c_j                       # u_j: the learner optimiser's step
    z     <- z + sum_{j=1..k} c_j + momentum * (z - z_prev)

The sum runs over all k learners (a sum, not a mean): first over the learners
stacked on this device, then with one `lax.psum` over `axis_name`. Every device
applies the same update to its own copy of `z`, so the copies stay identical
without a broadcast.

With `sync_every=p`, only every p-th update is the step above; in between
every learner takes its own step alone (`w_j <- w_j + u_j`), `z` and `z_prev`
stay, and no collective runs. The original code's `--wpc` is not p: it counts
tasks (one learner's step on one batch) over all k learners between
synchronisations, so `sync_every = wpc / k` (`--wpc k`: every update). EASGD
is `sma(momentum=0, sync_every=tau)`; EAMSGD the same with a Nesterov learner
optimiser.

With partial participation (`participation=`), only the learners drawn for a
sync take the correction, and `z` moves by the sum of theirs:

    c_j    = alpha * (w_j - z)  if j takes part, else 0
    w_j   <- w_j + u_j - c_j
    z     <- z + sum_{j in part} c_j + momentum * (z - z_prev)

`alpha` is not rescaled (a sum over the participants, so `z` is pulled less when
fewer take part), and a sync with no participant still moves `z` by its momentum.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crossbow_jax.transformation import _learners, _participation, _period


class SMAState(NamedTuple):
    """State of `sma`.

    Attributes:
        learner_state: the learner optimiser's state, one per learner (every leaf
            has the leading learner axis m).
        z: the central average model, stored once per device (no learner axis).
        z_prev: `z` before the last update, for the central momentum.
        count: number of updates applied (int32).
    """

    learner_state: optax.OptState
    z: optax.Params
    z_prev: optax.Params
    count: jax.Array


def _number(name: str, value: Any, what: str) -> float | None:
    """A hyperparameter's value when it is known now (a number, or a concrete scalar array,
    as `optax.inject_hyperparams` passes it); None when it is traced."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, jax.Array | np.ndarray) and jnp.shape(value) == ():
        if isinstance(value, jax.core.Tracer):
            return None
        return float(value)
    raise TypeError(f"{name}={value!r} must be {what}")


def _check_hyperparameters(alpha: Any, momentum: Any) -> None:
    if alpha is not None:
        a = _number("alpha", alpha, "a positive float or None (None means 1/k)")
        if a is not None and not a > 0:
            raise ValueError(f"alpha={alpha} must be > 0; try about 1/k for k learners in all")
    mu = _number("momentum", momentum, "a float in [0, 1)")
    if mu is not None and not 0 <= mu < 1:
        raise ValueError(f"momentum={momentum} must be in [0, 1); the original used 0.9")


def sma(
    learner_optimizer: optax.GradientTransformation,
    *,
    alpha: float | None = None,
    momentum: float = 0.9,
    sync_every: int = 1,
    axis_name: Hashable | None = None,
    average_dtype: Any | None = None,
    participation: _participation.Participation = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Synchronous Model Averaging over stacked learners (CROSSBOW, Algorithm 1).

    `params`, `updates` (gradients) and the returned updates are pytrees whose
    every leaf has a leading axis of the m learners held on this device. The
    learner optimiser runs on each learner separately (vmapped), so each learner
    has its own optimiser state, and tree-wide transforms such as
    `optax.clip_by_global_norm` act per learner.

    Call `init` and `update` inside the function mapped over devices
    (`jax.shard_map` or `jax.pmap`) with the device axis as `axis_name`, or
    outside any mapping with `axis_name=None` for one device.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> import crossbow_jax
        >>> params = {"w": jnp.zeros((4, 3))}            # 4 learners, 3 weights each
        >>> opt = crossbow_jax.sma(optax.sgd(0.1), alpha=0.25)
        >>> state = opt.init(params)
        >>> grads = {"w": jnp.arange(12.0).reshape(4, 3)}
        >>> updates, state = opt.update(grads, state, params)
        >>> params = optax.apply_updates(params, updates)
        >>> crossbow_jax.sma_average(state)["w"].shape
        (3,)

    Args:
        learner_optimizer: any optax transformation (or `optax.MultiSteps`): the
            step `u_j` each learner takes on its own, e.g.
            `optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))`.
        alpha: the correction step pulling each learner toward `z`. None means
            1/k with k the number of learners on all devices. The `z` recursion
            is stable only for roughly `alpha * k < 2`.
        momentum: the central model's heavy-ball momentum, in [0, 1).
        sync_every: synchronise at every this many updates (the `(t+1)`-th update,
            t updates before it, syncs when `(t + 1) % sync_every == 0`); the
            updates between are the learners' own steps, with no collective.
            1 (the default) is Algorithm 1 at every update. The original code's
            `--wpc` counts tasks over all k learners: `sync_every = wpc / k`.
        axis_name: the device axis name under `jax.shard_map` / `jax.pmap`, or
            None for a single device.
        average_dtype: dtype of `z` and `z_prev`; None keeps the parameters'
            dtype (e.g. `jnp.float32` keeps a float32 average of bfloat16 learners).
        participation: who takes part in a sync. None: every learner. A
            probability p in (0, 1]: each learner independently at each sync,
            drawn from `seed` and the update count (the same draw on every device).
            A function of the update count returning a 0/1 mask of shape (k,)
            over all k learners (device-major order). Only participants take the
            correction `c_j`; a non-participant takes its own step alone
            (`w_j <- w_j + u_j`, its optimiser state updated as always) and adds
            nothing to `z`'s sum. `z` moves by the participants' sum (`alpha` is not
            rescaled) plus its momentum, which it takes even when no learner
            takes part.
        seed: the seed of the participation draws (an int >= 0).

    Returns:
        An `optax.GradientTransformationExtraArgs`. Its `update` accepts the
        keyword `reset_learners` (a bool, may be traced): when true, every
        learner is moved onto `z` (returned updates are `z - w_j`), this step's
        gradients are not used, and `z` and the learner optimiser states are
        left as they are. The original code did this at each learning-rate drop.
        Other keyword arguments are passed on to the learner optimiser; `value`
        (optax's loss argument, e.g. of `optax.contrib.reduce_on_plateau`) is
        per learner: shape (m,), each learner's own loss, or a scalar for all.

    Raises:
        ValueError: alpha <= 0, momentum outside [0, 1), sync_every < 1, a bad
            `participation` or `seed`, learner axes that differ between leaves or
            between `updates` and `params`, or a participation function whose mask
            is not of shape (k,) (at the first update).
    """
    _check_hyperparameters(alpha, momentum)
    period = _period.check_period("sync_every", sync_every)
    participation = _participation.check_participation(participation)
    seed = _period.check_int("seed", seed, 0, "the seed of the participation draws")
    inner = _learners.as_extra_args(learner_optimizer)

    def total_learners(params):
        return _learners.learners_on_device(params) * _learners.device_count(axis_name)

    def init_fn(params):
        k = total_learners(params)
        a = None if alpha is None else _number("alpha", alpha, "a float")
        if a is not None and a * k >= 2:
            warnings.warn(
                f"sma: alpha={a:g} with k={k} learners gives alpha*k={a * k:.3g} >= 2; "
                "the central model may diverge. Use alpha of about 1/k.",
                stacklevel=2,
            )
        learner_state = _learners.init_per_learner(inner, params)
        total = _learners.sum_over_learners(params, axis_name)
        z = jax.tree.map(
            lambda s, p: (s / k).astype(average_dtype or p.dtype),
            total,
            jax.tree.map(lambda x: x[0], params),
        )
        return SMAState(learner_state, z, z, jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, reset_learners=False, **extra_args):
        _learners.check_same_learners(params, updates)
        k = total_learners(params)
        a = 1.0 / k if alpha is None else alpha

        step, learner_state = _learners.update_per_learner(
            inner, updates, state.learner_state, params, **extra_args
        )

        def synchronise(operand):
            step, z, z_prev = operand
            corrections = jax.tree.map(lambda w, z: a * (w - z[None]), params, z)
            if participation is not None:
                mine, _ = _participation.for_params(participation, seed, state.count, params, axis_name)
                corrections = _participation.masked(corrections, mine)
            new_updates = jax.tree.map(lambda u, c: (u - c).astype(u.dtype), step, corrections)
            total = _learners.sum_over_learners(corrections, axis_name)
            new_z = jax.tree.map(
                lambda z, zp, s: (z + s + momentum * (z - zp)).astype(z.dtype), z, z_prev, total
            )
            return new_updates, new_z, z

        new_updates, z, z_prev = _period.on_sync(
            state.count, period, synchronise, (step, state.z, state.z_prev)
        )
        new_state = SMAState(learner_state, z, z_prev, optax.safe_increment(state.count))

        if reset_learners is False:
            return new_updates, new_state
        reset = jnp.asarray(reset_learners, bool)
        to_average = jax.tree.map(lambda w, z: (z[None] - w).astype(w.dtype), params, state.z)
        chosen_updates = jax.tree.map(lambda r, n: jnp.where(reset, r, n), to_average, new_updates)
        kept = SMAState(state.learner_state, state.z, state.z_prev, new_state.count)
        chosen_state = jax.tree.map(lambda o, n: jnp.where(reset, o, n), kept, new_state)
        return chosen_updates, chosen_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sma_average(state: Any) -> optax.Params:
    """Returns the central average model `z`: the model to evaluate and publish.

    Args:
        state: the state of `sma`, or any optax state that contains it (e.g.
            the state of an `optax.chain` with `sma` inside).

    Returns:
        The parameters of `z`, without a learner axis.

    Raises:
        ValueError: if no `SMAState` is found in `state`.
    """
    found = _learners.find_state(state, SMAState)
    if found is None:
        raise ValueError(
            f"no SMAState found in a {type(state).__name__}; pass the state returned by "
            "crossbow_jax.sma(...).init/update"
        )
    return found.z
