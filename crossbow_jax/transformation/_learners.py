"""Helpers shared by the learner transformations: the stacked learner axis.

Every parameter leaf handed to `sma` or `ssgd` carries a leading axis that
indexes the learners held on this device. These helpers check that axis, count
learners across devices, and reduce over learners hierarchically: a plain sum
over the stacked axis on each device, then one `lax.psum` over the device axis
(a single collective over a tuple of a vmap axis and a mesh axis fails under
`shard_map`'s default checking on jax 0.10; docs/sma.md, "Details").
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax


def learners_on_device(tree: Any, what: str = "params") -> int:
    """Returns m, the size of the leading learner axis shared by all leaves.

    Args:
        tree: a pytree whose every leaf has shape `(m, ...)`.
        what: a name for the tree, used in error messages.

    Raises:
        ValueError: if the tree is empty, a leaf is a scalar, or leaves disagree.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{what} is an empty pytree; pass the stacked learner parameters")
    sizes = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{what} leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs a "
                "leading learner axis (stack learners with jax.vmap or x[None] for one learner)"
            )
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ValueError(
            f"{what} leaves have different leading learner axes {sorted(sizes)}; every leaf "
            "must have the same leading axis m (learners on this device)"
        )
    (m,) = sizes
    if m < 1:
        raise ValueError(f"{what} has a learner axis of size 0; use at least one learner")
    return m


def check_same_learners(params: Any, updates: Any) -> int:
    """Checks that `updates` and `params` have one and the same learner axis."""
    if params is None:
        raise ValueError(
            "params is None; learner transformations need the current "
            "learner parameters: call update(grads, state, params)"
        )
    m = learners_on_device(params, "params")
    mu = learners_on_device(updates, "updates")
    if mu != m:
        raise ValueError(
            f"updates have {mu} learners but params have {m}; both need the same "
            "leading learner axis"
        )
    return m


def device_count(axis_name: Hashable | None) -> int:
    """The number of devices along `axis_name` (1 when None). Static."""
    if axis_name is None:
        return 1
    return lax.axis_size(axis_name)


def sum_over_learners(tree: Any, axis_name: Hashable | None) -> Any:
    """Sums over the learner axis here, then over devices with one psum."""
    local = jax.tree.map(lambda x: jnp.sum(x, axis=0), tree)
    if axis_name is None:
        return local
    return lax.psum(local, axis_name)


def as_extra_args(optimizer: Any) -> optax.GradientTransformationExtraArgs:
    """Accepts any optax transformation (or `optax.MultiSteps`) as a learner optimiser."""
    if hasattr(optimizer, "gradient_transformation") and callable(
        optimizer.gradient_transformation
    ):
        optimizer = optimizer.gradient_transformation()
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            f"learner_optimizer must be an optax GradientTransformation, got "
            f"{type(optimizer).__name__}; e.g. optax.sgd(0.05, momentum=0.9)"
        )
    if getattr(optimizer.init, "__qualname__", "").startswith("lookahead."):
        raise ValueError(LOOKAHEAD)
    return optax.with_extra_args_support(optimizer)


LOOKAHEAD = (
    "optax.lookahead keeps slow weights of its own in LookaheadParams and cannot be a "
    "learner optimiser; SMA's central model already plays that part (tune alpha and "
    "momentum), or pass lookahead's fast optimiser alone"
)


# Parts of a learner optimiser's state that all learners share: the step count
# and hyperparameters of `optax.inject_hyperparams`, so that they stay scalars
# (`optax.tree_utils.tree_set(state, learning_rate=0.01)` sets them for all).
_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
_SHARED_FIELDS = ("count", "hyperparams", "hyperparams_states")


def learner_axes(state: Any) -> Any:
    """vmap axes of a learner optimiser's state: 0 (one per learner), None where shared."""

    def axes(node):
        if not isinstance(node, _INJECTED):
            return 0
        return type(node)(
            **{
                f: jax.tree.map(lambda _: None, getattr(node, f))
                if f in _SHARED_FIELDS
                else learner_axes(getattr(node, f))
                for f in node._fields
            }
        )

    return jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, _INJECTED))


def init_per_learner(inner: optax.GradientTransformation, params: Any) -> Any:
    """`inner.init` for every learner (vmapped); injected hyperparameters kept once."""
    shapes = jax.eval_shape(inner.init, first_learner(params))
    lookahead = lambda node: isinstance(node, optax.LookaheadState)  # noqa: E731
    if any(lookahead(n) for n in jax.tree.leaves(shapes, is_leaf=lookahead)):
        raise ValueError(LOOKAHEAD)  # inside a chain: it would fail at its first update
    axes = learner_axes(shapes)
    return jax.vmap(inner.init, out_axes=axes)(params)


def update_per_learner(
    inner: optax.GradientTransformationExtraArgs, updates: Any, state: Any, params: Any, **extra
) -> tuple[Any, Any]:
    """`inner.update` for every learner (vmapped); injected hyperparameters kept once.

    `value` (optax's name for the loss, e.g. of `optax.contrib.reduce_on_plateau`) is per
    learner: shape (m,), each learner's own, or a scalar that every learner gets; other
    extra arguments go to every learner as they are.
    """
    axes = learner_axes(state)
    m = learners_on_device(params)
    value = extra.pop("value", None)
    values = None if value is None else jnp.broadcast_to(value, (m,))

    def one(g, s, p, v):
        return inner.update(g, s, p, **extra, **({} if v is None else {"value": v}))

    return jax.vmap(one, in_axes=(0, axes, 0, 0), out_axes=(0, axes))(
        updates, state, params, values
    )


def first_learner(tree: Any) -> Any:
    """The leaves of learner 0 (drops the learner axis)."""
    return jax.tree.map(lambda x: x[0], tree)


def broadcast_to_learners(tree: Any, m: int) -> Any:
    """Repeats every leaf along a new leading learner axis of size m."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (m,) + jnp.shape(x)), tree)


def find_state(state: Any, types: type | tuple[type, ...]) -> Any:
    """The outermost node of `types` in an optax state (e.g. inside an `optax.chain`), or None."""
    if isinstance(state, types):
        return state
    children = state.values() if isinstance(state, dict) else state
    if isinstance(state, (tuple, list, dict)):
        for child in children:
            found = find_state(child, types)
            if found is not None:
                return found
    return None


def mean_over_learners(tree: Any, axis_name: Hashable | None, dtype: Any = None) -> Any:
    """The mean of all k learners on all devices (no learner axis), in `dtype` or the leaves'."""
    k = learners_on_device(tree) * device_count(axis_name)
    total = sum_over_learners(tree, axis_name)
    return jax.tree.map(lambda s, x: (s / k).astype(dtype or x.dtype), total, tree)


def apply_to_learners(params: Any, target: Any) -> Any:
    """Updates that move every learner onto `target` (one model, no learner axis); the
    difference is taken in the learners' dtype, `target` rounded to it first (exact where
    a learner is within a factor 2 of `target`, else one rounding off in low precision)."""
    return jax.tree.map(lambda w, t: t.astype(w.dtype)[None] - w, params, target)
