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
from crossbow_jax.engine.config import TrainConfig
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
    a loop (measured by experiments/bench_engine.py), so on CPU the steps of a
    dispatch are unrolled and dispatches kept short to bound compile time.
    """
    cpu = mesh.devices.flat[0].platform == "cpu"
    unroll = cpu if cfg.unroll_steps is None else cfg.unroll_steps
    steps = cfg.steps_per_dispatch or (2 if cpu else 50)
    return steps, unroll


def learner_transform(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """`sma` or `ssgd` around the learner optimiser, over the device axis."""
    inner = optimizer if optimizer is not None else default_optimizer(cfg, steps_per_epoch)
    if cfg.algorithm == "sma":
        return sma(
            inner, alpha=cfg.alpha, momentum=cfg.central_momentum, axis_name=mapping.DEVICE_AXIS
        )
    return ssgd(inner, axis_name=mapping.DEVICE_AXIS)


def shard_test_set(x: np.ndarray, y: np.ndarray, devices: int):
    """(devices, chunks, chunk, ...) arrays and a mask of the real rows."""
    per_device = math.ceil(len(x) / devices)
    chunk = min(per_device, EVAL_CHUNK)
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
        self.n_train = len(data.train_x)
        self.sample = data.preprocess(data.train_x[:1], None)
        devices = mesh.size
        put = lambda tree: mapping.put_on_devices(tree, mesh)
        self.images, self.labels = put(mapping.replicate((data.train_x, data.train_y), devices))
        resets = (
            milestone_steps(cfg, steps_per_epoch)
            if (cfg.reset_at_drops and cfg.algorithm == "sma")
            else []
        )
        self.resets = put(mapping.replicate(np.asarray(resets, np.int32), devices))
        self.key = put(mapping.replicate(np.asarray(jax.random.PRNGKey(cfg.seed)), devices))
        self.has_test = data.test_x is not None
        if self.has_test:
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

    def set_epoch(self, epoch: int) -> None:
        """This epoch's shuffle, the same on every device and host."""
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

    def compile_all(self, lengths: set[int], state) -> None:
        """Compiles the train program for every dispatch length, and the evaluation."""
        if self.perm is None:
            self.set_epoch(0)
        for length in sorted(lengths - set(self._train)):
            step = functools.partial(self.programs.train_steps, length=length, unroll=self.unroll)
            fn = self._jit(step, (0,))
            self._train[length] = self._timed_compile(
                fn,
                state,
                self.images,
                self.labels,
                self.perm,
                self._start(0),
                self.resets,
                self.key,
            )
        if self.has_test and self._eval is None:
            self._eval = self._timed_compile(self._jit(self.programs.evaluate), state, *self.test)

    def train(self, chunk: Chunk, state):
        return self._train[chunk.length](
            state,
            self.images,
            self.labels,
            self.perm,
            self._start(chunk.position),
            self.resets,
            self.key,
        )

    def evaluate(self, state) -> tuple[float, float]:
        totals = mapping.first_device(self._eval(state, *self.test))
        count = max(int(totals["count"]), 1)
        return int(totals["correct"]) / count, float(totals["loss_sum"]) / count

    def central_variables(self, state) -> dict[str, Any]:
        """The central model's variables, as NumPy."""

        def central(state):
            out = {"params": self.programs.central_params(state)}
            if state.batch_stats:
                out["batch_stats"] = lax.pmean(state.batch_stats, mapping.DEVICE_AXIS)
            return out

        return mapping.first_device(self._jit(central)(state))


def build_state(c: Compiled, mesh) -> TrainState:
    """Fresh state: all learners equal to one initialisation, on every device."""
    cfg, lay = c.cfg, c.layout
    init_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0)
    kwargs = {"train": False} if c.programs.train_flag else {}
    variables = jax.jit(lambda k, x: c.model.init({"params": k, "dropout": k}, x, **kwargs))(
        init_key, c.sample
    )
    params = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables.get("batch_stats", {}))
    stacked = jax.tree.map(
        lambda p: np.broadcast_to(p, (lay.devices, lay.learners) + p.shape), params
    )
    put = lambda tree: mapping.put_on_devices(tree, mesh)
    params_g = put(stacked)
    opt_state = c._jit(c.transform.init)(params_g)
    return TrainState(
        params_g,
        put(mapping.replicate(stats, lay.devices)),
        opt_state,
        put(np.zeros(lay.devices, np.int32)),
    )
