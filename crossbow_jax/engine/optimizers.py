"""The optimisers of a run: epoch-counted schedules, the default learner
optimiser, and the replica-averaging transformation (`sma`, `ssgd`,
`local_sgd`, `diloco`, `hierarchical`) around the learner optimiser."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.mapping import DEVICE_AXIS, HOST_AXIS
from crossbow_jax.engine.plan import Clock
from crossbow_jax.transformation import diloco, hierarchical, local_sgd, sma, ssgd


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
    sgd = optax.sgd(learning_rate_schedule(config, clock), momentum=config.learner_momentum or None)
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd)
    return sgd


def outer_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """DiLoCo's outer optimiser: Nesterov SGD with the config's outer rate and momentum."""
    lr = 0.7 if config.outer_learning_rate is None else config.outer_learning_rate
    mu = 0.9 if config.outer_momentum is None else config.outer_momentum
    return optax.sgd(lr, momentum=mu or None, nesterov=bool(mu))


def learner_transform(
    config: TrainConfig,
    optimizer: optax.GradientTransformation | None,
    clock: Clock,
    axes: str | tuple[str, ...] = DEVICE_AXIS,
) -> optax.GradientTransformation:
    """The config's algorithm around the learner optimiser, over the mesh's axes.

    Args:
        config: the run's config (algorithm, its settings, default optimiser).
        optimizer: the user's learner optimiser, or None for `default_optimizer`.
        clock: the run's epochs in steps at this layout, for the epoch-counted schedule.
        axes: the axis name(s) over all devices (`mapping.device_axes`); with
            hosts, ("hosts", "devices"): hierarchical runs SMA over "devices"
            and DiLoCo over "hosts", the others reduce over both.
    """
    inner = optimizer if optimizer is not None else default_optimizer(config, clock)
    algo, period = config.algorithm, config.period
    if algo == "hierarchical":
        return hierarchical(
            inner, outer_optimizer(config), every=period, alpha=config.alpha,
            momentum=config.central_momentum, axis_name=DEVICE_AXIS,
            host_axis=HOST_AXIS if axes != DEVICE_AXIS else None,
        )  # fmt: skip
    if algo == "sma":
        return sma(
            inner, alpha=config.alpha, momentum=config.central_momentum, sync_every=period,
            axis_name=axes,
        )  # fmt: skip
    if algo == "local_sgd":
        return local_sgd(inner, every=period, axis_name=axes)
    if algo == "diloco":
        return diloco(inner, outer_optimizer(config), every=period, axis_name=axes)
    return ssgd(inner, axis_name=axes)
