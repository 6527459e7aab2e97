"""The one configuration both front doors (Python and the shell) fill in.

Every `TrainConfig` field carries its rule, its help text and its group in
the field's metadata (`option(...)`). That is the one source: validation
(`TrainConfig.validate`), the class docstring, and the `crossbow-jax` flags
with their choices and defaults (`crossbow_jax/cli/_common.py`) are all
made from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any

from crossbow_jax.engine.algorithms import (
    ALGORITHMS, COMPRESSIONS, HELP, OUTER, SMA_FAMILY, check_algorithm, refuse_function,
)  # fmt: skip
from crossbow_jax.engine.options import (
    GROUPS, NON_NEGATIVE, POSITIVE, UNIT, ConfigError, Range, check_value, docstring, floats,
    kind, normalise, option,
)  # fmt: skip

__all__ = ["ConfigError", "TrainConfig", "check_field", "kind", "make_config"]

EXECUTIONS = ("auto", "vmap", "unroll", "im2col")
MAPPERS = ("shard_map", "pmap")
DTYPES = ("float32", "bfloat16")
TUNE_STRATEGIES = ("linear", "doubling")
TUNE_MODES = ("online", "trials")
ELASTIC_FIELDS = (
    "learners_per_device", "num_devices", "execution", "mapper", "steps_per_dispatch",
    "unroll_steps", "data_placement",
)  # fmt: skip
"""What `elastic=True` lets a resumed run change: its hardware and how it uses it."""
PLACEMENTS = ("auto", "device", "host")

_L, _O, _S, _E, _R, _T, _M = GROUPS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (the docstring is made from the fields)."""

    batch_size: int = option(16, "images per learner per step (b)", _L, at_least=1, metavar="B")
    learners_per_device: int | str = option(
        4,
        "learners on every device (m), or 'auto' to choose m by measured throughput "
        "(docs/tuning.md)",
        _L, at_least=1, auto=True, metavar="M", cli_default="auto",
    )  # fmt: skip
    algorithm: str = option(
        "sma",
        "sma: m x devices learners at batch b, kept together by SMA; ssgd: the "
        "synchronous-SGD baseline, one learner per device at batch m x b; local_sgd: the "
        "learners averaged every sync_every steps; diloco: an outer Nesterov step on their "
        "mean change every sync_every steps; hierarchical: SMA inside each host, DiLoCo "
        "across hosts every sync_every steps (docs/sma.md)",
        _L, choices=ALGORITHMS,
    )  # fmt: skip
    epochs: float = option(
        5, "epochs of training data consumed by all learners together (may be fractional)",
        _L, range=POSITIVE, metavar="E", identity=False,
    )  # fmt: skip
    seed: int = option(
        0, "seeds initialisation, data order, augmentation and dropout", _L, at_least=0
    )
    learning_rate: float = option(
        0.05, "the learner optimiser's base learning rate (the default optimiser)", _O,
        range=POSITIVE, flags=("--lr", "--learning-rate"), metavar="LR", default_optimizer=True,
    )  # fmt: skip
    momentum: float | None = option(
        None, "learner SGD momentum (default: 0.9; 0 for diloco and hierarchical, whose outer "
        "Nesterov step carries the momentum: docs/sma.md)", _O, range=UNIT, none="the default",
        metavar="MU", default_optimizer=True,
    )  # fmt: skip
    weight_decay: float = option(
        0.0, "learner weight decay", _O, range=NON_NEGATIVE,
        flags=("--weight-decay", "--wd"), metavar="WD", default_optimizer=True,
    )  # fmt: skip
    lr_milestones: tuple[float, ...] = option(
        (),
        "epochs at which the learning rate is multiplied by lr_gamma (and, with "
        "reset_at_drops, the learners reset onto the central model) (default: none)",
        _O, metavar="EPOCH", default_optimizer=True,
    )  # fmt: skip
    lr_gamma: float = option(
        0.1, "the factor at each milestone", _O, range=Range(0, high=1, high_in=True),
        metavar="GAMMA", default_optimizer=True,
    )  # fmt: skip
    warmup_epochs: float = option(
        0.0, "linear warm-up of the learning rate from 0 over this many epochs", _O,
        range=NON_NEGATIVE, metavar="EPOCHS", default_optimizer=True,
    )  # fmt: skip
    reset_at_drops: bool = option(
        False, "SMA: move every learner onto the central model at each milestone", _O
    )
    alpha: float | None = option(
        None, "SMA correction step (default: 1/k, k = learners in all; hierarchical: "
        "learners of one host)", _S,
        range=POSITIVE, none="1/k",
    )  # fmt: skip
    central_momentum: float = option(
        0.9, "momentum of the central model (sma, hierarchical)", _S, range=UNIT, metavar="MU"
    )
    sync_every: int | None = option(
        None,
        "updates between synchronisations: sma's period (1: Algorithm 1 at every step), the "
        "H of local_sgd and diloco, the outer period across hosts of hierarchical (default: "
        "1 for sma; local_sgd, diloco and hierarchical need it)",
        _S, at_least=1, flags=("--sync-every", "--every"), metavar="H",
    )  # fmt: skip
    outer_learning_rate: float | None = option(
        None, "diloco, hierarchical: the outer Nesterov SGD's learning rate (default: 0.7)",
        _S, range=POSITIVE, none="0.7", flags=("--outer-lr", "--outer-learning-rate"),
        metavar="LR",
    )  # fmt: skip
    outer_momentum: float | None = option(
        None, "diloco, hierarchical: the outer Nesterov SGD's momentum (default: 0.9)", _S,
        range=UNIT, none="0.9", metavar="MU",
    )  # fmt: skip
    hosts: int | None = option(
        None,
        "hosts of a hosts x devices mesh (hierarchical: SMA inside a host, DiLoCo across); "
        "in one process, groups of the local devices simulate them (default: the number of "
        "processes for hierarchical, none for the others)",
        _S, at_least=1, metavar="H",
    )  # fmt: skip
    # the family's options: their help is with their checks (engine/algorithms.py)
    fragments: int = option(1, HELP["fragments"], _S, at_least=1, metavar="F")
    compress: str | None = option(None, HELP["compress"], _S, choices=COMPRESSIONS)
    error_feedback: bool = option(True, HELP["error_feedback"], _S)
    participation: float | None = option(
        None, HELP["participation"], _S, range=Range(0, high=1, high_in=True), metavar="P",
        none="every learner", refuse=refuse_function,
    )  # fmt: skip
    overlap: int = option(0, HELP["overlap"], _S, choices=(0, 1))
    sync_warmup_steps: int = option(0, HELP["sync_warmup_steps"], _S, at_least=0, metavar="K")
    eval_every: int = option(
        0, "also evaluate the central model every this many steps (0: at epoch ends only)",
        _E, at_least=0, metavar="STEPS", identity=False,
    )  # fmt: skip
    steps_per_dispatch: int | None = option(
        None, "steps run by one device call (default: 2 on CPU, 50 elsewhere)", _E,
        at_least=1, metavar="STEPS",
    )  # fmt: skip
    unroll_steps: bool | None = option(
        None,
        "unroll a dispatch's steps into one program instead of a loop (default: on for CPU, "
        "where XLA runs loop bodies ~5x slower; off elsewhere)",
        _E,
    )
    execution: str = option(
        "auto",
        "how a device runs its learners: vmap over the stacked parameters; unroll them one "
        "after another in one program; im2col: vmap with every convolution as patches and "
        "one batched matmul; auto: the platform's default, another tried on the run's own "
        "steps when the run repays compiling it; the fastest cached (docs/tuning.md)",
        _E, choices=EXECUTIONS,
    )  # fmt: skip
    mapper: str = option(
        "shard_map", "how programs are mapped over devices (multi-host: shard_map)", _E,
        choices=MAPPERS,
    )  # fmt: skip
    data_placement: str = option(
        "auto",
        "device: the training set stays on every device; host: batches are assembled on "
        "the host and fed ahead of use (streamed data sets always); auto: host only when "
        "the data would fill over half of a device's free memory",
        _E, choices=PLACEMENTS,
    )  # fmt: skip
    data_workers: int | None = option(
        None, "worker processes that read a streamed data set through grain (0: threads "
        "of the run's process; default: the host's cores less one, at most 8; 0 on 2 cores)",
        _E, at_least=0, metavar="N", identity=False,
    )  # fmt: skip
    num_devices: int | None = option(
        None,
        "use the first n devices (default: all; all processes' devices when multi-host)",
        _E, at_least=1, metavar="N",
    )  # fmt: skip
    dtype: str = option("float32", "compute dtype of the model", _E, choices=DTYPES)
    target_accuracy: float | None = option(
        None,
        "stop when the central model's test accuracy reaches this, and report the time "
        "to reach it (default: none, train all epochs)",
        _L, range=Range(0, high=1, high_in=True), metavar="ACC", identity=False,
    )  # fmt: skip
    divergence_factor: float = option(
        10.0, "raise TrainingDiverged when a history row's mean training loss exceeds this "
        "times its start (docs/usage.md, 'Divergence'); 0: off, for a loss that may grow",
        _L, range=NON_NEGATIVE, metavar="F", identity=False,
    )  # fmt: skip
    checkpoint_dir: str | None = option(
        None,
        "the run folder: config.json and orbax checkpoints; the crossbow-jax command also "
        "writes history.json and result.json there (default: none, nothing written)",
        _R, flags=("--output",), metavar="DIR", identity=False,
    )  # fmt: skip
    checkpoint_every: int = option(
        0,
        "also checkpoint every this many steps (0: none by steps); needs the run folder, "
        "where checkpoints are written at every epoch end, every checkpoint_minutes and at "
        "the end anyway",
        _R, at_least=0, metavar="STEPS", identity=False,
    )  # fmt: skip
    resume: bool = option(
        False,
        "continue the run in the run folder from its latest checkpoint, with the same "
        "settings",
        _R, identity=False,
    )  # fmt: skip
    elastic: bool = option(
        False,
        "with resume: the run may continue on other hardware (other devices, learners per "
        "device, execution); the central model, its momentum, the data position and the "
        "step count carry over, and every learner restarts from the central model",
        _R, identity=False,
    )  # fmt: skip
    overwrite: bool = option(
        False, "start a new run in a run folder that holds another run, whose checkpoints "
        "and files are removed once the new run has passed its checks", _R, identity=False,
    )  # fmt: skip
    tensorboard: bool | None = option(
        None, "write TensorBoard event files of the history rows into the run folder "
        "(docs/usage.md, 'Metrics'); False: none (default: on with a run folder)", _R,
        identity=False,
    )  # fmt: skip
    progress: bool = option(True, "a progress bar on stderr", _E, identity=False)
    tune_mode: str = option(
        "online",
        "with learners_per_device='auto': online trains from the first step with 1 learner "
        "per device and adds learners while throughput rises (the paper's tuner: tuning "
        "steps are training steps); trials measure settings on throw-away steps before "
        "training (crossbow-jax tune always does)",
        _T, choices=TUNE_MODES, identity=False,
    )  # fmt: skip
    tune_strategy: str = option(
        "linear",
        "linear: add one learner at a time (the paper's rule); doubling: 1, 2, 4, ... then "
        "one at a time",
        _T, choices=TUNE_STRATEGIES, identity=False,
    )  # fmt: skip
    tune_threshold: float = option(
        0.1, "add a learner only while throughput grows by more than this (0.1 = 10%)",
        _T, range=NON_NEGATIVE, metavar="GAIN", identity=False,
    )  # fmt: skip
    tune_max_learners: int = option(
        16, "never try more learners per device than this", _T, at_least=1, metavar="M",
        identity=False,
    )  # fmt: skip
    tune_steps: int = option(
        10, "steps per timed interval of a trial (fewer for big models)", _T, at_least=1,
        metavar="STEPS", identity=False,
    )  # fmt: skip
    tune_repeats: int = option(
        5, "timed dispatches per setting, after one warm-up; the median counts", _T,
        at_least=1, metavar="N", identity=False,
    )  # fmt: skip
    tune_memory_limit: int | None = option(
        None,
        "skip settings whose compiled program needs more bytes than this per device (the "
        "command takes MiB) (default: the device's free memory where it reports it; none "
        "on CPU)",
        _T, at_least=1, metavar="MIB", cli_type="mebibytes", identity=False,
    )  # fmt: skip

    checkpoint_minutes: float = option(
        5.0, "with a run folder, also checkpoint whenever this many minutes have passed "
        "since the last checkpoint (0: not by time)",
        _R, range=NON_NEGATIVE, metavar="MIN", identity=False,
    )  # fmt: skip
    mode_keyword: str | None = option(
        None,
        "the keyword of a Linen model's __call__ that switches training and evaluation, "
        "when it is not one of train, training, is_training, deterministic (those are "
        "found); 'not NAME' for one that is True in evaluation (default: found)",
        _M, metavar="NAME",
    )  # fmt: skip
    unscaled_images: bool = option(
        False, "take float (N, H, W, C) images beyond 0..1 (e.g. 0..255) as they are, for a "
        "model that scales them itself (default: refused; pass x / 255.0)", _M, identity=False,
        cli=False,  # the shell's data sets are uint8
    )  # fmt: skip

    def __post_init__(self):
        for f in dataclasses.fields(self):  # NumPy scalars, 0/1 flags, paths: plain values
            object.__setattr__(self, f.name, normalise(f, getattr(self, f.name)))
        object.__setattr__(self, "lr_milestones", floats("lr_milestones", self.lr_milestones))
        self.validate()

    def validate(self) -> None:
        """Raises `ConfigError` with a one-line message for any bad value."""
        for f in dataclasses.fields(self):
            check_value(f, getattr(self, f.name))
        if any(b <= a for a, b in zip(self.lr_milestones, self.lr_milestones[1:])):
            raise ConfigError(f"lr_milestones={self.lr_milestones} must increase")
        if any(not 0 < e < self.epochs for e in self.lr_milestones):
            raise ConfigError(f"lr_milestones={self.lr_milestones} must lie inside (0, epochs)")
        if not self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs} must be in [0, epochs)")
        if 0 < self.divergence_factor <= 1:
            raise ConfigError(f"divergence_factor={self.divergence_factor} must be 0 (off) or > 1")
        if self.elastic and not self.resume:
            raise ConfigError("elastic=True changes how a run resumes; it needs resume=True")
        if self.overwrite and (self.resume or not self.checkpoint_dir):
            raise ConfigError("overwrite=True replaces the run in checkpoint_dir with a new "
                              "one; it needs checkpoint_dir and cannot go with resume=True")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("resume=True needs checkpoint_dir (the folder of the run to resume)")
        if self.reset_at_drops and (self.algorithm not in SMA_FAMILY or not self.lr_milestones):
            raise ConfigError(
                "reset_at_drops=True moves SMA's learners onto the central model at the "
                "lr_milestones; it needs algorithm='sma' (or 'hierarchical') and lr_milestones"
            )
        check_algorithm(self)
        if self.tensorboard and not self.checkpoint_dir:
            raise ConfigError(
                "tensorboard=True writes event files into the run folder; it needs "
                "checkpoint_dir (or leave tensorboard out)"
            )
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError(
                f"checkpoint_every={self.checkpoint_every} needs checkpoint_dir (where "
                "checkpoints go); set checkpoint_dir or leave checkpoint_every at 0"
            )

    @property
    def learner_momentum(self) -> float:
        """`momentum`, or its default: 0 under an outer step (diloco, hierarchical), else 0.9."""
        if self.momentum is not None:
            return self.momentum
        return 0.0 if self.algorithm in OUTER else 0.9

    @property
    def period(self) -> int:
        """Updates between synchronisations (1: every update)."""
        return self.sync_every or 1

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it resumes."""
        fields = dataclasses.asdict(self)
        fields["lr_milestones"] = list(fields["lr_milestones"])
        fields["momentum"] = self.learner_momentum  # the learner's, set or by default
        return {f.name: fields[f.name] for f in FIELDS if f.metadata.get("identity", True)}


FIELDS = dataclasses.fields(TrainConfig)
_FIELDS_BY_NAME = {f.name: f for f in FIELDS}


def make_config(**values: Any) -> TrainConfig:
    """A validated `TrainConfig` from keyword values.

    Raises:
        ConfigError: an unknown name (the message suggests the field meant and
            lists the valid ones), or a bad value.
    """
    unknown = sorted(set(values) - set(_FIELDS_BY_NAME))
    if unknown:
        hints = [
            f"{name} -> {close[0]}"
            for name in unknown
            if (close := difflib.get_close_matches(name, _FIELDS_BY_NAME, n=1))
            or (close := [f for f in _FIELDS_BY_NAME if f.endswith("_" + name)])
        ]
        meant = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ConfigError(
            f"unknown option(s) {unknown}{meant}; valid ones: {sorted(_FIELDS_BY_NAME)}"
        )
    return TrainConfig(**values)


def check_field(name: str, value: Any) -> None:
    """Checks one `TrainConfig` field's value against its rule; raises `ConfigError`."""
    check_value(_FIELDS_BY_NAME[name], value)


TrainConfig.__doc__ = docstring(FIELDS)
