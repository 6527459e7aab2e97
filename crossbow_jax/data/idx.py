"""The IDX file format of MNIST and Fashion-MNIST, plain or gzip-compressed.

An IDX file is a 4-byte magic number (`0, 0, type code, number of
dimensions`), one big-endian `uint32` per dimension, then the values in
row-major order. Only unsigned bytes (type code `0x08`) occur in these data
sets and only they are supported.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from crossbow_jax.data._core import DatasetError

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx_bytes(path: Path) -> bytes:
    """Returns the IDX payload of `path`, decompressing it if it is gzip.

    Compression is recognised by content, not by the file name.

    Raises:
        DatasetError: The gzip stream is truncated or corrupt.
    """
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: corrupt or truncated gzip file ({e}); it was refused") from e


def parse_idx(data: bytes, what: str, ndim: int) -> np.ndarray:
    """Parses an IDX payload of unsigned bytes.

    Args:
        data: The decompressed file contents.
        what: Names the file in error messages.
        ndim: Required number of dimensions (1 for labels, 3 for images).

    Returns:
        A `uint8` array of the stored shape.

    Raises:
        DatasetError: Wrong magic number, type or rank, or a size that does
            not match the header.
    """
    if len(data) < 4 or data[:2] != b"\0\0":
        raise DatasetError(f"{what}: not an IDX file (bad magic number {data[:4].hex()})")
    code, rank = data[2], data[3]
    if code != _UBYTE or rank != ndim:
        raise DatasetError(
            f"{what}: IDX header says type 0x{code:02x} with {rank} dimensions; "
            f"expected unsigned bytes (0x08) with {ndim}"
        )
    header = 4 + 4 * rank
    if len(data) < header:
        raise DatasetError(f"{what}: truncated IDX header")
    shape = struct.unpack(f">{rank}I", data[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DatasetError(
            f"{what}: IDX size mismatch: header says shape {shape} ({expected} bytes), "
            f"file holds {len(data)} bytes (truncated or corrupt)"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def encode_idx(array: np.ndarray) -> bytes:
    """Returns the IDX encoding of a `uint8` array (the inverse of `parse_idx`)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX writing supports uint8 only, got {array.dtype}")
    head = bytes([0, 0, _UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Writes a `uint8` array as an IDX file.

    Args:
        path: Destination. Compressed with gzip if `compress` is true, or if
            it is `None` and the name ends in `.gz`.
        array: The values, e.g. images `(N, 28, 28)` or labels `(N,)`.
        compress: See `path`.

    Returns:
        The path written.
    """
    path = Path(path)
    data = encode_idx(array)
    if compress or (compress is None and path.suffix == ".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
