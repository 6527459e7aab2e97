"""The engine's own compiled step programs, stepped back to back with no host work.

A `Stepper` holds one AOT-compiled dispatch program of the engine (prepared
by `crossbow_jax.engine.programs.prepare` from a `TrainConfig`, as
`crossbow_jax.train` prepares it), its placed arguments and a training
state, and runs that program a given number of times in a row before
waiting for the result. Nothing else happens on the host in between: this
is the bare speed of the engine's step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from crossbow_jax.engine.checks import check_run
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.inputs import resolve
from crossbow_jax.engine.optimizers import default_optimizer
from crossbow_jax.engine.plan import Chunk
from crossbow_jax.engine.programs import Compiler, Setup, prepare
from crossbow_jax.tuning.executions import choose_execution


def synthetic(n: int, shape: tuple[int, ...], classes: int = 10, seed: int = 0):
    """Uniform random uint8 images (n, *shape) and int32 labels: data of a real shape."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = rng.integers(0, classes, size=(n,), dtype=np.int32)
    return images, labels


class Engine(NamedTuple):
    """One engine setting, prepared as `crossbow_jax.train` prepares it, nothing compiled."""

    config: TrainConfig
    setup: Setup
    example: np.ndarray  # one stored training example, for the initial state


def engine_run(model: Any, data: tuple[np.ndarray, np.ndarray], **config: Any) -> Engine:
    """The engine prepared for a config: data resident on the device, nothing compiled yet.

    `learners_per_device` must be a number (a benchmark fixes its layout).
    """
    cfg = TrainConfig(**{"progress": False, "data_placement": "device", **config})
    module, arrays, mesh = resolve(cfg, model, data)
    setup = prepare(cfg, module, None, arrays, mesh, cfg.learners_per_device)
    return Engine(cfg, setup, arrays.example)


def measured_execution(model: Any, data, **config: Any) -> dict[str, Any]:
    """`execution="auto"` as `crossbow_jax.train` decides it (every candidate timed by the
    tuner's trials, `crossbow_jax.tuning.executions`), without the disk cache."""
    cfg = TrainConfig(**{"progress": False, "data_placement": "device", **config})
    module, arrays, mesh = resolve(cfg, model, data)
    task = check_run(cfg, module, None, arrays)
    return choose_execution(cfg, module, None, arrays, mesh, task,
                            learners=cfg.learners_per_device, log=None, cache_dir="")  # fmt: skip


def per_learner(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` applied to each stacked learner on its own: SMA without the averaging."""

    def update(updates, state, params=None, **extra):
        del extra  # the engine's value= (the loss): the default SGD takes none
        return jax.vmap(optimizer.update)(updates, state, params)

    return optax.GradientTransformation(jax.vmap(optimizer.init), update)


def with_plain_learners(engine: Engine) -> Engine:
    """The same setting, with learners that take plain steps, never averaged.

    The learner optimiser is the one `sma` wraps in the run (the config's
    default SGD), vmapped over the learners by `per_learner`; the data,
    layout, execution and dispatch settings are the run's. (There is no
    central model: only the dispatch program is meant to be timed.)
    """
    setup = engine.setup
    plain = per_learner(default_optimizer(engine.config, setup.clock))
    spec = dataclasses.replace(setup.compiler.spec, tx=plain, algorithm="plain")
    compiler = Compiler(spec, setup.compiler.mesh, setup.compiler.mapper)
    return engine._replace(setup=setup._replace(compiler=compiler))


class Stepper:
    """One compiled dispatch program of the engine and a state to run it on.

    Compiles the program ahead of time, then runs one untimed warm-up dispatch.

    Args:
        engine: the prepared setting (`engine_run(...)`).
        length: steps per dispatch; None: the engine's default for the platform.

    Attributes:
        compile_seconds: time to compile the initialisation and dispatch programs (AOT).
        length: steps per dispatch.
        images_per_call: images of all learners in one dispatch.
        flops: floating-point operations of one dispatch, by XLA's cost analysis
            (0 where the backend gives none).
    """

    def __init__(self, engine: Engine, length: int | None = None):
        setup = engine.setup
        self.length = length or setup.steps_per_dispatch
        self.state = setup.compiler.init_state(engine.config.seed, engine.example)
        self.program = setup.compiler.train_program(
            self.state, setup.train_data, self.length, setup.unroll
        )
        self.compile_seconds = setup.compiler.seconds
        self.args = setup.train_data.args(Chunk(0, self.length, 0, 0, False, False))
        self.images_per_call = self.length * setup.layout.images_per_step
        cost = self.program.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        self.flops = float(cost.get("flops", 0.0))  # per dispatch, XLA's count
        jax.block_until_ready(self(1))

    def __call__(self, calls: int):
        """Runs `calls` dispatches back to back (each from the epoch's first batch)."""
        state, metrics = self.state, None
        for _ in range(calls):
            state, metrics = self.program(state, *self.args)
        self.state = state
        return state, metrics
