"""Parameter counts and forward FLOPs of the registered models.

Both are computed from shapes only: `jax.eval_shape` of `model.init` for the
variables, and XLA's cost analysis of the compiled eval-mode forward pass for
the FLOPs, so no weights or activations are ever allocated.

FLOP convention: XLA counts a multiply-add as 2 FLOPs and also counts the
element-wise work (BatchNorm, ReLU, residual adds, pooling), so its figures
are a little more than twice the "multiply-accumulate" counts quoted in
papers (ResNet-50: ~4.1 GMACs, ~8.2 GFLOPs here).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from crossbow_jax.models import _registry


class ModelRow(NamedTuple):
    """One row of `model_table`.

    Attributes:
        name: registry name.
        params: number of trainable parameters (the `params` collection).
        flops_per_image: forward FLOPs per image, XLA convention (see module doc).
        input_shape: input shape of one image, HWC.
    """

    name: str
    params: int
    flops_per_image: float
    input_shape: tuple[int, ...]


def _setup(name: str, num_classes: int | None, input_shape: Sequence[int] | None, dtype: Any):
    """Returns the model and the shape of one image (defaults from the spec)."""
    spec = _registry.get_spec(name)
    model = _registry.get_model(name, num_classes=num_classes, dtype=dtype)
    shape = tuple(int(d) for d in (spec.input_shape if input_shape is None else input_shape))
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}")
    return model, shape


def variable_shapes(
    name: str,
    *,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    dtype: Any = "float32",
) -> dict[str, Any]:
    """Returns the `jax.ShapeDtypeStruct` tree of the model's variables.

    Args:
        name: one of `model_names()`.
        num_classes: number of logits; defaults to the model's dataset.
        input_shape: HWC shape of one image; defaults to the model's dataset.
        dtype: compute dtype (parameters are float32 regardless).
    """
    model, shape = _setup(name, num_classes, input_shape, dtype)
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))


def _count(tree: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


@functools.cache
def _param_count(name: str, num_classes: int | None, input_shape: tuple[int, ...] | None) -> int:
    variables = variable_shapes(name, num_classes=num_classes, input_shape=input_shape)
    return _count(variables.get("params", {}))


def param_count(
    name: str,
    *,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> int:
    """Number of trainable parameters (BatchNorm running statistics excluded).

    Args:
        name: one of `model_names()`.
        num_classes: number of logits; defaults to the model's dataset.
        input_shape: HWC shape of one image; only matters for models whose
            dense layers depend on it (LeNet, VGG).

    Examples:
        >>> from crossbow_jax.models import param_count
        >>> param_count("resnet32")
        464154
    """
    shape = None if input_shape is None else tuple(input_shape)
    return _param_count(name, num_classes, shape)


def _flops_of(compiled: Any) -> float:
    """Reads 'flops' from a cost analysis (a dict, or a list of dicts on old jax)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        raise RuntimeError("XLA cost analysis reported no 'flops' on this backend")
    return float(analysis["flops"])


@functools.cache
def _flops(name, num_classes, input_shape, batch_size, dtype) -> float:
    model, shape = _setup(name, num_classes, input_shape, dtype)
    variables = variable_shapes(name, num_classes=num_classes, input_shape=shape, dtype=dtype)
    x = jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return _flops_of(forward.lower(variables, x).compile()) / batch_size


def flops_per_image(
    name: str,
    *,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 1,
    dtype: Any = "float32",
) -> float:
    """Forward (eval-mode) FLOPs per image, as counted by XLA.

    The eval-mode forward pass is lowered with abstract inputs and compiled
    for the default backend; the FLOPs of its cost analysis are divided by
    `batch_size`. A multiply-add counts as 2 FLOPs (see the module doc).

    Args:
        name: one of `model_names()`.
        num_classes: number of logits; defaults to the model's dataset.
        input_shape: HWC shape of one image; defaults to the model's dataset.
        batch_size: images per compiled forward pass.
        dtype: compute dtype.

    Raises:
        RuntimeError: if the backend's cost analysis has no FLOP count.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    dtype = _registry.resolve_dtype(dtype)
    shape = None if input_shape is None else tuple(input_shape)
    return _flops(name, num_classes, shape, int(batch_size), np.dtype(dtype).name)


def model_table(names: Sequence[str] | None = None) -> list[ModelRow]:
    """Parameters and forward FLOPs per image of registered models.

    Each model is measured at its default input shape and number of classes,
    float32, batch 1, eval mode. Results are cached per process; the first
    call compiles every forward pass (ResNet-50 dominates, a few seconds).

    Args:
        names: models to include; all registered models by default.
    """
    rows = []
    for name in _registry.model_names() if names is None else names:
        spec = _registry.get_spec(name)
        rows.append(ModelRow(name, param_count(name), flops_per_image(name), spec.input_shape))
    return rows


def format_model_table(rows: Sequence[ModelRow] | None = None) -> str:
    """Renders `model_table()` rows as a fixed-width text table."""
    rows = model_table() if rows is None else rows
    header = f"{'model':<10} {'params':>12} {'GFLOPs/image':>13}  {'input (HWC)':<14} dataset"
    lines = [header]
    for row in rows:
        spec = _registry.get_spec(row.name)
        shape = "x".join(str(d) for d in row.input_shape)
        lines.append(
            f"{row.name:<10} {row.params:>12,} {row.flops_per_image / 1e9:>13.4f}  "
            f"{shape:<14} {spec.dataset}"
        )
    return "\n".join(lines)
