"""The per-device program, as free functions: one step, n steps per dispatch, evaluation.

Everything here runs on one device, inside `jax.shard_map` or `jax.pmap`
(`crossbow_jax/engine/programs.py` maps and compiles it). Global arrays carry
a leading device axis; these functions see one device's slice. On a device
the learners' parameters have a leading axis of m learners, the BatchNorm
running statistics are kept once per device (the mean of its learners'
updates), and the training set is resident, so a step gathers its own
batches by index: nothing crosses the host per step.

The path of one step (`train_step`): the stored pixels of the learners'
batches -> `Preprocess` (cast, scale, normalise, augment) -> every learner's
forward and backward pass (`learner_grads`, vmapped or unrolled over the
learners; the loss and figures of `spec.task`) -> `spec.tx.update` (`sma` or
`ssgd` around the learner optimiser: one all-reduce over the devices) -> new
parameters and metrics.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from crossbow_jax.data.preprocess import Preprocess
from crossbow_jax.engine.im2col import im2col
from crossbow_jax.engine.mapping import DEVICE_AXIS
from crossbow_jax.engine.plan import Layout
from crossbow_jax.engine.task import Task
from crossbow_jax.models.adapters import Model
from crossbow_jax.transformation import central_params as family_central


class TrainState(NamedTuple):
    """One device's training state (globally: a leading device axis on each leaf)."""

    params: Any  # (m, ...) learners
    batch_stats: Any  # the model's state (BatchNorm statistics), once per device ({} if none)
    opt_state: Any  # the sma/ssgd state
    step: jax.Array  # global step count, int32


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
    """What a step is, fixed for a run (static under `jit`).

    Attributes:
        model: one learner's model (`crossbow_jax/models/adapters.py`).
        tx: `sma` or `ssgd` around the learner optimiser, over `axis`.
        layout: devices x learners x batch of one step.
        preprocess: stored pixels -> model input (`crossbow_jax/data/preprocess.py`).
        execution: "vmap", "unroll" or "im2col": how the learners' forward/backward run.
        algorithm: the config's algorithm: decides where the central model is read.
        task: the loss and the figures reported (`crossbow_jax/engine/task.py`).
        axis: the axis name(s) over all devices (`mapping.device_axes`).
    """

    model: Model
    tx: optax.GradientTransformation
    layout: Layout
    preprocess: Preprocess
    execution: str
    algorithm: str
    task: Task = Task()
    axis: str | tuple[str, ...] = DEVICE_AXIS


def batch_indices(perm: jax.Array, offset, device, layout: Layout) -> jax.Array:
    """Indices into the training set of one device's batches at one step.

    A step that begins `offset` images into the epoch takes the slice
    [offset, offset + P) of the epoch's permutation, P images per step in all;
    device d takes its m * b part, learner j its b rows. So batches are
    disjoint across learners and devices within a step, and an epoch consumes
    the training set once (whatever the layout of each step).

    Returns:
        (m, b) int32 indices.
    """
    per_device = layout.learners * layout.batch
    return lax.dynamic_slice(perm, (offset + device * per_device,), (per_device,)).reshape(
        layout.learners, layout.batch
    )


def apply_model(spec: StepSpec, params, state, x, train: bool, key=None):
    """One learner's outputs (floats as float32) and its updated model state.

    In training with `execution="im2col"`, every convolution of the model runs as
    patches and one matmul (`crossbow_jax.engine.im2col`), which the learners'
    vmap turns into one batched matmul instead of a grouped convolution.
    """
    apply = spec.model.apply
    if train and spec.execution == "im2col":
        apply = im2col(functools.partial(apply, train=True))
        outputs, state = apply(params, state, x, key=key)
    else:
        outputs, state = apply(params, state, x, train=train, key=key)
    if jnp.issubdtype(outputs.dtype, jnp.floating):
        outputs = outputs.astype(jnp.float32)
    return outputs, state


