"""Compressed outer gradients: what a device sends at an outer step, quantised.

`compress` is None (the exact all-reduce, `lax.psum`), "bf16", "int8" or
"int4". With compression the sum over the devices of an axis is a
reduce-scatter and an all-gather of quantised payloads, the two halves of a
ring all-reduce, so each device sends about `2 (D - 1) / D` times the
payload (D devices), as an all-reduce of the payload would:

1. every device quantises its contribution `c` (its leaves end to end, plus
   its residual when error feedback is on), cut into D shards; `lax.all_to_all`
   hands shard i of every device to device i, which dequantises them and sums
   in float32 (no overflow at any D);
2. each device quantises its shard's sum; `lax.all_gather` gives every device
   every shard's sum, dequantised: the total.

Payloads:

    bf16   the values as bfloat16: 2 bytes a value
    int8   blocks of `BLOCK` values, each scaled by max|c| / 127 (a float32 scale
           a block) and rounded to int8: 1 byte a value + 4 bytes a block
    int4   the same with max|c| / 7, two values packed in a byte: 0.5 byte a
           value + 4 bytes a block

Blocks run across leaves (a small leaf costs no padded block of its own, but
shares its block's scale: with int4 a value under 1/14 of its block's largest
rounds to 0, which error feedback sends later). Error feedback (Seide et al.
2014; Karimireddy et al. 2019, "EF-SGD") keeps what rounding dropped, per
device: its own contribution's rounding, plus the rounding of the shard sum it
owns, and adds it to its next contribution.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KINDS = ("bf16", "int8", "int4")
BLOCK = 256  # values that share one scale
_LEVELS = {"int8": 127, "int4": 7}


def check_compress(compress: Any, error_feedback: Any = True) -> str | None:
    """`compress` checked: None or one of KINDS; `error_feedback` a bool."""
    if compress is not None and compress not in KINDS:
        raise ValueError(
            f"compress={compress!r} is not a compression; use one of {', '.join(KINDS)} "
            "or None (the exact all-reduce)"
        )
    if not isinstance(error_feedback, bool):
        raise TypeError(f"error_feedback={error_feedback!r} must be True or False")
    if compress is None and not error_feedback:
        raise ValueError(
            "error_feedback=False does nothing without compress (nothing is rounded); "
            "leave it out, or set compress='bf16', 'int8' or 'int4'"
        )
    return compress


def _blocks(x: jax.Array) -> jax.Array:
    """x flattened, zero-padded to whole blocks: (blocks, BLOCK) float32."""
    flat = x.reshape(-1).astype(jnp.float32)
    pad = -flat.size % BLOCK
    return jnp.pad(flat, (0, pad)).reshape(-1, BLOCK)


def quantise(x: jax.Array, kind: str) -> tuple[jax.Array, ...]:
    """The payload of `x`: (bf16 values,) or (integer codes, float32 block scales)."""
    if kind == "bf16":
        return (x.astype(jnp.bfloat16),)
    levels = _LEVELS[kind]
    blocks = _blocks(x)
    top = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    scale = jnp.where(top > 0, top / levels, 1.0)
    codes = jnp.clip(jnp.round(blocks / scale), -levels, levels).astype(jnp.int8)
    if kind == "int4":  # two codes a byte: low nibble the even one, high nibble the odd one
        low, high = codes[:, 0::2], codes[:, 1::2]
        codes = ((low & 0xF) | (high << 4)).astype(jnp.uint8)
    return codes, scale[:, 0]


def dequantise(payload: tuple[jax.Array, ...], kind: str, like: jax.Array) -> jax.Array:
    """float32 values shaped like `like` from one device's payload (leading axes kept)."""
    if kind == "bf16":
        return payload[0].astype(jnp.float32)
    codes, scale = payload
    if kind == "int4":
        nibbles = jnp.stack([codes & 0xF, codes >> 4], axis=-1).astype(jnp.int8)
        codes = jnp.where(nibbles >= 8, nibbles - 16, nibbles).reshape(codes.shape[:-1] + (-1,))
    values = codes.astype(jnp.float32) * scale[..., None]
    lead = values.shape[:-2]
    flat = values.reshape(lead + (-1,))[..., : like.size]
    return flat.reshape(lead + like.shape)


def float32_zeros(tree: Any) -> Any:
    """float32 zeros shaped like `tree`'s leaves: a residual (or outer gradient) of nothing yet."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def _split(payload: tuple[jax.Array, ...], parts: int) -> tuple[jax.Array, ...]:
    """Each part of a payload with its leading axis cut into `parts` (one per shard)."""
    return tuple(p.reshape((parts, -1) + p.shape[1:]) for p in payload)


def compressed_sum(
    tree: Any, error: Any, kind: str, axis_name: Hashable | None
) -> tuple[Any, Any]:
    """(the float32 sum over `axis_name` of every device's quantised `tree + error`, this
    device's new residual, or None when `error` is None: no error feedback); see above."""
    leaves, treedef = jax.tree.flatten(tree)
    flat = jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in leaves])
    if error is not None:
        flat = flat + jnp.concatenate([e.reshape(-1) for e in jax.tree.leaves(error)])
    devices = 1 if axis_name is None else lax.axis_size(axis_name)
    shard = -(-flat.size // (devices * BLOCK)) * BLOCK  # a whole number of blocks
    padded = jnp.pad(flat, (0, devices * shard - flat.size))
    sent = quantise(padded, kind)
    mine = dequantise(sent, kind, padded)
    pieces = _split(sent, devices)  # shard i of this device's payload
    if axis_name is not None:
        pieces = tuple(lax.all_to_all(p, axis_name, 0, 0, tiled=False) for p in pieces)
    owned = jnp.sum(dequantise(pieces, kind, padded[:shard]), axis=0)  # one shard's sum
    owned_sent = quantise(owned, kind)
    owned_back = dequantise(owned_sent, kind, owned)
    if axis_name is None:
        sums = owned_back[None]
    else:
        gathered = tuple(lax.all_gather(p, axis_name) for p in owned_sent)
        sums = dequantise(gathered, kind, owned)

    def unflat(vector):
        parts = jnp.split(vector[: flat.size], np.cumsum([x.size for x in leaves])[:-1])
        return treedef.unflatten([v.reshape(x.shape) for v, x in zip(parts, leaves)])

    if error is None:
        return unflat(sums.reshape(-1)), None
    index = 0 if axis_name is None else lax.axis_index(axis_name)
    residual = (padded - mine).reshape(devices, shard)
    residual = residual.at[index].add(owned - owned_back).reshape(-1)
    return unflat(sums.reshape(-1)), unflat(residual)
