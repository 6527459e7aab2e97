"""Random-access sources as the engine's data: checked on a sample before any work, then
placed on the devices whole (small, no random transform) or streamed from the host
through grain (`crossbow_jax.data.streaming`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from crossbow_jax.data import DatasetError
from crossbow_jax.data.streaming import (
    LABEL_KEYS,
    Records,
    StreamedSource,
    default_workers,
    read_all,
)
from crossbow_jax.engine.config import ConfigError
from crossbow_jax.engine.dtypes import as_engine_dtype, as_model_layout

PLACED_BYTES = 2 << 30
"""A source up to this size (and half a device's free memory, where known) is read whole
and placed on the devices with `data_placement="auto"`, unless its transform is random."""


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """How sources are read: `transform`, worker processes, placement, free device bytes."""

    transform: Callable | None
    workers: int | None
    placement: str
    free_bytes: int = 0  # free memory of a device (0: not known)

    @property
    def worker_count(self) -> int:
        return default_workers() if self.workers is None else self.workers


def sample(records: Records, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A split's sample (inputs, labels, record indices), dtypes as the engine keeps them."""
    try:
        x, y, rows = records.sample()
    except DatasetError as e:
        raise ConfigError(f"{split} source: {e}") from None
    x = as_model_layout(x)
    if x.ndim < 2:
        raise ConfigError(f"{split} source's inputs are scalars; give each record an array input")
    return as_engine_dtype(x, split, "inputs"), as_engine_dtype(y, split, "labels"), rows


def _fits(records: Records, x: np.ndarray, y: np.ndarray, options: SourceOptions,
          training: bool = True) -> bool:  # fmt: skip
    """Whether a source is read whole and placed on the devices (`data_placement` is the
    training set's: a test source is read whole whenever it is small)."""
    random = training and records.random  # (evaluation calls a random transform with None)
    if options.placement == "host" and training:
        return False
    if options.placement == "device" and training:
        if random:
            raise ConfigError(
                "data_placement='device' reads the source once, but its transform is random "
                "(it takes rng) and runs every epoch on the host: use data_placement='host' "
                "or 'auto'"
            )
        return True
    total = (x.nbytes + y.nbytes) / len(x) * len(records)
    limit = min(PLACED_BYTES, options.free_bytes / 2) if options.free_bytes else PLACED_BYTES
    return not random and total <= limit


def declared_classes(source: Any) -> int | None:
    """The class count a source declares: a `num_classes` attribute, or a Hugging Face
    `ClassLabel` feature named like a label key."""
    count = getattr(source, "num_classes", None)
    if isinstance(count, (int, np.integer)) and count > 0:
        return int(count)
    features = getattr(source, "features", None)
    if isinstance(features, dict):
        for key in LABEL_KEYS:
            count = getattr(features.get(key), "num_classes", None)
            if isinstance(count, int) and count > 0:
                return count
    return None


def resolve_sources(train: Any, test: Any, options: SourceOptions, resolve_pairs) -> Any:
    """`Arrays` for a random-access training source (and a source, a pair or None for test).

    `resolve_pairs(train, test)` is the array path (`inputs.resolve_data` for pairs):
    sources read whole go through it, checked like arrays. Streamed sources are checked on
    a sample of records spread over them (shapes, dtypes, scale, NaN, labels later against
    the model), naming the record.
    """
    records = Records(train, options.transform)
    x, y, rows = sample(records, "train")
    test_records = Records(test, options.transform) if test is not None and not isinstance(
        test, (tuple, list)) else None  # fmt: skip
    tx = ty = trows = None
    if test_records is not None:
        tx, ty, trows = sample(test_records, "test")
    name = f"{type(train).__name__} source"
    classes = declared_classes(train)
    placed_test = test if test_records is None else (
        read_all(test_records, 0) if _fits(test_records, tx, ty, options, False) else None)  # fmt: skip
    if _fits(records, x, y, options):
        whole = resolve_pairs(read_all(records, options.worker_count), placed_test)
        return _streamed_test(dataclasses.replace(
            whole, name=name, declared_classes=classes, num_classes=classes or whole.num_classes),
                              test_records, placed_test, tx, ty, trows)  # fmt: skip
    placed = isinstance(placed_test, (tuple, list))
    checked = resolve_pairs((x, y), placed_test if placed else (tx, ty) if tx is not None else None)
    workers = options.worker_count

    def stream(images_per_step: int, seed: int) -> StreamedSource:
        return StreamedSource(records, images_per_step, seed, workers=workers)

    data = dataclasses.replace(
        checked, name=name, train_x=None, train_y=None, num_train=len(records), stream=stream,
        num_classes=classes or checked.num_classes, declared_classes=classes,
        train_sample=(x, y, rows), test_x=checked.test_x if placed else None,
        test_y=checked.test_y if placed else None,
    )
    return _streamed_test(data, test_records, placed_test, tx, ty, trows)


def _streamed_test(data, test_records, placed_test, tx, ty, trows):
    """`data` with a test source that was not read whole: streamed at each evaluation."""
    if test_records is None or placed_test is not None:
        return data

    def test_stream(batch: int) -> StreamedSource:
        return StreamedSource(test_records, batch, 0, workers=0, shuffle=False, training=False,
                              drop_remainder=False)  # fmt: skip

    return dataclasses.replace(data, test_stream=test_stream, test_sample=(tx, ty, trows))


def named_stream(name: str, data_dir: str | None, options: SourceOptions, resolve_pairs) -> Any:
    """A data set read from files (ImageNet, `crossbow_jax.data.load_imagenet`): its
    folders as sources, decoded and augmented in grain's workers, always streamed."""
    from crossbow_jax.data import load_imagenet
    from crossbow_jax.data.preprocess import pixels

    train = load_imagenet(split="train", data_dir=data_dir, num_workers=options.workers)
    val = load_imagenet(split="val", data_dir=data_dir)
    host = dataclasses.replace(options, transform=train.decode, placement="host")
    data = resolve_sources(train.files, val.files, host, resolve_pairs)
    info = train.info
    return dataclasses.replace(data, name=name, preprocess=pixels(info.mean, info.std))
