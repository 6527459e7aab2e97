"""The host loop: plan, dispatch, read the previous dispatch's metrics, evaluate, checkpoint.

The loop dispatches `steps_per_dispatch` steps at a time (one compiled
program per call) and reads each call's metrics only after the next call is
queued, so the host never makes the device wait for logging. It stops to
synchronise only to evaluate the central model and to checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

from crossbow_jax.engine import cache, identity, mapping, preemption, runfolder, traffic
from crossbow_jax.engine.checkpoint import Checkpointer
from crossbow_jax.engine.checks import check_run
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.events import open_events
from crossbow_jax.engine.history import History
from crossbow_jax.engine.inputs import Arrays
from crossbow_jax.engine.placement import TestData
from crossbow_jax.engine.plan import Clock, Position, layout_for, plan_chunks, run_end
from crossbow_jax.engine.programs import Setup, prepare
from crossbow_jax.engine.result import TrainResult, result_of_record, run_summary
from crossbow_jax.engine.stage import CheckpointTimer, compile_stage, run_plan, stage_with
from crossbow_jax.engine.task import Task
from crossbow_jax.models.adapters import Model


class OnlineTuner(Protocol):
    """What `fit` asks of a tuner that chooses learners per device while training
    (`crossbow_jax.tuning.online.OnlineTuner`)."""

    deciding: bool  # still measuring settings

    def first(self) -> int:
        """The setting to start with."""

    def until(self, step: int, steps_per_dispatch: int) -> int:
        """The step at which the current setting (under way at `step`) is observed."""

    def record(self, samples: list[tuple[int, float, int]]) -> None:
        """The current setting's samples so far, for a checkpoint."""

    def observe(
        self, learners: int, samples: list[tuple[int, float, int]], compile_seconds: float
    ) -> int:
        """A setting's (images, seconds, steps) per dispatch -> the next setting (the chosen
        one once decided)."""

    def admit(self, learners: int, program: Any) -> None:
        """Raises when a setting's compiled dispatch program may not be run (memory)."""

    def failed(self, learners: int, error: BaseException) -> int | None:
        """A setting failed to be laid out or compiled, or was not admitted: the next
        setting, or None to raise the error."""

    def report(self) -> dict[str, Any]:
        """The tuning report so far (JSON): curve, steps at each setting, chosen."""

    def replay(self, report: dict[str, Any]) -> int:
        """Continues from a checkpoint's report; returns the setting to run now."""


