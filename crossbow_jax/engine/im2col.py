"""Convolutions as patch extraction plus one matmul, for many learners under `jax.vmap`.

The engine runs m learners per device by `jax.vmap` over stacked per-learner
weights. Vmapping `lax.conv_general_dilated` over its weights makes XLA emit
grouped convolutions (one group per learner), which are slow on CPU and GPU.
`im2col(fn)` computes every convolution of `fn` instead as

1. patch extraction: the input (padded, interior-padded for `lhs_dilation`)
   is cut into one strided slice per window offset (`rhs_dilation` apart), and
   the slices are concatenated on the feature axis. Under `vmap` the learner
   axis is one more batch axis of pads and slices; their transposes (for the
   gradient) are pads and adds; then
2. one `lax.dot_general` of those patches with the weights reshaped to
   `(window * in_features, out_features)`: under `vmap` the learner axis
   becomes a batch axis of the matmul, i.e. one batched matmul.

It works on any function (a Flax Linen `model.apply`, an NNX call, a pure
function) without changing the model: `fn` is traced to a jaxpr and the jaxpr
is evaluated by a small interpreter that binds every primitive unchanged except
`conv_general_dilated`. Convolutions nested in other primitives are handled:
`jit` calls are inlined, `checkpoint`/`remat` bodies are re-wrapped in
`jax.checkpoint` with the same policy and `prevent_cse`, and any other
primitive holding jaxprs (`scan`, `cond`, `while`, ...) gets them rebuilt
through the interpreter. Equations with no convolution inside are bound as
they are. Convolutions inside `jax.custom_jvp`/`jax.custom_vjp` functions
raise `ValueError` (their custom derivative would no longer match).

Patch feature order: `k * C + c` for window offset `k` (row-major over the
spatial dimensions, in the lhs spec's order) and input channel `c`, so
HWIO-style weights `(window..., I, O)` reshape to `(K * I, O)` directly.
`lax.conv_general_dilated_patches` would give the same patches in the other
order (checked numerically: `c * K + k`, channel major), but it extracts them
with a depthwise convolution of a 0/1 kernel whose gradient XLA:CPU runs as a
slow grouped convolution. Training steps of m = 4 vmapped learners, as a
fraction of the speed of one learner at batch m * b (2-core CPU): LeNet, b = 32:
0.42x with it, 1.07x with slices, 0.65x for the plain vmap of the dense
convolutions; ResNet-32, b = 16: 0.05x, 0.61x and 0.31x.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, jaxprs_in_params

__all__ = ["im2col"]

_CONV = "conv_general_dilated"
_CALLS = ("jit", "pjit", "closed_call", "core_call")  # inlined
_REMATS = ("remat2", "checkpoint", "remat")  # re-wrapped in jax.checkpoint
_CUSTOM = ("custom_jvp", "custom_vjp")  # refused when they hold a convolution


def im2col(fn: Callable) -> Callable:
    """Returns fn with every lax.conv_general_dilated in it computed as patches + matmul.

    The result takes the same arguments and returns the same pytree as `fn`;
    it can be differentiated, vmapped (over weights, inputs or both) and
    jitted. Each call traces `fn` once with `jax.make_jaxpr`, so `fn` must be
    functional, as for `jax.jit`.

    Array leaves of the arguments (`jax.Array`, tracers, numpy arrays and
    scalars) become inputs of the trace. Every other leaf (Python bools, ints,
    floats, strings, None, arbitrary objects) is closed over as a static value,
    like a static argument of `jax.jit`: keyword flags such as `train=True` or
    `key=None` work as they do on `fn`. Python values that `fn` returns come
    back as arrays (as from `jax.jit`).

    Args:
        fn: any function of pytrees, e.g. `model.apply` or
            `lambda params, x: model.apply(params, x, train=True)`.

    Returns:
        The rewritten function.

    Raises:
        ValueError: (when called) a convolution inside a `jax.custom_jvp` /
            `jax.custom_vjp` function, or one with `batch_group_count > 1` (a
            weight gradient taken inside `fn`).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> conv = lambda w, x: jax.lax.conv(x, w, (1, 1), "SAME")
        >>> w, x = jnp.ones((4, 3, 3, 3)), jnp.ones((2, 3, 8, 8))
        >>> bool(jnp.allclose(im2col(conv)(w, x), conv(w, x)))
        True
    """

    @functools.wraps(fn)
    def rewritten(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        traced = [_is_array(leaf) for leaf in leaves]
        arrays = [leaf for leaf, t in zip(leaves, traced, strict=True) if t]

        def flat_fn(*inputs):
            it = iter(inputs)
            full = [next(it) if t else leaf for leaf, t in zip(leaves, traced, strict=True)]
            call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, full)
            return fn(*call_args, **call_kwargs)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*arrays)
        outs = _eval_jaxpr(closed.jaxpr, closed.consts, arrays)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return rewritten


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


def _has_conv(jaxpr: Jaxpr) -> bool:
    """Whether `jaxpr`, or any jaxpr nested in its equations' params, has a convolution."""
    return any(
        eqn.primitive.name == _CONV or any(_has_conv(sub) for sub in jaxprs_in_params(eqn.params))
        for eqn in jaxpr.eqns
    )


def _eval_jaxpr(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluates `jaxpr` on the current trace, rewriting the convolutions in it."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(var):
        return var.val if isinstance(var, Literal) else env[var]

    for eqn in jaxpr.eqns:
        outs = _eval_eqn(eqn, [read(var) for var in eqn.invars])
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(var) for var in jaxpr.outvars]


