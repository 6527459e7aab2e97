"""Decoding one image file into a fixed-size `uint8` RGB array (PIL)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from crossbow_jax.data._core import DatasetError

# Inception-style random-resized-crop ranges (as in the ResNet-50 recipes).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def _resize_shorter(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return image.resize(new, Image.Resampling.BILINEAR)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Returns the `(left, top, right, bottom)` of the central `size` square."""
    left, top = (width - size) // 2, (height - size) // 2
    return left, top, left + size, top + size


def random_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Samples an Inception-style crop: 8-100% of the area, aspect 3/4 to 4/3.

    Falls back to the largest central crop of admissible aspect after ten
    misses, as the usual implementations do.
    """
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, x + w, y + h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def decode(
    path: Path,
    *,
    image_size: int,
    crop: str,
    resize: int | None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Reads one image as `uint8 (image_size, image_size, 3)`.

    Args:
        path: An image file PIL can read (JPEG, PNG, ...); grey, CMYK and
            palette images are converted to RGB.
        image_size: Side of the square output.
        crop: `"center"`: scale the shorter side to `resize` (if given; a
            JPEG is decoded at reduced size when that is enough), then to at
            least `image_size`, then take the central square.
            `"random"`: Inception-style random-resized crop to `image_size`
            plus a random horizontal flip (`rng` required; `resize` unused).
        resize: See `crop`.
        rng: Source of randomness for `"random"`.

    Returns:
        The pixels; with `crop="center"`, `resize=None` and an image at
        least `image_size` on each side, exactly the decoded pixels of the
        central square.

    Raises:
        DatasetError: The file cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            if crop == "center":
                if resize:
                    image.draft("RGB", (resize, resize))
                image = image.convert("RGB")
                if resize:
                    image = _resize_shorter(image, resize)
                if min(image.size) < image_size:
                    image = _resize_shorter(image, image_size)
                image = image.crop(center_crop_box(*image.size, image_size))
            elif crop == "random":
                image = image.convert("RGB")
                box = random_crop_box(*image.size, rng)
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
                if rng.random() < 0.5:
                    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
            return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
