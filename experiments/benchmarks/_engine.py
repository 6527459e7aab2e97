"""The engine's own compiled step programs, stepped back to back with no host work.

A `Stepper` holds one AOT-compiled dispatch program of the engine (the same
`Compiled` that `crossbow_jax.train` builds, from a `TrainConfig`), its placed
arguments and a training state, and runs that program a given number of
times in a row before waiting for the result. Nothing else happens on the
host in between: this is the bare speed of the engine's step.
"""

from __future__ import annotations

import contextlib
import copy
import types
from typing import Any

import jax
import numpy as np
import optax

from crossbow_jax.engine import step as engine_step
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.loop import Run
from crossbow_jax.engine.programs import Compiled, build_state
from crossbow_jax.engine.schedules import default_optimizer
from crossbow_jax.engine.step import Programs


def synthetic(n: int, shape: tuple[int, ...], classes: int = 10, seed: int = 0):
    """Uniform random uint8 images (n, *shape) and int32 labels: data of a real shape."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = rng.integers(0, classes, size=(n,), dtype=np.int32)
    return images, labels


def engine_run(model: Any, data: tuple[np.ndarray, np.ndarray], **config: Any) -> Run:
    """The engine's `Run` for a config: data resident on the device, nothing compiled yet."""
    config = {"progress": False, "data_placement": "device", **config}
    return Run(TrainConfig(**config), model, data)


def per_learner(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` applied to each stacked learner on its own: SMA without the averaging."""

    def update(updates, state, params=None):
        return jax.vmap(optimizer.update)(updates, state, params)

    return optax.GradientTransformation(jax.vmap(optimizer.init), update)


def with_plain_learners(run: Run) -> Compiled:
    """A copy of the run's `Compiled` whose learners take plain steps, never averaged.

    The learner optimiser is the one `sma` wraps in the run (the config's
    default SGD), vmapped over the learners by `per_learner`; the data,
    layout, execution and dispatch settings are the run's.
    """
    c = copy.copy(run.compiled)
    c.transform = per_learner(default_optimizer(run.config, run.steps_per_epoch))
    c.programs = Programs(c.model, c.transform, c.layout, c.programs.pre, c.execution)
    c._train, c._eval, c.compile_time = {}, None, 0.0
    return c


@contextlib.contextmanager
def fully_unrolled_scan():
    """While tracing inside, the engine's unrolled scans become straight-line code.

    `Programs.train_steps` calls `lax.scan(..., unroll=bool(unroll))`, and jax
    turns `unroll=True` into `unroll=length`; for length 1 that is `unroll=1`,
    a rolled while loop of one trip. `unroll=0` unrolls fully at any length.
    Used only to measure what a one-step dispatch costs without the loop;
    the engine module is restored on exit.
    """

    def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kwargs):
        full = 0 if unroll is True or (unroll != 1 and unroll) else unroll
        return jax.lax.scan(f, init, xs, length, reverse, full, **kwargs)

    original = engine_step.lax
    patched = types.SimpleNamespace(**{n: getattr(jax.lax, n) for n in dir(jax.lax)
                                       if not n.startswith("__")})  # fmt: skip
    patched.scan = scan
    engine_step.lax = patched
    try:
        yield
    finally:
        engine_step.lax = original


class Stepper:
    """One compiled dispatch program of the engine and a state to run it on.

    Compiles the program ahead of time, then runs one untimed warm-up dispatch.

    Args:
        compiled: the engine's `Compiled` (from `engine_run(...).compiled`).
        mesh: its device mesh.
        length: steps per dispatch; None: the engine's default for the platform.

    Attributes:
        compile_seconds: time to compile the dispatch program (AOT).
        length: steps per dispatch.
        images_per_call: images of all learners in one dispatch.
    """

    def __init__(self, compiled: Compiled, mesh, length: int | None = None):
        self.length = length or compiled.steps_per_dispatch
        self.state = build_state(compiled, mesh)
        compiled.compile_all({self.length}, self.state)
        self.compile_seconds = compiled.compile_time
        self.executable = compiled._train[self.length]
        self.args = (
            compiled.images,
            compiled.labels,
            compiled.perm,
            compiled._start(0),
            compiled.resets,
            compiled.key,
        )
        self.images_per_call = self.length * compiled.layout.images_per_step
        jax.block_until_ready(self(1))

    def __call__(self, calls: int):
        """Runs `calls` dispatches back to back (each from the epoch's first batch)."""
        state, metrics = self.state, None
        for _ in range(calls):
            state, metrics = self.executable(state, *self.args)
        self.state = state
        return state, metrics
