"""One trial of the auto-tuner: compile a setting, guard its memory, time it.

A trial prepares the engine for one layout (`crossbow_jax.engine.programs.prepare`:
devices x m learners x batch b), a fresh state (all learners equal to the
initial model), compiles one dispatch of `steps` steps, checks the program's
memory estimate against
the device's free memory, runs one warm-up dispatch and then `repeats` timed
dispatches, each waited for with `block_until_ready`. The throughput is the
images of all learners in one dispatch over the median dispatch time;
compilation is timed apart.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any

import jax
import numpy as np

from crossbow_jax.engine import mapping
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.plan import Chunk
from crossbow_jax.engine.programs import Setup, prepare

OK, OOM, MEMORY = "ok", "oom", "memory"
_OOM_MARKERS = ("resource_exhausted", "resource exhausted", "out of memory", "oom when")


@dataclasses.dataclass(frozen=True)
class Trial:
    """The measured outcome of one setting.

    Attributes:
        learners: learners per device (for SSGD: the batch multiplier m).
        images_per_second: training images/s of all learners on all devices
            (None when the setting failed).
        memory_bytes: the compiled program's estimated footprint per device
            (arguments + outputs + temporaries - aliased buffers); None when
            the backend gives no estimate.
        status: "ok"; "oom" (out of memory while compiling or running);
            "memory" (the estimate exceeded the free memory, not run).
        median_seconds: median wall time of one timed dispatch.
        compile_seconds: time to compile the dispatch.
        steps: steps per dispatch.
        error: the first line of the error, for failed trials.
    """

    learners: int
    images_per_second: float | None
    memory_bytes: int | None
    status: str
    median_seconds: float | None = None
    compile_seconds: float | None = None
    steps: int | None = None
    error: str | None = None

    def as_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def program_memory(compiled: Any) -> int | None:
    """Estimated bytes per device of a compiled program, or None if unknown.

    Uses `compiled.memory_analysis()`: argument + output + temporary sizes,
    minus the aliased (donated) bytes counted in both arguments and outputs.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        return None
    if stats is None:
        return None
    if isinstance(stats, (list, tuple)):  # one entry per device on some versions
        stats = stats[0] if stats else None
        if stats is None:
            return None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    sizes = [getattr(stats, n, None) for n in names]
    if all(s is None for s in sizes):
        return None
    total = sum(int(s or 0) for s in sizes) - int(getattr(stats, "alias_size_in_bytes", 0) or 0)
    return max(total, 0)


def free_memory(devices) -> int | None:
    """The smallest `bytes_limit - bytes_in_use` over `devices`; None when unknown (CPU)."""
    free = []
    for device in devices:
        stats = mapping.memory_stats(device)
        if stats.get("bytes_limit") is None:
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(free) if free else None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception reports exhausted device (or host) memory."""
    if isinstance(error, MemoryError):
        return True
    text = f"{type(error).__name__} {error}".lower()
    return any(marker in text for marker in _OOM_MARKERS)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _dispatch(setup: Setup, program, chunks: list[Chunk], state):
    """Runs the chunks back to back, as training does, and waits for the last."""
    for chunk in chunks:
        state, metrics = program(state, *setup.train_data.args(chunk))
    jax.block_until_ready((state, metrics))
    return state


def run_trial(cfg: TrainConfig, model, optimizer, data, mesh, m: int, task=None) -> Trial:
    """Compiles and times one setting of learners per device.

    Args:
        cfg: the run's `TrainConfig` (its `learners_per_device` is not read).
            `tune_steps`: steps per timed interval, run as dispatches of the
            length the engine itself uses (capped at `tune_steps`), so a trial
            times the same program as training; `tune_repeats`: timed
            intervals after the warm-up dispatch (the median counts);
            `tune_memory_limit`: bytes per device the setting may use (None:
            the device's free memory before the trial, when it reports it).
        model: a resolved Flax module.
        optimizer: the learner optimiser, or None for the config's default.
        data: the run's resolved `Arrays` (only the training set is used).
        mesh: the run's device mesh.
        m: learners per device to try.
        task: the run's loss and figures (`crossbow_jax.engine.task.Task`; None:
            the default).

    Returns:
        A `Trial`. Out-of-memory errors become a failed trial; any other
        error propagates.
    """
    steps, repeats = cfg.tune_steps, cfg.tune_repeats
    gc.collect()  # let the previous trial's buffers go before reading free memory
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limit = cfg.tune_memory_limit if cfg.tune_memory_limit is not None else free_memory(local)
    memory = compile_seconds = None
    setup = state = None
    try:
        setup = prepare(cfg, model, optimizer, data, mesh, m, task)
        images_per_step = setup.layout.images_per_step
        state = setup.compiler.init_state(cfg.seed, data.example)
        length = min(setup.steps_per_dispatch, steps)
        dispatches = -(-steps // length)
        steps = dispatches * length
        chunk = Chunk(0, length, 0, 0, False, False)
        program = setup.compiler.train_program(state, setup.train_data, length, setup.unroll)
        compile_seconds = setup.compiler.seconds
        memory = program_memory(program)
        too_big = limit is not None and memory is not None and memory > limit
        if _from_process_0(float(too_big)):
            return Trial(
                m,
                None,
                memory,
                MEMORY,
                compile_seconds=compile_seconds,
                steps=steps,
                error=f"estimated {memory} bytes per device, over the limit of {limit}",
            )
        setup.train_data.start_epoch(0, [chunk] * (1 + repeats * dispatches))
        state = _dispatch(setup, program, [chunk], state)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            state = _dispatch(setup, program, [chunk] * dispatches, state)
            times.append(time.perf_counter() - t)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        return Trial(m, None, memory, OOM, None, compile_seconds, steps, _first_line(e))
    finally:
        if setup is not None:
            setup.train_data.close()
        del setup, state
    median = _from_process_0(statistics.median(times))
    return Trial(
        m,
        steps * images_per_step / median,
        memory,
        OK,
        median,
        compile_seconds,
        steps,
    )


def _from_process_0(value: float) -> float:
    """Process 0's value on every process, so that all processes take the same decisions."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return float(multihost_utils.broadcast_one_to_all(np.asarray(value, np.float32)))
