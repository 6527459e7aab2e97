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

Options, each off by default (then the program is the one above):

- `fragments=F` (Streaming DiLoCo, Douillard et al. 2025): the parameters split
  into F fragments (`_fragments.py`: layers in strided order); fragment f syncs
  as above, on its own leaves, when `(t + 1) % every == f * every / F`, with an
  outer optimiser state of its own, so a step moves about 1/F of the model.
- `compress` (`_compress.py`): the outer gradient each device sends is
  quantised (bf16, int8 or int4 with per-block scales), gathered and summed in
  float32; `error_feedback` keeps the quantisation residual per device and adds
  it to the next one.
- `participation` (`_participation.py`): at each sync only the drawn learners
  count: `delta = theta - mean over participants of w'_j`, participants restart
  from the new `theta`, the others keep `w'_j` (they missed the sync) and take
  part again at a later one. A sync with no participant changes nothing.
  With compression, each device's rounding residual is kept per participant.
- `overlap=1`: the outer gradient issued at a sync step is applied one inner
  step later (Streaming DiLoCo's delay of one step; the collective still runs
  inside the sync step's conditional, so no communication is hidden yet):
  at the sync step the learners keep
  `w'_j`; at the next step `theta` takes the outer step and each participant
  becomes `theta + u_j` (its inner step of the delay kept).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from crossbow_jax.transformation import _compress, _fragments, _learners, _participation
from crossbow_jax.transformation import _period


class DiLoCoState(NamedTuple):
    """State of `diloco`.

    Attributes:
        learner_state: the inner optimiser's state, one per learner.
        theta: the outer parameters, once per device: the model to evaluate.
        outer_state: the outer optimiser's state (for `theta`); with fragments, a
            tuple of one state per fragment (over the fragment's list of leaves).
        count: number of updates applied (int32).
        error: with `compress` and error feedback, this device's quantisation
            residual (float32, shaped like `theta`); else None.
        pending: with `overlap=1`, the outer gradient issued at the last sync step
            (shaped like `theta`), applied at the next update; else None.
    """

    learner_state: optax.OptState
    theta: optax.Params
    outer_state: optax.OptState
    count: jax.Array
    error: Any = None
    pending: Any = None


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


def check_overlap(overlap: Any, every: Any, fragments: int) -> int:
    """`overlap`: 0 or 1, with at least 2 updates between two syncs when 1."""
    if isinstance(overlap, bool) or overlap not in (0, 1):
        raise ValueError(f"overlap={overlap!r} must be 0 (no delay) or 1 (one inner step)")
    if overlap and not (isinstance(every, int) and every // fragments >= 2):
        raise ValueError(
            f"overlap=1 needs at least 2 updates between syncs (a fixed every / fragments "
            f">= 2), got every={every} with fragments={fragments}; raise every or use overlap=0"
        )
    return int(overlap)


def diloco(
    learner_optimizer: optax.GradientTransformation,
    outer_optimizer: optax.GradientTransformation | None = None,
    *,
    every: int,
    axis_name: Hashable | None = None,
    fragments: int = 1,
    compress: str | None = None,
    error_feedback: bool = True,
    participation: _participation.Participation = None,
    seed: int = 0,
    overlap: int = 0,
    average_dtype: Any | None = None,
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
            With fragments it sees each fragment as a list of its leaves.
        every: inner updates between outer steps (H >= 1).
        axis_name: the device axis name under `jax.shard_map` / `jax.pmap`, or
            None for a single device.
        fragments: F >= 1 dividing `every`: fragment f syncs at offset f*every/F.
        compress: None (exact all-reduce), "bf16", "int8" or "int4": how each
            device's outer gradient travels.
        error_feedback: with `compress`, carry each device's quantisation residual
            into its next outer gradient.
        participation: None (every learner), a probability in (0, 1] drawn per
            learner at each sync from `seed` and the update count, or a function of
            the update count returning a 0/1 mask over all k learners.
        seed: seeds the participation draws.
        overlap: 0, or 1 to apply each outer step one inner step after its sync.
        average_dtype: dtype of `theta` and the outer step; None keeps the
            parameters' dtype (e.g. `jnp.float32` over bfloat16 learners).

    Returns:
        An `optax.GradientTransformationExtraArgs` over stacked learners (every
        leaf has a leading learner axis). Keyword arguments of `update` go to
        the inner optimiser.
    """
    period = _period.check_period("every", every)
    fragments = _period.check_fragments(fragments, period)
    compress = _compress.check_compress(compress, error_feedback)
    participation = _participation.check_participation(participation)
    seed = _period.check_int("seed", seed, 0, "the seed of the participation draws")
    overlap = check_overlap(overlap, period, fragments)
    inner = _learners.as_extra_args(learner_optimizer)
    outer = check_outer(outer_optimizer)
    plain = participation is None and compress is None

    def split(tree):
        return _fragments.assign(tree, fragments) if fragments > 1 else None

    def init_fn(params):
        theta = _learners.mean_over_learners(params, axis_name, average_dtype)
        parts = split(theta)
        leaves = jax.tree.leaves(theta)
        if parts is None:
            outer_state = outer.init(theta)
        else:
            outer_state = tuple(outer.init(_fragments.take(leaves, f)) for f in parts)
        return DiLoCoState(
            _learners.init_per_learner(inner, params),
            theta,
            outer_state,
            jnp.zeros([], jnp.int32),
            _compress.float32_zeros(theta) if compress and error_feedback else None,
            _compress.float32_zeros(theta) if overlap else None,  # the pending outer gradient
        )

    def update_fn(updates, state, params=None, **extra_args):
        m = _learners.check_same_learners(params, updates)
        devices = _learners.device_count(axis_name)
        step, learner_state = _learners.update_per_learner(
            inner, updates, state.learner_state, params, **extra_args
        )
        treedef = jax.tree.structure(state.theta)
        parts = split(state.theta) or (tuple(range(treedef.num_leaves)),)
        flat = lambda tree: treedef.flatten_up_to(tree)  # noqa: E731
        p_leaves, s_leaves = flat(params), flat(step)

        def who(count):
            if participation is None:
                return None, jnp.float32(m * devices)
            return _participation.for_params(participation, seed, count, params, axis_name)

        def outer_gradient(f, theta, error, mask, n):
            """delta over fragment f's leaves, and this device's new residual (or None)."""
            idx = parts[f]
            moved = flat(optax.apply_updates(params, step))  # w'_j; in the branch, as XLA
            w, th = _fragments.take(moved, idx), _fragments.take(theta, idx)  # fuses it there
            if average_dtype is not None:  # sum in the average's dtype, not the learners'
                w = [x.astype(t.dtype) for x, t in zip(w, th)]
            if plain:
                mean = _learners.mean_over_learners(w, axis_name, average_dtype)
                return [t - x for t, x in zip(th, mean)], None
            if mask is not None:
                w = _participation.masked(w, mask)
            if compress is None:
                total = _learners.sum_over_learners(w, axis_name)
                return [t - (s / n).astype(t.dtype) for t, s in zip(th, total)], None
            count_here = m if mask is None else jnp.sum(mask)
            mine = [count_here * t.astype(jnp.float32) - jnp.sum(x, 0, dtype=jnp.float32)
                    for t, x in zip(th, w)]  # fmt: skip
            # the residual is kept per participant (over n out, times n in), so what one
            # sync's rounding dropped reaches theta whatever the next sync's count
            err = None if error is None else [e * n for e in _fragments.take(error, idx)]
            total, err = _compress.compressed_sum(mine, err, compress, axis_name)
            delta = [(s / n).astype(t.dtype) for t, s in zip(th, total)]
            if err is None:
                return delta, None
            return delta, _fragments.put(error, idx, [e / n for e in err])

        def take_outer_step(f, theta, outer_state, delta):
            """theta and the outer state after fragment f's outer step along `delta`."""
            idx = parts[f]
            if fragments == 1:
                new, new_state = outer_step(
                    outer, treedef.unflatten(delta), outer_state, treedef.unflatten(theta)
                )
                return flat(new), new_state
            new, new_f = outer_step(outer, delta, outer_state[f], _fragments.take(theta, idx))
            states = outer_state[:f] + (new_f,) + outer_state[f + 1 :]
            return _fragments.put(theta, idx, new), states

        def learners_onto(f, theta, upd, mask, plus_step):
            """Participants' fragment-f leaves onto theta (plus this update's step)."""
            idx = parts[f]
            target = [  # in the learners' dtype, theta rounded to it first: lands exactly
                (t.astype(w.dtype)[None] + s - w) if plus_step else (t.astype(w.dtype)[None] - w)
                for t, s, w in zip(
                    _fragments.take(theta, idx), _fragments.take(s_leaves, idx),
                    _fragments.take(p_leaves, idx),
                )
            ]  # fmt: skip
            if mask is not None:
                target = _participation.choose(mask, target, _fragments.take(upd, idx))
            return _fragments.put(upd, idx, target)

        def if_anyone(n, new, old):
            return new if participation is None else jax.tree.map(
                lambda a, b: jnp.where(n > 0, a, b), new, old
            )

        def sync(f):  # overlap 0: gradient, outer step and restart in one update
            def fn(operand):
                upd, theta, outer_state, error = operand
                mask, n = who(state.count)
                delta, error_new = outer_gradient(f, theta, error, mask, n)
                theta_new, outer_new = take_outer_step(f, theta, outer_state, delta)
                upd_new = learners_onto(f, theta_new, upd, mask, False)
                return if_anyone(n, (upd_new, theta_new, outer_new, error_new), operand)

            return fn

        def issue(f):  # overlap 1, at the sync step: the outer gradient, kept for the next
            def fn(operand):
                theta, error, pending = operand
                mask, n = who(state.count)
                delta, error_new = outer_gradient(f, theta, error, mask, n)
                pending_new = _fragments.put(pending, parts[f], delta)
                return if_anyone(n, (theta, error_new, pending_new), operand)

            return fn

        def apply(f):  # overlap 1, one update later: the outer step and the restart
            def fn(operand):
                upd, theta, outer_state = operand
                mask, n = who(state.count - 1)
                delta = _fragments.take(pending, parts[f])
                theta_new, outer_new = take_outer_step(f, theta, outer_state, delta)
                upd_new = learners_onto(f, theta_new, upd, mask, True)
                return if_anyone(n, (upd_new, theta_new, outer_new), operand)

            return fn

        theta, error, pending = flat(state.theta), state.error, state.pending
        error = None if error is None else flat(error)
        pending = None if pending is None else flat(pending)
        skip = lambda o: o  # noqa: E731
        if not overlap:
            operand = (s_leaves, theta, state.outer_state, error)
            if fragments == 1:
                result = _period.on_sync(state.count, period, sync(0), operand)
            else:
                branch = _period.sync_branch(state.count, period, fragments)
                result = _period.on_branch(
                    branch, [skip] + [sync(f) for f in range(fragments)], operand
                )
            upd, theta, outer_state, error = result
        else:
            before = _period.sync_branch(state.count - 1, period, fragments)
            before = jnp.where(state.count > 0, before, 0)
            upd, theta, outer_state = _period.on_branch(
                before, [skip] + [apply(f) for f in range(fragments)],
                (s_leaves, theta, state.outer_state),
            )  # fmt: skip
            branch = _period.sync_branch(state.count, period, fragments)
            theta, error, pending = _period.on_branch(
                branch, [skip] + [issue(f) for f in range(fragments)], (theta, error, pending)
            )
        unflat = lambda leaves: None if leaves is None else treedef.unflatten(leaves)  # noqa: E731
        new_state = DiLoCoState(
            learner_state, unflat(theta), outer_state, optax.safe_increment(state.count),
            unflat(error), unflat(pending),
        )  # fmt: skip
        return treedef.unflatten(upd), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
