"""LeNet-5-style convnet for MNIST-sized input (Caffe's `lenet`, ReLU everywhere).

Architecture for a 28x28x1 input (VALID convolutions, no BatchNorm, no dropout):

    conv 5x5, 20, stride 1  -> 24x24x20  -> ReLU
    max-pool 2x2, stride 2  -> 12x12x20
    conv 5x5, 50, stride 1  ->  8x8x50   -> ReLU
    max-pool 2x2, stride 2  ->  4x4x50
    flatten                 ->  800
    dense 500               -> ReLU
    dense num_classes       -> logits (float32)

This is the LeNet of Caffe's MNIST example, the model CROSSBOW was evaluated
with on MNIST, with a ReLU after each convolution as well. It has 431,080
parameters for 10 classes and reaches >99% test accuracy on MNIST within a few
epochs of plain SGD.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from crossbow_jax.models import _layers


class LeNet(nn.Module):
    """LeNet-5-style convnet.

    Attributes:
        num_classes: number of output logits.
        dtype: compute dtype (parameters are float32 whatever it is).
        conv_features: output channels of the two 5x5 convolutions.
        hidden: width of the hidden dense layer.
    """

    num_classes: int = 10
    dtype: _layers.Dtype = jnp.float32
    conv_features: Sequence[int] = (20, 50)
    hidden: int = 500

    @nn.compact
    def __call__(self, x: _layers.Array, train: bool = False) -> _layers.Array:
        """Returns float32 logits of shape `(batch, num_classes)`.

        Args:
            x: float images, NHWC.
            train: unused (LeNet has no BatchNorm or dropout); kept for the
                common model interface.
        """
        del train
        x = _layers.to_compute(x, self.dtype)
        for features in self.conv_features:
            x = _layers.conv(features, 5, padding="VALID", use_bias=True, dtype=self.dtype)(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_layers.dense(self.hidden, dtype=self.dtype)(x))
        x = _layers.dense(self.num_classes, dtype=self.dtype)(x)
        return _layers.as_logits(x)
