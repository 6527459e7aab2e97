"""Cutting a run into steps and dispatches.

`Layout` says how one step's images are spread over devices, learners and
batches (the one place where the averaging algorithms and SSGD differ in shape:
`layout_for`);
`Clock` maps a run's epochs to global steps from a `Position` (so a run can
change its layout mid-run), and `plan_chunks` cuts the run's steps into
dispatches, each one device call inside one epoch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from crossbow_jax.engine.config import ConfigError, TrainConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    """How images are spread over devices, learners and batches in one step."""

    devices: int
    learners: int  # learners per device (m; 1 for SSGD)
    batch: int  # images per learner per step (b; m*b for SSGD)

    @property
    def images_per_step(self) -> int:
        return self.devices * self.learners * self.batch


def layout_for(algorithm: str, devices: int, m: int, batch: int) -> Layout:
    """The layout of `m` learners per device: m learners at batch b (SMA and the rest of
    the replica-averaging family), or one learner at batch m x b (SSGD, the baseline
    that takes as many images per step)."""
    return Layout(devices, 1, m * batch) if algorithm == "ssgd" else Layout(devices, m, batch)


def epoch_steps(layout: Layout, num_train: int) -> int:
    """Steps in one epoch (the training set consumed once by all learners together).

    Raises:
        ConfigError: not even one step fits in the training set.
    """
    steps = num_train // layout.images_per_step
    if steps == 0:
        lay = layout
        raise ConfigError(
            f"one step needs {lay.images_per_step} images ({lay.devices} devices x "
            f"{lay.learners} learners x batch {lay.batch}) but the training set has "
            f"{num_train}; use a smaller batch_size or fewer learners"
        )
    return steps


class Position(NamedTuple):
    """Where a run stands: steps taken, the epoch under way, images of it consumed.

    The data position is counted in images, so a run can change its layout
    (learners, devices) mid-epoch and still take every epoch's permutation
    once, in order (`Clock`).
    """

    step: int = 0
    epoch: int = 0
    offset: int = 0  # images of the epoch's permutation consumed


class Clock:
    """A run's epochs in global steps, from `start` on, at `images_per_step` per step.

    An epoch takes its permutation of the training set in slices of
    `images_per_step`; the tail that does not fill a step is skipped. The
    epoch under way at `start` continues from `start.offset`. At least one
    step must fit in the training set (`epoch_steps` checks it).
    """

    def __init__(self, start: Position, images_per_step: int, num_train: int):
        self.start, self.per_step, self.num_train = start, images_per_step, num_train
        self.steps_per_epoch = num_train // images_per_step
        self.first = max(0, (num_train - start.offset) // images_per_step)  # left in start.epoch

    def epoch_end(self, step: int) -> int:
        """The global step at which the epoch under way at `step` ends."""
        return (
            self.start.step
            + self.first
            + (self.position(step).epoch - self.start.epoch) * (self.steps_per_epoch)
        )

    def position(self, step: int) -> Position:
        """The position after global step `step` (>= start.step)."""
        k = step - self.start.step
        if k < self.first:
            return Position(step, self.start.epoch, self.start.offset + k * self.per_step)
        k -= self.first
        epochs, steps = divmod(k, self.steps_per_epoch)
        return Position(step, self.start.epoch + 1 + epochs, steps * self.per_step)

    def epochs(self, step: int) -> float:
        """Epochs of data consumed after global step `step` (whole at every epoch end)."""
        where = self.position(step)
        whole = self.per_step * (self.first if where.epoch == self.start.epoch else 0)
        span = (
            (self.start.offset + whole)
            if where.epoch == self.start.epoch
            else (self.steps_per_epoch * self.per_step)
        )
        return where.epoch + where.offset / span

    def step_at(self, epochs: float, rounding=round) -> int | None:
        """The global step at which `epochs` of data are consumed (None: already past).

        For a run that has kept one layout this is `rounding(epochs * steps_per_epoch)`,
        wherever the clock starts; after a change of layout, the step whose position
        in the epoch is nearest to the same fraction of it.
        """
        whole = int(epochs // 1)
        spe, per_step = self.steps_per_epoch, self.per_step
        if whole < self.start.epoch:
            return None
        base = self.start.offset if whole == self.start.epoch else 0
        done = 0 if whole == self.start.epoch else self.first + (whole - self.start.epoch - 1) * spe
        if base % per_step == 0:  # the same rounding as from the start of the run
            more = _rounded(epochs * spe, rounding) - whole * spe - base // per_step
            if more < 0:
                return None  # earlier in the clock's first epoch
        elif (epochs - whole) * spe * per_step < base - 1e-9:
            return None
        else:
            more = _rounded(epochs * spe - base / per_step, rounding) - whole * spe
        return self.start.step + done + max(0, more)


def _rounded(x: float, rounding) -> int:
    """`rounding(x)`, with float noise around whole numbers ignored."""
    return round(x) if abs(x - round(x)) < 1e-9 else int(rounding(x))


class Chunk(NamedTuple):
    """Steps [start, start + length) of the run, run by one device call."""

    start: int
    length: int
    epoch: int
    offset: int  # images of the epoch's permutation consumed before the chunk
    evaluate: bool  # evaluate z after it
    checkpoint: bool  # checkpoint after it
    epochs: float = 0.0  # epochs of data consumed at its end

    @property
    def end(self) -> int:
        return self.start + self.length


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


def run_end(clock: Clock, epochs: float) -> int:
    """The run's last global step: `epochs` of data, in whole steps (at least one step)."""
    end = clock.step_at(epochs, math.ceil)
    return clock.start.step if end is None else max(end, 1)


