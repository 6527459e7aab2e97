"""Random images of a real data set's shape, for throughput runs.

Nothing is read or cached: the data are regenerated from the seed, which is
faster than reading them back.
"""

from __future__ import annotations

import math

import numpy as np

from crossbow_jax.data._core import Dataset, DatasetSpec

# Mean and standard deviation of uniform random bytes, in [0, 1] pixel units.
_UNIFORM_MEAN = 127.5 / 255
_UNIFORM_STD = math.sqrt((256**2 - 1) / 12) / 255

# Default sizes for ImageNet-like data, whose real sizes would not fit in memory.
_IMAGE_DEFAULT = (1_024, 256)


def make(
    like: DatasetSpec,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Returns uniform random `uint8` images shaped like another data set.

    Args:
        like: Registry entry of the data set to imitate (shape, classes,
            augmentation).
        n_train: Number of training examples; default: as many as the real
            data set has (ImageNet-like: 1,024).
        n_test: Number of test examples; default: as the real one
            (ImageNet-like: 256).
        seed: The same seed gives the same arrays.

    Returns:
        A `Dataset` whose `info` is `like`'s with `name="synthetic"`,
        `substitute=<like's name>`, and the mean/std of uniform bytes.
    """
    small = math.prod(like.info.image_shape) <= 32 * 32 * 3
    default_train, default_test = (like.num_train, like.num_test) if small else _IMAGE_DEFAULT
    n_train = default_train if n_train is None else int(n_train)
    n_test = default_test if n_test is None else int(n_test)
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    channels = like.info.image_shape[-1]
    info = like.info.replace(
        name="synthetic",
        substitute=like.info.name,
        mean=(_UNIFORM_MEAN,) * channels,
        std=(_UNIFORM_STD,) * channels,
    )
    train_rng, test_rng = np.random.default_rng(seed).spawn(2)

    def split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        images = rng.integers(0, 256, size=(n, *info.image_shape), dtype=np.uint8)
        labels = rng.integers(0, info.num_classes, size=(n,), dtype=np.int32)
        return images, labels

    train_images, train_labels = split(train_rng, n_train)
    test_images, test_labels = split(test_rng, n_test)
    return Dataset(train_images, train_labels, test_images, test_labels, info)
