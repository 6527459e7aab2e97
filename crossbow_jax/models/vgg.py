"""VGG-16 for 32x32 input (CIFAR), with BatchNorm and a dropout classifier.

Architecture for a 32x32x3 input; every convolution is 3x3, stride 1, SAME
padding, no bias, followed by BatchNorm and ReLU; "M" is a 2x2/2 max-pool:

    64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M
    flatten (1x1x512 -> 512)
    dropout -> dense 512 -> ReLU -> dropout -> dense num_classes

The 13 convolutions are those of Simonyan & Zisserman's configuration D; the
ImageNet classifier (two 4096-wide layers) is replaced by the small one above,
as is usual on CIFAR. 15,032,868 parameters with 100 classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from crossbow_jax.models import _layers

VGG16_LAYERS: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
    512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
"""VGG configuration D: channel counts of the 3x3 convolutions, "M" = max-pool."""


class VGG(nn.Module):
    """VGG with BatchNorm and a dropout classifier (VGG-16 by default).

    Attributes:
        num_classes: number of output logits.
        dtype: compute dtype (parameters are float32 whatever it is).
        layers: convolution widths and "M" max-pools, in order.
        hidden: width of the hidden classifier layer.
        dropout_rate: dropout rate before each classifier dense layer.
    """

    num_classes: int = 100
    dtype: _layers.Dtype = jnp.float32
    layers: Sequence[int | str] = VGG16_LAYERS
    hidden: int = 512
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: _layers.Array, train: bool = False) -> _layers.Array:
        """Returns float32 logits of shape `(batch, num_classes)`.

        Args:
            x: float images, NHWC.
            train: batch statistics and dropout (needs the `'dropout'` rng) if
                true, running statistics and no dropout otherwise.
        """
        x = _layers.to_compute(x, self.dtype)
        for layer in self.layers:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = _layers.conv(int(layer), 3, dtype=self.dtype)(x)
                x = nn.relu(_layers.batch_norm(train, dtype=self.dtype)(x))
        x = x.reshape((x.shape[0], -1))
        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        x = nn.relu(_layers.dense(self.hidden, dtype=self.dtype)(dropout(x)))
        x = _layers.dense(self.num_classes, dtype=self.dtype)(dropout(x))
        return _layers.as_logits(x)
