"""How the engine keeps user data: inputs laid out as the models take them, numbers in
the dtypes the programs are compiled for (uint8 pixels, int32, float32)."""

from __future__ import annotations

import numpy as np

from crossbow_jax.engine.options import ConfigError

CHANNELS = (1, 3, 4)  # the channel counts of images (grey, RGB, RGBA)


def as_model_layout(x: np.ndarray) -> np.ndarray:
    """Inputs as the engine lays them out: (N, H, W) uint8 images get their channel axis;
    anything else stays as it is."""
    return x[..., None] if x.ndim == 3 and x.dtype == np.uint8 else x


def as_engine_dtype(a: np.ndarray, what: str = "fed", part: str = "labels") -> np.ndarray:
    """uint8 stays uint8 (pixels); other integers become int32, floats and bools float32.

    Raises:
        ConfigError: an integer outside int32 (it would wrap: 2**32 + 1 becomes 1).
    """
    if a.dtype == np.uint8 and part == "inputs":
        return a
    if np.issubdtype(a.dtype, np.integer):
        _fits_int32(a, what, part)
        return a.astype(np.int32, copy=False)
    if np.issubdtype(a.dtype, np.floating) or a.dtype == bool:
        return a.astype(np.float32, copy=False)
    raise ConfigError(f"{what} {part} have dtype {a.dtype}; pass numbers")


def _fits_int32(a: np.ndarray, what: str, part: str) -> None:
    """Refuses integers that int32 cannot hold, naming the first such row and its value."""
    if np.can_cast(a.dtype, np.int32) or a.size == 0:
        return
    low, high = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    if a.min() >= low and a.max() <= high:
        return
    outside = ((a < low) | (a > high)).reshape(len(a), -1)
    row = int(np.argmax(outside.any(axis=1)))
    value = a.reshape(len(a), -1)[row][outside[row]][0]
    fix = ("renumber the classes 0..C-1 (e.g. np.unique(labels, return_inverse=True)[1])"
           if part == "labels" else "pass them as floats or as smaller integers")  # fmt: skip
    raise ConfigError(
        f"{what} {part} row {row} holds {value}, outside int32 ({low}..{high}), in which the "
        f"engine keeps integers; {fix}"
    )
