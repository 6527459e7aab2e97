"""Data sets by name, real data wherever it can be had, cached on disk.

    from crossbow_jax.data import load_dataset
    ds = load_dataset("mnist")          # Dataset: uint8 NHWC images, int32 labels, info

Names: `mnist`, `fashion_mnist`, `fashion_mnist32` (Fashion-MNIST padded to
CIFAR's 32x32x3, a stand-in for CIFAR-10), `cifar10`, `cifar100`,
`imagenet` (streamed: `load_imagenet`), `synthetic`. See `docs/data.md`.

`preprocess` turns stored pixels into model input on the device
(`Preprocess`: scale, normalise, `crop_flip` augmentation); `training_data`
gives `crossbow_jax.train`'s data arguments for a data set by name.
"""

from crossbow_jax.data._core import Dataset, DatasetError, DatasetInfo, DatasetSpec, DownloadError
from crossbow_jax.data._fetch import default_cache_dir
from crossbow_jax.data.imagenet import ImageNetSource, load_imagenet
from crossbow_jax.data.preprocess import Preprocess, crop_flip
from crossbow_jax.data.registry import (
    DATASETS,
    dataset_names,
    load_dataset,
    prepare,
    training_data,
)

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetError",
    "DatasetInfo",
    "DatasetSpec",
    "DownloadError",
    "ImageNetSource",
    "Preprocess",
    "crop_flip",
    "dataset_names",
    "default_cache_dir",
    "load_dataset",
    "load_imagenet",
    "prepare",
    "training_data",
]
