"""ImageNet (ILSVRC-2012) from a folder, streamed as host batches.

Supported layouts under the root folder (default `<data_dir>/imagenet/`):

* `train/<wnid>/*.JPEG`: one folder per class. The sorted folder names are
  the classes; label `i` is the `i`-th of them.
* `val/<wnid>/*.JPEG`: the same for validation, or
* `val/*.JPEG` flat, with a labels file: `labels_file=`, else the first of
  `<root>/val_labels.txt`, `<root>/val.txt`, `<root>/LOC_val_solution.csv`.
  Each line holds a file name (with or without extension) and a label
  (a wnid, or a class index), separated by whitespace or a comma; further
  fields and a header line are ignored. This reads both Caffe's `val.txt`
  and Kaggle's `LOC_val_solution.csv`.

Files ending in `.jpeg`, `.jpg` or `.png` (any case) are images. The file
listing of each split is cached in `<cache>/imagenet/` and rebuilt when a
folder's modification time changes. grain reads the files (`ImageFiles`, a
random-access source) and decodes and augments them (`Decode`) in worker
processes, ahead of the consumer.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from crossbow_jax.data import _fetch
from crossbow_jax.data._core import DatasetError, DatasetInfo
from crossbow_jax.data._imaging import decode
from crossbow_jax.data.streaming import Records, StreamedSource, batch_count, default_workers

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png"})
LABEL_FILES = ("{split}_labels.txt", "{split}.txt", "LOC_{split}_solution.csv")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
HOW = (
    "ImageNet cannot be downloaded automatically: register at https://image-net.org, "
    "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
    "extract the training set as <root>/train/<wnid>/*.JPEG "
    "(one tar per class inside the main tar)",
    "extract validation as <root>/val/<wnid>/*.JPEG, or flat as <root>/val/*.JPEG "
    "plus <root>/val_labels.txt ('<file> <wnid>' per line)",
)


@dataclasses.dataclass(frozen=True)
class ImageIndex:
    """The listing of one split.

    Attributes:
        split_dir: Folder of the split.
        paths: File paths relative to `split_dir`.
        labels: `int32` label of each file.
        classes: Class names (wnids); label `i` means `classes[i]`.
    """

    split_dir: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]


def _images_in(folder: Path) -> list[str]:
    return sorted(
        e.name
        for e in os.scandir(folder)
        if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS
    )


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def _labels_file(root: Path, split: str, given: str | os.PathLike | None) -> Path:
    if given is not None:
        return Path(given)
    for pattern in LABEL_FILES:
        if (root / pattern.format(split=split)).is_file():
            return root / pattern.format(split=split)
    names = ", ".join(str(root / p.format(split=split)) for p in LABEL_FILES)
    raise DatasetError(
        f"{root / split} holds images directly but no labels file was found (looked for {names})"
    )


def _read_labels(path: Path, classes: list[str] | None) -> tuple[dict[str, int], list[str]]:
    rows = []
    for line in path.read_text().splitlines():
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        if len(fields) >= 2 and fields[0] != "ImageId":
            rows.append((Path(fields[0]).stem, fields[1]))
    if not rows:
        raise DatasetError(f"{path}: no '<file> <label>' lines")
    if classes is None:
        classes = sorted({label for _, label in rows if not label.isdigit()})
    lookup = {c: i for i, c in enumerate(classes)}
    labels = {}
    for stem, label in rows:
        index = int(label) if label.isdigit() else lookup.get(label)
        if index is None or (classes and index >= len(classes)):
            raise DatasetError(
                f"{path}: label {label!r} of {stem} is not one of the {len(classes)} classes"
            )
        labels[stem] = index
    if not classes:  # class indices only, and no train/ folder to name them
        classes = [str(i) for i in range(max(labels.values()) + 1)]
    return labels, classes


def build_index(root: Path, split: str, labels_file: str | os.PathLike | None = None) -> ImageIndex:
    """Lists one split of an ImageNet-style folder (see the module docstring).

    Raises:
        DatasetError: The split folder is missing, empty, has class folders
            unknown to `train/`, or has images without labels.
    """
    split_dir = root / split
    if not split_dir.is_dir():
        raise _fetch.missing_error("imagenet", [split_dir], f"the {split} split", HOW, [])
    train_classes = _subdirs(root / "train") if (root / "train").is_dir() else None
    subdirs = _subdirs(split_dir)
    paths: list[str] = []
    labels: list[int] = []
    if subdirs:
        classes = train_classes or subdirs
        unknown = sorted(set(subdirs) - set(classes))
        if unknown:
            raise DatasetError(
                f"{split_dir}: class folders {unknown[:5]} are not in {root / 'train'}"
            )
        for index, name in enumerate(classes):
            if (split_dir / name).is_dir():
                files = _images_in(split_dir / name)
                paths += [f"{name}/{f}" for f in files]
                labels += [index] * len(files)
    else:
        by_stem, classes = _read_labels(_labels_file(root, split, labels_file), train_classes)
        files = _images_in(split_dir)
        missing = [f for f in files if Path(f).stem not in by_stem]
        if missing:
            raise DatasetError(
                f"{split_dir}: {len(missing)} images have no label, e.g. {missing[0]}"
            )
        paths, labels = files, [by_stem[Path(f).stem] for f in files]
    if not paths:
        raise _fetch.missing_error(
            "imagenet", [split_dir], "image files (.JPEG, .jpg, .png)", HOW, []
        )
    return ImageIndex(split_dir, tuple(paths), np.asarray(labels, np.int32), tuple(classes))


def _fingerprint(root: Path, split: str, labels_file) -> str:
    split_dir = root / split
    stamps = [(str(split_dir), split_dir.stat().st_mtime_ns)]
    for extra in (root / "train", Path(labels_file) if labels_file else None):
        if extra is not None and extra.exists():
            stamps.append((str(extra), extra.stat().st_mtime_ns))
    stamps += [(e.name, e.stat().st_mtime_ns) for e in os.scandir(split_dir) if e.is_dir()]
    return hashlib.sha256(repr(sorted(stamps)).encode()).hexdigest()


def cached_index(
    root: Path, split: str, labels_file=None, cache_dir: Path | None = None
) -> ImageIndex:
    """`build_index`, with the listing kept in `<cache_dir>/index-*.json.gz`.

    Args:
        root: ImageNet root folder.
        split: `"train"` or `"val"` (any sub-folder name works).
        labels_file: See `build_index`.
        cache_dir: Where listings are kept; default `<cache>/imagenet/`.
    """
    root = Path(root).expanduser().resolve()
    if not (root / split).is_dir():
        return build_index(root, split, labels_file)  # raises the missing-data error
    cache_dir = Path(cache_dir) if cache_dir is not None else _fetch.dataset_dir("imagenet", None)
    key = hashlib.sha256(f"{root}\0{split}".encode()).hexdigest()[:16]
    path = cache_dir / f"index-{split}-{key}.json.gz"
    fingerprint = _fingerprint(root, split, labels_file)
    if path.is_file():
        try:
            data = json.loads(gzip.decompress(path.read_bytes()))
            if data["fingerprint"] == fingerprint:
                return ImageIndex(
                    root / split,
                    tuple(data["paths"]),
                    np.asarray(data["labels"], np.int32),
                    tuple(data["classes"]),
                )
        except (OSError, EOFError, ValueError, KeyError):
            pass  # a stale or damaged listing is rebuilt
    index = build_index(root, split, labels_file)
    payload = {
        "fingerprint": fingerprint,
        "paths": index.paths,
        "labels": index.labels.tolist(),
        "classes": index.classes,
    }
    with _fetch.atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(json.dumps(payload).encode(), mtime=0))
    return index


class ImageFiles:
    """A split's files as a random-access source: record `i` is `(path, label)`.

    Attributes:
        num_classes: the class count (the engine reads it to size a named model).
    """

    def __init__(self, index: ImageIndex):
        self.index, self.num_classes = index, len(index.classes)

    def __len__(self) -> int:
        return len(self.index.paths)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return str(self.index.split_dir / self.index.paths[i]), int(self.index.labels[i])


@dataclasses.dataclass(frozen=True)
class Decode:
    """The transform of `ImageFiles` records: `((path, label), rng) -> (uint8 image, label)`;
    a random-resized crop and flip when `crop="random"` and an `rng` is given (training),
    else a center crop after scaling the shorter side to `resize`."""

    image_size: int
    crop: str
    resize: int

    def __call__(self, record: tuple[str, int], rng: np.random.Generator | None = None):
        path, label = record
        crop = self.crop if rng is not None else "center"
        image = decode(Path(path), image_size=self.image_size, crop=crop,
                       resize=self.resize or None, rng=rng)  # fmt: skip
        return image, np.int32(label)


class ImageNetSource:
    """Host batches of an ImageNet split: `(uint8 (B, S, S, 3), int32 (B,))`, decoded and
    augmented by grain worker processes (`crossbow_jax.data.streaming`).

    Args:
        root: Root folder (see the module docstring).
        split: Sub-folder to read, `"train"` or `"val"`.
        batch_size: Images per batch.
        image_size: Output side `S`.
        crop: `"random"` (random-resized crop and flip; default for
            `"train"`) or `"center"` (default otherwise).
        resize: With `crop="center"`, the shorter side is scaled to this
            first; default `round(image_size / 0.875)` (256 for 224). `0`
            scales only when the image is smaller than `image_size`.
        shuffle: Shuffle each epoch (default: for `"train"` only).
        drop_remainder: Drop the last, smaller batch (default: for `"train"`).
        seed: Fixes shuffling and random crops: epoch `e` is the same on
            every run, whatever the number of workers.
        num_workers: grain worker processes that decode (0: threads of this
            process; default: the CPU count less one, at most 8; 0 on 2 cores).
        labels_file: For a flat validation folder (see the module docstring).
        cache_dir: Where the file listing is cached.
    """

    def __init__(
        self,
        root,
        split="train",
        *,
        batch_size=256,
        image_size=224,
        crop=None,
        resize=None,
        shuffle=None,
        drop_remainder=None,
        seed=0,
        num_workers=None,
        labels_file=None,
        cache_dir=None,
    ):
        is_train = split == "train"
        self.crop = crop or ("random" if is_train else "center")
        if self.crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        if batch_size < 1 or image_size < 1:
            raise ValueError("batch_size and image_size must be positive")
        self.index = cached_index(Path(root), split, labels_file, cache_dir)
        self.batch_size, self.image_size = int(batch_size), int(image_size)
        self.resize = round(image_size / 0.875) if resize is None else int(resize)
        self.shuffle = is_train if shuffle is None else bool(shuffle)
        self.drop_remainder = is_train if drop_remainder is None else bool(drop_remainder)
        self.seed = int(seed)
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        self.files = ImageFiles(self.index)
        self.decode = Decode(self.image_size, self.crop, self.resize)

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names; label `i` means `classes[i]`."""
        return self.index.classes

    @property
    def info(self) -> DatasetInfo:
        """The `DatasetInfo` of the batches (augmentation is done here, so `augment=None`)."""
        size = self.image_size
        return DatasetInfo("imagenet", len(self.classes), (size, size, 3), MEAN, STD, None, None)

    def __len__(self) -> int:
        """Number of images in the split."""
        return len(self.index.paths)

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        return batch_count(len(self), self.batch_size, self.drop_remainder)

    def stream(self) -> StreamedSource:
        """The grain pipeline of this split's batches (one pipeline across epochs)."""
        return StreamedSource(
            Records(self.files, self.decode), self.batch_size, self.seed,
            workers=self.num_workers, shuffle=self.shuffle, training=self.crop == "random",
            drop_remainder=self.drop_remainder,
        )  # fmt: skip

    def epoch(
        self, epoch: int = 0, start_batch: int = 0, *, start_image: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields the batches of one pass over the split.

        Args:
            epoch: Selects the shuffle order and random crops.
            start_batch: Skip the batches before this one (to resume mid-epoch).
            start_image: Skip this many images of the pass instead (batches then
                begin there; used when a run changes its batch mid-epoch).
        """
        stream = self.stream()
        try:
            yield from stream.epoch(epoch, start_batch, start_image=start_image)
        finally:
            stream.close()

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields batches endlessly, epoch 0, 1, 2, ... from one pipeline."""
        stream, epoch = self.stream(), 0
        try:
            while True:
                yield from stream.epoch(epoch)
                epoch += 1
        finally:
            stream.close()


def load_imagenet(root=None, split="train", *, data_dir=None, **options) -> ImageNetSource:
    """Opens an ImageNet split for streaming.

    Args:
        root: Root folder; default `<data_dir>/imagenet/`.
        split: `"train"` or `"val"`.
        data_dir: Cache root (see `crossbow_jax.data.default_cache_dir`);
            also where the file listing is cached.
        **options: Passed to `ImageNetSource` (batch_size, image_size, ...).

    Raises:
        DatasetError: The folder is missing or malformed; the message says
            how to obtain and lay out ImageNet.
    """
    folder = _fetch.dataset_dir("imagenet", data_dir)
    options.setdefault("cache_dir", folder)
    return ImageNetSource(Path(root) if root is not None else folder, split, **options)
