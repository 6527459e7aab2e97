"""Tests of crossbow_jax.engine.im2col: convolutions as patches + matmul.

Every rewritten function is compared with the original (dense convolution):
forward values and gradients, also under `jax.vmap` over per-learner weights,
and its jaxpr is checked to hold no convolution (nested ones included).
The registry models are compiled with XLA's cheap optimisation level (only
compile time matters here) and get numpy-filled variables (no initialiser
compile).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _engine_fixtures import he_variables
from flax import nnx
from jax import lax
from jax.extend.core import jaxprs_in_params

from crossbow_jax import models
from crossbow_jax.engine.im2col import im2col
from crossbow_jax.models.adapters import as_model

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CONV = "conv_general_dilated"


def _normal(seed, shape, dtype=jnp.float32):
    """Random normal values made in numpy (no compile: these tests spend their time compiling)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _run(fn, *args):
    """`fn(*args)`, jitted with XLA's cheap optimisation level."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _assert_close(actual, expected, rtol=1e-5):
    """Leafwise allclose, with an absolute tolerance of rtol times the leaf's largest value."""
    actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * (np.abs(e).max() + 1e-30))


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def _assert_rewritten(fn, *args):
    """No convolution left in the jaxpr of `fn`, nested ones included; matmuls instead."""
    names = _primitives(jax.make_jaxpr(fn)(*args).jaxpr)
    assert CONV not in names and "dot_general" in names


NHWC = ("NHWC", "HWIO", "NHWC")
SAME = {"padding": "SAME"}

# name: (lhs shape, rhs shape, dimension numbers, conv keyword arguments)
CASES = {
    "nhwc_stride_same": ((2, 9, 8, 3), (3, 3, 3, 5), NHWC, {**SAME, "window_strides": (2, 2)}),
    "nhwc_valid": ((2, 7, 7, 4), (3, 2, 4, 6), NHWC, {"padding": "VALID"}),
    "explicit_asymmetric": ((2, 8, 9, 3), (3, 3, 3, 4), NHWC,
                            {"window_strides": (2, 1), "padding": ((1, 2), (0, 1))}),
    "rhs_dilation": ((2, 9, 9, 3), (3, 3, 3, 4), NHWC, {**SAME, "rhs_dilation": (2, 3)}),
    "lhs_dilation": ((2, 5, 6, 3), (3, 3, 3, 4), NHWC,
                     {"window_strides": (1, 2), "padding": ((2, 2), (1, 1)),
                      "lhs_dilation": (2, 2)}),
    "negative_padding": ((2, 8, 9, 3), (3, 3, 3, 4), NHWC,
                         {"window_strides": (2, 1), "padding": ((-1, 2), (1, -2))}),
    "all_dilations": ((2, 5, 6, 3), (3, 2, 3, 4), NHWC,
                      {"padding": ((2, 1), (0, 3)), "lhs_dilation": (2, 3),
                       "rhs_dilation": (1, 2)}),
    "pointwise_stride": ((2, 8, 8, 6), (1, 1, 6, 5), NHWC, {"window_strides": (2, 2),
                                                            "padding": "VALID"}),
    "feature_groups": ((2, 7, 7, 6), (3, 3, 2, 9), NHWC, {**SAME, "feature_group_count": 3}),
    "depthwise": ((2, 7, 7, 4), (3, 3, 1, 8), NHWC,
                  {**SAME, "window_strides": (2, 2), "feature_group_count": 4}),
    "nchw_oihw": ((2, 3, 8, 7), (5, 3, 3, 2), ("NCHW", "OIHW", "NCHW"),
                  {**SAME, "window_strides": (1, 2), "precision": lax.Precision.HIGHEST}),
    "mixed_layouts": ((2, 8, 7, 3), (4, 3, 2, 3), ("NHWC", "OIWH", "CNHW"),
                      {"window_strides": (2, 1), "padding": ((0, 1), (1, 0)),
                       "rhs_dilation": (1, 2)}),
    "conv1d": ((2, 11, 3), (3, 3, 4), ("NWC", "WIO", "NWC"),
               {**SAME, "window_strides": (2,), "rhs_dilation": (2,)}),
    "conv3d": ((2, 5, 6, 4, 2), (2, 3, 2, 1, 4), ("NDHWC", "DHWIO", "NDHWC"),
               {**SAME, "window_strides": (1, 2, 1), "feature_group_count": 2}),
}  # fmt: skip


