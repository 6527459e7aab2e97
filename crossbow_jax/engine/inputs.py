"""Resolve what the user passed (names or arrays) into a model and checked arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from crossbow_jax import models
from crossbow_jax.data.preprocess import AUGMENTATIONS, Preprocess, for_arrays, pixels
from crossbow_jax.data.streaming import is_source
from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.dtypes import CHANNELS, as_engine_dtype, as_model_layout
from crossbow_jax.engine.mapping import free_bytes, make_mesh, select_devices
from crossbow_jax.engine.sources import SourceOptions, named_stream, resolve_sources
from crossbow_jax.models.adapters import Model, ModelError, as_model


@dataclasses.dataclass(frozen=True)
class Arrays:
    """Training and test arrays in the layout the engine uses (NHWC or (N, F))."""

    name: str
    train_x: np.ndarray | None  # None for a streamed data set
    train_y: np.ndarray | None
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    num_classes: int | None  # of integer labels: the largest + 1; None for other labels
    preprocess: Preprocess
    num_train: int = 0
    example: np.ndarray | None = None  # one stored example, shape (1, ...)
    label_example: np.ndarray | None = None  # one label, shape (1, ...)
    stream: Callable[[int, int], Any] | None = None  # (images per step, seed) -> Source
    test_stream: Callable[[int], Any] | None = None  # batch size -> Source of the test split
    train_sample: tuple | None = None  # streamed: (inputs, labels, record indices) checked
    test_sample: tuple | None = None
    declared_classes: int | None = None  # a source's own class count (num_classes, ClassLabel)

    def __post_init__(self):
        if self.train_x is not None:
            object.__setattr__(self, "num_train", len(self.train_x))
            object.__setattr__(self, "example", self.train_x[:1])
            object.__setattr__(self, "label_example", self.train_y[:1])
        elif self.label_example is None:  # streamed: integer class labels
            object.__setattr__(self, "label_example", np.zeros((1,), np.int32))

    @property
    def has_test(self) -> bool:
        return self.test_x is not None or self.test_stream is not None


def _pair(value: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """User arrays as the engine keeps them: inputs (N, ...) and labels (N, ...)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(
            f"{what} must be a dataset name, a pair (inputs, labels) or a data source (with "
            f"__len__ and __getitem__), got {type(value).__name__}"
        )
    x, y = np.asarray(value[0]), np.asarray(value[1])
    x = as_model_layout(x)
    if x.ndim == 4 and x.shape[1] in CHANNELS and x.shape[3] not in CHANNELS:
        raise ConfigError(
            f"{what} inputs look channels-first (N, C, H, W) = {x.shape}; crossbow_jax "
            "expects NHWC: pass x.transpose(0, 2, 3, 1)"
        )
    if x.ndim < 2:
        raise ConfigError(
            f"{what} inputs have shape {x.shape}; use (N, H, W, C) images, (N, features) "
            "or any (N, ...) array"
        )
    if y.ndim < 1 or len(y) != len(x):
        raise ConfigError(
            f"{what} labels have shape {y.shape} for {len(x)} examples; "
            "pass one label (or label array) per example"
        )
    if len(x) == 0:
        raise ConfigError(f"{what} set is empty")
    return as_engine_dtype(x, what, "inputs"), as_engine_dtype(y, what, "labels")


