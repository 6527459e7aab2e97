"""The model to evaluate, for every member of the replica-averaging family."""

from __future__ import annotations

from typing import Any

import optax

from crossbow_jax.transformation import _learners
from crossbow_jax.transformation.diloco import DiLoCoState
from crossbow_jax.transformation.hierarchical import HierarchicalState
from crossbow_jax.transformation.local_sgd import LocalSGDState
from crossbow_jax.transformation.sma import SMAState
from crossbow_jax.transformation.ssgd import SSGDState

FAMILY = (HierarchicalState, DiLoCoState, LocalSGDState, SMAState, SSGDState)


def central_params(state: Any) -> optax.Params:
    """Returns the central model of a replica-averaging state: the model to evaluate.

    `z` for `sma`, the learners' mean at the last sync for `local_sgd`, the
    outer parameters `theta` for `diloco` and `hierarchical`.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> import crossbow_jax
        >>> opt = crossbow_jax.local_sgd(optax.sgd(0.1), every=4)
        >>> state = opt.init({"w": jnp.stack([jnp.zeros(3), jnp.ones(3)])})
        >>> [float(v) for v in crossbow_jax.central_params(state)["w"]]
        [0.5, 0.5, 0.5]

    Args:
        state: the state of one of them, or any optax state that contains it
            (e.g. the state of an `optax.chain`).

    Returns:
        The central parameters, without a learner axis.

    Raises:
        ValueError: no such state in `state`, or an `ssgd` state (it keeps no
            central model: its learners are all equal, evaluate any one).
    """
    found = _learners.find_state(state, FAMILY)
    if found is None:
        raise ValueError(
            f"no sma, local_sgd, diloco or hierarchical state found in a {type(state).__name__}; "
            "pass the state returned by the transformation's init/update"
        )
    if isinstance(found, SSGDState):
        raise ValueError(  # noqa: TRY004 -- a state without a central model, not a bad type
            "ssgd keeps no central model: its learners stay equal, so evaluate any one of them "
            "(e.g. jax.tree.map(lambda p: p[0], params))"
        )
    if isinstance(found, SMAState):
        return found.z
    if isinstance(found, LocalSGDState):
        return found.average
    return found.theta
