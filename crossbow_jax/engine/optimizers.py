"""The optimisers of a run: epoch-counted schedules, the default learner
optimiser, and `sma`/`ssgd` around the learner optimiser."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.mapping import DEVICE_AXIS
from crossbow_jax.engine.plan import Clock
from crossbow_jax.transformation import sma, ssgd


def milestone_steps(config: TrainConfig, clock: Clock) -> list[int | None]:
    """The global steps at which the learning rate drops (None: already passed at the
    clock's start)."""
    return [None if (s := clock.step_at(e)) is None else max(1, s) for e in config.lr_milestones]


def learning_rate_schedule(config: TrainConfig, clock: Clock) -> optax.Schedule:
    """Linear warm-up, then `lr_gamma` at each milestone (multistep), in the learner's
    steps, which the engine keeps equal to the run's global steps."""
    drops = [0 if s is None else s for s in milestone_steps(config, clock)]
    drops = jnp.asarray(drops or [-1], jnp.int32)
    warmup = (clock.step_at(config.warmup_epochs) or 0) if config.warmup_epochs else 0
    base, gamma = config.learning_rate, config.lr_gamma
    have_drops = bool(config.lr_milestones)

    def schedule(count):
        lr = jnp.asarray(base, jnp.float32)
        if have_drops:
            lr = lr * gamma ** jnp.sum(count >= drops)
        if warmup:
            lr = lr * jnp.minimum(1.0, (count + 1) / warmup)
        return lr

    return schedule


def default_optimizer(config: TrainConfig, clock: Clock) -> optax.GradientTransformation:
    """The original CROSSBOW learner: weight decay, then SGD with momentum."""
    sgd = optax.sgd(learning_rate_schedule(config, clock), momentum=config.momentum or None)
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd)
    return sgd


def learner_transform(
    config: TrainConfig, optimizer: optax.GradientTransformation | None, clock: Clock
) -> optax.GradientTransformation:
    """`sma` (or `ssgd`) around the learner optimiser, over the device axis.

    Args:
        config: the run's config (algorithm, SMA settings, default optimiser).
        optimizer: the user's learner optimiser, or None for `default_optimizer`.
        clock: the run's epochs in steps at this layout, for the epoch-counted schedule.
    """
    inner = optimizer if optimizer is not None else default_optimizer(config, clock)
    if config.algorithm == "sma":
        return sma(
            inner, alpha=config.alpha, momentum=config.central_momentum, axis_name=DEVICE_AXIS
        )
    return ssgd(inner, axis_name=DEVICE_AXIS)
