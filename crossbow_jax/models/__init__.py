"""The paper's models in Flax Linen, selectable by name.

Every model is a `flax.linen.Module` with fields `num_classes` and `dtype`,
called as `model.apply(variables, x, train=False)` on float NHWC images; it
returns float32 logits. BatchNorm statistics live in the `batch_stats`
collection; dropout uses the `'dropout'` rng in training mode.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> from crossbow_jax import models
    >>> model = models.get_model("lenet")
    >>> spec = models.MODELS["lenet"]
    >>> x = jnp.zeros((2, *spec.input_shape))
    >>> variables = model.init(jax.random.key(0), x)
    >>> model.apply(variables, x).shape
    (2, 10)
"""

from crossbow_jax.models._registry import (
    DTYPES,
    MODELS,
    ModelSpec,
    get_model,
    get_spec,
    model_names,
    resolve_dtype,
)
from crossbow_jax.models.lenet import LeNet
from crossbow_jax.models.resnet import BasicBlock, BottleneckBlock, CifarResNet, ImageNetResNet
from crossbow_jax.models.stats import (
    ModelRow,
    flops_per_image,
    format_model_table,
    model_table,
    param_count,
    variable_shapes,
)
from crossbow_jax.models.vgg import VGG

__all__ = [
    "DTYPES",
    "MODELS",
    "BasicBlock",
    "BottleneckBlock",
    "CifarResNet",
    "ImageNetResNet",
    "LeNet",
    "ModelRow",
    "ModelSpec",
    "VGG",
    "flops_per_image",
    "format_model_table",
    "get_model",
    "get_spec",
    "model_names",
    "model_table",
    "param_count",
    "resolve_dtype",
    "variable_shapes",
]
