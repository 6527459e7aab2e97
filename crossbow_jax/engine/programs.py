"""The device side of a run: placed data, the mapped and compiled programs.

Compilation happens ahead of time (`lower().compile()`) for every dispatch
length the run needs, so its cost is measured and reported apart from the
steady-state throughput.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import numpy as np
from jax import lax

from crossbow_jax.engine import mapping
from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.feed import ArraySource, Feeder
from crossbow_jax.engine.plan import Chunk
from crossbow_jax.engine.schedules import default_optimizer, milestone_steps
from crossbow_jax.engine.step import Programs, TrainState
from crossbow_jax.transformation import sma, ssgd

EVAL_CHUNK = 500


def resolve_execution(execution: str, mesh) -> str:
    """ "auto": a loop unrolled in one program on CPU, vmap elsewhere (docs/performance.md)."""
    if execution != "auto":
        return execution
    return "unroll" if mesh.devices.flat[0].platform == "cpu" else "vmap"


def resolve_dispatch(cfg: TrainConfig, mesh) -> tuple[int, bool]:
    """(steps per dispatch, unrolled?): on CPU 2 unrolled steps, elsewhere a scan of 50.

    XLA:CPU runs a while-loop body about 5x slower than the same ops outside
    a loop (measured by experiments/benchmarks/engine_overhead.py), so on CPU the steps of a
    dispatch are unrolled and dispatches kept short to bound compile time.
    """
    cpu = mesh.devices.flat[0].platform == "cpu"
    unroll = cpu if cfg.unroll_steps is None else cfg.unroll_steps
    steps = cfg.steps_per_dispatch or (2 if cpu else 50)
    return steps, unroll


def resolve_placement(cfg: TrainConfig, data, mesh) -> str:
    """Where the training set lives: "device" (resident) or "host" (fed ahead of use)."""
    if data.stream is not None:
        if cfg.data_placement == "device":
            raise ConfigError(
                f"{data.name} is streamed from files and cannot be device-resident; "
                "use data_placement='host' or 'auto'"
            )
        return "host"
    if cfg.data_placement != "auto":
        return cfg.data_placement
    local = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    stats = local.memory_stats() or {}
    free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    return "host" if free > 0 and data.train_x.nbytes > free / 2 else "device"


def learner_transform(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """`sma` or `ssgd` around the learner optimiser, over the device axis."""
    inner = optimizer if optimizer is not None else default_optimizer(cfg, steps_per_epoch)
    if cfg.algorithm == "sma":
        return sma(
            inner, alpha=cfg.alpha, momentum=cfg.central_momentum, axis_name=mapping.DEVICE_AXIS
        )
    return ssgd(inner, axis_name=mapping.DEVICE_AXIS)


def shard_test_set(x: np.ndarray, y: np.ndarray, devices: int, chunk: int | None = None):
    """(devices, chunks, chunk, ...) arrays and a mask of the real rows."""
    per_device = math.ceil(len(x) / devices)
    chunk = chunk or min(per_device, EVAL_CHUNK)
    chunks = math.ceil(per_device / chunk)
    total = devices * chunks * chunk
    mask = np.arange(total) < len(x)
    pad = total - len(x)
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    shape = (devices, chunks, chunk)
    return x.reshape(shape + x.shape[1:]), y.reshape(shape), mask.reshape(shape)


class Compiled:
    """Everything a run keeps on the devices, and its compiled programs."""

    def __init__(
        self, cfg: TrainConfig, model, optimizer, layout, data, mesh, steps_per_epoch: int
    ):
        self.cfg, self.mesh, self.layout, self.model = cfg, mesh, layout, model
        self.transform = learner_transform(cfg, optimizer, steps_per_epoch)
        self.execution = resolve_execution(cfg.execution, mesh)
        self.steps_per_dispatch, self.unroll = resolve_dispatch(cfg, mesh)
        self.programs = Programs(model, self.transform, layout, data.preprocess, self.execution)
        self.n_train = data.num_train
        self.example = data.example
        self.sample = data.preprocess(data.example, None)
        devices = mesh.size
        put = lambda tree: mapping.put_on_devices(tree, mesh)
        self.placement = resolve_placement(cfg, data, mesh)
        if self.placement == "device":
            self.images, self.labels = put(mapping.replicate((data.train_x, data.train_y), devices))
        else:
            source = (
                data.stream(layout.images_per_step, cfg.seed)
                if data.stream is not None
                else ArraySource(data.train_x, data.train_y, layout.images_per_step, cfg.seed)
            )
            self.feeder = Feeder(source, layout, mesh)
        resets = (
            milestone_steps(cfg, steps_per_epoch)
            if (cfg.reset_at_drops and cfg.algorithm == "sma")
            else []
        )
        self.resets = put(mapping.replicate(np.asarray(resets, np.int32), devices))
        self.key = put(mapping.replicate(np.asarray(jax.random.PRNGKey(cfg.seed)), devices))
        self.test_stream = data.test_stream
        self.has_test = data.test_x is not None or data.test_stream is not None
        if data.test_x is not None:
            self.test = put(shard_test_set(data.test_x, data.test_y, devices))
        self.perm = None
        self.compile_time = 0.0
        self._train = {}
        self._eval = None
        self._jit = self._mapper()

    def _mapper(self):
        if self.cfg.mapper == "pmap":
            return lambda fn, donate=(): mapping.device_map(
                fn, self.mesh, "pmap", donate_argnums=donate
            )
        return lambda fn, donate=(): jax.jit(
            mapping.device_map(fn, self.mesh), donate_argnums=donate
        )

    def set_epoch(self, epoch: int, chunks: list[Chunk]) -> None:
        """Prepares an epoch: its shuffle on the devices, or the feeder for its chunks."""
        if self.placement == "host":
            self.feeder.start(epoch, chunks)
            return
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n_train)
        self.perm = mapping.put_on_devices(
            mapping.replicate(perm.astype(np.int32), self.mesh.size), self.mesh
        )

    def _start(self, position: int):
        return mapping.put_on_devices(np.full(self.mesh.size, position, np.int32), self.mesh)

    def _timed_compile(self, fn, *args):
        t = time.perf_counter()
        compiled = fn.lower(*args).compile()
        self.compile_time += time.perf_counter() - t
        return compiled

    def _fed_inputs(self, length: int):
        """Shapes of a fed chunk: (devices, length, learners, batch, ...)."""
        lay, example = self.layout, self.example
        lead = (lay.devices, length, lay.learners, lay.batch)
        sharding = mapping.device_sharding(self.mesh)
        return (
            jax.ShapeDtypeStruct(lead + example.shape[1:], example.dtype, sharding=sharding),
            jax.ShapeDtypeStruct(lead, np.int32, sharding=sharding),
        )

    def compile_all(self, lengths: set[int], state) -> None:
        """Compiles the train program for every dispatch length, and the evaluation."""
        for length in sorted(lengths - set(self._train)):
            if self.placement == "host":
                step = functools.partial(self.programs.train_fed_steps, unroll=self.unroll)
                args = (*self._fed_inputs(length), self.resets, self.key)
            else:
                if self.perm is None:
                    self.set_epoch(0, [])
                step = functools.partial(
                    self.programs.train_steps, length=length, unroll=self.unroll
                )
                args = (self.images, self.labels, self.perm, self._start(0), self.resets, self.key)
            self._train[length] = self._timed_compile(self._jit(step, (0,)), state, *args)
        if self.has_test and self._eval is None:
            test = self.test if self.test_stream is None else self._stream_batches(1)[0]
            self._eval = self._timed_compile(self._jit(self.programs.evaluate), state, *test)

    def train(self, chunk: Chunk, state):
        if self.placement == "host":
            xs, ys = self.feeder.next(chunk)
            return self._train[chunk.length](state, xs, ys, self.resets, self.key)
        return self._train[chunk.length](
            state,
            self.images,
            self.labels,
            self.perm,
            self._start(chunk.position),
            self.resets,
            self.key,
        )

    def _stream_batches(self, limit: int | None = None) -> list:
        """The streamed test split as device batches (devices, 1, chunk, ...) with masks."""
        devices = self.mesh.size
        source = self.test_stream(devices * EVAL_CHUNK)
        out = []
        for x, y in source.epoch(0):
            x, y, mask = shard_test_set(x, y.astype(np.int32), devices, chunk=EVAL_CHUNK)
            out.append(mapping.put_on_devices((x, y, mask), self.mesh))
            if limit and len(out) >= limit:
                break
        return out

    def evaluate(self, state) -> tuple[float, float]:
        batches = [self.test] if self.test_stream is None else self._stream_batches()
        parts = [mapping.first_device(self._eval(state, *batch)) for batch in batches]
        totals = {k: sum(p[k] for p in parts) for k in parts[0]}
        count = max(int(totals["count"]), 1)
        return int(totals["correct"]) / count, float(totals["loss_sum"]) / count

    def close(self) -> None:
        """Stops the feeder thread, if any."""
        if self.placement == "host":
            self.feeder.close()

    def central_variables(self, state) -> dict[str, Any]:
        """The central model's variables, as NumPy."""

        def central(state):
            out = {"params": self.programs.central_params(state)}
            if state.batch_stats:
                out["batch_stats"] = lax.pmean(state.batch_stats, mapping.DEVICE_AXIS)
            return out

        return mapping.first_device(self._jit(central)(state))


def build_state(c: Compiled, mesh) -> TrainState:
    """Fresh state: all learners equal to one initialisation, on every device.

    Compiling the two initialisation programs counts in `c.compile_time`.
    """
    cfg, lay = c.cfg, c.layout
    init_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0)
    kwargs = {"train": False} if c.programs.train_flag else {}
    init = jax.jit(lambda k, x: c.model.init({"params": k, "dropout": k}, x, **kwargs))
    variables = c._timed_compile(init, init_key, c.sample)(init_key, c.sample)
    params = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables.get("batch_stats", {}))
    stacked = jax.tree.map(
        lambda p: np.broadcast_to(p, (lay.devices, lay.learners) + p.shape), params
    )
    put = lambda tree: mapping.put_on_devices(tree, mesh)
    params_g = put(stacked)
    opt_state = c._timed_compile(c._jit(c.transform.init), params_g)(params_g)
    return TrainState(
        params_g,
        put(mapping.replicate(stats, lay.devices)),
        opt_state,
        put(np.zeros(lay.devices, np.int32)),
    )
