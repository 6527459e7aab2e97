"""Random-access data sources read through grain: records -> batches of one step.

A source is anything with `__len__` and `__getitem__(i)` returning one record:
a `grain.MapDataset`, a grain `RandomAccessDataSource`, a Hugging Face
`datasets.Dataset`, or a class of your own. A record is an `(input, label)`
pair or a dict holding one input key and one label key (`INPUT_KEYS`,
`LABEL_KEYS`: e.g. `{"image": PIL image, "label": 3}`); a `transform` turns
other records into one. `transform(record)` is applied in training and
evaluation alike; `transform(record, rng)` gets a `numpy.random.Generator`
in training (drawn from the run's seed, the epoch and the record's index, so
a resumed run sees the same crops) and `rng=None` in evaluation.

`StreamedSource` serves one step's images at a time in the order the
device-resident path uses (the permutation `default_rng([seed, epoch])`),
so the same records train the same way wherever they live. grain reads the
batches in worker processes (`workers`; 0: threads of this process) ahead of
use; one pipeline runs across epochs, so the workers start once.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from crossbow_jax.data._core import DatasetError

INPUT_KEYS = ("image", "img", "pixel_values", "x", "input", "inputs", "features")
LABEL_KEYS = ("label", "labels", "y", "target", "targets")
PROCESSES_FROM = 20_000  # records read whole by worker processes, not threads
EPOCHS_AHEAD = 1_000_000  # how far one pipeline may run; a run re-opens it past that


def is_source(value: Any) -> bool:
    """A random-access source (not a pair of arrays, not a name)."""
    if isinstance(value, (str, bytes, tuple, list, dict, np.ndarray)):
        return False
    return hasattr(value, "__len__") and hasattr(value, "__getitem__")


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of an epoch's `n` records, the same wherever they live (device-resident
    arrays, arrays fed from the host, sources): the permutation `default_rng([seed, epoch])`."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_count(images: int, per_batch: int, drop_remainder: bool) -> int:
    """Batches of `per_batch` in `images`: whole ones only, or the last one smaller too."""
    return images // per_batch if drop_remainder else -(-images // per_batch)


def default_workers() -> int:
    """Worker processes for a host's cores: one per core, one core left to the run, at most
    8; none (threads) on 2 cores or fewer, where threads read ImageNet JPEGs 1.25x faster
    than one worker process (docs/performance.md, "The host path")."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores - 1)