def learner_grads(spec: StepSpec, params, state, x, y, key):
    """One learner: gradient, its figures (mean loss, accuracy, ...) and updated model state."""

    def loss_fn(p):
        outputs, new_state = apply_model(spec, p, state, x, True, key)
        figures = {k: jnp.mean(v) for k, v in spec.task.figures(outputs, y).items()}
        return figures["loss"], (figures, new_state)

    (_, (figures, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, figures, new_state


def all_learner_grads(spec: StepSpec, params, batch_stats, x, y, keys):
    """`learner_grads` of every learner on the device, stacked on the learner axis."""
    if spec.execution in ("vmap", "im2col"):
        one = functools.partial(learner_grads, spec)
        return jax.vmap(one, in_axes=(0, None, 0, 0, 0))(params, batch_stats, x, y, keys)
    outs = [
        learner_grads(spec, jax.tree.map(lambda p, j=j: p[j], params), batch_stats, x[j], y[j],
                      keys[j])
        for j in range(spec.layout.learners)
    ]  # fmt: skip
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)


def train_step(spec: StepSpec, state: TrainState, raw_x, y, reset_steps, key, device):
    """One SMA/SSGD step of this device's learners on stored pixels `raw_x` (m, b, ...).

    Returns:
        (new state, the task's figures ({"loss", "accuracy", ...}) averaged over
        all learners on all devices).
    """
    step_key = jax.random.fold_in(jax.random.fold_in(key, state.step), device)
    aug_key, drop_key = jax.random.split(step_key)
    x = spec.preprocess(raw_x, aug_key)
    keys = jax.random.split(drop_key, spec.layout.learners)
    grads, figures, stats = all_learner_grads(spec, state.params, state.batch_stats, x, y, keys)
    metrics = lax.pmean({k: jnp.mean(v) for k, v in figures.items()}, spec.axis)
    # optax's extra argument for the loss (`reduce_on_plateau`): each learner's own; SSGD's
    # one optimiser steps on the mean gradient of all learners, so it gets their mean loss.
    extra = {"value": metrics["loss"] if spec.algorithm == "ssgd" else figures["loss"]}
    if reset_steps.shape[0]:
        extra["reset_learners"] = jnp.any(reset_steps == state.step)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    batch_stats = jax.tree.map(_learners_mean, stats)
    return TrainState(params, batch_stats, opt_state, state.step + 1), metrics


def _learners_mean(values):
    """A state array's mean over the learners (floats); integer state takes learner 0's."""
    if jnp.issubdtype(values.dtype, jnp.floating):
        return jnp.mean(values, 0)
    return values[0]


def _scan(step, state, xs, unroll: bool):
    """`lax.scan(step, state, xs)`, or the same steps as straight-line code.

    Straight-line code when `unroll`: XLA:CPU runs a loop body ~5x slower, and
    `lax.scan(..., unroll=True)` still emits a one-trip loop for one step.
    """
    if not unroll:
        return lax.scan(step, state, xs)
    outs = []
    for i in range(jax.tree.leaves(xs)[0].shape[0]):
        state, out = step(state, jax.tree.map(lambda x, i=i: x[i], xs))
        outs.append(out)
    return state, jax.tree.map(lambda *o: jnp.stack(o), *outs)


def train_steps(
    spec: StepSpec, state, images, labels, perm, start, reset_steps, key, *, length, unroll=False
):
    """Runs `length` steps on the device-resident training set (one dispatch).

    Args:
        spec: the run's `StepSpec`.
        state: this device's `TrainState`.
        images, labels: the training set, resident on this device.
        perm: this epoch's permutation of the training set (int32).
        start: images of the epoch's permutation consumed before this call.
        reset_steps: global steps at which SMA moves learners onto z
            (padded with -1).
        key: the run's base PRNG key.
        length: number of steps (static).
        unroll: unroll the steps into straight-line code instead of a
            loop (faster on XLA:CPU, see `TrainConfig.unroll_steps`).

    Returns:
        (new state, the task's figures, each of shape (length,) and averaged
        over all learners on all devices).
    """
    device = lax.axis_index(spec.axis)

    def one(state, i):
        idx = batch_indices(perm, start + i * spec.layout.images_per_step, device, spec.layout)
        return train_step(spec, state, images[idx], labels[idx], reset_steps, key, device)

    return _scan(one, state, jnp.arange(length), unroll)


def train_fed_steps(spec: StepSpec, state, xs, ys, reset_steps, key, *, unroll=False):
    """Like `train_steps`, on batches fed from the host: xs (length, m, b, ...)."""
    device = lax.axis_index(spec.axis)

    def one(state, batch):
        return train_step(spec, state, batch[0], batch[1], reset_steps, key, device)

    return _scan(one, state, (xs, ys), unroll)


def central_params(spec: StepSpec, state: TrainState):
    """The model to evaluate: the family's central model (`crossbow_jax.central_params`:
    z, the last average, theta), or the (identical) learner 0 for SSGD."""
    if spec.algorithm == "ssgd":
        return jax.tree.map(lambda p: p[0], state.params)
    return family_central(state.opt_state)


def central_variables(spec: StepSpec, state: TrainState) -> tuple[Any, Any]:
    """The central model: its parameters, and the devices' mean model state."""
    return central_params(spec, state), jax.tree.map(_devices_mean(spec.axis), state.batch_stats)


def _devices_mean(axis):
    def mean(values):
        if jnp.issubdtype(values.dtype, jnp.floating):
            return lax.pmean(values, axis)
        return values

    return mean


def eval_step(spec: StepSpec, state: TrainState, images, labels, mask):
    """The task's figures of z on this device's test shard, summed over its examples.

    Args:
        images, labels, mask: (chunks, chunk, ...) test data; mask marks
            real rows (the last chunk may be padded).

    Returns:
        {figure: sum over the examples, ..., "count": examples} summed over all devices.
    """
    params, model_state = central_variables(spec, state)

    def chunk(inputs):
        x, y, m = inputs
        outputs, _ = apply_model(spec, params, model_state, spec.preprocess(x, None), False)
        sums = {k: jnp.sum(jnp.where(m, v, 0.0)) for k, v in spec.task.figures(outputs, y).items()}
        return {**sums, "count": jnp.sum(m)}

    totals = jax.tree.map(lambda v: jnp.sum(v, 0), lax.map(chunk, (images, labels, mask)))
    return lax.psum(totals, spec.axis)
