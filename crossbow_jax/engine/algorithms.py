"""The replica-averaging algorithms a run can use, and the settings each one takes.

`check_algorithm` refuses a setting the chosen algorithm would ignore (silent
is worse than loud): SMA's alpha for local SGD, an outer learning rate for
SMA, a period for SSGD, and so on; `check_family_options` does the same for
the family's options (fragments, compress, error_feedback, participation,
overlap, sync_warmup_steps), whose help (`HELP`, for their `TrainConfig`
fields) is kept here with their checks. `warn_outer_momentum` warns of learner
momentum set under an outer step, which can train to chance (docs/sma.md).
"""

from __future__ import annotations

import warnings

from crossbow_jax.engine.options import ConfigError

ALGORITHMS = ("sma", "ssgd", "local_sgd", "diloco", "hierarchical")
SMA_FAMILY = ("sma", "hierarchical")  # the algorithms with SMA's alpha and central momentum
OUTER = ("diloco", "hierarchical")  # the algorithms with an outer optimiser
COMPRESSIONS = ("bf16", "int8", "int4")
PARTICIPANTS = ("sma", "local_sgd", "diloco")  # the algorithms with partial participation

HELP = {
    "fragments": "diloco: split the model into F fragments, each synchronised every sync_every "
    "updates at its own offset (Streaming DiLoCo), so one outer step moves one fragment "
    "(whole layers, strided: sizes follow the layers); F must divide sync_every (default: "
    "1, the whole model at once)",
    "compress": "diloco, hierarchical: quantise the outer step's all-reduce to bf16, int8 or "
    "int4 (default: none, float32)",
    "error_feedback": "with compress: carry each device's quantisation error into its next "
    "outer step (error feedback); off: drop it",
    "participation": "sma, local_sgd, diloco: the chance that a learner takes part in a "
    "synchronisation, drawn for every learner at every sync from the seed (default: none, "
    "every learner; the transformations also take a function: docs/sma.md)",
    "overlap": "diloco: 1 applies each outer step one inner update after its sync "
    "(Streaming DiLoCo's delay; it hides no communication yet: docs/sma.md); needs "
    "sync_every / fragments >= 2 (default: 0, applied at once)",
    "sync_warmup_steps": "local_sgd: average at every update for the first K updates, then "
    "every sync_every (post-local SGD)",
}
"""The help of the family's options (their `TrainConfig` fields, flags and docstring)."""


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
    check_family_options(config)


def _only(name: str, value, members: tuple[str, ...], algo: str, what: str) -> ConfigError:
    names = [repr(m) for m in members]
    quoted = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    return ConfigError(
        f"{name}={value!r} applies to algorithm={quoted} only; algorithm={algo!r} {what}: "
        f"leave {name} out, or use algorithm={members[0]!r}"
    )


def check_family_options(config) -> None:
    """Refuses the family's options where they cannot take effect."""
    algo, every = config.algorithm, config.period
    if config.fragments != 1:
        if algo != "diloco":
            raise _only("fragments", config.fragments, ("diloco",), algo,
                        "has no fragmented outer step")  # fmt: skip
        if every % config.fragments:
            fits = every - every % config.fragments or config.fragments
            raise ConfigError(
                f"fragments={config.fragments} must divide sync_every={every} (fragment f "
                f"syncs at offset f*sync_every/fragments); use sync_every={fits}, or fragments "
                f"that divide {every}"
            )
    if config.compress is not None and algo not in OUTER:
        raise _only("compress", config.compress, OUTER, algo, "has no outer all-reduce")
    if not config.error_feedback and config.compress is None:
        raise ConfigError(
            "error_feedback=False turns off compress's quantisation residuals; without "
            "compress there are none: leave error_feedback out, or set compress"
        )
    if config.participation is not None and algo not in PARTICIPANTS:
        raise _only("participation", config.participation, PARTICIPANTS, algo,
                    "has no partial participation")  # fmt: skip
    if config.overlap:
        if algo != "diloco":
            raise _only("overlap", config.overlap, ("diloco",), algo, "has no outer step")
        if every // config.fragments < 2:
            per = f"sync_every={every}" + (f" with fragments={config.fragments}"
                                           if config.fragments > 1 else "")  # fmt: skip
            raise ConfigError(
                f"overlap={config.overlap} applies an outer step one update after its sync, "
                f"so it needs 2 or more updates between syncs (sync_every / fragments),"
                f" not {per}: raise sync_every, or leave overlap out"
            )
    if config.sync_warmup_steps:
        k = config.sync_warmup_steps
        if algo != "local_sgd":
            raise _only("sync_warmup_steps", k, ("local_sgd",), algo, "has no warm-up")
        if every == 1:
            raise ConfigError(
                f"sync_warmup_steps={k} averages at every update for {k} updates, as "
                "sync_every=1 does throughout: leave sync_warmup_steps out, or set sync_every "
                "above 1"
            )
    if config.elastic and config.compress is not None and config.error_feedback:
        raise ConfigError(
            f"elastic=True cannot carry compress={config.compress!r} with error feedback "
            "(its quantisation residuals are per device and cannot move to another layout); "
            "resume on the same devices without elastic"
        )


def refuse_function(participation) -> None:
    """The engine's participation is a probability; a function is the transformations'."""
    if callable(participation):
        raise ConfigError(
            f"participation={participation!r}: the engine takes a probability in (0, 1]; a "
            "function of the update count is taken by the transformations in a training loop "
            "of your own (crossbow_jax.sma, local_sgd or diloco with participation=fn: "
            "docs/sma.md)"
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