def resolve_data(
    train: Any,
    test: Any,
    *,
    data_dir: str | None = None,
    augment: str | None = None,
    unscaled_images: bool = False,
    sources: SourceOptions | None = None,
) -> Arrays:
    """Loads a named dataset, checks user arrays or reads a source; fails before any work.

    Both splits of user arrays go through the one `Preprocess` made from the
    training split (`for_arrays`), so they must agree in dtype and scale
    (`check_same_scale`); float images at 0..255 are refused unless
    `unscaled_images`. A random-access source (`sources.resolve_sources`) is read
    whole into arrays or streamed, as `sources` says.
    """
    sources = sources or SourceOptions(None, None, "auto")
    if is_source(train) or is_source(test):
        if not is_source(train):
            raise ConfigError(
                f"test is a {type(test).__name__} source but train is not: pass the training "
                "data as a source too (or both as (inputs, labels) arrays)"
            )
        return resolve_sources(train, test, sources, lambda tr, te: resolve_data(
            tr, te, augment=augment, unscaled_images=unscaled_images))  # fmt: skip
    if sources.transform is not None:
        raise ConfigError(
            "transform= applies to the records of a data source (an object with __len__ and "
            "__getitem__); transform arrays or a named data set before passing them"
        )
    if isinstance(train, str):
        from crossbow_jax import data as datasets

        if test is not None and not isinstance(test, str):
            raise ConfigError("train is a dataset name, so test must be None or the same name")
        if isinstance(test, str) and test != train:
            raise ConfigError(
                f"test={test!r} differs from train={train!r}; a named dataset "
                "brings its own test split"
            )
        if unscaled_images:
            raise ConfigError(
                f"unscaled_images=True is for float image arrays; the data set {train!r} "
                "is uint8 pixels, scaled and normalised for you: leave it False"
            )
        spec = datasets.DATASETS.get(train)
        if spec is not None and spec.kind == "stream":
            return named_stream(train, data_dir, sources, lambda tr, te: resolve_data(tr, te))
        ds = datasets.load_dataset(train, data_dir=data_dir)
        info = ds.info
        pre = pixels(info.mean, info.std, augment or info.augment)
        return Arrays(
            info.name,
            ds.train_images,
            ds.train_labels.astype(np.int32),
            ds.test_images,
            ds.test_labels.astype(np.int32),
            info.num_classes,
            pre,
        )

    x, y = _pair(train, "train")
    tx = ty = None
    if isinstance(test, str):
        raise ConfigError(_NAMED_TEST.format(name=test))
    if test is not None:
        tx, ty = _pair(test, "test")
        if tx.shape[1:] != x.shape[1:]:
            raise ConfigError(
                f"test examples have shape {tx.shape[1:]} but train examples "
                f"have {x.shape[1:]}; both sets need the same shape"
            )
        if ty.shape[1:] != y.shape[1:]:  # e.g. (N, 1) against (N,): evaluation would not compile
            raise ConfigError(
                f"test labels have shape {ty.shape} but train labels have {y.shape}; both sets "
                f"need the same label shape per example (reshape the test labels to "
                f"{(len(ty), *y.shape[1:])})"
            )
    check_same_scale(x, tx, unscaled_images)
    num_classes = None  # of integer train labels: the largest + 1 (for the named models)
    if np.issubdtype(y.dtype, np.integer):
        num_classes = int(y.max()) + 1
    if augment is not None and augment not in AUGMENTATIONS:
        choices = ", ".join(repr(a) for a in (None, *AUGMENTATIONS))
        raise ConfigError(f"augment={augment!r} is not one of {choices}")
    if augment and x.ndim != 4:
        raise ConfigError("augment='crop_flip' needs (N, H, W, C) images")
    return Arrays("arrays", x, y, tx, ty, num_classes, for_arrays(x, augment))


_NAMED_TEST = (
    "test={name!r} is a string, but train is arrays: a named data set brings its own test "
    "split only with its own training split (train={name!r}); for arrays pass "
    "test=(inputs, labels), e.g. ds = crossbow_jax.data.load_dataset({name!r}) and "
    "test=(ds.test_images, ds.test_labels)"
)


def check_same_scale(x: np.ndarray, tx: np.ndarray | None, unscaled_images: bool) -> None:
    """Refuses splits that one preprocessing would scale apart, and float images at 0..255.

    The preprocessing is chosen by the training inputs' dtype (uint8: scaled by 1/255 and
    normalised; others: used as they are) and applied to both splits.

    Raises:
        ConfigError: dtypes that differ; float splits whose spans differ over 50-fold;
            float (N, H, W, C) images with values beyond 0..1.5 and none below 0
            (pixels not divided by 255), unless `unscaled_images`; `unscaled_images`
            for inputs that are not float images.
    """
    if tx is not None and tx.dtype != x.dtype:
        raise ConfigError(
            f"train inputs are {_scale(x)} but test inputs are {_scale(tx)}; one "
            "preprocessing, chosen by the train inputs, serves both splits: give them the "
            "same dtype and scale (e.g. both uint8, or both x.astype(np.float32) / 255)"
        )
    floats = np.issubdtype(x.dtype, np.floating)
    images = x.ndim == 4 and x.shape[-1] in CHANNELS
    if unscaled_images and not (floats and images):
        raise ConfigError(
            f"unscaled_images=True is for float (N, H, W, C) images, but the train inputs "
            f"are {x.dtype} of shape {x.shape}; leave it False"
        )
    if not floats:
        return
    ranges = {split: (float(v.min()), float(v.max())) for split, v in (("train", x), ("test", tx))
              if v is not None and v.size}  # fmt: skip
    if not np.isfinite(list(ranges.values())).all():
        return  # NaN or infinity: `checks.check_values` names the row
    for split, (low, high) in ranges.items():
        if images and not unscaled_images and low >= 0 and high > 1.5:
            raise ConfigError(
                f"{split} inputs are float images with values {low:g}..{high:g}, used as "
                "they are: pixels at 0..255 train to chance; pass x / 255.0 (or uint8 pixels, "
                "scaled and normalised for you), or unscaled_images=True if the model "
                "scales them itself"
            )
    spans = [high - low for low, high in ranges.values()]
    if len(spans) == 2 and min(spans) > 0 and max(spans) > 50 * min(spans):
        (a, b), (c, d) = ranges.values()
        raise ConfigError(
            f"train inputs span {a:g}..{b:g} but test inputs {c:g}..{d:g}, "
            f"{max(spans) / min(spans):.0f}x apart; both are used as they are: give them the "
            "same scale (e.g. divide both by 255, or neither)"
        )