def _eval_eqn(eqn, invals: list[Any]) -> list[Any]:
    """One equation's outputs (always a list), its convolutions rewritten."""
    name, params = eqn.primitive.name, eqn.params
    if name == _CONV:
        return [_conv_as_matmul(*invals, out_dtype=eqn.outvars[0].aval.dtype, **params)]
    if not any(_has_conv(sub) for sub in jaxprs_in_params(params)):
        return _bind(eqn.primitive, params, invals)  # fast path: nothing to rewrite
    if name.startswith(_CUSTOM):
        raise ValueError(
            f"im2col: a convolution inside a jax.custom_jvp/custom_vjp function ({name}) cannot "
            "be rewritten consistently with its custom derivative; use execution='vmap' or "
            "'unroll'"
        )
    if name in _CALLS:
        sub = params.get("jaxpr", params.get("call_jaxpr"))
        if isinstance(sub, ClosedJaxpr):
            return _eval_jaxpr(sub.jaxpr, sub.consts, invals)
        return _eval_jaxpr(sub, (), invals)
    if name in _REMATS and not params["jaxpr"].constvars:
        body = functools.partial(_eval_jaxpr, params["jaxpr"], ())
        remat = jax.checkpoint(
            lambda *xs: body(xs), prevent_cse=params["prevent_cse"], policy=params["policy"]
        )
        return list(remat(*invals))
    new_params = {key: _rewrite_param(value, name) for key, value in params.items()}
    return _bind(eqn.primitive, new_params, invals)


def _bind(primitive, params: dict[str, Any], invals: list[Any]) -> list[Any]:
    bind_params = primitive.get_bind_params(params)
    if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
        subfuns, bind_params = bind_params
        outs = primitive.bind(*subfuns, *invals, **bind_params)
    else:
        outs = primitive.bind(*invals, **bind_params)
    return list(outs) if primitive.multiple_results else [outs]


def _rewrite_param(value: Any, name: str) -> Any:
    """A param of a control-flow primitive, its jaxprs with convolutions rebuilt."""
    if isinstance(value, tuple):
        return tuple(_rewrite_param(v, name) for v in value)
    if isinstance(value, ClosedJaxpr) and _has_conv(value.jaxpr):
        return _rebuild(value.jaxpr, value.consts)
    if isinstance(value, Jaxpr) and _has_conv(value):
        closed = _rebuild(value, ())
        if closed.consts:
            raise ValueError(
                f"im2col: cannot rebuild the convolutions inside {name} without constants; "
                "use execution='vmap' or 'unroll'"
            )
        return closed.jaxpr
    return value


def _rebuild(jaxpr: Jaxpr, consts: Sequence[Any]) -> ClosedJaxpr:
    """A jaxpr of the same signature as `jaxpr`, its convolutions as patches + matmul."""
    avals = [
        jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)
        for v in jaxpr.invars
    ]
    return jax.make_jaxpr(lambda *xs: _eval_jaxpr(jaxpr, consts, xs))(*avals)


def _conv_as_matmul(
    lhs,
    rhs,
    *,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    precision,
    preferred_element_type,
    out_dtype,
    **_,
):
    """`lax.conv_general_dilated(lhs, rhs, ...)` as patch extraction + one dot_general."""
    if batch_group_count != 1:
        raise ValueError(
            f"im2col: conv_general_dilated with batch_group_count={batch_group_count} (a weight "
            "gradient taken inside the function) is not supported; take jax.grad outside im2col"
        )
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    n = len(lhs_spec) - 2
    window = [rhs.shape[d] for d in rhs_spec[2:]]
    x = lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # (batch, spatial..., C)
    pads = [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)), (0, 0, 0)]
    if any(any(p) for p in pads):  # lhs dilation is interior padding
        x = lax.pad(x, jax.numpy.zeros((), x.dtype), pads)
    sizes = [
        max(0, (x.shape[1 + i] - (window[i] - 1) * rhs_dilation[i] - 1) // window_strides[i] + 1)
        for i in range(n)
    ]
    spans = [max(0, (m - 1) * s + 1) for m, s in zip(sizes, window_strides)]
    columns = []
    for offsets in itertools.product(*(range(k) for k in window)):  # row-major window offsets
        start = [o * r for o, r in zip(offsets, rhs_dilation)]
        stop = [x.shape[0], *(b + span for b, span in zip(start, spans)), x.shape[-1]]
        columns.append(lax.slice(x, (0, *start, 0), stop, (1, *window_strides, 1)))
    patches = lax.concatenate(columns, n + 1)  # (batch, out spatial..., K * C): k * C + c
    in_features, out_features = rhs.shape[rhs_spec[1]], rhs.shape[rhs_spec[0]]
    groups, k = feature_group_count, len(columns)
    weights = lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # (window..., I, O)
    if groups == 1:
        weights = weights.reshape(k * in_features, out_features)  # k * I + i, matching
        dims = (((n + 1,), (0,)), ((), ()))
    else:  # input channel c = g * I + i; output feature o = g * (O / G) + j
        patches = patches.reshape(*patches.shape[:-1], k, groups, in_features)
        weights = weights.reshape(k, in_features, groups, out_features // groups)
        dims = (((n + 1, n + 3), (0, 1)), ((n + 2,), (2,)))
    out = lax.dot_general(
        patches, weights, dims, precision=precision, preferred_element_type=preferred_element_type
    )  # (batch, out spatial..., O), or with groups (G, batch, out spatial..., O / G)
    if groups != 1:
        out = jax.numpy.moveaxis(out, 0, -2)
        out = out.reshape(*out.shape[:-2], out_features)
    order = [0] * (n + 2)  # from (batch, spatial..., features) to out_spec
    for axis, dim in zip((0, n + 1, *range(1, n + 1)), out_spec, strict=True):
        order[dim] = axis
    out = lax.transpose(out, order)
    return out if out.dtype == out_dtype else lax.convert_element_type(out, out_dtype)
