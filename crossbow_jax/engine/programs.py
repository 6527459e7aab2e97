"""The host side of the per-device program: mapped over the devices, compiled ahead of time.

`Compiler` turns the free functions of `crossbow_jax/engine/step.py` into
programs compiled (`lower().compile()`) for one mesh and mapper, and times
every compilation, so that compile time is reported apart from throughput.
`prepare` builds what one layout of learners needs before its first
dispatch; the training loop (`loop.py`), the tuner's trials
(`crossbow_jax/tuning/measure.py`) and the benchmarks all start from it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from crossbow_jax.engine import cache, mapping, step, traffic
from crossbow_jax.engine.checks import check_memory
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.inputs import Arrays
from crossbow_jax.engine.optimizers import learner_transform
from crossbow_jax.engine.placement import TestData, TrainData, resolve_placement
from crossbow_jax.engine.plan import (
    Clock,
    Layout,
    Position,
    check_length,
    epoch_steps,
    layout_for,
)
from crossbow_jax.engine.task import Task
from crossbow_jax.models.adapters import Model
from crossbow_jax.transformation.resize import resize_params, resize_state


def resolve_execution(execution: str, mesh) -> str:
    """The engine's fallback for "auto" when no measurement chose (`crossbow_jax.train` and
    `tune` measure it, `crossbow_jax.tuning.executions`): unroll on CPU, vmap elsewhere."""
    if execution != "auto":
        return execution
    return "unroll" if mesh.devices.flat[0].platform == "cpu" else "vmap"


def resolve_dispatch(config: TrainConfig, mesh) -> tuple[int, bool]:
    """(steps per dispatch, unrolled?): on CPU 2 unrolled steps, elsewhere a scan of 50.

    XLA:CPU runs a while-loop body about 5x slower than the same ops outside
    a loop (measured by experiments/benchmarks/engine_overhead.py), so on CPU the steps of a
    dispatch are unrolled and dispatches kept short to bound compile time.
    """
    cpu = mesh.devices.flat[0].platform == "cpu"
    unroll = cpu if config.unroll_steps is None else config.unroll_steps
    steps = config.steps_per_dispatch or (2 if cpu else 50)
    return steps, unroll


class Compiler:
    """Compiles the per-device functions of one `StepSpec` for a mesh and mapper.

    Attributes:
        spec: what a step is.
        mesh: the device mesh.
        mapper: "shard_map" or "pmap".
        seconds: time spent compiling so far.
        programs: programs compiled so far; `cached` of them were loaded from
            JAX's persistent compilation cache (`crossbow_jax.engine.cache`).
        traffic: the collectives' bytes per step of the last training program.
    """

    def __init__(self, spec: step.StepSpec, mesh, mapper: str):
        self.spec, self.mesh, self.mapper = spec, mesh, mapper
        self.seconds, self.programs, self.cached = 0.0, 0, 0
        self.traffic = traffic.Traffic({})  # of the last training program compiled
        self._central = None

    def _map(self, fn, donate: tuple[int, ...] = ()):
        if self.mapper == "pmap":
            return mapping.device_map(fn, self.mesh, "pmap", donate_argnums=donate)
        return jax.jit(mapping.device_map(fn, self.mesh), donate_argnums=donate)

    def _compile(self, fn, *args, steps: int = 0):
        """`fn` compiled for `args`; with `steps`, its collectives' bytes per step are read
        from the traced program into `self.traffic` (`crossbow_jax.engine.traffic`)."""
        start, hits = time.perf_counter(), cache.cache_hits()
        if steps and hasattr(fn, "trace"):
            traced = fn.trace(*args)
            self.traffic = traffic.count(traced.jaxpr, steps, dict(self.mesh.shape))
            compiled = traced.lower().compile()
        else:
            if steps:  # pmap has no trace(): trace it apart
                self.traffic = traffic.count(
                    jax.make_jaxpr(fn)(*args), steps, dict(self.mesh.shape)
                )
            compiled = fn.lower(*args).compile()
        self.seconds += time.perf_counter() - start
        self.programs, self.cached = self.programs + 1, self.cached + cache.cache_hits() - hits
        return compiled

    def init_state(self, seed: int, example: np.ndarray) -> step.TrainState:
        """Fresh state: all learners equal to one initialisation, on every device.

        Args:
            seed: the run's seed.
            example: one stored training example, shape (1, ...).
        """
        spec, lay = self.spec, self.spec.layout
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
        sample = spec.preprocess(example, None)
        if spec.model.given:  # an NNX module or (apply_fn, params): its own parameters
            variables = spec.model.init(key, sample)
        else:
            init = jax.jit(spec.model.init)
            variables = self._compile(init, key, sample)(key, sample)
        params, stats = jax.tree.map(np.asarray, variables)
        stacked = jax.tree.map(
            lambda p: np.broadcast_to(p, (lay.devices, lay.learners) + p.shape), params
        )
        params = mapping.put_on_devices(stacked, self.mesh)
        opt_state = self._compile(self._map(spec.tx.init), params)(params)
        return step.TrainState(
            params,
            mapping.put_on_devices(mapping.replicate(stats, lay.devices), self.mesh),
            opt_state,
            mapping.put_on_devices(np.zeros(lay.devices, np.int32), self.mesh),
        )

    def resized(self, state: step.TrainState, before: step.StepSpec, keep: int):
        """`state` of another layout of learners (`before`) made into this one's.

        Learners 0..keep-1 stay as they are; the others start from the central
        model with a fresh optimiser state; the central model, its momentum,
        the model state and the step count carry over
        (`crossbow_jax.transformation.resize`). Runs on the devices.
        """
        spec = self.spec

        def resize(old: step.TrainState) -> step.TrainState:
            central = step.central_params(before, old)
            params = resize_params(old.params, central, spec.layout.learners, keep)
            opt_state = resize_state(old.opt_state, spec.tx.init(params), keep)
            return step.TrainState(params, old.batch_stats, opt_state, old.step)

        return self._compile(self._map(resize), state)(state)

    def train_program(self, state: step.TrainState, data: TrainData, length: int, unroll: bool):
        """The dispatch of `length` steps: (state, *data.args(chunk)) -> (state, metrics).

        The state is donated: a dispatch's input state is gone once it runs.
        """
        if data.placement == "host":
            fn = functools.partial(step.train_fed_steps, self.spec, unroll=unroll)
        else:
            fn = functools.partial(step.train_steps, self.spec, length=length, unroll=unroll)
        return self._compile(self._map(fn, (0,)), state, *data.example_args(length), steps=length)

    def eval_program(self, state: step.TrainState, test: TestData):
        """The evaluation program: (state, *batch) -> {figure: sum over the batch's
        examples, ..., "count": examples} (`step.eval_step`)."""
        fn = functools.partial(step.eval_step, self.spec)
        return self._compile(self._map(fn), state, *test.batches(limit=1)[0])

    def central_variables(self, state: step.TrainState) -> tuple[Any, Any]:
        """The central model's parameters and model state, as NumPy (at checkpoints and at
        the end; its compilation is not counted in `seconds`)."""
        if self._central is None:
            self._central = self._map(functools.partial(step.central_variables, self.spec))
        return mapping.first_device(self._central(state))


class Setup(NamedTuple):
    """What one layout of learners needs before its first dispatch."""

    layout: Layout
    clock: Clock  # the run's epochs in steps at this layout, from where it starts
    compiler: Compiler
    train_data: TrainData  # the training set placed (or its feeder), resets, key
    steps_per_dispatch: int
    unroll: bool


def with_execution(setup: Setup, execution: str) -> Setup:
    """`setup` with its learners run another way ("vmap", "unroll", "im2col"): a new
    compiler; the layout, clock, placed data and the state's form are the same."""
    old = setup.compiler
    spec = dataclasses.replace(old.spec, execution=execution)
    return setup._replace(compiler=Compiler(spec, old.mesh, old.mapper))


