"""The host path: batches assembled on the host and fed to the devices ahead of use.

For data that does not fit in device memory (ImageNet, or any data set with
`data_placement="host"`). A source yields one batch of all images of a step
(devices x learners x batch) at a time; a `Feeder` thread stacks a dispatch's
batches, places them on the devices, and keeps `prefetch` dispatches ready,
so decoding and transfer overlap with compute.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from crossbow_jax.data.streaming import epoch_order
from crossbow_jax.engine import mapping
from crossbow_jax.engine.dtypes import as_engine_dtype, as_model_layout
from crossbow_jax.engine.plan import Chunk, Layout


class Source(Protocol):
    """What the feeder reads: batches of one step's images, epoch by epoch."""

    num_batches: int  # steps per epoch

    def epoch(
        self, epoch: int, start_batch: int = 0, *, start_image: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (images, labels) of one step each, from batch `start_batch` on, or from
        `start_image` images into the epoch's order (the feeder passes it, so that a
        run can change its step size mid-epoch)."""
        ...


class ArraySource:
    """In-memory arrays served from the host, in exactly the device path's order.

    Step t of epoch e takes rows `perm[t*P:(t+1)*P]` of the permutation
    `default_rng([seed, e])`, P images per step, like the device-resident path,
    so both placements train on the same batches.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, images_per_step: int, seed: int):
        self.x, self.y = x, y
        self.per_step, self.seed = images_per_step, seed
        self.num_batches = len(x) // images_per_step

    def epoch(self, epoch: int, start_batch: int = 0, *, start_image: int | None = None):
        perm = epoch_order(self.seed, epoch, len(self.x))
        first = start_batch * self.per_step if start_image is None else start_image
        for begin in range(first, len(self.x) - self.per_step + 1, self.per_step):
            rows = perm[begin : begin + self.per_step]
            yield self.x[rows], self.y[rows]


def as_device_chunk(batches: list[tuple[np.ndarray, np.ndarray]], layout: Layout, mesh):
    """(L steps of P images) -> device arrays (devices, L, learners, batch, ...)."""
    d, m, b = layout.devices, layout.learners, layout.batch

    def arrange(arrays):
        stacked = np.stack(arrays)  # (L, P, ...)
        shaped = stacked.reshape((len(arrays), d, m, b) + stacked.shape[2:])
        return np.moveaxis(shaped, 1, 0)

    xs = arrange([as_engine_dtype(as_model_layout(x), part="inputs") for x, _ in batches])
    ys = arrange([as_engine_dtype(y) for _, y in batches])
    return mapping.put_on_devices((xs, ys), mesh)


class Feeder:
    """Prepares the device inputs of an epoch's chunks on a background thread."""

    def __init__(self, source: Source, layout: Layout, mesh, prefetch: int = 2):
        self.source, self.layout, self.mesh = source, layout, mesh
        self.prefetch = prefetch
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, epoch: int, chunks: list[Chunk]) -> None:
        """Begins preparing `chunks` (consecutive, all in `epoch`)."""
        self._stop_thread()
        self._stop = threading.Event()
        self._queue = queue.Queue(self.prefetch)
        args = (epoch, chunks, self._queue, self._stop)
        self._thread = threading.Thread(
            target=self._work, args=args, daemon=True, name="crossbow-feeder"
        )
        self._thread.start()

    def _work(self, epoch, chunks, out: queue.Queue, stop: threading.Event) -> None:
        try:
            batches = self.source.epoch(epoch, start_image=chunks[0].offset)
            for chunk in chunks:
                taken = [next(batches) for _ in range(chunk.length)]
                item = (chunk, as_device_chunk(taken, self.layout, self.mesh))
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except Exception as e:  # handed to the consumer, raised there
            out.put((None, e))

    def next(self, chunk: Chunk) -> Any:
        """The device inputs (xs, ys) of `chunk`; waits for the thread if needed."""
        got, item = self._queue.get()
        if got is None:
            raise item
        if got != chunk:
            raise RuntimeError(f"feeder out of step: expected {chunk}, prepared {got}")
        return item

    def _stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = None

    def close(self) -> None:
        """Stops the thread and the source's readers (grain's worker processes), if any."""
        self._stop_thread()
        if hasattr(self.source, "close"):
            self.source.close()