class ExecutionChooser(Protocol):
    """What `fit` asks of a chooser of the execution that measures it on the run's own steps
    (`crossbow_jax.tuning.choice.OnlineExecutions`), after the tuner, if any, has decided."""

    deciding: bool  # still measuring candidates

    def start(self, learners: int) -> str:
        """The execution to start with at this many learners per device."""

    def until(self, step: int, steps_per_dispatch: int) -> int:
        """The step at which the running candidate (under way at `step`) is observed."""

    def observe(self, execution: str, samples: list[tuple[int, float, int]],
                compile_seconds: float, remaining: int, cold: bool) -> str:  # fmt: skip
        """A candidate's (images, seconds, steps) per dispatch, its dispatch programs'
        compile time (`cold`: none came from the compilation cache) and the steps left ->
        the next execution (the chosen one once decided)."""

    def failed(self, execution: str, error: BaseException) -> str:
        """A candidate could not be compiled -> the next execution."""

    def report(self) -> dict[str, Any]:
        """The choice so far (JSON): "chosen", every candidate's figures, "seconds" (cost)."""


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
    tuner: OnlineTuner | None = None,
    signals: preemption.Signals | None = None,
    chooser: ExecutionChooser | None = None,
) -> TrainResult:
    """Trains `learners_per_device` learners on every device of `mesh`; the engine's loop.

    Args:
        config: the run's config.
        model: the resolved model (`crossbow_jax.engine.inputs.resolve`).
        optimizer: the learner optimiser, or None for the config's default.
        data: the resolved data (`crossbow_jax.engine.inputs.resolve`).
        mesh: the device mesh.
        learners_per_device: m (an int; with `tuner`, not read).
        task: the loss and figures from `checks.check_run` (None: checked here,
            with the default loss).
        checkpointer: the run folder's `Checkpointer` (None: one is opened
            on `config.checkpoint_dir` when that is set, and closed at the
            end); with `config.resume` the run continues from its latest
            checkpoint (with `config.elastic`, on another layout).
        callback: called once with every history row.
        tuning: the tuner's report (trials before training), kept in the result.
        started: `time.perf_counter()` when the run started (default: now).
        tuner: chooses m while training (`OnlineTuner`): the run starts with
            `tuner.first()` learners and changes layout between real steps.
        signals: the run's SIGTERM/SIGINT watch (`preemption.Signals`, entered);
            None: one is installed for the loop.
        chooser: chooses the execution while training (`ExecutionChooser`; with
            `config.execution="auto"`), once `tuner` has decided.

    Returns:
        A `TrainResult`.

    Raises:
        RunInterrupted: SIGTERM or SIGINT came; the step reached is saved (with a
            run folder).
        CheckpointError: a checkpoint could not be written (naming the cause).
    """
    began = time.perf_counter()
    started = began if started is None else started
    cache.enable_compilation_cache()
    compilers = []  # of every stage run so far (compile time, programs)
    task = task or check_run(config, model, optimizer, data)
    with contextlib.ExitStack() as closing:
        if checkpointer is None and config.checkpoint_dir:
            checkpointer = closing.enter_context(Checkpointer(config.checkpoint_dir, config))
        resuming = bool(checkpointer and config.resume and checkpointer.latest_step() is not None)
        record = checkpointer.latest_record() if resuming else None
        saved_m = record["run"]["learners_per_device"] if record else None
        m = tuner.first() if tuner else learners_per_device
        if tuner and record and not config.elastic:  # the tuner goes on where it was
            m = tuner.replay(record["run"]["tuning"]) if record["run"].get("tuning") else saved_m
        start = _position(record, data, mesh, config, saved_m)
        choosing = chooser and not (tuner and tuner.deciding)  # (else once the tuner decided)
        run_config = config.replace(execution=chooser.start(m)) if choosing else config
        setup = prepare(run_config, model, optimizer, data, mesh, m, task, start)  # checks memory
        closing.callback(lambda: setup.train_data.close())
        test = TestData(data, mesh) if data.has_test else None
        state = setup.compiler.init_state(config.seed, data.example)
        rows, before = [], 0.0
        if checkpointer:
            layout = {"devices": mesh.size, "learners_per_device": "auto" if tuner else m}
            learner = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape[2:], p.dtype),
                                   state.params)  # one learner's parameters  # fmt: skip
            checkpointer.check_and_record(
                unchecked=("layout",) if config.elastic else (),
                layout=layout,
                model=learner,
                optimizer=_optimizer_shapes(state),
                data=identity.data_fingerprint(data),
                behaviour=identity.DEFAULT if optimizer is None else (
                    identity.optimizer_behaviour(optimizer, learner)),
            )  # fmt: skip
        if record and start.step >= run_end(setup.clock, config.epochs):  # nothing to train
            return _complete(checkpointer, record, model, config)
        if record:
            state = _restored(checkpointer, setup, state, record, config, mesh, saved_m, m)
            rows, before = list(record["history"]), record["elapsed"]
        history = History(
            config,
            rows,
            before,
            started,
            clock=setup.clock,
            total_steps=run_end(setup.clock, config.epochs),
            devices=mesh.size,
            callback=callback,
            checkpoint_dir=checkpointer.directory if checkpointer else None,
            start_loss=record.get("start_loss") if record else None,
            uniform_loss=task.uniform_loss(data.num_classes),
            default_optimizer=optimizer is None,
            events=open_events(config, checkpointer and checkpointer.directory, start.step),
        )
        closing.callback(history.close)
        timer = CheckpointTimer(config.checkpoint_minutes if checkpointer else 0.0)
        stage, position = None, start

        def result(central) -> TrainResult:
            report = tuner.report() if tuner else tuning
            choice = chooser.report() if chooser and chooser.learners is not None else None
            running = stage.setup.compiler.spec.execution
            sent = stage.setup.compiler.traffic
            counts = traffic.schedule_counts(config, 0, history.step)
            return TrainResult(
                params=model.variables(*central),
                accuracy=history.last_accuracy,
                history=history.rows,
                time_to_accuracy=history.time_to_accuracy,
                images_per_second=history.images_per_second(),
                wall_time=history.elapsed(),
                compile_time=sum(c.seconds for c in compilers),
                programs=(sum(c.programs for c in compilers), sum(c.cached for c in compilers)),
                setup_time=setup_time,
                executions=choice,
                steps=history.step,
                learners_per_device=m,
                devices=mesh.size,
                config=config.replace(execution=choice["chosen"] if choice else running),
                tuning=report,
                test_loss=history.last_loss,
                preprocess=data.preprocess,
                model=model,
                central=central,
                input_shape=data.example.shape[1:],
                all_reduce_bytes=traffic.per_step(sent, counts),
                peak_bytes=traffic.peak(sent, counts),
            )

        def save(step: int, state) -> None:
            if tuner and tuner.deciding:
                tuner.record(history.samples[first_sample:])  # the interval so far
            central = stage.setup.compiler.central_variables(state)
            record = {"step": step, "position": list(stage.setup.clock.position(step)),
                      "history": history.rows, "elapsed": history.elapsed(),
                      "start_loss": history.start_loss,
                      "run": run_summary(result(central), data)}  # fmt: skip
            checkpointer.save(step, state, record, central)
            history.flush()
            timer.saved()

        interrupt = preemption.Interrupt(signals or closing.enter_context(preemption.Signals()),
                                         save, checkpointer, start.step, config)  # fmt: skip
        stage, first_sample = compile_stage(setup, state, test), 0
        compilers.append(setup.compiler)
        setup_time = time.perf_counter() - began - setup.compiler.seconds  # placement, restore
        stages = {}  # execution -> stage, while the chooser measures
        while True:
            end = run_end(setup.clock, config.epochs)
            tuning_now = tuner and tuner.deciding
            choosing = chooser and chooser.deciding and not tuning_now
            stop = (tuner.until(position.step, setup.steps_per_dispatch) if tuning_now else
                    chooser.until(position.step, setup.steps_per_dispatch) if choosing else None)  # fmt: skip
            plan = plan_chunks(setup.clock, end, config, setup.steps_per_dispatch,
                               start=position.step, stop=stop)  # fmt: skip
            first_sample = len(history.samples)
            history.learners = m  # rows say which setting ran them
            state, reached = run_plan(stage, plan, state, test, history, timer,
                                  save if checkpointer else None, interrupt)  # fmt: skip
            position = setup.clock.position(plan[-1].end) if plan else position
            if reached or position.step >= end or not (tuning_now or choosing):
                break
            if choosing:  # the next candidate, or the chosen one, runs the next steps
                stages[stage.setup.compiler.spec.execution] = stage
                stage = _next_execution(chooser, stage, stages, state, history.samples[
                    first_sample:], end - position.step, compilers)  # fmt: skip
                setup = stage.setup
                continue
            following = tuner.observe(m, history.samples[first_sample:], setup.compiler.seconds)
            while following != m:
                try:  # the new layout, compiled before the old one is let go
                    new = prepare(config, model, optimizer, data, mesh, following, task, position,
                                  like=setup)  # fmt: skip
                    resized = new.compiler.resized(state, setup.compiler.spec, min(m, following))
                    new_stage = compile_stage(new, resized, test)
                    tuner.admit(following, new_stage.dispatch[new.steps_per_dispatch])
                except Exception as error:  # the tuner decides what is fatal
                    following = tuner.failed(following, error)
                    if following is None:
                        raise
                    continue
                setup.train_data.close()
                compilers.append(new.compiler)
                setup, stage, state, m = new, new_stage, resized, following
                history.use(setup.clock, run_end(setup.clock, config.epochs))
            if chooser and not tuner.deciding:  # m is chosen: now the execution
                stage = _switch(chooser, stage, {}, state, chooser.start(m), compilers)
                setup = stage.setup
        return result(stage.setup.compiler.central_variables(state))


