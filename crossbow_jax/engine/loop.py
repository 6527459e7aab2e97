"""The host loop: plan, dispatch, read the previous dispatch's metrics, evaluate, checkpoint.

The loop dispatches `steps_per_dispatch` steps at a time (one compiled
program per call) and reads each call's metrics only after the next call is
queued, so the host never makes the device wait for logging. It stops to
synchronise only to evaluate the central model and to checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from crossbow_jax.engine import mapping
from crossbow_jax.engine.checkpoint import Checkpointer
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.inputs import Arrays
from crossbow_jax.engine.placement import TestData
from crossbow_jax.engine.plan import plan_chunks
from crossbow_jax.engine.programs import prepare
from crossbow_jax.engine.record import History, TrainResult


def fit(
    config: TrainConfig,
    model,
    optimizer,
    data: Arrays,
    mesh,
    learners_per_device: int,
    *,
    checkpointer: Checkpointer | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    tuning: dict[str, Any] | None = None,
    started: float | None = None,
) -> TrainResult:
    """Trains `learners_per_device` learners on every device of `mesh`; the engine's loop.

    Args:
        config: the run's config.
        model: the resolved Flax module.
        optimizer: the learner optimiser, or None for the config's default.
        data: the resolved data (`crossbow_jax.engine.inputs.resolve_data`).
        mesh: the device mesh.
        learners_per_device: m (an int: the tuner, if any, has chosen it).
        checkpointer: the run folder's `Checkpointer` (None: one is opened
            on `config.checkpoint_dir` when that is set, and closed at the
            end); with `config.resume` the run continues from its latest
            checkpoint.
        callback: called with every history row as it is logged.
        tuning: the tuner's report, kept in the result.
        started: `time.perf_counter()` when the run started (default: now).

    Returns:
        A `TrainResult`.
    """
    started = time.perf_counter() if started is None else started
    if checkpointer is None and config.checkpoint_dir:
        with Checkpointer(config.checkpoint_dir, config) as opened:
            return fit(
                config,
                model,
                optimizer,
                data,
                mesh,
                learners_per_device,
                checkpointer=opened,
                callback=callback,
                tuning=tuning,
                started=started,
            )
    setup = prepare(config, model, optimizer, data, mesh, learners_per_device)
    test = TestData(data, mesh) if data.has_test else None
    state = setup.compiler.init_state(config.seed, data.example)
    start, rows, before = 0, [], 0.0
    if checkpointer and config.resume and checkpointer.latest_step() is not None:
        state, saved = checkpointer.restore(state)
        start, rows, before = saved["step"], list(saved["history"]), saved["elapsed"]
    total = max(1, math.ceil(config.epochs * setup.steps_per_epoch))
    plan = plan_chunks(start, total, setup.steps_per_epoch, config, setup.steps_per_dispatch)
    lengths = sorted({chunk.length for chunk in plan})
    dispatch = {n: setup.compiler.train_program(state, setup.train_data, n, setup.unroll) for n in lengths}
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
    try:
        pending, epoch = None, None
        history.restart_clock()
        for chunk in plan:
            if chunk.epoch != epoch:
                epoch = chunk.epoch
                setup.train_data.start_epoch(epoch, [c for c in plan if c.epoch == epoch])
            state, metrics = dispatch[chunk.length](state, *setup.train_data.args(chunk))
            if pending:
                history.add_dispatch(*pending)  # the previous dispatch, one late
            pending = (chunk, metrics)
            if not (chunk.evaluate or chunk.checkpoint or chunk is plan[-1]):
                continue
            history.add_dispatch(*pending)
            pending = None
            reached = False
            if chunk.evaluate and test is not None:
                reached = history.add_evaluation(*evaluate_central(evaluate, state, test))
            if checkpointer and (chunk.checkpoint or reached):
                saved = {"step": chunk.end, "history": history.rows, "elapsed": history.elapsed()}
                checkpointer.save(chunk.end, state, saved)
            if reached:
                break
            history.restart_clock()
    finally:
        history.close()
        setup.train_data.close()
    return TrainResult(
        params=setup.compiler.central_variables(state),
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
    )


def evaluate_central(program, state, test: TestData) -> tuple[float, float]:
    """The central model's test accuracy and mean loss, over every test batch."""
    parts = [mapping.first_device(program(state, *batch)) for batch in test.batches()]
    totals = {k: sum(p[k] for p in parts) for k in parts[0]}
    count = max(int(totals["count"]), 1)
    return int(totals["correct"]) / count, float(totals["loss_sum"]) / count
