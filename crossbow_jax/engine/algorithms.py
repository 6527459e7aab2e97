"""The replica-averaging algorithms a run can use, and the settings each one takes.

`check_algorithm` refuses a setting the chosen algorithm would ignore (silent
is worse than loud): SMA's alpha for local SGD, an outer learning rate for
SMA, a period for SSGD, and so on. `warn_outer_momentum` warns of learner
momentum set under an outer step, which can train to chance (docs/sma.md).
"""

from __future__ import annotations

import warnings

from crossbow_jax.engine.options import ConfigError

ALGORITHMS = ("sma", "ssgd", "local_sgd", "diloco", "hierarchical")
SMA_FAMILY = ("sma", "hierarchical")  # the algorithms with SMA's alpha and central momentum
OUTER = ("diloco", "hierarchical")  # the algorithms with an outer optimiser


def check_algorithm(config) -> None:
    """Refuses replica-averaging settings that the chosen algorithm would ignore."""
    algo = config.algorithm
    if algo == "ssgd" and config.sync_every not in (None, 1):
        raise ConfigError(
            f"sync_every={config.sync_every} does not apply to algorithm='ssgd' (it "
            "synchronises at every step); use algorithm='local_sgd' for a period"
        )
    if algo in ("local_sgd", *OUTER) and config.sync_every is None:
        raise ConfigError(
            f"algorithm={algo!r} needs sync_every (H: updates between "
            f"{'outer steps' if algo in OUTER else 'averagings'}, e.g. 16)"
        )
    if algo not in SMA_FAMILY and (config.alpha is not None or config.central_momentum != 0.9):
        name = "alpha" if config.alpha is not None else "central_momentum"
        raise ConfigError(
            f"{name}={getattr(config, name)} is SMA's; algorithm={algo!r} has no "
            "central model to pull toward: leave it out, or use algorithm='sma'"
        )
    for name in ("outer_learning_rate", "outer_momentum"):
        if algo not in OUTER and getattr(config, name) is not None:
            raise ConfigError(
                f"{name}={getattr(config, name)} applies to algorithm='diloco' or "
                f"'hierarchical' only; algorithm={algo!r} has no outer optimiser"
            )
    if algo == "hierarchical" and config.hosts == 1:
        raise ConfigError(
            "algorithm='hierarchical' with hosts=1 is plain SMA (its sync_every and outer "
            "settings would do nothing); use algorithm='sma', or hosts=2 or more"
        )
    if algo == "hierarchical" and config.elastic:
        raise ConfigError(
            "elastic=True cannot carry algorithm='hierarchical' (its central models are per "
            "host); resume it on the same hosts and devices without elastic"
        )
    if (config.hosts not in (None, 1) or algo == "hierarchical") and config.mapper == "pmap":
        what = "algorithm='hierarchical'" if config.hosts is None else f"hosts={config.hosts}"
        raise ConfigError(
            f"{what} needs a hosts x devices mesh, which only mapper='shard_map' maps"
        )


def warn_outer_momentum(config) -> None:
    """Warns when the default optimiser's momentum is set above 0 under an outer Nesterov
    step: measured on LeNet/MNIST, it trained to chance at the default learning rate and
    trained at lr 0.01 (docs/sma.md, "Defaults that train"), so it is not refused."""
    if config.algorithm in OUTER and config.momentum:
        warnings.warn(
            f"momentum={config.momentum} with algorithm={config.algorithm!r}: momentum "
            "learners under the outer Nesterov step trained LeNet/MNIST to chance at "
            "learning_rate 0.05 (docs/sma.md); leave momentum out (the default is 0 under an "
            "outer step) or lower learning_rate",
            UserWarning,
            stacklevel=3,
        )
