"""Layer factories shared by every model in :mod:`crossbow_jax.models`.

All models follow one mixed-precision convention: parameters are always
stored in float32 (`param_dtype`), the computation runs in the module's
`dtype` (float32 or bfloat16), and logits are cast back to float32.
BatchNorm reductions stay in float32 even under bfloat16 compute.

The factories below must be called from inside a `@nn.compact` method,
so that Flax attaches the created submodule to the calling module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any
Array = Any

PARAM_DTYPE = jnp.float32
"""Storage dtype of every parameter, whatever the compute dtype."""

BN_MOMENTUM = 0.9
"""Running-average momentum of BatchNorm (PyTorch's 0.1 in Flax convention)."""

BN_EPSILON = 1e-5

conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
"""He (Kaiming) normal initialisation over fan-out, as in He et al. 2015."""


def conv(
    features: int,
    kernel: int,
    strides: int = 1,
    *,
    dtype: Dtype,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    use_bias: bool = False,
    name: str | None = None,
) -> nn.Conv:
    """A square 2-D convolution with He initialisation and float32 params.

    Args:
        features: number of output channels.
        kernel: spatial kernel size (`kernel x kernel`).
        strides: spatial stride, the same in both dimensions.
        dtype: compute dtype.
        padding: Flax padding spec.
        use_bias: whether to add a bias (off by default: a BatchNorm follows).
        name: optional submodule name.

    Returns:
        An unbound `nn.Conv`.
    """
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        use_bias=use_bias,
        kernel_init=conv_kernel_init,
        dtype=dtype,
        param_dtype=PARAM_DTYPE,
        name=name,
    )


def batch_norm(
    train: bool,
    *,
    dtype: Dtype,
    zero_init: bool = False,
    name: str | None = None,
) -> nn.BatchNorm:
    """BatchNorm that uses batch statistics iff `train` is true.

    Running statistics live in the `batch_stats` collection and are only
    updated when `train` is true (and the collection is mutable).

    Args:
        train: training mode (batch statistics, running averages updated).
        dtype: compute dtype; reductions are done in float32 regardless.
        zero_init: initialise the scale to zero (residual-branch trick).
        name: optional submodule name.

    Returns:
        An unbound `nn.BatchNorm`.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
        dtype=dtype,
        param_dtype=PARAM_DTYPE,
        name=name,
    )


def dense(features: int, *, dtype: Dtype, name: str | None = None) -> nn.Dense:
    """A fully connected layer with float32 params and `dtype` compute."""
    return nn.Dense(features, dtype=dtype, param_dtype=PARAM_DTYPE, name=name)


def to_compute(x: Array, dtype: Dtype) -> Array:
    """Casts the model input to the compute dtype."""
    return jnp.asarray(x, dtype)


def as_logits(x: Array) -> Array:
    """Casts the final activations to float32 logits."""
    return x.astype(jnp.float32)