def _conv_checks(conv):
    """Forward, gradients, and three learners' values and gradients (one shared batch)."""

    def loss(w, x):
        return jnp.sum(jnp.sin(conv(w, x)))

    def checks(w, ws, x):
        learners = jax.vmap(jax.value_and_grad(loss), in_axes=(0, None))
        return conv(w, x), jax.grad(loss, argnums=(0, 1))(w, x), learners(ws, x)

    return checks


@pytest.mark.parametrize("case", CASES)
def test_conv_matches_dense(case):
    lhs_shape, rhs_shape, specs, kwargs = CASES[case]
    x, w = _normal(0, lhs_shape), _normal(1, rhs_shape)
    ws = jnp.asarray(np.stack([w, 0.5 * w, -w]))

    def conv(w, x):
        params = {"window_strides": (1,) * (x.ndim - 2), **kwargs}
        return lax.conv_general_dilated(x, w, dimension_numbers=specs, **params)

    _assert_close(_run(_conv_checks(im2col(conv)), w, ws, x), _run(_conv_checks(conv), w, ws, x))
    _assert_rewritten(im2col(conv), w, x)
    _assert_rewritten(_conv_checks(im2col(conv)), w, ws, x)
    assert CONV in _primitives(jax.make_jaxpr(_conv_checks(conv))(w, ws, x).jaxpr)


def test_conv_general_dilated_patches_order_is_channel_major():
    """The order the module docstring reports for `lax.conv_general_dilated_patches` (not
    used: its gradient is slow): input channel major, then window offsets row-major."""
    x = _normal(0, (1, 4, 5, 3))
    specs = ("NHWC", "OIHW", "NHWC")
    patches = lax.conv_general_dilated_patches(x, (2, 3), (1, 1), "VALID", dimension_numbers=specs)
    x = np.asarray(x)
    expected = np.stack([x[0, i : i + 2, j : j + 3, :].transpose(2, 0, 1).ravel()
                         for i in range(3) for j in range(3)])  # fmt: skip
    np.testing.assert_array_equal(np.asarray(patches[0]).reshape(9, 18), expected)


def test_dtypes_eager_and_jit():
    x, w = _normal(0, (2, 3, 6, 6), jnp.bfloat16), _normal(1, (4, 3, 3, 3), jnp.bfloat16)

    def conv(w, x):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", preferred_element_type=jnp.float32)

    out = jax.jit(im2col(conv))(w, x)
    assert out.dtype == jnp.float32
    _assert_close(out, conv(w, x), rtol=1e-2)
    eager = im2col(lambda w, x: lax.conv(x, w, (1, 1), "SAME"))(w, x)
    assert eager.dtype == jnp.bfloat16
    _assert_close(eager, lax.conv(x, w, (1, 1), "SAME"), rtol=1e-2)


def test_static_keyword_and_python_arguments():
    def apply(params, x, *, train, scale=1.0, key=None, shift=None):
        y = lax.conv(x, params["w"], (1, 1), "SAME") * scale
        if train and key is not None:
            y = y + jax.random.normal(key, y.shape)
        return {"y": y if shift is None else y + shift, "train": train}

    def both(apply):
        def run(params, x, key, shift):
            return (apply(params, x, train=True, key=key, scale=2.0),
                    apply(params, x, train=False, shift=shift))  # fmt: skip

        return run

    args = ({"w": _normal(1, (4, 3, 3, 3))}, _normal(0, (2, 3, 6, 6)), jax.random.key(2), 1.0)
    rewritten, dense = _run(both(im2col(apply)), *args), _run(both(apply), *args)
    _assert_close(rewritten, dense)
    assert bool(rewritten[0]["train"]) and not bool(rewritten[1]["train"])
    shapes = jax.eval_shape(functools.partial(im2col(apply), train=True, key=None), *args[:2])
    assert shapes["y"].shape == (2, 4, 6, 6)


