"""Synchronisation periods shared by the averaging transformations.

With a period p, the update that has `t` updates before it (0-based) is a
sync step when `(t + 1) % p == 0`: with p = 4 the 4th, 8th, ... updates
synchronise. A sync runs under `lax.cond`, so steps between syncs issue no
collective at all: that is the communication a period saves.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def check_int(name: str, value: Any, minimum: int, hint: str) -> int | jax.Array:
    """An int >= `minimum`; `hint` says what it counts.

    A 0-d integer array is taken too (`optax.inject_hyperparams` passes every
    numeric hyperparameter as one): a concrete one becomes an int; a traced one
    (changed at run time, e.g. with `optax.tree_utils.tree_set`) is kept as it is
    and decided on inside `jit`, so its value cannot be checked here.
    """
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(
                f"{name}={value!r} must be an int >= {minimum} ({hint}); got an array of "
                f"shape {value.shape} and dtype {value.dtype}"
            )
        if isinstance(value, jax.core.Tracer):
            return value
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an int >= {minimum} ({hint})")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum} ({hint})")
    return int(value)


def check_period(name: str, value: Any) -> int | jax.Array:
    """A period's value: an int >= 1 (1: synchronise at every update), as `check_int`."""
    return check_int(name, value, 1, "updates between synchronisations; 1: every update")


def is_sync(count: jax.Array, period: int | jax.Array) -> jax.Array:
    """Whether the update after `count` updates synchronises."""
    return (count + 1) % period == 0


def _varying_axes(tree: Any) -> frozenset:
    """Mesh axes along which some leaf varies (under `shard_map`'s type checking), else empty."""
    axes: set = set()
    for leaf in jax.tree.leaves(tree):
        aval = jax.typeof(leaf)
        vma = getattr(aval, "vma", None)
        if vma is None:  # jax >= 0.10 spells it manual_axis_type.varying
            vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
        axes.update(vma)
    return frozenset(axes)


def _as_varying(tree: Any, axes: frozenset) -> Any:
    def cast(x):
        missing = tuple(sorted(axes - _varying_axes(x), key=str))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def on_sync(
    count: jax.Array,
    period: int | jax.Array,
    sync_fn: Callable[[Any], Any],
    operand: Any,
) -> Any:
    """`sync_fn(operand)` if the update after `count` updates is a sync step, else `operand`
    as it is; with period 1 just `sync_fn(operand)`.

    The choice is a `lax.cond`, so the sync's collectives run on sync steps only;
    `sync_fn`'s outputs take the dtypes of `operand`'s leaves (same structure).
    Under `shard_map`'s type checking a collective's result is invariant over
    its axis while the state it replaces varies; when the branches' types differ
    for that reason only, both branches' outputs are marked varying over the
    axes the operand varies over, and the cond is traced again.
    """
    if isinstance(period, int) and period == 1:
        return keep_dtype(sync_fn(operand), operand)
    return on_pred(is_sync(count, period), sync_fn, operand)


def on_pred(sync: jax.Array, sync_fn: Callable[[Any], Any], operand: Any) -> Any:
    """`sync_fn(operand)` where `sync` (a traced bool) holds, else `operand`: `on_sync`'s
    `lax.cond` for a schedule of another shape (e.g. local SGD's warm-up)."""
    sync_fn = lambda o, fn=sync_fn: keep_dtype(fn(o), o)
    skip_fn = lambda o: o
    return _typed(lambda fns: lax.cond(sync, fns[1], fns[0], operand), [skip_fn, sync_fn], operand)


def on_branch(index: jax.Array, branches: list[Callable[[Any], Any]], operand: Any) -> Any:
    """`branches[index](operand)` by `lax.switch` (index 0 is usually "no sync"); outputs
    take the dtypes of `operand`'s leaves and, as in `on_sync`, are marked varying where
    the branches' types differ only in that."""
    fns = [lambda o, fn=fn: keep_dtype(fn(o), o) for fn in branches]
    return _typed(lambda fns: lax.switch(index, fns, operand), fns, operand)


def _typed(run: Callable[[list], Any], fns: list[Callable[[Any], Any]], operand: Any) -> Any:
    """`run(fns)`; when tracing fails on types and the operand varies over mesh axes, again
    with every branch's outputs marked varying over those axes."""
    try:
        return run(fns)
    except TypeError as error:
        axes = _varying_axes(operand)
        if not axes:
            raise
        try:
            return run([lambda o, fn=fn: _as_varying(fn(o), axes) for fn in fns])
        except Exception:  # noqa: BLE001 -- the first error is the one to show
            raise error from None


def keep_dtype(new: Any, like: Any) -> Any:
    """`new` cast leaf by leaf to the dtypes of `like`."""
    return jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.result_type(o)), new, like)


def check_fragments(fragments: Any, every: int | jax.Array) -> int:
    """The number of fragments: an int >= 1 that divides the period `every`."""
    if isinstance(fragments, bool) or not isinstance(fragments, numbers.Integral) or fragments < 1:
        raise ValueError(f"fragments={fragments!r} must be an int >= 1 (1: the whole model at once)")
    fragments = int(fragments)
    if fragments == 1:
        return 1
    if not isinstance(every, int):
        raise ValueError(
            f"fragments={fragments} needs a fixed period (an int every), not one set at run time"
        )
    if every % fragments:
        raise ValueError(
            f"fragments={fragments} must divide every={every} (fragment f syncs at offset "
            f"f*every/fragments); use every={every - every % fragments or fragments} or fragments "
            "that divide it"
        )
    return fragments


def sync_branch(t: Any, every: Any, fragments: int = 1, warmup_steps: int = 0) -> Any:
    """What the update with `t` updates before it synchronises, as a branch index.

    0: nothing; 1 + f: fragment f (f = 0, the whole model, when `fragments` is 1).
    Fragment f syncs every `every` updates at offset `f * every / fragments`: when
    `(t + 1) % every == f * every / fragments`, so fragment 0 syncs on the steps an
    unfragmented period syncs on. The first `warmup_steps` updates all sync (branch 1;
    local SGD's warm-up of every-step averaging). Works on ints and NumPy arrays (the
    engine counts a run's syncs with it) and on traced JAX integers (the transformations
    branch on it).
    """
    traced = (t, every, warmup_steps)
    xp = jnp if any(isinstance(x, jax.Array) for x in traced) else np
    stride = every // fragments
    r = (xp.asarray(t) + 1) % every
    branch = xp.where(r % stride == 0, 1 + r // stride, 0)
    if not (isinstance(warmup_steps, int) and warmup_steps == 0):  # may be traced
        branch = xp.where(xp.asarray(t) < warmup_steps, 1, branch)
    return branch


def branch_counts(start: int, end: int, every: int, fragments: int = 1,
                  warmup_steps: int = 0) -> list[int]:  # fmt: skip
    """How many of the updates with t in [start, end) updates before them take each branch
    of `sync_branch` (index 0: no sync; 1 + f: fragment f)."""
    t = np.arange(start, end, dtype=np.int64)
    branches = sync_branch(t, every, fragments, warmup_steps)
    return np.bincount(branches, minlength=1 + fragments).tolist()
