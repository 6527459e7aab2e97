"""Pure per-device functions: initialise, train n steps, evaluate the central model.

Global arrays carry a leading device axis (see `mapping`); these functions see
one device's slice. On a device the learners' parameters have a leading axis
of m learners, the BatchNorm running statistics are kept once per device (the
mean of its learners' updates), and the training set is resident, so a step
gathers its own batches by index: nothing crosses the host per step.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from crossbow_jax.engine.mapping import DEVICE_AXIS
from crossbow_jax.transformation import sma_average


class TrainState(NamedTuple):
    """One device's training state (globally: a leading device axis on each leaf)."""

    params: Any  # (m, ...) learners
    batch_stats: Any  # BatchNorm running statistics, once per device ({} if none)
    opt_state: Any  # the sma/ssgd state
    step: jax.Array  # global step count, int32


@dataclasses.dataclass(frozen=True)
class Layout:
    """How images are spread over devices, learners and batches in one step."""

    devices: int
    learners: int  # learners per device (m; 1 for SSGD)
    batch: int  # images per learner per step (b; m*b for SSGD)

    @property
    def images_per_step(self) -> int:
        return self.devices * self.learners * self.batch


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Turns stored pixels into model input on the device."""

    scale: float | None  # 1/255 for uint8 pixels, None for float features
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    augment: str | None  # "crop_flip" or None

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.scale is not None:
            x = x * self.scale
        if self.mean is not None:
            x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
        if self.augment == "crop_flip" and key is not None:
            x = crop_flip(x, key)
        return x


def batch_indices(perm: jax.Array, step_in_epoch, device, layout: Layout) -> jax.Array:
    """Indices into the training set of one device's batches at one step.

    Step t of an epoch takes the slice [t * P, (t + 1) * P) of the epoch's
    permutation, P images per step in all; device d takes its m * b part,
    learner j its b rows. So batches are disjoint across learners and devices
    within a step, and an epoch consumes the training set once.

    Returns:
        (m, b) int32 indices.
    """
    per_device = layout.learners * layout.batch
    offset = step_in_epoch * layout.images_per_step + device * per_device
    return lax.dynamic_slice(perm, (offset,), (per_device,)).reshape(layout.learners, layout.batch)


def crop_flip(x: jax.Array, key: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop after zero padding by `pad` pixels, and a horizontal flip.

    Args:
        x: (..., H, W, C) images; each image gets its own crop and flip.
    """
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape((-1, h, w, c))
    kc, kf = jax.random.split(key)
    offsets = jax.random.randint(kc, (flat.shape[0], 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(kf, 0.5, (flat.shape[0],))
    padded = jnp.pad(flat, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, flip):
        img = lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, img[:, ::-1], img)

    return jax.vmap(one)(padded, offsets, flips).reshape(lead + (h, w, c))


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


def takes_train_flag(model: nn.Module) -> bool:
    """Whether the module's `__call__` has a `train` argument."""
    return "train" in inspect.signature(type(model).__call__).parameters


class Programs:
    """The per-device programs for one model, optimiser and layout."""

    def __init__(self, model, optimizer, layout, preprocess, execution, axis=DEVICE_AXIS):
        self.model = model
        self.opt = optimizer
        self.layout = layout
        self.pre = preprocess
        self.execution = execution
        self.axis = axis
        self.train_flag = takes_train_flag(model)

    def _apply(self, params, batch_stats, x, train, key=None):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        kwargs = {"train": train} if self.train_flag else {}
        if train:
            rngs = {"dropout": key} if key is not None else {}
            logits, mutated = self.model.apply(
                variables, x, mutable=["batch_stats"], rngs=rngs, **kwargs
            )
            return logits.astype(jnp.float32), mutated.get("batch_stats", {})
        return self.model.apply(variables, x, **kwargs).astype(jnp.float32), batch_stats

    def _learner_grads(self, params, batch_stats, x, y, key):
        """One learner: gradient, loss, accuracy and updated BN statistics."""

        def loss_fn(p):
            logits, stats = self._apply(p, batch_stats, x, True, key)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (jnp.mean(jnp.argmax(logits, -1) == y), stats)

        (loss, (acc, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, loss, acc, stats

    def _all_learner_grads(self, params, batch_stats, x, y, keys):
        if self.execution == "vmap":
            return jax.vmap(self._learner_grads, in_axes=(0, None, 0, 0, 0))(
                params, batch_stats, x, y, keys
            )
        outs = [
            self._learner_grads(
                jax.tree.map(lambda p, j=j: p[j], params), batch_stats, x[j], y[j], keys[j]
            )
            for j in range(self.layout.learners)
        ]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)

    def _one_step(self, state, raw_x, y, reset_steps, key, dev):
        """One SMA/SSGD step of this device's learners on stored pixels `raw_x` (m, b, ...)."""
        step_key = jax.random.fold_in(jax.random.fold_in(key, state.step), dev)
        aug_key, drop_key = jax.random.split(step_key)
        x = self.pre(raw_x, aug_key)
        keys = jax.random.split(drop_key, self.layout.learners)
        grads, loss, acc, stats = self._all_learner_grads(
            state.params, state.batch_stats, x, y, keys
        )
        extra = {}
        if reset_steps.shape[0]:
            extra["reset_learners"] = jnp.any(reset_steps == state.step)
        updates, opt_state = self.opt.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        batch_stats = jax.tree.map(lambda s: jnp.mean(s, 0), stats)
        metrics = lax.pmean({"loss": jnp.mean(loss), "accuracy": jnp.mean(acc)}, self.axis)
        return TrainState(params, batch_stats, opt_state, state.step + 1), metrics

    def train_steps(
        self, state, images, labels, perm, start, reset_steps, key, *, length, unroll=False
    ):
        """Runs `length` steps on the device-resident training set.

        Args:
            state: this device's `TrainState`.
            images, labels: the training set, resident on this device.
            perm: this epoch's permutation of the training set (int32).
            start: the step index within the epoch where this call begins.
            reset_steps: global steps at which SMA moves learners onto z
                (padded with -1).
            key: the run's base PRNG key.
            length: number of steps (static).
            unroll: unroll the steps into straight-line code instead of a
                loop (faster on XLA:CPU, see `TrainConfig.unroll_steps`).

        Returns:
            (new state, metrics {"loss", "accuracy"} of shape (length,)),
            each averaged over all learners on all devices.
        """
        dev = lax.axis_index(self.axis)

        def one(state, i):
            idx = batch_indices(perm, start + i, dev, self.layout)
            return self._one_step(state, images[idx], labels[idx], reset_steps, key, dev)

        return _scan(one, state, jnp.arange(length), unroll)

    def train_fed_steps(self, state, xs, ys, reset_steps, key, *, unroll=False):
        """Like `train_steps`, on batches fed from the host: xs (length, m, b, ...)."""
        dev = lax.axis_index(self.axis)

        def one(state, batch):
            return self._one_step(state, batch[0], batch[1], reset_steps, key, dev)

        return _scan(one, state, (xs, ys), unroll)

    def central_params(self, state):
        """The model to evaluate: z for SMA, the (identical) learner 0 for SSGD."""
        try:
            return sma_average(state.opt_state)
        except ValueError:
            return jax.tree.map(lambda p: p[0], state.params)

    def evaluate(self, state, images, labels, mask):
        """Correct predictions and summed loss of z on this device's test shard.

        Args:
            images, labels, mask: (chunks, chunk, ...) test data; mask marks
                real rows (the last chunk may be padded).

        Returns:
            {"correct", "loss_sum", "count"} summed over all devices.
        """
        params = self.central_params(state)
        batch_stats = lax.pmean(state.batch_stats, self.axis)

        def chunk(inputs):
            x, y, m = inputs
            logits, _ = self._apply(params, batch_stats, self.pre(x, None), False)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return {
                "correct": jnp.sum((jnp.argmax(logits, -1) == y) & m),
                "loss_sum": jnp.sum(jnp.where(m, loss, 0.0)),
                "count": jnp.sum(m),
            }

        totals = jax.tree.map(lambda v: jnp.sum(v, 0), lax.map(chunk, (images, labels, mask)))
        return lax.psum(totals, self.axis)
