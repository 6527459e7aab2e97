"""What a run records on the host: history rows, the throughput clock, the progress display."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from crossbow_jax.engine import mapping
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.plan import Chunk
from crossbow_jax.engine.progress import progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


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
        self.last_loss = next((r["test_loss"] for r in reversed(rows) if "test_loss" in r), None)
        self.time_to_accuracy = next((r["time"] for r in rows if r.get("reached_target")), None)
        self.tick = time.perf_counter()
        self.bar = None
        if config.progress:
            self.bar = progress(total_steps, self.step, f"{config.algorithm} x{devices}dev")

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def images_per_second(self) -> float:
        return self.images / self.train_seconds if self.train_seconds else 0.0

    def restart_clock(self) -> None:
        """Training time counts again from now (after an evaluation or a checkpoint)."""
        self.tick = time.perf_counter()

    def dispatched(self, chunk: Chunk, metrics) -> tuple[Chunk, Any, float | None]:
        """Notes a dispatch right after its device call returned: the call's metrics, and the
        time when they were already computed (a call that ran to its end), else None."""
        ready = all(x.is_ready() for x in jax.tree.leaves(metrics))
        return chunk, metrics, time.perf_counter() if ready else None

    def add_dispatches(self, done: list[tuple[Chunk, Any, float | None]], *,
                       evaluation_follows: bool = False) -> None:  # fmt: skip
        """Reads finished dispatches' metrics (waiting for them) and logs one row each.

        A dispatch's training time runs from the end of the previous one (or
        from `restart_clock`, after an evaluation or a checkpoint) to the
        moment its metrics were seen computed. With `evaluation_follows`,
        the last row is reported (callback, progress) only once
        `add_evaluation` has added the test figures: once per row.

        Args:
            done: `dispatched(...)` notes, in the order the dispatches ran.

        Raises:
            TrainingDiverged: a loss is NaN or infinite.
        """
        for i, (chunk, metrics, ready_at) in enumerate(done):
            metrics = mapping.first_device(metrics)
            end = ready_at or time.perf_counter()
            seconds = max(end - self.tick, 1e-9)
            self.train_seconds += seconds
            self.tick = max(self.tick, end)
            self._check_finite(chunk, np.asarray(metrics["loss"]))
            images = chunk.length * self.images_per_step
            self.images += images
            self.step = chunk.end
            figures = {"loss": float(np.mean(metrics["loss"]))}
            figures.update({k: float(np.mean(v)) for k, v in metrics.items() if k != "loss"})
            row = {
                "step": chunk.end,
                "epoch": round(chunk.end / self.steps_per_epoch, 4),
                **figures,
                "images_per_second": images / seconds,
                "time": self.elapsed(),
            }
            self.rows.append(row)
            if not (evaluation_follows and i == len(done) - 1):
                self._report(row)

    def _check_finite(self, chunk: Chunk, loss: np.ndarray) -> None:
        if np.all(np.isfinite(loss)):
            return
        bad = chunk.start + int(np.argmin(np.isfinite(loss))) + 1
        folder = self.checkpoint_dir
        where = f"; the last good checkpoint is in {folder}" if folder else ""
        raise TrainingDiverged(
            f"loss became {loss[~np.isfinite(loss)][0]} at step {bad} (epoch "
            f"{bad / self.steps_per_epoch:.2f}){where}; lower the learning rate or alpha"
        )

    def add_evaluation(self, figures: dict[str, float]) -> bool:
        """Adds z's test figures ("loss", "accuracy", ...) to the last row as test_<name>;
        returns True when the target accuracy is reached."""
        row = self.rows[-1]
        row.update({f"test_{k}": v for k, v in figures.items()}, time=self.elapsed())
        self.last_loss = figures["loss"]
        accuracy = figures.get("accuracy")
        if accuracy is not None:
            self.last_accuracy = accuracy
        target = self.config.target_accuracy
        reached = target is not None and accuracy is not None and accuracy >= target
        if reached and self.time_to_accuracy is None:
            self.time_to_accuracy = row["time"]
            row["reached_target"] = True
        self._report(row)
        return reached

    def _report(self, row: dict[str, Any]) -> None:
        """Shows a finished row (progress display) and hands it to the callback."""
        if self.bar is not None:
            post = {"img/s": f"{row['images_per_second']:.0f}", "loss": f"{row['loss']:.3f}"}
            if self.last_accuracy is not None:
                post["test_acc"] = f"{self.last_accuracy:.4f}"
            self.bar.update(row["step"], post)
        if self.callback:
            self.callback(dict(row))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