# The longest run the engine takes, checked before any work (`check_length`):
# - MAX_STEPS: steps are counted on the devices in int32 (the state's step, the reset and
#   milestone steps, optax's counts), so a run past 2**31 - 1 steps would wrap.
# - MAX_DISPATCHES: the loop plans a run's dispatches up front (`plan_chunks`, one `Chunk`
#   of about 230 bytes and 5 us of host time each, measured on the 2-core CI machine), so
#   2**24 dispatches are about 4 GB of host memory and 90 s before the first step. Real runs
#   are far below: ResNet-50 on ImageNet for 90 epochs, 16 images per step, one step per
#   dispatch, is 7.2 million.
MAX_STEPS = 2**31 - 1
MAX_DISPATCHES = 2**24


def check_length(
    clock: Clock, epochs: float, steps_per_dispatch: int, cuts_every: tuple[int, ...] = ()
) -> None:
    """Refuses a run whose steps from `clock.start` overflow the step counter or whose
    dispatches are too many to plan (`MAX_STEPS`, `MAX_DISPATCHES`): at least one per
    `steps_per_dispatch` steps, per epoch end and per cut every `cuts_every` steps
    (`eval_every`, `checkpoint_every`; 0: none).

    Raises:
        ConfigError: one line naming the epochs, the steps and the bound.
    """
    end = run_end(clock, epochs)
    steps = end - clock.start.step
    what = (f"epochs={epochs:g} is {steps} steps"
            f"{f' from step {clock.start.step}' if clock.start.step else ''}")  # fmt: skip
    per_epoch = f"{clock.steps_per_epoch} steps of {clock.per_step} images per epoch"
    if end > MAX_STEPS:
        per = max(clock.steps_per_epoch, 1)  # within the dispatch bound too (its cuts aside)
        most = min(MAX_STEPS / per, MAX_DISPATCHES * steps_per_dispatch / per, MAX_DISPATCHES)
        raise ConfigError(
            f"{what} ({per_epoch}); the engine counts steps in int32, at most {MAX_STEPS} "
            f"steps: use at most epochs={most:.6g}, or more images per step"
        )
    cuts = [-(-steps // steps_per_dispatch), math.ceil(epochs - clock.epochs(clock.start.step))]
    cuts += [steps // every for every in cuts_every if every]
    dispatches = max(cuts)  # at least: a plan cuts at each of these
    if dispatches > MAX_DISPATCHES:
        raise ConfigError(
            f"{what} in {dispatches} dispatches of at most {steps_per_dispatch} "
            f"step{'s' if steps_per_dispatch > 1 else ''}; a run is planned up front, at most "
            f"{MAX_DISPATCHES} dispatches: use fewer epochs or a larger steps_per_dispatch"
        )


def plan_chunks(
    clock: Clock,
    end: int,
    config: TrainConfig,
    steps_per_dispatch: int,
    *,
    start: int | None = None,
    stop: int | None = None,
) -> list[Chunk]:
    """Chunks from `start` (default `clock.start`) to `end` (or `stop`, if sooner), cut
    at epoch ends, evaluations and checkpoints.

    z is evaluated at every epoch end, every `eval_every` steps and at `end`;
    checkpoints (when a folder is set) at every epoch end, every
    `checkpoint_every` steps and at `end` (the loop adds timed ones, every
    `checkpoint_minutes`).
    """
    chunks = []
    step = clock.start.step if start is None else start
    last_step = end if stop is None else min(end, stop)
    while step < last_step:
        where = clock.position(step)
        epoch_end = clock.epoch_end(step)
        cut = min(step + steps_per_dispatch, epoch_end, last_step)
        for every in (config.eval_every, config.checkpoint_every):
            if every:
                cut = min(cut, _next_multiple(step, every))
        last = cut == end
        evaluate = (
            last or cut == epoch_end or bool(config.eval_every and cut % config.eval_every == 0)
        )
        checkpoint = bool(config.checkpoint_dir) and (
            last
            or cut == epoch_end
            or bool(config.checkpoint_every and cut % config.checkpoint_every == 0)
        )
        chunks.append(
            Chunk(
                step, cut - step, where.epoch, where.offset, evaluate, checkpoint, clock.epochs(cut)
            )
        )
        step = cut
    return chunks