def prepare(
    config: TrainConfig,
    model: Model,
    optimizer,
    data: Arrays,
    mesh,
    learners_per_device: int,
    task: Task | None = None,
    start: Position | None = None,
    like: Setup | None = None,
) -> Setup:
    """Lays out `learners_per_device` learners, places the training data, readies the compiler.

    Args:
        config: the run's config (`learners_per_device` in it is not read).
        model: the resolved model (`crossbow_jax.engine.inputs.resolve_model`).
        optimizer: the learner optimiser, or None for the config's default.
        data: the resolved data (only the training split is placed).
        mesh: the device mesh.
        learners_per_device: m.
        task: the loss and figures (`crossbow_jax.engine.checks.check_run`);
            None: softmax cross-entropy and accuracy.
        start: where the run stands when this layout takes over (None: at the start).
        like: the setup this one takes over from (its placed training set is shared).

    Raises:
        ConfigError: before any work: not even one step fits in the training set; the
            run is too long to count or plan (`plan.check_length`); its state and data
            cannot fit the devices' memory (`checks.check_memory`; not checked for a
            layout taking over from another, `like`).
    """
    layout = layout_for(config.algorithm, mesh.size, learners_per_device, config.batch_size)
    epoch_steps(layout, data.num_train)  # at least one step fits
    clock = Clock(start or Position(), layout.images_per_step, data.num_train)
    dispatch = resolve_dispatch(config, mesh)
    check_length(clock, config.epochs, dispatch[0], (config.eval_every, config.checkpoint_every))
    axes = mapping.device_axes(mesh)
    spec = step.StepSpec(
        model,
        learner_transform(config, optimizer, clock, axes),
        layout,
        data.preprocess,
        resolve_execution(config.execution, mesh),
        config.algorithm,
        task or Task(),
        axes,
    )
    if like is None:  # the tuner's later layouts: 1 learner was checked at the first
        placement = resolve_placement(config, data, mesh)
        check_memory(config, model, spec.tx, data, mesh, layout, placement)
    compiler = Compiler(spec, mesh, config.mapper)
    train_data = TrainData(config, data, layout, mesh, clock, like and like.train_data)
    return Setup(layout, clock, compiler, train_data, *dispatch)
