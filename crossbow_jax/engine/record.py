"""What a run records on the host: history rows, throughput clock, progress bar, result."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from crossbow_jax.engine import mapping
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.plan import Chunk


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        params: variables of the central model z (`{"params": ..., "batch_stats": ...}`).
        accuracy: the last test accuracy of z (None without a test set).
        history: one dict per logged interval (step, epoch, loss, accuracy,
            images_per_second, time, and test_accuracy/test_loss at evaluations).
        time_to_accuracy: seconds from the start of the run (tuning and
            compilation included) until z first reached `target_accuracy`.
        images_per_second: training images per second of all learners,
            compilation, evaluation and checkpoints excluded.
        wall_time: seconds for the whole run, data loading excluded.
        compile_time: seconds spent compiling, reported apart.
        steps: steps taken in all (including before a resume).
        learners_per_device, devices: the layout that ran.
        config: the `TrainConfig` of the run.
        tuning: the auto-tuner's report when `learners_per_device="auto"`
            (chosen setting and throughput curve, docs/tuning.md), else None.
    """

    params: Any
    accuracy: float | None
    history: list[dict[str, Any]]
    time_to_accuracy: float | None
    images_per_second: float
    wall_time: float
    compile_time: float
    steps: int
    learners_per_device: int
    devices: int
    config: TrainConfig
    tuning: dict[str, Any] | None = None


class History:
    """The run's history rows, its throughput clock and its progress bar.

    Training time is counted between `restart_clock` and the next logged
    dispatch, so evaluation and checkpoints stay out of images/s.

    Args:
        config: the run's config (progress, target accuracy, algorithm).
        rows: rows restored from a checkpoint ([] for a fresh run).
        elapsed_before: seconds the run had taken before a resume.
        started: `time.perf_counter()` at the start of this process's run.
        images_per_step, steps_per_epoch, total_steps, devices: the run's shape.
        callback: called with every row as it is logged.
        checkpoint_dir: the run folder, named when the run diverges.
    """

    def __init__(
        self,
        config: TrainConfig,
        rows: list[dict[str, Any]],
        elapsed_before: float,
        started: float,
        *,
        images_per_step: int,
        steps_per_epoch: int,
        total_steps: int,
        devices: int,
        callback: Callable[[dict[str, Any]], None] | None = None,
        checkpoint_dir: str | None = None,
    ):
        self.config, self.rows, self.callback = config, rows, callback
        self.checkpoint_dir = checkpoint_dir
        self.before, self.started = elapsed_before, started
        self.images_per_step, self.steps_per_epoch = images_per_step, steps_per_epoch
        self.train_seconds, self.images = 0.0, 0
        self.step = rows[-1]["step"] if rows else 0
        self.last_accuracy = next(
            (r["test_accuracy"] for r in reversed(rows) if "test_accuracy" in r), None
        )
        self.time_to_accuracy = next((r["time"] for r in rows if r.get("reached_target")), None)
        self.tick = time.perf_counter()
        self.bar = None
        if config.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                desc=f"{config.algorithm} x{devices}dev",
            )

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def images_per_second(self) -> float:
        return self.images / self.train_seconds if self.train_seconds else 0.0

    def restart_clock(self) -> None:
        """Training time counts again from now (after an evaluation or a checkpoint)."""
        self.tick = time.perf_counter()

    def add_dispatch(self, chunk: Chunk, metrics) -> None:
        """Reads a dispatch's metrics (waiting for it) and logs its row.

        Raises:
            TrainingDiverged: its loss is NaN or infinite.
        """
        metrics = mapping.first_device(metrics)
        loss, acc = np.asarray(metrics["loss"]), np.asarray(metrics["accuracy"])
        now = time.perf_counter()
        self.train_seconds += now - self.tick
        images = chunk.length * self.images_per_step
        self.images += images
        self.step = chunk.end
        if not np.all(np.isfinite(loss)):
            bad = chunk.start + int(np.argmin(np.isfinite(loss))) + 1
            folder = self.checkpoint_dir
            where = f"; the last good checkpoint is in {folder}" if folder else ""
            raise TrainingDiverged(
                f"loss became {loss[~np.isfinite(loss)][0]} at step {bad} (epoch "
                f"{bad / self.steps_per_epoch:.2f}){where}; lower the learning rate or alpha"
            )
        row = {
            "step": chunk.end,
            "epoch": round(chunk.end / self.steps_per_epoch, 4),
            "loss": float(loss.mean()),
            "accuracy": float(acc.mean()),
            "images_per_second": images / max(now - self.tick, 1e-9),
            "time": self.elapsed(),
        }
        self._emit(row)
        self.tick = now

    def add_evaluation(self, accuracy: float, loss: float) -> bool:
        """Adds z's test figures to the last row; returns True when the target is reached."""
        self.last_accuracy = accuracy
        row = dict(self.rows[-1], test_accuracy=accuracy, test_loss=loss, time=self.elapsed())
        target = self.config.target_accuracy
        reached = target is not None and accuracy >= target
        if reached and self.time_to_accuracy is None:
            self.time_to_accuracy = row["time"]
            row["reached_target"] = True
        self._emit(row)
        return reached

    def _emit(self, row: dict[str, Any]) -> None:
        if self.rows and self.rows[-1]["step"] == row["step"]:
            self.rows[-1].update(row)
            row = self.rows[-1]
        else:
            self.rows.append(row)
        if self.bar is not None:
            self.bar.n = row["step"]
            post = {"img/s": f"{row['images_per_second']:.0f}", "loss": f"{row['loss']:.3f}"}
            if self.last_accuracy is not None:
                post["test_acc"] = f"{self.last_accuracy:.4f}"
            self.bar.set_postfix(post, refresh=True)
        if self.callback:
            self.callback(dict(row))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
