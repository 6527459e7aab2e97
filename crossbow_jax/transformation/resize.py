"""Changing the number of learners of a running replica-averaging state.

CROSSBOW's tuner adds a learner per device while throughput rises and drops
the last one when it does not; a run resumed on other hardware restarts its
learners from the central model. Both keep what the learners have in common
and give new learners a fresh start:

- kept: everything that is not per learner: `z`, `z_prev` (its momentum) and
  the update count of `sma`; the last average of `local_sgd`; `theta` and the
  outer optimiser's state of `diloco` and `hierarchical`; the whole state of
  `ssgd` (one optimiser for all learners); any state outside them (e.g.
  `optax.inject_hyperparams`' hyperparameters);
- learners `0 .. keep-1`: their parameters and optimiser state, unchanged;
- every other learner: the central model as parameters and a fresh optimiser
  state (`inner.init`), except the step counters of learning-rate schedules
  (`optax.ScaleByScheduleState`), which take learner 0's, so that a schedule
  continues where the run is rather than starting again. (Adam-style moment
  counts stay fresh: they belong with the fresh moments.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from crossbow_jax.transformation import _learners


def _rows(old: jax.Array, new: jax.Array, keep: int) -> jax.Array:
    """Rows [0, keep) of `old`, then rows [keep, m') of `new` (learner axis 0)."""
    keep = min(keep, old.shape[0], new.shape[0])
    return jnp.concatenate([old[:keep], new[keep:]]).astype(new.dtype)


def _is_schedule(node: Any) -> bool:
    return isinstance(node, optax.ScaleByScheduleState)


def _learner_state(old: Any, fresh: Any, keep: int) -> Any:
    """A learner optimiser's state: kept rows, fresh rows with schedule counters carried."""
    axes = _learners.learner_axes(fresh)
    counters = jax.tree.map(
        lambda n: jax.tree.map(lambda _: _is_schedule(n), n), fresh, is_leaf=_is_schedule
    )

    def merge(axis, o, f, counter):
        if axis is None:  # shared by all learners (injected hyperparameters)
            return o
        if counter:
            f = jnp.broadcast_to(o[:1], f.shape).astype(f.dtype)
        return _rows(o, f, keep)

    return jax.tree.map(merge, axes, old, fresh, counters, is_leaf=lambda x: x is None)


def resize_state(old: Any, fresh: Any, keep: int) -> Any:
    """A replica-averaging state (or one that contains it) after a change of learners.

    Args:
        old: the running state (m learners on this device).
        fresh: `init` of the same transformation on the new learners' parameters
            (m' learners, new ones equal to the central model).
        keep: how many of the old learners stay (the first ones); 0 restarts
            every learner.

    Returns:
        A state shaped like `fresh`: see the module docstring for what is kept.
    """
    if isinstance(fresh, tuple) and "learner_state" in getattr(fresh, "_fields", ()):
        learners = _learner_state(old.learner_state, fresh.learner_state, keep)
        return old._replace(learner_state=learners)  # the family: the rest is not per learner
    if isinstance(fresh, tuple) and hasattr(fresh, "_fields"):
        return type(fresh)(*(resize_state(o, f, keep) for o, f in zip(old, fresh)))
    if isinstance(fresh, (tuple, list)):
        return type(fresh)(resize_state(o, f, keep) for o, f in zip(old, fresh))
    if isinstance(fresh, dict):
        return {k: resize_state(old[k], f, keep) for k, f in fresh.items()}
    if fresh is None or not hasattr(fresh, "shape"):
        return old
    return old if jnp.shape(old) == jnp.shape(fresh) else fresh


def resize_params(old: Any, central: Any, learners: int, keep: int) -> Any:
    """`learners` stacked learners: the first `keep` of `old`, the rest copies of `central`."""
    new = _learners.broadcast_to_learners(central, learners)
    return jax.tree.map(lambda o, n: _rows(o, n, keep), old, new)