def _scale(x: np.ndarray) -> str:
    if x.dtype == np.uint8:
        return "uint8 (pixels: scaled by 1/255, then normalised)"
    if np.issubdtype(x.dtype, np.floating) and x.size:
        return f"{x.dtype} (used as they are; values {x.min():g}..{x.max():g})"
    return f"{x.dtype}"


def resolve_model(
    model: Any, num_classes: int | None, dtype: str, mode_keyword: str | None = None
) -> Model:
    """The adapter of a model name, a Linen or NNX module, or `(apply_fn, params)`.

    Raises:
        ConfigError: another kind of model, a mode keyword it does not take, or
            a `dtype` other than float32 for a model that is not a name (set
            your own model's dtype in the model).
    """
    if isinstance(model, str):
        if mode_keyword is not None:
            raise ConfigError(
                f"mode_keyword={mode_keyword!r} is for models of your own; the named model "
                f"{model!r} takes train= already"
            )
        if num_classes is None:
            raise ConfigError(
                f"model {model!r} is a classifier but the labels are not class indices; "
                "pass integer labels, or a model of your own with loss_fn="
            )
        module = models.get_model(model, num_classes=num_classes, dtype=dtype)
        return dataclasses.replace(as_model(module), registry=model)
    if dtype != "float32":
        raise ConfigError(
            f"dtype={dtype!r} applies to the named models; set the dtype inside your own "
            f"model (a {type(model).__name__}) and leave dtype at float32"
        )
    try:
        return as_model(model, mode_keyword=mode_keyword)
    except ModelError as e:
        raise ConfigError(str(e)) from None


class Resolved(NamedTuple):
    """What the user passed, resolved: the module, the checked data, the device mesh."""

    model: Model
    data: Arrays
    mesh: Any


def resolve_hosts(config: TrainConfig) -> int:
    """The mesh's hosts: `config.hosts`, else the processes for hierarchical, else 1.

    Raises:
        ConfigError: hierarchical with one host (it would be plain SMA).
    """
    if config.hosts is not None:
        return config.hosts
    if config.algorithm != "hierarchical":
        return 1
    if jax.process_count() == 1:
        raise ConfigError(
            "algorithm='hierarchical' runs DiLoCo across hosts, and this is one process: set "
            "hosts=2 (or more) to split the local devices into simulated hosts, or start "
            "several processes (docs/usage.md)"
        )
    return jax.process_count()


def resolve(
    config: TrainConfig,
    model: Any,
    train: Any,
    test: Any = None,
    *,
    data_dir: str | None = None,
    augment: str | None = None,
    transform: Callable | None = None,
) -> Resolved:
    """Resolves a model (or its name), the data (or a data set name) and the devices.

    Selects `config.num_devices` devices into a mesh of `resolve_hosts(config)`
    hosts, loads and checks the data (`resolve_data`), and builds the module for
    the data's classes and the config's dtype. Nothing is placed on a device yet.
    """
    # The devices and hosts first: a wrong count fails before a data set is loaded.
    mesh = make_mesh(select_devices(config.num_devices), hosts=resolve_hosts(config))
    sources = SourceOptions(transform, config.data_workers, config.data_placement,
                            free_bytes(mesh))  # fmt: skip
    data = resolve_data(train, test, data_dir=data_dir, augment=augment,
                        unscaled_images=config.unscaled_images, sources=sources)  # fmt: skip
    if isinstance(model, str) and data.train_sample is not None and not data.declared_classes:
        raise ConfigError(
            f"model {model!r} is sized by the number of classes, which the streamed "
            f"{data.name} does not declare: give the source a num_classes attribute"
        )
    module = resolve_model(model, data.num_classes, config.dtype, config.mode_keyword)
    if isinstance(model, str) and data.example.ndim != 4:
        shape = models.get_spec(model).input_shape
        raise ConfigError(
            f"model {model!r} takes (N, H, W, C) images (it is built for {shape}), but the "
            f"train inputs have shape (N, {', '.join(map(str, data.example.shape[1:]))}); "
            f"reshape them, e.g. x.reshape(-1, {', '.join(map(str, shape))})"
        )
    return Resolved(module, data, mesh)
