"""Residual networks of He et al. 2016: the CIFAR family and ImageNet ResNet-50.

`CifarResNet` (depth 6n+2; ResNet-32 is n=5) follows Section 4.2 of "Deep
Residual Learning for Image Recognition":

    conv 3x3, 16 -> BN -> ReLU                          32x32x16
    stage 1: n basic blocks, 16 channels, stride 1      32x32x16
    stage 2: n basic blocks, 32 channels, stride 2      16x16x32
    stage 3: n basic blocks, 64 channels, stride 2       8x8x64
    global average pool -> dense num_classes

A basic block is conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut,
then ReLU. Where the shape changes, the shortcut is the paper's option A
(stride-2 subsampling and zero-padded channels, parameter-free; 464,154
parameters for ResNet-32 with 10 classes) or option B (1x1 projection + BN).

`ImageNetResNet` with `stage_sizes=(3, 4, 6, 3)` is ResNet-50: a 7x7/2 stem
conv, 3x3/2 max-pool, four stages of bottleneck blocks (1x1 -> 3x3 -> 1x1 with
4x expansion, 64/128/256/512 bottleneck channels), projection shortcuts where
the shape changes, global average pool and a dense layer: 25,557,032
parameters with 1000 classes. By default the stride of a down-sampling block
sits on its 3x3 convolution (the "v1.5" placement used by torchvision, MLPerf
and the ~4.1 GMAC figure); `stride_on_3x3=False` puts it on the first 1x1
convolution as in the original Caffe model. Parameter counts are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from crossbow_jax.models import _layers

Array = _layers.Array
Dtype = _layers.Dtype

SHORTCUTS = ("A", "B")


def _zero_pad_shortcut(x: Array, features: int, strides: int) -> Array:
    """Option-A shortcut: subsample spatially, zero-pad the new channels."""
    x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class _Shortcut(nn.Module):
    """Identity, or a zero-pad (option A) / projection (option B) shortcut."""

    features: int
    strides: int
    kind: str
    dtype: Dtype

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if x.shape[-1] == self.features and self.strides == 1:
            return x
        if self.kind == "A":
            return _zero_pad_shortcut(x, self.features, self.strides)
        x = _layers.conv(self.features, 1, self.strides, dtype=self.dtype)(x)
        return _layers.batch_norm(train, dtype=self.dtype)(x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (CIFAR ResNets).

    Attributes:
        features: output channels.
        strides: stride of the first convolution (and of the shortcut).
        shortcut: "A" (zero-pad) or "B" (1x1 projection) where shapes change.
        dtype: compute dtype.
    """

    features: int
    strides: int = 1
    shortcut: str = "A"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv = functools.partial(_layers.conv, self.features, 3, dtype=self.dtype)
        norm = functools.partial(_layers.batch_norm, train, dtype=self.dtype)
        y = nn.relu(norm()(conv(self.strides)(x)))
        y = norm()(conv()(y))
        residual = _Shortcut(self.features, self.strides, self.shortcut, self.dtype)(x, train)
        return nn.relu(y + residual)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck with 4x expansion (ResNet-50 v1).

    Attributes:
        features: bottleneck channels; the block outputs `4 * features`.
        strides: spatial stride of the block.
        stride_on_3x3: put the stride on the 3x3 conv (v1.5) or the first 1x1.
        dtype: compute dtype.
    """

    features: int
    strides: int = 1
    stride_on_3x3: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv = functools.partial(_layers.conv, dtype=self.dtype)
        norm = functools.partial(_layers.batch_norm, train, dtype=self.dtype)
        s3, s1 = (self.strides, 1) if self.stride_on_3x3 else (1, self.strides)
        y = nn.relu(norm()(conv(self.features, 1, s1)(x)))
        y = nn.relu(norm()(conv(self.features, 3, s3)(y)))
        y = norm()(conv(4 * self.features, 1)(y))
        residual = _Shortcut(4 * self.features, self.strides, "B", self.dtype)(x, train)
        return nn.relu(y + residual)


def _head(x: Array, num_classes: int, dtype: Dtype) -> Array:
    """Global average pool, dense layer, float32 logits."""
    x = jnp.mean(x, axis=(1, 2))
    return _layers.as_logits(_layers.dense(num_classes, dtype=dtype)(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (ResNet-20/32/44/56/110).

    Attributes:
        num_classes: number of output logits.
        dtype: compute dtype (parameters are float32 whatever it is).
        depth: total weighted layers; must be 6n+2.
        shortcut: "A" (zero-pad, the paper's CIFAR choice) or "B" (projection).
        width: channels of the first stage; doubled at each later stage.
    """

    num_classes: int = 10
    dtype: Dtype = jnp.float32
    depth: int = 32
    shortcut: str = "A"
    width: int = 16

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Returns float32 logits of shape `(batch, num_classes)`."""
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"CifarResNet depth must be 6n+2 with n >= 1, got {self.depth}")
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}")
        blocks_per_stage = (self.depth - 2) // 6
        x = _layers.to_compute(x, self.dtype)
        x = _layers.conv(self.width, 3, dtype=self.dtype)(x)
        x = nn.relu(_layers.batch_norm(train, dtype=self.dtype)(x))
        for stage in range(3):
            for block in range(blocks_per_stage):
                x = BasicBlock(
                    self.width * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    shortcut=self.shortcut,
                    dtype=self.dtype,
                )(x, train)
        return _head(x, self.num_classes, self.dtype)


class ImageNetResNet(nn.Module):
    """ImageNet ResNet v1 with bottleneck blocks (ResNet-50 by default).

    Attributes:
        num_classes: number of output logits.
        dtype: compute dtype (parameters are float32 whatever it is).
        stage_sizes: bottleneck blocks per stage; (3, 4, 6, 3) is ResNet-50,
            (3, 4, 23, 3) ResNet-101, (3, 8, 36, 3) ResNet-152.
        width: bottleneck channels of the first stage; doubled at each stage.
        stride_on_3x3: stride placement in down-sampling blocks (see module doc).
    """

    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    stride_on_3x3: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Returns float32 logits of shape `(batch, num_classes)`."""
        x = _layers.to_compute(x, self.dtype)
        x = _layers.conv(self.width, 7, 2, padding=((3, 3), (3, 3)), dtype=self.dtype)(x)
        x = nn.relu(_layers.batch_norm(train, dtype=self.dtype)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, size in enumerate(self.stage_sizes):
            for block in range(size):
                x = BottleneckBlock(
                    self.width * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    stride_on_3x3=self.stride_on_3x3,
                    dtype=self.dtype,
                )(x, train)
        return _head(x, self.num_classes, self.dtype)
