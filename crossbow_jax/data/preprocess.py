"""Input preprocessing on the device: stored pixels -> model input, and augmentation.

The training set stays on the device as stored (uint8 pixels stay uint8);
each step casts, scales, normalises and, for CIFAR-style data, crops and
flips its own batches with a `Preprocess`. Evaluation applies the same
`Preprocess` without augmentation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AUGMENTATIONS = ("crop_flip",)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Turns stored pixels into model input on the device.

    Attributes:
        scale: 1/255 for uint8 pixels; None for features used as they are (floats
            as float32, integers such as token ids as integers).
        mean, std: per-channel normalisation after scaling (None: none).
        augment: "crop_flip" or None; applied only when a key is given (training).
    """

    scale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    augment: str | None

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        if self.scale is not None or not jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(jnp.float32)  # integer inputs without a scale (token ids) stay integers
        if self.scale is not None:
            x = x * self.scale
        if self.mean is not None:
            x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
        if self.augment == "crop_flip" and key is not None:
            x = crop_flip(x, key)
        return x


def pixels(mean, std, augment: str | None = None) -> Preprocess:
    """uint8 pixels scaled to [0, 1], then normalised with a data set's `mean` and `std`."""
    return Preprocess(1 / 255, tuple(mean), tuple(std), augment)


def for_arrays(x: np.ndarray, augment: str | None = None) -> Preprocess:
    """The preprocessing of user arrays: uint8 images normalised with their own
    per-channel mean and standard deviation; other inputs used as they are."""
    if x.dtype != np.uint8:
        return Preprocess(None, None, None, augment)
    channels = x.reshape(-1, x.shape[-1]) / 255.0
    mean = tuple(float(v) for v in channels.mean(0))
    std = tuple(float(v) + 1e-8 for v in channels.std(0))
    return Preprocess(1 / 255, mean, std, augment)


def crop_flip(x: jax.Array, key: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop after zero padding by `pad` pixels, and a horizontal flip.

    Args:
        x: (..., H, W, C) images; each image gets its own crop and flip.
    """
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape((-1, h, w, c))
    kc, kf = jax.random.split(key)
    offsets = jax.random.randint(kc, (flat.shape[0], 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(kf, 0.5, (flat.shape[0],))
    padded = jnp.pad(flat, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, flip):
        img = lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, img[:, ::-1], img)

    return jax.vmap(one)(padded, offsets, flips).reshape(lead + (h, w, c))
