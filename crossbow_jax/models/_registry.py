"""Model registry: the paper's models by name, with their default data setup."""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from crossbow_jax.models import lenet, resnet, vgg

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
"""Accepted compute dtypes, by name."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model and the data it is meant for.

    Attributes:
        name: registry name, e.g. `"resnet32"`.
        constructor: `constructor(num_classes=..., dtype=...)` returns the
            `nn.Module`.
        input_shape: default input shape of one image, HWC.
        num_classes: default number of classes.
        dataset: name of the default dataset.
        description: one line for tables and help text.
    """

    name: str
    constructor: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    dataset: str
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("lenet", lenet.LeNet, (28, 28, 1), 10, "mnist",
                  "LeNet-5-style convnet (Caffe MNIST LeNet, ReLU)"),
        ModelSpec("resnet32", functools.partial(resnet.CifarResNet, depth=32),
                  (32, 32, 3), 10, "cifar10",
                  "CIFAR ResNet-32, option-A shortcuts (He et al. 2016)"),
        ModelSpec("vgg16", vgg.VGG, (32, 32, 3), 100, "cifar100",
                  "VGG-16 with BatchNorm, dropout classifier (CIFAR variant)"),
        ModelSpec("resnet50", resnet.ImageNetResNet, (224, 224, 3), 1000, "imagenet",
                  "ImageNet ResNet-50 v1, bottleneck [3, 4, 6, 3]"),
    )
}  # fmt: skip
"""Registered models by name, in the order of the paper's benchmarks."""


def model_names() -> tuple[str, ...]:
    """Returns the names accepted by `get_model`, in registry order."""
    return tuple(MODELS)


def get_spec(name: str) -> ModelSpec:
    """Returns the `ModelSpec` registered as `name`.

    Raises:
        ValueError: if `name` is not a registered model.
    """
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}") from None


def resolve_dtype(dtype: Any) -> Any:
    """Maps `'float32'`/`'bfloat16'` or the matching jnp/numpy dtype to a jnp dtype.

    Raises:
        ValueError: for any other value.
    """
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if not isinstance(dtype, str):
        try:
            canonical = np.dtype(dtype).name
        except (TypeError, ValueError):
            canonical = None
        if canonical in DTYPES:
            return DTYPES[canonical]
    raise ValueError(f"unsupported dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")


def _check_num_classes(num_classes: Any) -> int:
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Integral)
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def get_model(name: str, *, num_classes: int | None = None, dtype: Any = "float32") -> nn.Module:
    """Builds a registered model.

    Every model is a `flax.linen.Module` called as `model.apply(variables, x,
    train=...)` on float NHWC images and returns float32 logits. BatchNorm
    statistics (if any) live in the `batch_stats` collection; dropout (if any)
    draws from the `'dropout'` rng when `train=True`.

    Args:
        name: one of `model_names()`.
        num_classes: number of logits; defaults to the model's dataset.
        dtype: compute dtype, `'float32'` or `'bfloat16'` (or the jnp dtype).
            Parameters are stored in float32 either way.

    Returns:
        The unbound module.

    Raises:
        ValueError: for an unknown name, dtype, or a non-positive `num_classes`.

    Examples:
        >>> from crossbow_jax.models import get_model
        >>> model = get_model("resnet32", dtype="bfloat16")
        >>> model.num_classes
        10
    """
    spec = get_spec(name)
    classes = spec.num_classes if num_classes is None else _check_num_classes(num_classes)
    return spec.constructor(num_classes=classes, dtype=resolve_dtype(dtype))
