"""One layout's compiled programs and the run of a plan's dispatches (`fit`'s inner loop).

A `Stage` is what runs now: a `Setup` (`programs.prepare`), its dispatch
programs by length (compiled when a plan first needs them) and its
evaluation program. `run_plan` dispatches a plan's chunks, reads each
dispatch's metrics one dispatch late, evaluates the central model and saves
checkpoints when the plan asks.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax

from crossbow_jax.engine import mapping, preemption
from crossbow_jax.engine.history import History
from crossbow_jax.engine.placement import TestData
from crossbow_jax.engine.programs import Setup, with_execution


class Stage(NamedTuple):
    """One layout of learners while it runs: its setup and compiled programs."""

    setup: Setup
    dispatch: dict[int, Any]  # steps -> compiled dispatch program
    evaluate: Any  # compiled evaluation program (None without a test set)


def compile_stage(setup: Setup, state, test) -> Stage:
    """A layout's programs: evaluation now, dispatches by length as plans need them."""
    evaluate = setup.compiler.eval_program(state, test) if test is not None else None
    return Stage(setup, Programs(setup, state), evaluate)


def stage_with(stage: Stage, execution: str, state) -> Stage:
    """`stage` with its learners run another way (`programs.with_execution`): the same
    state and evaluation program; its full-length dispatch compiled now (so that a
    candidate that cannot run fails here, before it takes the state)."""
    setup = with_execution(stage.setup, execution)
    new = Stage(setup, Programs(setup, state), stage.evaluate)
    new.dispatch[setup.steps_per_dispatch]
    return new


class Programs(dict):
    """Dispatch programs by length, compiled when first needed (`seconds`: their compile
    time; `cached`: how many were loaded from the persistent compilation cache)."""

    def __init__(self, setup: Setup, state):
        super().__init__()
        self.seconds, self.cached = 0.0, 0
        self.setup, self.like = (
            setup,
            jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
            ),
        )

    def __missing__(self, length: int):
        setup = self.setup
        before, hits = setup.compiler.seconds, setup.compiler.cached
        program = setup.compiler.train_program(self.like, setup.train_data, length, setup.unroll)
        self[length], self.seconds = program, self.seconds + setup.compiler.seconds - before
        self.cached += setup.compiler.cached - hits
        return program


def run_plan(stage: Stage, plan, state, test, history: History, timer, save, interrupt):
    """Runs the chunks of `plan`; returns (state, whether the target accuracy was reached).

    `interrupt(signal, step, state)` saves and raises `RunInterrupted` when a signal came
    (seen before the first dispatch, after compiling, and after every dispatch, once that
    dispatch's evaluation and checkpoint are done)."""
    setup = stage.setup
    for length in sorted({chunk.length for chunk in plan}):  # compile before the clock runs
        stage.dispatch[length]
    history.traffic = setup.compiler.traffic  # (read from the programs just compiled)
    signum = preemption.poll(interrupt.signals, False)[0] if plan else 0
    if signum:
        interrupt(signum, plan[0].start, state)
    pending, epoch = None, None
    history.restart_clock()
    for chunk in plan:
        if chunk.epoch != epoch:
            epoch = chunk.epoch
            setup.train_data.start_epoch(epoch, [c for c in plan if c.epoch == epoch])
        called_at = time.perf_counter()
        state, metrics = stage.dispatch[chunk.length](state, *setup.train_data.args(chunk))
        current = history.dispatched(chunk, metrics, called_at)
        signum, due = preemption.poll(interrupt.signals, timer.due())  # the same in every process
        if not (chunk.evaluate or chunk.checkpoint or due or signum or chunk is plan[-1]):
            if pending:  # the previous dispatch, read one late
                history.add_dispatches([pending], next_one=current)
            pending = current
            continue
        evaluate_now = chunk.evaluate and test is not None
        history.add_dispatches([pending, current] if pending else [current],
                               evaluation_follows=evaluate_now)  # fmt: skip
        pending = None
        reached = False
        if evaluate_now:  # also when a signal came: the resumed run goes on from here
            reached = history.add_evaluation(evaluate_central(stage.evaluate, state, test))
        if save and (chunk.checkpoint or due or reached):
            save(chunk.end, state)
        if reached:
            return state, True
        if signum and chunk is not plan[-1]:  # (at the plan's end: the run ends, or the
            interrupt(signum, chunk.end, state)  # next plan's first poll stops it)
        history.restart_clock()
    return state, False


class CheckpointTimer:
    """When a timed checkpoint is due: `minutes` after the last one (0: never).

    With several processes, a checkpoint is due when any process's clock says so
    (`preemption.poll`), so that every process saves at the same step.
    """

    def __init__(self, minutes: float):
        self.seconds, self.last = minutes * 60, time.monotonic()

    def due(self) -> bool:
        """This process's clock; `preemption.poll` makes every process agree."""
        return bool(self.seconds) and time.monotonic() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = time.monotonic()


def evaluate_central(program, state, test: TestData) -> dict[str, float]:
    """The central model's test figures (mean loss, accuracy, ...) over every test batch."""
    parts = [mapping.first_device(program(state, *batch)) for batch in test.batches()]
    totals = {k: sum(float(p[k]) for p in parts) for k in parts[0]}
    count = max(totals.pop("count"), 1)
    return {k: v / count for k, v in totals.items()}
