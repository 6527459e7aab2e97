"""What a run records on the host: history rows, the throughput clock, the progress display."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from crossbow_jax.engine import mapping, runfolder, traffic
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.events import Events
from crossbow_jax.engine.optimizers import learning_rate_schedule
from crossbow_jax.engine.plan import Chunk, Clock
from crossbow_jax.engine.progress import progress


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite, or rose far above its start
    (`TrainConfig.divergence_factor`)."""


class Dispatch(NamedTuple):
    """A dispatch as the host saw it: its chunk, its metrics (device arrays), when its call
    began, and when it was seen finished at the call's return (None: still running)."""

    chunk: Chunk
    metrics: Any
    called_at: float
    ready_at: float | None


class History:
    """The run's history rows, its throughput clock and its progress bar.

    Training time is counted between `restart_clock` and the next logged
    dispatch, so evaluation and checkpoints stay out of images/s.

    Args:
        config: the run's config (progress, target accuracy, algorithm).
        rows: rows restored from a checkpoint ([] for a fresh run).
        elapsed_before: seconds the run had taken before a resume.
        started: `time.perf_counter()` at the start of this process's run.
        clock: the run's epochs in steps (`crossbow_jax.engine.plan.Clock`), whose
            `per_step` images every step takes; `use` changes both when the
            layout changes.
        total_steps, devices: the run's length (an estimate while the tuner
            decides) and its devices.
        callback: called with every row as it is logged.
        checkpoint_dir: the run folder, named when the run diverges.
        start_loss: the training loss of the run's first step (the initial model's, before
            any update), as a resumed run recorded it; None: read at step 0.
        uniform_loss: the loss of outputs that score every class alike (ln of the number
            of classes, for the default loss), or None.
        default_optimizer: the learners run the config's SGD, whose learning rate rows
            carry (a user's optimiser's is not known).
        events: the run segment's TensorBoard event file, which every new row goes to.
    """

    def __init__(
        self,
        config: TrainConfig,
        rows: list[dict[str, Any]],
        elapsed_before: float,
        started: float,
        *,
        clock: Clock,
        total_steps: int,
        devices: int,
        callback: Callable[[dict[str, Any]], None] | None = None,
        checkpoint_dir: str | None = None,
        start_loss: float | None = None,
        uniform_loss: float | None = None,
        default_optimizer: bool = False,
        events: Events | None = None,
    ):
        self.config, self.rows, self.callback = config, rows, callback
        self.checkpoint_dir = checkpoint_dir
        self.start_loss, self.uniform_loss = start_loss, uniform_loss
        self.before, self.started = elapsed_before, started
        self.clock = clock
        self.train_seconds, self.images = 0.0, 0
        self.samples: list[tuple[int, float, int]] = []  # (images, seconds, steps) per row
        self.learners: int | None = None  # when set, rows carry "learners_per_device"
        self.traffic: traffic.Traffic | None = None  # of the running programs (`run_plan`)
        self.default_optimizer, self.events = default_optimizer, events
        self.schedule = learning_rate_schedule(config, clock, np) if default_optimizer else None
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

    def use(self, clock: Clock, total_steps: int) -> None:
        """The layout changed: steps take `clock.per_step` images from now on."""
        self.clock = clock
        if self.default_optimizer:
            self.schedule = learning_rate_schedule(self.config, clock, np)
        if self.bar is not None:
            self.bar.total = total_steps

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def images_per_second(self) -> float:
        return self.images / self.train_seconds if self.train_seconds else 0.0

    def restart_clock(self) -> None:
        """Training time counts again from now (after an evaluation or a checkpoint)."""
        self.tick = time.perf_counter()

    def dispatched(self, chunk: Chunk, metrics, called_at: float) -> Dispatch:
        """Notes a dispatch right after its device call returned (`called_at`: when the call
        began); a call that ran to its end is noted as finished then."""
        ready = all(x.is_ready() for x in jax.tree.leaves(metrics))
        return Dispatch(chunk, metrics, called_at, time.perf_counter() if ready else None)

    def add_dispatches(
        self, done: list[Dispatch], *, next_one: Dispatch | None = None,
        evaluation_follows: bool = False,
    ) -> None:  # fmt: skip
        """Reads finished dispatches' metrics (waiting for them) and logs one row each.

        A dispatch's training time runs from the end of the previous one (or
        from `restart_clock`, after an evaluation or a checkpoint) to the
        moment it was seen finished: when its call returned, for a call that
        ran to its end, else when its metrics were read; and no later than
        the start of a following call that ran to its end (the device runs
        dispatches in order). With `evaluation_follows`, the last row is
        reported (callback, progress) only once `add_evaluation` has added the
        test figures: once per row.

        Args:
            done: `dispatched(...)` notes, in the order the dispatches ran.
            next_one: the note of the dispatch queued after them, if any.

        Raises:
            TrainingDiverged: a step's loss is NaN or infinite, or a row's mean loss is over
                `config.divergence_factor` times its start (`_check_rise`).
        """
        read = []
        for note in done:
            figures = mapping.first_device(note.metrics)
            read.append((note, figures, note.ready_at or time.perf_counter()))
        bound = math.inf
        if next_one is not None and next_one.ready_at is not None:
            bound = next_one.called_at
        ends = []
        for note, _, seen in reversed(read):
            ends.append(min(seen, bound))
            bound = min(ends[-1], note.called_at if note.ready_at is not None else math.inf)
        for i, ((note, metrics, _), end) in enumerate(zip(read, reversed(ends))):
            chunk = note.chunk
            seconds = max(end - self.tick, 1e-6)
            self.train_seconds += seconds
            self.tick = max(self.tick, end)
            losses = np.asarray(metrics["loss"])
            self._check_finite(chunk, losses)
            if chunk.start == 0 and self.start_loss is None:  # the initial model's loss
                self.start_loss = float(losses[0])
            loss = float(np.mean(losses))
            self._check_rise(chunk, loss)
            images = chunk.length * self.clock.per_step
            self.images += images
            self.samples.append((images, seconds, chunk.length))
            self.step = chunk.end
            figures = {"loss": loss}
            figures.update({k: float(np.mean(v)) for k, v in metrics.items() if k != "loss"})
            row = {
                "step": chunk.end,
                "epoch": round(chunk.epochs, 4),
                **figures,
                "images_per_second": images / seconds,
                "time": self.elapsed(),
            }
            if self.learners is not None:
                row["learners_per_device"] = self.learners
            if self.schedule is not None:  # the learning rate of the row's last step
                row["learning_rate"] = float(self.schedule(chunk.end - 1))
            if self.traffic is not None:  # over the row's steps, all axes together
                counts = traffic.schedule_counts(self.config, chunk.start, chunk.end)
                row["all_reduce_bytes"] = sum(traffic.per_step(self.traffic, counts).values())
                row["peak_bytes"] = sum(traffic.peak(self.traffic, counts).values())
            self.rows.append(row)
            if not (evaluation_follows and i == len(read) - 1):
                self._report(row)

    def _check_finite(self, chunk: Chunk, loss: np.ndarray) -> None:
        if np.all(np.isfinite(loss)):
            return
        bad = chunk.start + int(np.argmin(np.isfinite(loss))) + 1
        self._diverged(f"loss became {loss[~np.isfinite(loss)][0]}", bad)

    def _check_rise(self, chunk: Chunk, loss: float) -> None:
        """Raises when a row's mean loss is over `divergence_factor` x its reference: the
        larger of the start loss and the uniform loss (those known), when positive."""
        factor, start, uniform = self.config.divergence_factor, self.start_loss, self.uniform_loss
        by_start = uniform is None or (start is not None and start >= uniform)
        reference = start if by_start else uniform
        if not factor or reference is None or not reference > 0 or not loss > factor * reference:
            return
        since = "" if start is None else f"from {start:.3g} "
        scale = "its start" if by_start else f"{uniform:.3g}, the loss of a uniform guess"
        grow = "; for a loss that may grow, raise divergence_factor (0: off)"
        self._diverged(f"the training loss rose {since}to {loss:,.4g} (over {factor:g}x {scale})",
                       chunk.end, grow)  # fmt: skip

    def _diverged(self, what: str, step: int, other_fix: str = ""):
        """Raises `TrainingDiverged`: what happened at `step`, the last good checkpoint, the
        fix."""
        saved = runfolder.checkpoint_steps(self.checkpoint_dir) if self.checkpoint_dir else []
        where = f"; the last good checkpoint (step {saved[-1]}) is in {self.checkpoint_dir}" if (
            saved) else ""  # fmt: skip
        raise TrainingDiverged(
            f"{what} at step {step} (epoch {self.clock.epochs(step):.2f}){where}; lower the "
            f"learning rate or alpha{other_fix}"
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
        self.flush()
        return reached

    def _report(self, row: dict[str, Any]) -> None:
        """Shows a finished row (progress display), writes it to the event file and hands
        it to the callback."""
        if self.events is not None:
            self.events.write(row)
        if self.bar is not None:
            # images/s over the run's training time so far: the figure its result ends with
            post = {"img/s": f"{self.images_per_second():.0f}", "loss": f"{row['loss']:.3f}"}
            if self.last_accuracy is not None:
                post["test_acc"] = f"{self.last_accuracy:.4f}"
            self.bar.update(row["step"], post)
        if self.callback:
            self.callback(dict(row))

    def flush(self) -> None:
        """Writes the event file's pending rows (at evaluations and checkpoints)."""
        if self.events is not None:
            self.events.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.events is not None:
            self.events.close()