def test_nested_jit_remat_scan_cond_while():
    @jax.jit
    def layer(w, x):
        return jnp.tanh(lax.conv(x, w, (1, 1), "SAME"))

    def body(w, ws, x, flag):
        x = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)(w, x)
        x, _ = lax.scan(lambda h, wi: (layer(wi, h), None), x, ws)
        return lax.cond(flag, layer, lambda w, h: h, w, x)

    def fn(w, ws, x, flag, n):
        x = body(w, ws, x, flag)
        return lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, layer(w, c[1])), (0, x))[1]

    w, ws = 0.3 * _normal(1, (2, 3, 3, 3, 3)), 0.3 * _normal(2, (2, 2, 3, 3, 3, 3))
    args = (w, ws, _normal(0, (2, 3, 6, 6)), jnp.array(True), jnp.array(2))  # two learners
    names = _primitives(jax.make_jaxpr(im2col(fn))(w[0], ws[0], *args[2:]).jaxpr)
    assert {"scan", "cond", "while"} <= names and {"checkpoint", "remat2"} & names
    assert CONV not in names

    def checks(fn, body):
        def loss(w, ws, x, flag):
            return jnp.sum(body(w, ws, x, flag) ** 2)

        def run(w, ws, x, flag, n):
            grads = jax.grad(loss, (0, 1, 2))(w[0], ws[0], x, flag)  # none through while
            learners = jax.vmap(fn, in_axes=(0, 0, None, None, None))(w, ws, x, flag, n)
            return fn(w[0], ws[0], x, flag, n), grads, learners

        return run

    _assert_close(_run(checks(im2col(fn), im2col(body)), *args), _run(checks(fn, body), *args))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="SAME")(x))
        return nn.Conv(8, (3, 3), padding="VALID", kernel_dilation=2, feature_group_count=2)(x)


class _ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.tanh(nn.Conv(8, (3, 3), padding="SAME", feature_group_count=4)(x)), None


class _UserNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.remat(_Block)()(x)
        scan = nn.scan(_ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=2)  # fmt: skip
        x, _ = scan()(x, None)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_user_linen_model_with_remat_and_scan():
    model, x = _UserNet(), _normal(0, (2, 12, 12, 3))
    params = he_variables(jax.eval_shape(model.init, jax.random.key(0), x))

    def checks(apply):
        def loss(params, x):
            return jnp.sum(apply(params, x) ** 2)

        learners = jax.vmap(jax.value_and_grad(loss))
        return lambda p, ps, x, xs: (apply(p, x), learners(ps, xs))

    stacked = jax.tree.map(lambda p: jnp.asarray(np.stack([p, 0.5 * p])), params)
    args = (params, stacked, x, jnp.asarray(np.stack([x, -x])))
    _assert_close(_run(checks(im2col(model.apply)), *args), _run(checks(model.apply), *args))
    names = _primitives(jax.make_jaxpr(im2col(model.apply))(params, x).jaxpr)
    assert "scan" in names and {"checkpoint", "remat2"} & names and CONV not in names


def test_nnx_model_through_the_adapter():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
            self.norm = nnx.BatchNorm(8, rngs=rngs)
            self.depthwise = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)

        def __call__(self, x):
            return self.depthwise(nnx.relu(self.norm(self.conv(x)))).mean(axis=(1, 2))

    model, x = as_model(Net(nnx.Rngs(0))), _normal(0, (4, 8, 8, 3))
    params, state = model.init(None, x)

    def checks(apply):
        def loss(params, state, x):
            out, new_state = apply(params, state, x, train=True)
            return jnp.sum(out**2), new_state

        return jax.value_and_grad(loss, has_aux=True)

    _assert_close(_run(checks(im2col(model.apply)), params, state, x),
                  _run(checks(model.apply), params, state, x), rtol=1e-4)  # fmt: skip


