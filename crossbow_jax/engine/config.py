"""The one configuration both front doors (Python and the shell) fill in."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

ALGORITHMS = ("sma", "ssgd")
EXECUTIONS = ("auto", "vmap", "unroll")
MAPPERS = ("shard_map", "pmap")
DTYPES = ("float32", "bfloat16")
TUNE_STRATEGIES = ("linear", "doubling")
PLACEMENTS = ("auto", "device", "host")


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any training."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run.

    Attributes:
        batch_size: images per learner per step (b).
        learners_per_device: learners on every device (m); an int >= 1, or
            "auto" to pick it by measured throughput (the tuning package).
        algorithm: "sma" (k = m x devices learners at batch b, kept together
            by SMA) or "ssgd" (the fair baseline: one learner per device at
            batch m x b, gradients averaged across devices).
        epochs: epochs of training data consumed by all learners together.
        seed: seeds initialisation, data order, augmentation and dropout.
        learning_rate: the learner optimiser's base learning rate, used when
            no optax optimiser is passed to `train`.
        momentum: learner SGD momentum (default optimiser).
        weight_decay: learner weight decay (default optimiser).
        lr_milestones: epochs at which the learning rate is multiplied by
            `lr_gamma` (multistep schedule, counted in epochs).
        lr_gamma: the factor at each milestone.
        warmup_epochs: linear warm-up of the learning rate from 0.
        reset_at_drops: move every learner onto z at each milestone (SMA).
        alpha: SMA correction step; None means 1/k.
        central_momentum: SMA momentum of the central model.
        eval_every: evaluate z every this many steps (0: only at epoch ends).
        steps_per_dispatch: steps run by one device call (`lax.scan`); None
            picks per platform (see `unroll_steps`).
        unroll_steps: unroll the scan over steps into one straight-line
            program. None picks per platform: on CPU, XLA runs a loop body
            about 5x slower than the same code unrolled (docs/performance.md),
            so CPU runs 2 unrolled steps per dispatch; elsewhere a rolled scan
            of 50 steps.
        execution: how learners' forward/backward run on a device: "vmap",
            "unroll" (a loop unrolled in one program), or "auto" (unroll on
            CPU, vmap elsewhere; see docs/performance.md).
        mapper: "shard_map" or "pmap".
        data_placement: "device" keeps the training set resident on every
            device and gathers batches there; "host" assembles batches on the
            host and feeds them ahead of use (for data too big for device
            memory; streamed data sets such as ImageNet always use it);
            "auto" picks "host" only when the training set would take more
            than half of a device's free memory.
        num_devices: use the first n local devices (None: all).
        dtype: compute dtype of the model ("float32" or "bfloat16").
        target_accuracy: stop when the test accuracy of z reaches it.
        checkpoint_dir: where orbax checkpoints go (None: no checkpoints).
        checkpoint_every: checkpoint every this many steps (and at the end).
        resume: continue from the latest checkpoint in `checkpoint_dir`.
        progress: show a progress bar.
        tune_strategy: "linear" (the paper's rule) or "doubling", for
            `learners_per_device="auto"` (docs/tuning.md).
        tune_threshold: keep adding learners while throughput gains more than this.
        tune_max_learners: the most learners per device the tuner tries.
        tune_steps: steps per timed dispatch in a tuning trial.
        tune_repeats: timed dispatches per trial (the median is used).
        tune_memory_limit: bytes a trial's program may use (None: the
            device's free memory where it reports one).
    """

    batch_size: int = 16
    learners_per_device: int | str = 4
    algorithm: str = "sma"
    epochs: float = 5
    seed: int = 0
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_milestones: tuple[float, ...] = ()
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    reset_at_drops: bool = False
    alpha: float | None = None
    central_momentum: float = 0.9
    eval_every: int = 0
    steps_per_dispatch: int | None = None
    unroll_steps: bool | None = None
    execution: str = "auto"
    mapper: str = "shard_map"
    data_placement: str = "auto"
    num_devices: int | None = None
    dtype: str = "float32"
    target_accuracy: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True
    tune_strategy: str = "linear"
    tune_threshold: float = 0.1
    tune_max_learners: int = 16
    tune_steps: int = 10
    tune_repeats: int = 5
    tune_memory_limit: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "lr_milestones", tuple(float(e) for e in self.lr_milestones))
        self.validate()

    def validate(self) -> None:
        """Raises `ConfigError` with a one-line message for any bad value."""
        _positive_int("batch_size", self.batch_size)
        if self.learners_per_device != "auto":
            _positive_int("learners_per_device", self.learners_per_device, extra=' or "auto"')
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("execution", self.execution, EXECUTIONS)
        _choice("mapper", self.mapper, MAPPERS)
        _choice("data_placement", self.data_placement, PLACEMENTS)
        _choice("dtype", self.dtype, DTYPES)
        if not self.epochs > 0:
            raise ConfigError(f"epochs={self.epochs} must be > 0")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha} must be > 0 (or None for 1/k)")
        if not 0 <= self.central_momentum < 1:
            raise ConfigError(f"central_momentum={self.central_momentum} must be in [0, 1)")
        if any(b <= a for a, b in zip(self.lr_milestones, self.lr_milestones[1:])):
            raise ConfigError(f"lr_milestones={self.lr_milestones} must increase")
        if any(not 0 < e < self.epochs for e in self.lr_milestones):
            raise ConfigError(f"lr_milestones={self.lr_milestones} must lie inside (0, epochs)")
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"lr_gamma={self.lr_gamma} must be in (0, 1]")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs} must be in [0, epochs)")
        if self.steps_per_dispatch is not None:
            _positive_int("steps_per_dispatch", self.steps_per_dispatch)
        _choice("tune_strategy", self.tune_strategy, TUNE_STRATEGIES)
        if not self.tune_threshold >= 0:
            raise ConfigError(f"tune_threshold={self.tune_threshold} must be >= 0")
        for name in ("tune_max_learners", "tune_steps", "tune_repeats"):
            _positive_int(name, getattr(self, name))
        if self.tune_memory_limit is not None:
            _positive_int("tune_memory_limit", self.tune_memory_limit)
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an int >= 0")
        if self.num_devices is not None:
            _positive_int("num_devices", self.num_devices)
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"target_accuracy={self.target_accuracy} must be in (0, 1]")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("resume=True needs checkpoint_dir (the folder of the run to resume)")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it resumes."""
        loose = {
            "epochs",
            "checkpoint_dir",
            "checkpoint_every",
            "resume",
            "progress",
            "eval_every",
            "target_accuracy",
            "tune_strategy",
            "tune_threshold",
            "tune_max_learners",
            "tune_steps",
            "tune_repeats",
            "tune_memory_limit",
        }
        fields = dataclasses.asdict(self)
        fields["lr_milestones"] = list(fields["lr_milestones"])
        return {k: v for k, v in fields.items() if k not in loose}


def check_writable(folder: str) -> None:
    """Fails early, with the path, when a run folder cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"cannot write to {folder!r} ({e.strerror}); pick a folder you can write"
        ) from None


def _positive_int(name: str, value: Any, extra: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an int >= 1{extra}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
