"""TensorBoard event files in the run folder: every history row under standard tags.

With a run folder (and `TrainConfig.tensorboard` not False), process 0
writes each history row as it is logged into `<run folder>/events.out.
tfevents.*` (tensorboardX), so `tensorboard --logdir RUN_FOLDER` shows the
run while it goes. Every run segment (a fresh run, each resume) writes a new
file that starts with TensorBoard's purge mark at the step after the one it
starts from: rows a cut-off segment wrote after its last checkpoint are
hidden by the rows the resumed run writes again, and rows restored from the
checkpoint are never written twice.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax

from crossbow_jax.engine import runfolder
from crossbow_jax.engine.config import TrainConfig

TAGS = {
    "loss": "train/loss",
    "accuracy": "train/accuracy",
    "learning_rate": "train/learning_rate",
    "images_per_second": "perf/images_per_second",
    "learners_per_device": "perf/learners_per_device",
    "all_reduce_bytes": "perf/all_reduce_bytes",
    "peak_bytes": "perf/peak_bytes",
}
"""Row field -> tag; `test_<name>` goes to `test/<name>`, a user's metric to `train/<name>`."""
NOT_SHOWN = ("step", "epoch", "time", "reached_target")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A history row's figures by tag."""
    out = {}
    for name, value in row.items():
        if name in NOT_SHOWN or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        tag = TAGS.get(name)
        if tag is None:
            test, _, metric = name.partition("test_")
            tag = f"test/{metric}" if not test and metric else f"train/{name}"
        out[tag] = float(value)
    return out


class Events:
    """One run segment's event file (tensorboardX's `SummaryWriter`, opened lazily).

    Args:
        folder: the run folder.
        start: the step the segment starts from (0: a fresh run).
    """

    def __init__(self, folder: str, start: int):
        self.folder, self.start, self.writer = folder, start, None
        self.suffix = f".{os.getpid()}-{time.time_ns()}"  # (one file per segment)

    def write(self, row: dict[str, Any]) -> None:
        """Adds a row's figures at its step."""
        if self.writer is None:
            from tensorboardX import SummaryWriter  # (imported when a run writes)

            runfolder.WRITING.add(self.suffix)  # kept by `runfolder.clear` (overwrite)
            self.writer = SummaryWriter(self.folder, purge_step=self.start + 1,
                                        filename_suffix=self.suffix)  # fmt: skip
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"])

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            runfolder.WRITING.discard(self.suffix)


def open_events(config: TrainConfig, folder: str | None, start: int) -> Events | None:
    """The run segment's `Events` (process 0, with a run folder, unless tensorboard=False)."""
    if folder is None or config.tensorboard is False or jax.process_index() != 0:
        return None
    return Events(folder, start)