def test_custom_derivative_with_conv_is_refused():
    @jax.custom_vjp
    def conv(w, x):
        return lax.conv(x, w, (1, 1), "SAME")

    conv.defvjp(lambda w, x: (conv(w, x), (w, x)), lambda res, g: res)
    w, x = _normal(1, (4, 3, 3, 3)), _normal(0, (2, 3, 6, 6))
    with pytest.raises(ValueError, match="execution='vmap' or 'unroll'") as info:
        jax.eval_shape(im2col(conv), w, x)
    assert "\n" not in str(info.value)
    relu = im2col(lambda w, x: jax.nn.relu(lax.conv(x, w, (1, 1), "SAME")))  # custom_jvp, no conv
    _assert_rewritten(relu, w, x)


def test_batch_group_count_is_refused():
    def conv(w, x):
        return lax.conv_general_dilated(x, w, (1, 1), "VALID", batch_group_count=2)

    with pytest.raises(ValueError, match="batch_group_count=2") as info:
        jax.eval_shape(im2col(conv), _normal(1, (4, 3, 3, 3)), _normal(0, (4, 3, 6, 6)))
    assert "\n" not in str(info.value)


def _flat(tree):
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def _rel_l2(actual, expected):
    actual, expected = _flat(actual), _flat(expected)
    return np.linalg.norm(actual - expected) / (np.linalg.norm(expected) + 1e-30)


def _assert_grads_close(actual, expected, perturbed, rtol=1e-4):
    """`actual` as close to `expected` in relative L2 norm as rtol or as the noise floor
    (3x the distance of `perturbed`: the dense model's gradients for an input changed by
    float32 round-off), and within 1% anyway; each leaf within 1% (or its noise floor).

    Elementwise bounds do not hold for deep nets in training mode at batch 2: among
    their many activations a few lie within round-off of a ReLU's kink, and which side
    they fall on switches their gradient on or off; BatchNorm then spreads that."""
    leaves = zip(*(jax.tree.leaves(t) for t in (actual, expected, perturbed)), strict=True)
    for a, e, p in leaves:  # catches one wrong layer; a leaf of zero gradient is all noise
        assert _rel_l2(a, e) <= max(1e-2, 3 * _rel_l2(p, e))
    error, floor = _rel_l2(actual, expected), _rel_l2(perturbed, expected)
    print(f"gradients: relative L2 error {error:.1e}, noise floor {floor:.1e}")
    assert error <= min(max(rtol, 3 * floor), 1e-2)


@pytest.mark.parametrize("name,size", [("lenet", 28), ("resnet32", 32), ("vgg16", 32),
                                       ("resnet50", 64)])  # fmt: skip
def test_registry_model_matches_dense_in_training(name, size):
    """The paper's models in training mode (BatchNorm batch statistics, dropout), through
    the engine's adapter. ResNet-50 at batch 2 needs small residual BatchNorm scales:
    otherwise its gradients explode at initialisation, so that float32 rounding alone (a
    1e-6 relative change of the weights) moves them by percents."""
    model, spec = as_model(models.get_model(name)), models.get_spec(name)
    x = _normal(1, (2, size, size, spec.input_shape[-1]))
    x_rounded = x * (1 + 1e-6 * _normal(4, x.shape))  # a few ulps
    variables = he_variables(models.variable_shapes(name), residual_scale=0.05)
    params, state = variables["params"], variables.get("batch_stats", {})
    weights, key = _normal(2, (2, spec.num_classes)), jax.random.key(3)

    def compiled(apply):
        def loss(params, state, x, key):
            logits, new_state = apply(params, state, x, train=True, key=key)
            return jnp.sum(logits * weights), (logits, new_state)

        grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
        return grad.lower(params, state, x, key).compile(compiler_options=FAST_COMPILE)

    (_, (logits, new_state)), grads = compiled(im2col(model.apply))(params, state, x, key)
    dense = compiled(model.apply)
    (_, (dense_logits, dense_state)), dense_grads = dense(params, state, x, key)
    _assert_close(logits, dense_logits, rtol=1e-4)
    _assert_close(new_state, dense_state, rtol=1e-4)
    _assert_grads_close(grads, dense_grads, dense(params, state, x_rounded, key)[1])
