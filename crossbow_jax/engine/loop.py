"""The host loop: plan, dispatch, read the previous dispatch's metrics, evaluate, checkpoint.

The loop dispatches `steps_per_dispatch` steps at a time (one compiled
program per call) and reads each call's metrics only after the next call is
queued, so the host never makes the device wait for logging. It stops to
synchronise only to evaluate the central model and to checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from crossbow_jax.engine import mapping
from crossbow_jax.engine.checkpoint import Checkpointer
from crossbow_jax.engine.checks import check_run
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.history import History
from crossbow_jax.engine.inputs import Arrays
from crossbow_jax.engine.placement import TestData
from crossbow_jax.engine.plan import plan_chunks
from crossbow_jax.engine.programs import prepare
from crossbow_jax.engine.result import TrainResult, run_summary
from crossbow_jax.engine.task import Task
from crossbow_jax.models.adapters import Model


def fit(
    config: TrainConfig,
    model: Model,
    optimizer,
    data: Arrays,
    mesh,
    learners_per_device: int,
    *,
    task: Task | None = None,
    checkpointer: Checkpointer | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    tuning: dict[str, Any] | None = None,
    started: float | None = None,
) -> TrainResult:
    """Trains `learners_per_device` learners on every device of `mesh`; the engine's loop.

    Args:
        config: the run's config.
        model: the resolved model (`crossbow_jax.engine.inputs.resolve`).
        optimizer: the learner optimiser, or None for the config's default.
        data: the resolved data (`crossbow_jax.engine.inputs.resolve`).
        mesh: the device mesh.
        learners_per_device: m (an int: the tuner, if any, has chosen it).
        task: the loss and figures from `checks.check_run` (None: checked here,
            with the default loss).
        checkpointer: the run folder's `Checkpointer` (None: one is opened
            on `config.checkpoint_dir` when that is set, and closed at the
            end); with `config.resume` the run continues from its latest
            checkpoint.
        callback: called once with every history row.
        tuning: the tuner's report, kept in the result.
        started: `time.perf_counter()` when the run started (default: now).

    Returns:
        A `TrainResult`.
    """
    started = time.perf_counter() if started is None else started
    task = task or check_run(config, model, optimizer, data)
    with contextlib.ExitStack() as closing:
        if checkpointer is None and config.checkpoint_dir:
            checkpointer = closing.enter_context(Checkpointer(config.checkpoint_dir, config))
        setup = prepare(config, model, optimizer, data, mesh, learners_per_device, task)
        closing.callback(setup.train_data.close)
        test = TestData(data, mesh) if data.has_test else None
        state = setup.compiler.init_state(config.seed, data.example)
        start, rows, before = 0, [], 0.0
        if checkpointer:
            checkpointer.check_and_record(
                layout={"devices": mesh.size, "learners_per_device": learners_per_device},
                model=jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape[2:], p.dtype),
                                   state.params),  # per learner
                optimizer=state.opt_state,
            )  # fmt: skip
            if config.resume and checkpointer.latest_step() is not None:
                state, saved = checkpointer.restore(state)
                start, rows, before = saved["step"], list(saved["history"]), saved["elapsed"]
        total = max(1, math.ceil(config.epochs * setup.steps_per_epoch))
        plan = plan_chunks(start, total, setup.steps_per_epoch, config, setup.steps_per_dispatch)
        lengths = sorted({chunk.length for chunk in plan})
        compile_train = setup.compiler.train_program
        dispatch = {n: compile_train(state, setup.train_data, n, setup.unroll) for n in lengths}
        evaluate = setup.compiler.eval_program(state, test) if test is not None else None
        history = History(
            config,
            rows,
            before,
            started,
            images_per_step=setup.layout.images_per_step,
            steps_per_epoch=setup.steps_per_epoch,
            total_steps=total,
            devices=mesh.size,
            callback=callback,
            checkpoint_dir=checkpointer.directory if checkpointer else None,
        )
        closing.callback(history.close)

        def result(central) -> TrainResult:
            return TrainResult(
                params=model.variables(*central),
                accuracy=history.last_accuracy,
                history=history.rows,
                time_to_accuracy=history.time_to_accuracy,
                images_per_second=history.images_per_second(),
                wall_time=history.elapsed(),
                compile_time=setup.compiler.seconds,
                steps=history.step,
                learners_per_device=learners_per_device,
                devices=mesh.size,
                config=config,
                tuning=tuning,
                test_loss=history.last_loss,
                preprocess=data.preprocess,
                model=model,
                central=central,
                input_shape=data.example.shape[1:],
            )

        timer = CheckpointTimer(config.checkpoint_minutes if checkpointer else 0.0)
        pending, epoch = None, None
        history.restart_clock()
        for chunk in plan:
            if chunk.epoch != epoch:
                epoch = chunk.epoch
                setup.train_data.start_epoch(epoch, [c for c in plan if c.epoch == epoch])
            called_at = time.perf_counter()
            state, metrics = dispatch[chunk.length](state, *setup.train_data.args(chunk))
            current = history.dispatched(chunk, metrics, called_at)
            due = timer.due()  # a timed checkpoint
            if not (chunk.evaluate or chunk.checkpoint or due or chunk is plan[-1]):
                if pending:  # the previous dispatch, read one late
                    history.add_dispatches([pending], next_one=current)
                pending = current
                continue
            evaluate_now = chunk.evaluate and test is not None
            history.add_dispatches([pending, current] if pending else [current],
                                   evaluation_follows=evaluate_now)  # fmt: skip
            pending = None
            reached = False
            if evaluate_now:
                reached = history.add_evaluation(evaluate_central(evaluate, state, test))
            if checkpointer and (chunk.checkpoint or due or reached):
                central = setup.compiler.central_variables(state)
                record = {"step": chunk.end, "history": history.rows, "elapsed": history.elapsed(),
                          "run": run_summary(result(central), data)}  # fmt: skip
                checkpointer.save(chunk.end, state, record, central)
                timer.saved()
            if reached:
                break
            history.restart_clock()
        return result(setup.compiler.central_variables(state))


class CheckpointTimer:
    """When a timed checkpoint is due: `minutes` after the last one (0: never).

    With several processes, process 0's clock decides for all (one small
    broadcast per dispatch), so that every process saves at the same step.
    """

    def __init__(self, minutes: float):
        self.seconds, self.last = minutes * 60, time.monotonic()

    def due(self) -> bool:
        if not self.seconds:
            return False
        due = time.monotonic() - self.last >= self.seconds
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
        return due

    def saved(self) -> None:
        self.last = time.monotonic()


def evaluate_central(program, state, test: TestData) -> dict[str, float]:
    """The central model's test figures (mean loss, accuracy, ...) over every test batch."""
    parts = [mapping.first_device(program(state, *batch)) for batch in test.batches()]
    totals = {k: sum(float(p[k]) for p in parts) for k in parts[0]}
    count = max(totals.pop("count"), 1)
    return {k: v / count for k, v in totals.items()}
