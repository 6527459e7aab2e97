"""Cutting a run into dispatches: each one `lax.scan` call inside one epoch."""

from __future__ import annotations

from typing import NamedTuple

from crossbow_jax.engine.config import TrainConfig


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
    checkpoints (when a folder is set) every `checkpoint_every` steps and at the end.
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
            last or bool(config.checkpoint_every and end % config.checkpoint_every == 0)
        )
        chunks.append(
            Chunk(step, end - step, epoch, step - epoch * steps_per_epoch, evaluate, checkpoint)
        )
        step = end
    return chunks
