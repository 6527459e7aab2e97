"""Cutting a run into steps and dispatches.

`Layout` says how one step's images are spread over devices, learners and
batches (the one place where SMA and SSGD differ in shape: `layout_for`);
`plan_chunks` cuts the run's steps into dispatches, each one device call
inside one epoch.
"""

from __future__ import annotations

import dataclasses
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
    """The layout of `m` learners per device: m learners at batch b (SMA), or one
    learner at batch m x b (SSGD, the baseline that takes as many images per step)."""
    return Layout(devices, m, batch) if algorithm == "sma" else Layout(devices, 1, m * batch)


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


class Chunk(NamedTuple):
    """Steps [start, start + length) of the run, run by one device call."""

    start: int
    length: int
    epoch: int
    position: int  # the step index within the epoch where the chunk begins
    evaluate: bool  # evaluate z after it
    checkpoint: bool  # checkpoint after it

    @property
    def end(self) -> int:
        return self.start + self.length


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


def plan_chunks(
    start: int, total: int, steps_per_epoch: int, config: TrainConfig, steps_per_dispatch: int
) -> list[Chunk]:
    """Chunks from `start` to `total`, cut at epoch ends, evaluations and checkpoints.

    z is evaluated at every epoch end, every `eval_every` steps and at the end;
    checkpoints (when a folder is set) at every epoch end, every
    `checkpoint_every` steps and at the end (the loop adds timed ones,
    every `checkpoint_minutes`).
    """
    chunks = []
    step = start
    while step < total:
        epoch = step // steps_per_epoch
        epoch_end = (epoch + 1) * steps_per_epoch
        end = min(step + steps_per_dispatch, epoch_end, total)
        for every in (config.eval_every, config.checkpoint_every):
            if every:
                end = min(end, _next_multiple(step, every))
        last = end == total
        evaluate = (
            last or end == epoch_end or bool(config.eval_every and end % config.eval_every == 0)
        )
        checkpoint = bool(config.checkpoint_dir) and (
            last
            or end == epoch_end
            or bool(config.checkpoint_every and end % config.checkpoint_every == 0)
        )
        chunks.append(
            Chunk(step, end - step, epoch, step - epoch * steps_per_epoch, evaluate, checkpoint)
        )
        step = end
    return chunks
