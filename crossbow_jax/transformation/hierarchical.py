"""SMA inside a host, DiLoCo across hosts, as one optax transformation.

A mesh of hosts x devices. Inside each host h, SMA (Algorithm 1) runs over
that host's learners at every update, with a central model `z_h` per host
and one all-reduce over the host's devices (`axis_name`). Across hosts,
DiLoCo runs every `every` updates, each host one DiLoCo worker whose model is
`z_h` (after this update's SMA step):

    delta  = theta - (1/H) sum_h z_h                    # one all-reduce over `host_axis`
    theta <- theta + outer_optimizer.update(delta)
    w_j, z_h, z_prev_h  move by  theta - z_h            # every learner j of host h

so the host's learners keep their spread around the centre. The update with
t updates before it is an outer step when `(t + 1) % every == 0`. With one
host there is no outer step and this is `sma` bit for bit (`theta` then
follows `z`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from crossbow_jax.transformation import _compress, _learners, _period
from crossbow_jax.transformation.diloco import check_outer, outer_step
from crossbow_jax.transformation.sma import SMAState, sma


class HierarchicalState(NamedTuple):
    """State of `hierarchical`.

    Attributes:
        sma_state: this host's `SMAState` (its `z` is the host's central model `z_h`).
        theta: the outer parameters, once per device: the model to evaluate.
        outer_state: the outer optimiser's state (for `theta`).
        count: number of updates applied (int32).
        error: with `compress` and error feedback, this device's quantisation
            residual (float32, shaped like `theta`); else None.
    """

    sma_state: SMAState
    theta: optax.Params
    outer_state: optax.OptState
    count: jax.Array
    error: Any = None


def hierarchical(
    learner_optimizer: optax.GradientTransformation,
    outer_optimizer: optax.GradientTransformation | None = None,
    *,
    every: int,
    alpha: float | None = None,
    momentum: float = 0.9,
    axis_name: Hashable | None = None,
    host_axis: Hashable | None = None,
    compress: str | None = None,
    error_feedback: bool = True,
    average_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SMA over each host's learners at every update, DiLoCo across hosts every `every`.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> import crossbow_jax
        >>> params = {"w": jnp.zeros((2, 3))}            # one host: plain SMA
        >>> opt = crossbow_jax.hierarchical(optax.sgd(0.1), every=8)
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": jnp.ones((2, 3))}, state, params)
        >>> crossbow_jax.central_params(state)["w"].shape
        (3,)

    Args:
        learner_optimizer: any optax transformation: each learner's own step.
        outer_optimizer: DiLoCo's outer optimiser across hosts; None means
            `optax.sgd(0.7, momentum=0.9, nesterov=True)`.
        every: updates between outer steps (H >= 1).
        alpha: SMA's correction step inside a host; None means 1/k with k the
            learners of one host.
        momentum: the central momentum of each host's SMA, in [0, 1).
        axis_name: the device axis inside a host (None: one device per host).
        host_axis: the host axis (None: one host, plain SMA).
        compress: None (exact all-reduce across hosts), "bf16", "int8" or "int4":
            how each host's outer gradient travels.
        error_feedback: with `compress`, carry each device's quantisation residual
            into its next outer gradient.
        average_dtype: dtype of every host's `z_h` and of `theta`; None keeps the
            parameters' dtype.

    Returns:
        An `optax.GradientTransformationExtraArgs` over stacked learners. Keyword
        arguments of `update` go to the inner `sma` (e.g. `reset_learners`).
    """
    period = _period.check_period("every", every)
    outer = check_outer(outer_optimizer)
    compress = _compress.check_compress(compress, error_feedback)
    if compress is not None and host_axis is None:
        raise ValueError(
            f"compress={compress!r} compresses the outer step across hosts, and with "
            "host_axis=None there is one host and no outer step; pass host_axis or leave "
            "compress out"
        )
    inside = sma(
        learner_optimizer, alpha=alpha, momentum=momentum, axis_name=axis_name,
        average_dtype=average_dtype,
    )  # fmt: skip

    def hosts() -> int:
        return _learners.device_count(host_axis)

    def init_fn(params):
        sma_state = inside.init(params)
        if hosts() > 1:  # the hosts' learners may start apart: theta is their mean
            theta = jax.tree.map(lambda z: lax.psum(z, host_axis) / hosts(), sma_state.z)
            theta = _period.keep_dtype(theta, sma_state.z)
        else:
            theta = sma_state.z
        error = None
        if compress and error_feedback:
            error = _compress.float32_zeros(theta)
        count = jnp.zeros([], jnp.int32)
        return HierarchicalState(sma_state, theta, outer.init(theta), count, error)

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, sma_state = inside.update(updates, state.sma_state, params, **extra_args)
        count = optax.safe_increment(state.count)
        if hosts() == 1:
            return new_updates, state._replace(
                sma_state=sma_state, theta=sma_state.z, count=count
            )

        def outer_gradient(theta, z, error):
            """delta = theta - the hosts' mean of z_h, and this device's new residual."""
            if compress is None:
                mean = jax.tree.map(lambda x: lax.psum(x, host_axis) / hosts(), z)
                return jax.tree.map(lambda t, m: t - m, theta, mean), error
            mine = jax.tree.map(lambda t, x: t.astype(jnp.float32) - x, theta, z)
            total, error = _compress.compressed_sum(mine, error, compress, host_axis)
            return jax.tree.map(lambda t, s: (s / hosts()).astype(t.dtype), theta, total), error

        def outer_sync(operand):
            new_updates, sma_state, theta, outer_state, error = operand
            z = sma_state.z
            delta, error = outer_gradient(theta, z, error)
            theta, outer_state = outer_step(outer, delta, outer_state, theta)
            shift = jax.tree.map(lambda t, z: t - z, theta, z)
            moved = sma_state._replace(
                z=jax.tree.map(jnp.add, sma_state.z, shift),
                z_prev=jax.tree.map(jnp.add, sma_state.z_prev, shift),
            )
            new_updates = jax.tree.map(lambda u, s: u + s[None], new_updates, shift)
            return new_updates, moved, theta, outer_state, error

        operand = (new_updates, sma_state, state.theta, state.outer_state, state.error)
        new_updates, sma_state, theta, outer_state, error = _period.on_sync(
            state.count, period, outer_sync, operand
        )
        return new_updates, HierarchicalState(sma_state, theta, outer_state, count, error)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