def _next_execution(chooser, stage, stages, state, samples, remaining, compilers):
    """The stage of the execution the chooser names after observing the running one."""
    execution = stage.setup.compiler.spec.execution
    programs = stage.dispatch
    following = chooser.observe(execution, samples, programs.seconds, remaining,
                                cold=programs.cached == 0)  # fmt: skip
    chosen = _switch(chooser, stage, stages, state, following, compilers)
    if not chooser.deciding:
        stages.clear()  # the others' programs are let go
    return chosen


def _switch(chooser, stage, stages, state, execution, compilers):
    """The stage that runs `execution` (compiled now, unless it ran before); a candidate
    that fails to compile is the chooser's to replace."""
    while execution != stage.setup.compiler.spec.execution and execution not in stages:
        try:
            new = stage_with(stage, execution, state)
        except Exception as error:  # noqa: BLE001 -- the candidate's row; others may run
            execution = chooser.failed(execution, error)
            continue
        compilers.append(new.setup.compiler)
        return new
    return stages.get(execution, stage)


def _complete(checkpointer: Checkpointer, record, model: Model, config) -> TrainResult:
    """A resumed run that its checkpoint already ends (a requeued job, fewer epochs): the
    checkpoint's result, with nothing compiled or written."""
    if jax.process_index() == 0:
        runfolder.report(f"the run in {checkpointer.directory} is complete at step "
                         f"{record['step']} (epochs={config.epochs:g}): nothing to train; "
                         "more epochs continue it")  # fmt: skip
    return dataclasses.replace(result_of_record(checkpointer.directory, record, model),
                               config=config)  # fmt: skip


