"""`train`: the notebook front door, and the loop that drives the devices.

The loop dispatches `steps_per_dispatch` steps at a time (one `lax.scan` per
call) and reads each call's metrics only after the next call is queued, so
the host never makes the device wait for logging. It stops to synchronise
only to evaluate the central model and to checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from crossbow_jax.engine import mapping
from crossbow_jax.engine.checkpoint import Checkpointer
from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.inputs import resolve_data, resolve_model
from crossbow_jax.engine.plan import Chunk, plan_chunks
from crossbow_jax.engine.programs import Compiled, build_state
from crossbow_jax.engine.step import Layout


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


def train(
    model: Any,
    train: Any,
    test: Any = None,
    *,
    optimizer: Any = None,
    batch_size: int = 16,
    learners_per_device: int | str = 4,
    algorithm: str = "sma",
    epochs: float = 5,
    seed: int = 0,
    target_accuracy: float | None = None,
    data_dir: str | None = None,
    augment: str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> TrainResult:
    """Trains `model` with many small-batch learners per device.

    Args:
        model: a Flax Linen module (with a `train` keyword if it has BatchNorm
            or dropout) or a model name (`crossbow_jax.models.model_names()`).
        train: a pair `(images, labels)` of NumPy arrays (NHWC or (N, features);
            integer labels) or a dataset name (`crossbow_jax.data.dataset_names()`).
        test: a pair like `train`, or None (a named dataset brings its own).
        optimizer: the learner optimiser (any optax transformation). None
            builds SGD with `learning_rate`, `momentum`, `weight_decay` and the
            epoch-based schedule of the config.
        batch_size, learners_per_device, algorithm, epochs, seed, target_accuracy:
            see `TrainConfig`.
        data_dir: where named datasets are looked for and cached.
        augment: "crop_flip" for user arrays that want CIFAR-style augmentation.
        callback: called with every history row as it is logged.
        **options: any other `TrainConfig` field (e.g. `eval_every`, `mapper`,
            `checkpoint_dir`, `resume`, `lr_milestones`, `alpha`).

    Returns:
        A `TrainResult`.

    Raises:
        ConfigError: bad settings or data, before any training.
        TrainingDiverged: the loss became NaN/Inf (the last good checkpoint stays).
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; valid ones: {sorted(fields)}")
    config = TrainConfig(
        batch_size=batch_size,
        learners_per_device=learners_per_device,
        algorithm=algorithm,
        epochs=epochs,
        seed=seed,
        target_accuracy=target_accuracy,
        **options,
    )
    return Run(
        config,
        model,
        train,
        test,
        optimizer=optimizer,
        data_dir=data_dir,
        augment=augment,
        callback=callback,
    ).run()


def select_devices(num_devices: int | None) -> list[jax.Device]:
    """All devices (global across hosts) or the first `num_devices` local ones."""
    available = jax.devices() if jax.process_count() > 1 else jax.local_devices()
    if num_devices is None:
        return list(available)
    if num_devices > len(available):
        raise ConfigError(
            f"num_devices={num_devices} but only {len(available)} devices are "
            "available; pass a smaller number or None for all"
        )
    return list(available[:num_devices])


class Run:
    """One training run: resolved inputs, placed data, compiled programs, the loop."""

    def __init__(
        self,
        config,
        model,
        train,
        test=None,
        *,
        optimizer=None,
        data_dir=None,
        augment=None,
        callback=None,
    ):
        self.config = cfg = config
        self.callback = callback
        if isinstance(model, str):  # a bad name fails before the data is loaded
            from crossbow_jax.models import get_spec

            get_spec(model)
        self.checkpointer = Checkpointer(cfg.checkpoint_dir, cfg) if cfg.checkpoint_dir else None
        self.data = resolve_data(train, test, data_dir=data_dir, augment=augment)
        self.mesh = mapping.make_mesh(select_devices(cfg.num_devices))
        self.t0 = time.perf_counter()
        self.tuning = None
        m = cfg.learners_per_device
        if m == "auto":
            from crossbow_jax.tuning import tune_for_run

            self.tuning = tune_for_run(self, model, optimizer)
            m = self.tuning["chosen"]
        devices = self.mesh.size
        self.layout = (
            Layout(devices, m, cfg.batch_size)
            if cfg.algorithm == "sma"
            else Layout(devices, 1, m * cfg.batch_size)
        )
        self.learners_per_device = m
        n = self.data.num_train
        self.steps_per_epoch = n // self.layout.images_per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"one step needs {self.layout.images_per_step} images ({devices} devices x {m} "
                f"learners x batch {cfg.batch_size}) but the training set has {n}; "
                "use a smaller batch_size or fewer learners"
            )
        self.model = resolve_model(model, self.data.num_classes, cfg.dtype)
        self.compiled = Compiled(
            cfg, self.model, optimizer, self.layout, self.data, self.mesh, self.steps_per_epoch
        )

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.config.epochs * self.steps_per_epoch))

    def run(self) -> TrainResult:
        cfg, c = self.config, self.compiled
        state = build_state(c, self.mesh)
        start, history, before = 0, [], 0.0
        if self.checkpointer and cfg.resume and self.checkpointer.latest_step() is not None:
            state, record = self.checkpointer.restore(state)
            start, history, before = record["step"], list(record["history"]), record["elapsed"]
        plan = plan_chunks(start, self.total_steps, self.steps_per_epoch, cfg, c.steps_per_dispatch)
        c.compile_all({ch.length for ch in plan}, state)
        loop = _Loop(self, history, before)
        try:
            state = loop.drive(state, plan)
        finally:
            loop.close()
            c.close()
            if self.checkpointer:
                self.checkpointer.close()
        variables = c.central_variables(state)
        return TrainResult(
            params=variables,
            accuracy=loop.last_accuracy,
            history=loop.history,
            time_to_accuracy=loop.time_to_accuracy,
            images_per_second=loop.images_per_second(),
            wall_time=loop.elapsed(),
            compile_time=c.compile_time,
            steps=loop.step,
            learners_per_device=self.learners_per_device,
            devices=self.mesh.size,
            config=cfg,
            tuning=self.tuning,
        )


