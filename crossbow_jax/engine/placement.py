"""What a dispatch reads besides the state, placed on the devices.

`TrainData` holds the training side: the training set resident on every
device with the epoch's permutation (`data_placement="device"`), or a
`Feeder` thread that assembles batches on the host ahead of use ("host");
plus the run's base PRNG key and the steps at which SMA resets learners.
`TestData` holds the test split, placed in shards or streamed. Both give
the arguments of the per-device programs in `crossbow_jax/engine/step.py`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from crossbow_jax.data.streaming import epoch_order
from crossbow_jax.engine import mapping
from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.dtypes import as_engine_dtype
from crossbow_jax.engine.feed import ArraySource, Feeder
from crossbow_jax.engine.inputs import Arrays
from crossbow_jax.engine.optimizers import milestone_steps
from crossbow_jax.engine.plan import Chunk, Clock, Layout

EVAL_CHUNK = 500


def resolve_placement(config: TrainConfig, data: Arrays, mesh) -> str:
    """Where the training set lives: "device" (resident) or "host" (fed ahead of use)."""
    if data.stream is not None:
        if config.data_placement == "device":
            raise ConfigError(
                f"{data.name} is streamed from files and cannot be device-resident; "
                "use data_placement='host' or 'auto'"
            )
        return "host"
    if config.data_placement != "auto":
        return config.data_placement
    free = mapping.free_bytes(mesh)
    return "host" if free > 0 and data.train_x.nbytes > free / 2 else "device"


class TrainData:
    """The training inputs of every dispatch: batches (resident or fed), resets, key.

    Args:
        config: the run's config (seed, placement, reset_at_drops, milestones).
        data: the resolved data (only the training split is used).
        layout: devices x learners x batch of one step.
        mesh: the device mesh.
        clock: the run's epochs in steps at this layout (for the resets).
        like: the `TrainData` of the layout this one takes over from: its
            placement and resident training set are shared, not placed again.
    """

    def __init__(
        self,
        config: TrainConfig,
        data: Arrays,
        layout: Layout,
        mesh,
        clock: Clock,
        like: TrainData | None = None,
    ):
        self.seed, self.layout, self.mesh = config.seed, layout, mesh
        self.example, self.label_example = data.example, data.label_example
        self.num_train = data.num_train
        self.placement = like.placement if like else resolve_placement(config, data, mesh)
        if self.placement == "device":
            self.images, self.labels = (
                (like.images, like.labels) if like else self._put((data.train_x, data.train_y))
            )
            self.perm = None
        else:
            source = (
                data.stream(layout.images_per_step, config.seed)
                if data.stream is not None
                else ArraySource(data.train_x, data.train_y, layout.images_per_step, config.seed)
            )
            self.feeder = Feeder(source, layout, mesh)
        resets = (
            [s for s in milestone_steps(config, clock) if s is not None]
            if config.reset_at_drops
            else []
        )
        self.resets = self._put(np.asarray(resets, np.int32))
        self.key = self._put(np.asarray(jax.random.PRNGKey(config.seed)))

    def _put(self, tree):
        """Replicates host arrays onto every device (a leading device axis)."""
        return mapping.put_on_devices(mapping.replicate(tree, self.mesh.size), self.mesh)

    def start_epoch(self, epoch: int, chunks: list[Chunk]) -> None:
        """Prepares an epoch: its shuffle on the devices, or the feeder for its chunks."""
        if self.placement == "host":
            self.feeder.start(epoch, chunks)
            return
        perm = epoch_order(self.seed, epoch, self.num_train)
        self.perm = self._put(perm.astype(np.int32))

    def _start(self, position: int):
        return mapping.put_on_devices(np.full(self.mesh.size, position, np.int32), self.mesh)

    def args(self, chunk: Chunk) -> tuple:
        """The dispatch's arguments after the state (`train_steps` or `train_fed_steps`)."""
        if self.placement == "host":
            xs, ys = self.feeder.next(chunk)
            return xs, ys, self.resets, self.key
        start = self._start(chunk.offset)
        return self.images, self.labels, self.perm, start, self.resets, self.key

    def example_args(self, length: int) -> tuple:
        """Arguments of the right shapes for compiling a dispatch of `length` steps."""
        if self.placement == "device":
            if self.perm is None:
                self.start_epoch(0, [])
            return self.args(Chunk(0, length, 0, 0, False, False))
        lay, example = self.layout, self.example
        lead = (lay.devices, length, lay.learners, lay.batch)
        sharding = mapping.device_sharding(self.mesh)
        xs = jax.ShapeDtypeStruct(lead + example.shape[1:], example.dtype, sharding=sharding)
        label = self.label_example
        ys = jax.ShapeDtypeStruct(lead + label.shape[1:], label.dtype, sharding=sharding)
        return xs, ys, self.resets, self.key

    def close(self) -> None:
        """Stops the feeder thread, if any."""
        if self.placement == "host":
            self.feeder.close()


def shard_test_set(x: np.ndarray, y: np.ndarray, devices: int, chunk: int | None = None):
    """(devices, chunks, chunk, ...) arrays and a mask of the real rows."""
    per_device = math.ceil(len(x) / devices)
    chunk = chunk or min(per_device, EVAL_CHUNK)
    chunks = math.ceil(per_device / chunk)
    total = devices * chunks * chunk
    mask = np.arange(total) < len(x)
    pad = total - len(x)
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)])
    shape = (devices, chunks, chunk)
    return x.reshape(shape + x.shape[1:]), y.reshape(shape + y.shape[1:]), mask.reshape(shape)


class TestData:
    """The test split on the devices: placed once in shards, or streamed at each evaluation."""

    def __init__(self, data: Arrays, mesh):
        self.mesh, self.stream = mesh, data.test_stream
        self.placed = None
        if data.test_x is not None:
            self.placed = mapping.put_on_devices(
                shard_test_set(data.test_x, data.test_y, mesh.size), mesh
            )

    def batches(self, limit: int | None = None) -> list[Any]:
        """Placed (images, labels, mask) batches, each (devices, chunks, chunk, ...)."""
        if self.stream is None:
            return [self.placed]
        devices = self.mesh.size
        out = []
        for x, y in self.stream(devices * EVAL_CHUNK).epoch(0):
            x, y, mask = shard_test_set(x, as_engine_dtype(y), devices, chunk=EVAL_CHUNK)
            out.append(mapping.put_on_devices((x, y, mask), self.mesh))
            if limit and len(out) >= limit:
                break
        return out
