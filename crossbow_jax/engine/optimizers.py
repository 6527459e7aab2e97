"""The optimisers of a run: epoch-counted schedules, the default learner
optimiser, the replica-averaging transformation (`sma`, `ssgd`,
`local_sgd`, `diloco`, `hierarchical`) around the learner optimiser, and the
check of a user's learner optimiser before any work (`check_optimizer`,
`refuse_ignored_options`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crossbow_jax.engine.config import FIELDS, ConfigError, TrainConfig
from crossbow_jax.engine.mapping import DEVICE_AXIS, HOST_AXIS
from crossbow_jax.engine.options import one_line
from crossbow_jax.engine.plan import Clock
from crossbow_jax.transformation import diloco, hierarchical, local_sgd, sma, ssgd
from crossbow_jax.transformation.central import FAMILY


def milestone_steps(config: TrainConfig, clock: Clock) -> list[int | None]:
    """The global steps at which the learning rate drops (None: already passed at the
    clock's start)."""
    return [None if (s := clock.step_at(e)) is None else max(1, s) for e in config.lr_milestones]


def learning_rate_schedule(config: TrainConfig, clock: Clock, xp: Any = jnp) -> optax.Schedule:
    """Linear warm-up, then `lr_gamma` at each milestone (multistep), in the learner's
    steps, which the engine keeps equal to the run's global steps (`xp=np`: the same on the
    host, for the history rows)."""
    drops = [0 if s is None else s for s in milestone_steps(config, clock)]
    drops = xp.asarray(drops or [-1], xp.int32)
    warmup = (clock.step_at(config.warmup_epochs) or 0) if config.warmup_epochs else 0
    base, gamma = config.learning_rate, config.lr_gamma
    have_drops = bool(config.lr_milestones)

    def schedule(count):
        lr = xp.asarray(base, xp.float32)
        if have_drops:
            lr = lr * gamma ** xp.sum(count >= drops)
        if warmup:
            lr = lr * xp.minimum(1.0, (count + 1) / warmup)
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
    algo, period, given = config.algorithm, config.period, family_options(config)
    if algo == "hierarchical":
        return hierarchical(
            inner, outer_optimizer(config), every=period, alpha=config.alpha,
            momentum=config.central_momentum, axis_name=DEVICE_AXIS,
            host_axis=HOST_AXIS if axes != DEVICE_AXIS else None, **given,
        )  # fmt: skip
    if algo == "sma":
        return sma(
            inner, alpha=config.alpha, momentum=config.central_momentum, sync_every=period,
            axis_name=axes, **given,
        )  # fmt: skip
    if algo == "local_sgd":
        return local_sgd(inner, every=period, axis_name=axes, **given)
    if algo == "diloco":
        return diloco(inner, outer_optimizer(config), every=period, axis_name=axes, **given)
    return ssgd(inner, axis_name=axes)


def family_options(config: TrainConfig) -> dict[str, Any]:
    """The family's options that `config` sets (not at their defaults), as keyword arguments
    of its algorithm's transformation (the config refused them for an algorithm without
    them); a config that sets none builds the program it built before they existed."""
    given: dict[str, Any] = {}
    if config.fragments != 1:
        given["fragments"] = config.fragments
    if config.compress is not None:
        given["compress"] = config.compress
    if not config.error_feedback:
        given["error_feedback"] = False
    if config.participation is not None:
        given.update(participation=config.participation, seed=config.seed)
    if config.overlap:
        given["overlap"] = config.overlap
    if config.sync_warmup_steps:
        given["warmup_steps"] = config.sync_warmup_steps
    return given


def check_optimizer(optimizer: Any, params: Any, variables: Any = None) -> None:
    """The learner optimiser: an optax transformation that `sma` can wrap, initialise on one
    learner's parameters and update with `value=` (the learner's loss, as the engine passes
    it); so not `sma`/`ssgd` already, nor `optax.lookahead`, nor one built (a mask, labels)
    on the model's whole `variables` rather than its parameters."""
    if optimizer is None:
        return
    if not callable(getattr(optimizer, "init", None)) or not callable(
        getattr(optimizer, "update", None)
    ):
        raise ConfigError(
            f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}; "
            "e.g. optax.adam(1e-3)"
        )
    one = _one_learner(params)
    try:
        state = jax.eval_shape(sma(optimizer).init, one)
    except Exception as e:  # noqa: BLE001 -- the user's optimiser failed on the model
        text = one_line(e)
        if "lookahead" in text:
            raise ConfigError(str(e)) from None
        if "learner ax" in text:  # sma or ssgd inside: met parameters without a learner axis
            raise ConfigError(f"optimizer contains a crossbow_jax.sma or ssgd; {_WRAPS}") from None
        built_on = _variables_fitted(optimizer, variables)
        if built_on is not None:
            keys = ", ".join(f"{k!r}: ..." for k in built_on)
            raise ConfigError(
                f"the optimizer's mask/labels were built from the whole variables dict {{{keys}}}"
                "; the optimizer sees variables['params']: build it from variables['params']"
            ) from None
        raise ConfigError(
            f"optimizer cannot initialise on the model's parameters: {text}"
        ) from None
    found = [type(s).__name__ for s in jax.tree.leaves(state.learner_state, is_leaf=_is_wrapper)
             if _is_wrapper(s)]  # fmt: skip
    if found:
        raise ConfigError(f"optimizer contains a {found[0]}; {_WRAPS}")
    loss = jax.ShapeDtypeStruct((1,), np.float32)
    try:
        jax.eval_shape(lambda g, s, v: sma(optimizer).update(g, s, g, value=v), one, state, loss)
    except Exception as e:  # noqa: BLE001 -- the user's optimiser failed on the model
        raise ConfigError(
            f"optimizer cannot update the model's parameters: {one_line(e)}; the engine calls "
            "update(grads, state, params, value=the learner's loss), and no other extra argument"
        ) from None


def _one_learner(tree: Any) -> Any:
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct((1, *np.shape(p)), p.dtype), tree)


def _variables_fitted(optimizer: Any, variables: Any) -> dict | None:
    """The Linen-style variables ({'params': ...}, with the model state or without) on which
    `optimizer` initialises, where it does; else None."""
    if not isinstance(variables, dict) or "params" not in variables:
        return None
    for tree in (variables, {"params": variables["params"]}):
        try:
            jax.eval_shape(sma(optimizer).init, _one_learner(tree))
        except Exception:  # noqa: BLE001 -- it fails on these as well
            continue
        return tree
    return None


_WRAPS = "pass the learner optimiser; the engine wraps it (the algorithm option: sma, ssgd, ...)"


def _is_wrapper(node) -> bool:
    return isinstance(node, FAMILY)


def refuse_ignored_options(optimizer: Any, options: dict[str, Any]) -> None:
    """With a learner `optimizer`, the default optimiser's settings would be ignored: refuse them.

    Args:
        optimizer: the `optimizer=` argument (None: the default optimiser is used).
        options: the settings the caller passed explicitly.

    Raises:
        ConfigError: naming every such setting (`lr_milestones` stays allowed with
            `reset_at_drops=True`, where it marks the resets).
    """
    if optimizer is None:
        return
    ignored = [f.name for f in FIELDS if f.metadata.get("default_optimizer") and f.name in options]
    if options.get("reset_at_drops") and "lr_milestones" in ignored:
        ignored.remove("lr_milestones")
    if ignored:
        raise ConfigError(
            f"optimizer= is given, so {', '.join(ignored)} (settings of the default SGD "
            "optimiser) would be ignored; put them in your optimizer, or leave optimizer out"
        )
