"""CIFAR-10 and CIFAR-100: the "python version" pickled batches.

Routes, tried in order (the in-memory cache in front of them lives in
`crossbow_jax.data.registry`):

1. The extracted batches in `<data_dir>/<name>/cifar-10-batches-py/`
   (`cifar-100-python/` for CIFAR-100) or directly in `<data_dir>/<name>/`.
2. The archive `cifar-10-python.tar.gz` (`cifar-100-python.tar.gz`) in
   `<data_dir>/<name>/`, read without extracting it.
3. The standard download of that archive (5 s connect timeout).

With `verify=True` (the default) the archive's published MD5 is checked
before it is opened and each batch file's MD5 before it is unpickled;
downloads are always checked. Pickles are read with an unpickler that
accepts numpy arrays and nothing else.
"""

from __future__ import annotations

import dataclasses
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crossbow_jax.data import _fetch
from crossbow_jax.data._core import DatasetError

_MIRRORS = ("https://www.cs.toronto.edu/~kriz/", "https://cave.cs.toronto.edu/kriz/")


@dataclasses.dataclass(frozen=True)
class CifarRelease:
    """One published CIFAR archive.

    Attributes:
        name: Registry name.
        folder: Folder name inside the archive.
        archive: Archive file name.
        archive_md5: Published MD5 of the archive.
        train: `(file name, md5)` of each training batch, in order.
        test: `(file name, md5)` of each test batch.
        label_key: Key of the labels in each batch's dict.
        num_classes: Number of labels.
    """

    name: str
    folder: str
    archive: str
    archive_md5: str
    train: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]
    label_key: str
    num_classes: int

    @property
    def how(self) -> tuple[str, ...]:
        """How to obtain the files, for the error message."""
        return (
            f"download {_MIRRORS[0]}{self.archive} (md5 {self.archive_md5}) into the first folder "
            f"(or extract it there, giving {self.folder}/)",
            f"then run crossbow_jax.data.prepare('{self.name}') or load again",
        )


CIFAR10 = CifarRelease(
    name="cifar10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    archive_md5="c58f30108f718f92721af3b95e74349a",
    train=(
        ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
        ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
        ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
        ("data_batch_4", "634d18415352ddfa80567beed471001a"),
        ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
    ),
    test=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
    label_key="labels",
    num_classes=10,
)

CIFAR100 = CifarRelease(
    name="cifar100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    train=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
    test=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    label_key="fine_labels",
    num_classes=100,
)

RELEASES = {r.name: r for r in (CIFAR10, CIFAR100)}


def decode_batch(
    blob: bytes, label_key: str, num_classes: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes one pickled batch.

    Args:
        blob: The file's bytes: a pickled dict with `data` (`uint8`
            `(N, 3072)`, each row the 1024 red, then green, then blue values
            of a 32x32 image in row-major order) and the labels under
            `label_key`.
        label_key: `"labels"` (CIFAR-10) or `"fine_labels"` (CIFAR-100).
        num_classes: Labels must lie in `[0, num_classes)`.
        what: Names the file in error messages.

    Returns:
        Images `uint8 (N, 32, 32, 3)` and labels `int32 (N,)`.

    Raises:
        DatasetError: The batch is malformed.
    """
    batch = _fetch.load_pickle(blob, what)
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise DatasetError(f"{what}: not a CIFAR batch (needs the keys 'data' and {label_key!r})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{what}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{what}: {len(data)} images but labels of shape {labels.shape}, dtype {labels.dtype}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{what}: labels outside [0, {num_classes})")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def encode_batch(images: np.ndarray, labels: np.ndarray, label_key: str = "labels") -> dict:
    """Returns the batch dict for `uint8 (N, 32, 32, 3)` images (inverse of `decode_batch`).

    Pickle the result (any protocol) to get a file in the CIFAR format.
    """
    data = np.ascontiguousarray(np.asarray(images, np.uint8).transpose(0, 3, 1, 2)).reshape(
        len(images), -1
    )
    return {"data": data, label_key: [int(v) for v in labels]}


def _read_batches(read: Callable[[str], bytes], release: CifarRelease, verify: bool, where: str):
    arrays = {}
    for split, files in (("train", release.train), ("test", release.test)):
        parts = []
        for filename, md5 in files:
            what = f"{where}/{filename}"
            blob = read(filename)
            if verify:
                _fetch.verify_digest(blob, md5, what, algorithm="md5")
            parts.append(decode_batch(blob, release.label_key, release.num_classes, what))
        arrays[f"{split}_images"] = np.concatenate([p[0] for p in parts])
        arrays[f"{split}_labels"] = np.concatenate([p[1] for p in parts])
    return arrays


def _batch_dir(folder: Path, release: CifarRelease) -> Path | None:
    names = [f for f, _ in release.train + release.test]
    for place in (folder / release.folder, folder):
        if all((place / n).is_file() for n in names):
            return place
    return None


def read_archive(path: Path, release: CifarRelease, *, verify: bool) -> dict[str, np.ndarray]:
    """Reads the batches straight out of the `.tar.gz` archive.

    Raises:
        DatasetError: The archive fails its MD5 (when `verify`), is
            truncated or corrupt, or lacks a batch.
    """
    if verify:
        _fetch.verify_digest(path, release.archive_md5, str(path), algorithm="md5")
    wanted = {f"{release.folder}/{f}" for f, _ in release.train + release.test}
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    members[member.name.rsplit("/", 1)[1]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DatasetError(
            f"{path}: truncated or corrupt archive ({type(e).__name__}: {e}); it was refused"
        ) from e

    def read(filename: str) -> bytes:
        if filename not in members:
            raise DatasetError(f"{path}: archive lacks {release.folder}/{filename}")
        return members[filename]

    return _read_batches(read, release, verify, str(path))


def load(
    name: str, folder: Path, *, download: bool, verify: bool
) -> tuple[dict[str, np.ndarray], str]:
    """Finds or fetches CIFAR-10 or CIFAR-100 (see the module docstring).

    Args:
        name: `"cifar10"` or `"cifar100"`.
        folder: `<data_dir>/<name>/`, searched first and downloaded into.
        download: Whether the archive may be downloaded.
        verify: Check the published MD5s of local files (downloads are always checked).

    Returns:
        The arrays and a description of where they came from.

    Raises:
        DatasetError: Nothing usable was found or fetched, or a file was refused.
    """
    release = RELEASES[name]
    place = _batch_dir(folder, release)
    if place is not None:
        return _read_batches(
            lambda f: (place / f).read_bytes(), release, verify, str(place)
        ), f"batches in {place}"
    archive = folder / release.archive
    tried: list[str] = []
    if not archive.is_file() and download:

        def check(path: Path) -> None:
            _fetch.verify_digest(
                path, release.archive_md5, f"downloaded {release.archive}", algorithm="md5"
            )

        tried = _fetch.download_from_mirrors([(release.archive, check)], _MIRRORS, folder)
    if archive.is_file():
        return read_archive(archive, release, verify=verify), f"archive {archive}"
    searched = [folder / release.folder, folder]
    raise _fetch.missing_error(
        name, searched, f"{release.folder}/ batches or {release.archive}", release.how, tried
    )