def _position(record, data: Arrays, mesh, config: TrainConfig, saved_m) -> Position:
    """Where a resumed run stands (a fresh run: at the start)."""
    if record is None:
        return Position()
    if "position" in record:
        return Position(*record["position"])
    devices = record["run"].get("devices", mesh.size)  # as saved (elastic: not the mesh)
    layout = layout_for(config.algorithm, devices, saved_m, config.batch_size)
    return Clock(Position(), layout.images_per_step, data.num_train).position(record["step"])


def _optimizer_shapes(state) -> Any:
    """The optimiser state for the run folder's fingerprint: its arrays' paths and dtypes
    (shapes left out: they change with the layout, which is fingerprinted apart)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((), a.dtype), state.opt_state)


def _restored(checkpointer, setup: Setup, state, record, config, mesh, saved_m, m):
    """The checkpoint's state on this layout: as saved, or converted (`elastic`)."""
    if not config.elastic:
        restored, _ = checkpointer.restore(state)
        return restored
    saved = checkpointer.restore_as_saved(state)
    first = jax.tree.map(lambda a: np.asarray(a)[:1], saved)  # every device holds the same z
    stats = jax.tree.map(_devices_mean, saved.batch_stats)
    old = first._replace(batch_stats=stats)
    placed = mapping.put_on_devices(jax.tree.map(lambda a: np.repeat(a, mesh.size, 0), old), mesh)
    before = layout_for(config.algorithm, mesh.size, saved_m, config.batch_size)
    return setup.compiler.resized(
        placed, dataclasses.replace(setup.compiler.spec, layout=before), keep=0
    )


def _devices_mean(values):
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.floating):
        return values.mean(0, keepdims=True).astype(values.dtype)
    return values[:1]