class _Loop:
    """The host side of the loop: dispatch, one-late metrics, eval, checkpoints."""

    def __init__(self, run: Run, history: list[dict[str, Any]], elapsed_before: float):
        self.run, self.cfg, self.c = run, run.config, run.compiled
        self.history = history
        self.before = elapsed_before
        self.start = time.perf_counter()
        self.train_seconds = 0.0
        self.images = 0
        self.step = history[-1]["step"] if history else 0
        self.last_accuracy = next(
            (r["test_accuracy"] for r in reversed(history) if "test_accuracy" in r), None
        )
        self.time_to_accuracy = next((r["time"] for r in history if r.get("reached_target")), None)
        self.bar = None
        if self.cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=run.total_steps,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                desc=f"{self.cfg.algorithm} x{run.mesh.size}dev",
            )

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.run.t0

    def images_per_second(self) -> float:
        return self.images / self.train_seconds if self.train_seconds else 0.0

    def drive(self, state, plan: list[Chunk]):
        pending = None
        epoch = None
        tick = time.perf_counter()
        for chunk in plan:
            if chunk.epoch != epoch:
                epoch = chunk.epoch
                self.c.set_epoch(epoch, [ch for ch in plan if ch.epoch == epoch])
            state, metrics = self.c.train(chunk, state)
            if pending:
                tick = self._log(*pending, tick)
            pending = (chunk, metrics)
            if chunk.evaluate or chunk.checkpoint or chunk is plan[-1]:
                tick = self._log(*pending, tick)
                pending = None
                if chunk.evaluate and self.c.has_test and self._evaluate(state, chunk):
                    self._checkpoint(state, chunk)
                    break
                if chunk.checkpoint:
                    self._checkpoint(state, chunk)
                tick = time.perf_counter()
        return state

    def _log(self, chunk: Chunk, metrics, tick: float) -> float:
        metrics = mapping.first_device(metrics)
        loss, acc = np.asarray(metrics["loss"]), np.asarray(metrics["accuracy"])
        now = time.perf_counter()
        self.train_seconds += now - tick
        images = chunk.length * self.run.layout.images_per_step
        self.images += images
        self.step = chunk.end
        if not np.all(np.isfinite(loss)):
            bad = chunk.start + int(np.argmin(np.isfinite(loss))) + 1
            where = (
                f"; the last good checkpoint is in {self.run.checkpointer.directory}"
                if self.run.checkpointer
                else ""
            )
            raise TrainingDiverged(
                f"loss became {loss[~np.isfinite(loss)][0]} at step {bad} (epoch "
                f"{bad / self.run.steps_per_epoch:.2f}){where}; lower the learning rate or alpha"
            )
        row = {
            "step": chunk.end,
            "epoch": round(chunk.end / self.run.steps_per_epoch, 4),
            "loss": float(loss.mean()),
            "accuracy": float(acc.mean()),
            "images_per_second": images / max(now - tick, 1e-9),
            "time": self.elapsed(),
        }
        self._emit(row)
        return now

    def _emit(self, row: dict[str, Any]) -> None:
        if self.history and self.history[-1]["step"] == row["step"]:
            self.history[-1].update(row)
            row = self.history[-1]
        else:
            self.history.append(row)
        if self.bar is not None:
            self.bar.n = row["step"]
            post = {"img/s": f"{row['images_per_second']:.0f}", "loss": f"{row['loss']:.3f}"}
            if self.last_accuracy is not None:
                post["test_acc"] = f"{self.last_accuracy:.4f}"
            self.bar.set_postfix(post, refresh=True)
        if self.run.callback:
            self.run.callback(dict(row))

    def _evaluate(self, state, chunk: Chunk) -> bool:
        """Evaluates z; returns True when the target accuracy is reached."""
        accuracy, loss = self.c.evaluate(state)
        self.last_accuracy = accuracy
        row = dict(self.history[-1], test_accuracy=accuracy, test_loss=loss, time=self.elapsed())
        target = self.cfg.target_accuracy
        reached = target is not None and accuracy >= target
        if reached and self.time_to_accuracy is None:
            self.time_to_accuracy = row["time"]
            row["reached_target"] = True
        self._emit(row)
        return reached

    def _checkpoint(self, state, chunk: Chunk) -> None:
        if self.run.checkpointer:
            record = {"step": chunk.end, "history": self.history, "elapsed": self.elapsed()}
            self.run.checkpointer.save(chunk.end, state, record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