def takes_rng(transform: Callable | None) -> bool:
    """Whether `transform` is random: it takes a second argument (`rng`)."""
    if transform is None:
        return False
    try:
        params = list(inspect.signature(transform).parameters.values())
    except (TypeError, ValueError):  # a builtin: one argument
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def record_pair(record: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One record as NumPy `(input, label)`.

    Raises:
        DatasetError: a record that is neither a pair nor a dict with one input and
            one label key, naming the record and the fix.
    """
    if isinstance(record, (tuple, list)) and len(record) == 2:
        x, y = record
    elif isinstance(record, dict):
        x, y = (_one_key(record, keys, what, index) for keys, what in
                ((INPUT_KEYS, "input"), (LABEL_KEYS, "label")))  # fmt: skip
    else:
        raise DatasetError(
            f"record {index} is a {type(record).__name__}; a source's records must be "
            "(input, label) pairs or dicts with an input and a label key: pass "
            "transform=lambda r: (input of r, label of r)"
        )
    return np.asarray(x), np.asarray(y)


def _one_key(record: dict, keys: tuple[str, ...], what: str, index: int) -> Any:
    found = [k for k in keys if k in record]
    if len(found) != 1:
        has = "none of" if not found else f"{len(found)} of"
        raise DatasetError(
            f"record {index} is a dict with keys {sorted(record)}, {has} the {what} keys "
            f"{list(keys)}; pass transform=lambda r: (r['<input key>'], r['<label key>'])"
        )
    return record[found[0]]


class Records:
    """Record `i` of a source as `(input, label)` arrays, its transform applied.

    Args:
        source: the random-access source.
        transform: `record -> record`, or `(record, rng) -> record` (random: `rng` is
            None in evaluation); None: records are used as they are.
    """

    def __init__(self, source: Any, transform: Callable | None = None):
        self.source, self.transform = source, transform
        self.random = takes_rng(transform)

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int, rng: np.random.Generator | None = None):
        record = self.source[int(index)]
        if self.transform is not None:
            record = self.transform(record, rng) if self.random else self.transform(record)
        return record_pair(record, int(index))

    def sample(self, count: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, labels, indices) of up to `count` records spread over the source,
        read in this process without augmentation, for the checks before any work.

        Raises:
            DatasetError: an empty source, or records whose shapes differ.
        """
        if len(self) == 0:
            raise DatasetError(f"the source {type(self.source).__name__} is empty")
        rows = np.unique(np.linspace(0, len(self) - 1, min(count, len(self))).round())
        pairs = []
        for i in rows:
            try:
                pairs.append(self.read(int(i)))
            except DatasetError:
                raise
            except Exception as e:  # noqa: BLE001 -- named with its record, before any work
                raise DatasetError(
                    f"reading record {int(i)} of the {type(self.source).__name__} failed "
                    f"({type(e).__name__}: {e}); a source's [i] must return record i"
                ) from e
        return (*stack(pairs, rows), rows.astype(np.int64))


def stack(pairs: list[tuple[np.ndarray, np.ndarray]], rows) -> tuple[np.ndarray, np.ndarray]:
    """Records -> batch arrays; records of another shape are named.

    Raises:
        DatasetError: records whose input or label shapes differ.
    """
    for part in (0, 1):
        first = pairs[0][part].shape
        for pair, row in zip(pairs, rows):
            if pair[part].shape != first:
                what = ("input", "label")[part]
                raise DatasetError(
                    f"record {int(row)} has {what} shape {pair[part].shape} but record "
                    f"{int(rows[0])} has {first}; every record needs the same shape (resize "
                    "in transform=)"
                )
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


class _Batches:
    """Batch `k` of a pipeline that starts `first` images into `epoch`: (epoch, begin, end)."""

    def __init__(self, n: int, per_batch: int, epoch: int, first: int, drop: bool, epochs: int):
        self.n, self.per, self.epoch, self.first, self.drop = n, per_batch, epoch, first, drop
        self.head = batch_count(n - first, per_batch, drop)  # left in the first epoch
        self.length = self.head + batch_count(n, per_batch, drop) * epochs

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> tuple[int, int, int]:
        if k < self.head:
            epoch, begin = self.epoch, self.first + k * self.per
        else:
            later, j = divmod(k - self.head, batch_count(self.n, self.per, self.drop))
            epoch, begin = self.epoch + 1 + later, j * self.per
        return epoch, begin, min(begin + self.per, self.n)


class _ReadBatch:
    """(epoch, begin, end) -> the stacked records at those places of the epoch's order
    (run in grain's workers; picklable)."""

    def __init__(self, records: Records, seed: int, shuffle: bool, training: bool):
        self.records, self.seed, self.shuffle, self.training = records, seed, shuffle, training
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.records)
            perm = epoch_order(self.seed, epoch, n) if self.shuffle else np.arange(n)
            self._order = (epoch, perm)
        return self._order[1]

    def __call__(self, item: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        epoch, begin, end = item
        rows = self.order(epoch)[begin:end]
        random = self.training and self.records.random
        pairs = [self.records.read(i, np.random.default_rng([self.seed, epoch, int(i)])
                                   if random else None) for i in rows]  # fmt: skip
        return stack(pairs, rows)


class StreamedSource:
    """One step's images at a time from `records`, read by grain ahead of use.

    Args:
        records: the source's records.
        per_batch: images per batch (one step's: devices x learners x batch).
        seed: the run's seed: the epochs' order and random transforms.
        workers: grain worker processes (0: threads of this process).
        shuffle: a new order each epoch (False: the source's order, for evaluation).
        training: random transforms get their `rng` (False: `rng=None`).
        drop_remainder: leave out an epoch's last, smaller batch.
    """

    def __init__(self, records: Records, per_batch: int, seed: int, *, workers: int,
                 shuffle: bool = True, training: bool = True, drop_remainder: bool = True):  # fmt: skip
        self.records, self.per, self.workers = records, per_batch, workers
        self.read = _ReadBatch(records, seed, shuffle, training)
        self.drop = drop_remainder
        self.num_batches = batch_count(len(records), per_batch, drop_remainder)
        self._iter, self._at = None, None  # the live pipeline and where it stands

    def epoch(self, epoch: int, start_batch: int = 0, *, start_image: int | None = None
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
        """Yields (inputs, labels) of one step each, from batch `start_batch` on, or from
        `start_image` images into the epoch's order, to the epoch's end."""
        first = start_batch * self.per if start_image is None else start_image
        count = batch_count(len(self.records) - first, self.per, self.drop)
        if self._at != (epoch, first):
            self._open(epoch, first)
        for _ in range(count):
            batch = next(self._iter)
            self._next += 1
            self._at = self._batches[self._next][:2]
            yield batch

    def _open(self, epoch: int, first: int) -> None:
        import grain

        self.close()
        self._batches = _Batches(len(self.records), self.per, epoch, first, self.drop,
                                 EPOCHS_AHEAD)  # fmt: skip
        threads = max(1, min(4, os.cpu_count() or 1))
        ds = grain.MapDataset.source(self._batches).map(self.read).to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        )
        if self.workers:
            _absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        self._iter, self._at, self._next = iter(ds), (epoch, first), 0

    def close(self) -> None:
        """Stops the pipeline (its worker processes); a later epoch opens a new one."""
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter, self._at = None, None


def read_all(records: Records, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Every record in order, without augmentation, as arrays (to place them on devices);
    by `workers` processes from `PROCESSES_FROM` records on (threads below: starting
    processes costs seconds)."""
    size = min(len(records), 1024)
    workers = workers if len(records) >= PROCESSES_FROM else 0
    source = StreamedSource(records, size, 0, workers=workers, shuffle=False, training=False,
                            drop_remainder=False)  # fmt: skip
    try:
        xs, ys = zip(*source.epoch(0))
    finally:
        source.close()
    return np.concatenate(xs), np.concatenate(ys)


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which a program without `absl.app` never
    parsed: mark them parsed (their defaults) so that the workers start."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
