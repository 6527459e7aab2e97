"""Tests of crossbow_jax.models: registry, shapes, dtypes, BatchNorm, dropout, stats.

ResNet-50 and VGG-16 only run through `jax.eval_shape`, `jax.make_jaxpr` and
XLA's cost analysis (no weights allocated), except one tiny VGG-16 dropout
forward pass; LeNet and ResNet-32 run for real on small batches. Compiling the
random initialisers is slow on CPU (seconds per model), so only LeNet's
vmapped `init` runs for real; other tests fill `eval_shape`d variables in numpy.
"""

from __future__ import annotations

import functools
import operator
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _engine_fixtures import he_variables

from crossbow_jax import models
from crossbow_jax.models import stats

NAMES = ("lenet", "resnet32", "vgg16", "resnet50")


def _abstract_input(name, batch=2):
    return jax.ShapeDtypeStruct((batch, *models.MODELS[name].input_shape), jnp.float32)


def _images(name, batch, seed=0):
    shape = (batch, *models.MODELS[name].input_shape)
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def _numpy_init(name, seed=0):
    """He-scaled random variables built in numpy: skips compiling the initialisers."""
    return he_variables(models.variable_shapes(name), seed)


@pytest.fixture(scope="module")
def resnet32_variables():
    """ResNet-32 variables and a batch of 4 images (shared: cheap to build once)."""
    return _numpy_init("resnet32"), _images("resnet32", 4)


# --- registry ---------------------------------------------------------------


def test_registry_names_and_specs():
    assert models.model_names() == NAMES
    expected = {
        "lenet": ("mnist", (28, 28, 1), 10),
        "resnet32": ("cifar10", (32, 32, 3), 10),
        "vgg16": ("cifar100", (32, 32, 3), 100),
        "resnet50": ("imagenet", (224, 224, 3), 1000),
    }
    for name, (dataset, shape, classes) in expected.items():
        spec = models.MODELS[name]
        assert isinstance(spec, models.ModelSpec)
        assert (spec.name, spec.dataset, spec.input_shape, spec.num_classes) == (
            name, dataset, shape, classes)
        model = models.get_model(name)
        assert model.num_classes == classes and model.dtype == jnp.float32


def test_get_model_overrides_classes_and_dtype():
    model = models.get_model("resnet50", num_classes=7, dtype=jnp.bfloat16)
    assert model.num_classes == 7 and model.dtype == jnp.bfloat16
    assert models.get_model("lenet", dtype="bfloat16").dtype == jnp.bfloat16


def test_unknown_model_name_is_one_line_value_error():
    with pytest.raises(ValueError) as info:
        models.get_model("resnet99")
    message = str(info.value)
    assert "\n" not in message and "'resnet99'" in message
    assert all(name in message for name in NAMES)
    with pytest.raises(ValueError, match="lenet"):
        models.param_count("LeNet")


@pytest.mark.parametrize("dtype", ["float16", "bf16", jnp.float16, np.float64, None])
def test_bad_dtype_is_value_error(dtype):
    with pytest.raises(ValueError, match="float32, bfloat16"):
        models.get_model("lenet", dtype=dtype)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes_is_value_error(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        models.get_model("lenet", num_classes=num_classes)


# --- shapes, parameter counts, dtypes -----------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [("lenet", 431_080), ("resnet32", 464_154), ("vgg16", 15_032_868), ("resnet50", 25_557_032)],
)
def test_param_counts(name, expected):
    count = models.param_count(name)
    assert count == expected
    known_ranges = {"resnet32": (0.44e6, 0.48e6), "resnet50": (25.4e6, 25.8e6)}
    low, high = known_ranges.get(name, (0, np.inf))
    assert low <= count <= high


def test_param_count_follows_num_classes():
    # Only the final dense layer (2048 inputs) changes.
    assert models.param_count("resnet50", num_classes=10) == 25_557_032 - 990 * 2049


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("train", [False, True])
def test_output_shape_and_float32_logits(name, train):
    model = models.get_model(name, num_classes=5)
    x = _abstract_input(name)
    variables = models.variable_shapes(name, num_classes=5)
    rngs = {"dropout": jax.random.key(1)}
    def forward(v, x):
        return model.apply(v, x, train=train, mutable=["batch_stats"], rngs=rngs)

    logits, updates = jax.eval_shape(forward, variables, x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert set(updates) == ({"batch_stats"} if "batch_stats" in variables else set())
    assert all(leaf.dtype == jnp.float32 for leaf in _leaves(variables))


def _heavy_op_input_dtypes(model, variables, x):
    """Input dtypes of every convolution and matmul in the forward pass."""
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    dtypes = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                dtypes.update(var.aval.dtype for var in eqn.invars)
            for param in eqn.params.values():  # nested jaxprs (pjit, custom_jvp, ...)
                sub = getattr(param, "jaxpr", param)
                if hasattr(sub, "eqns"):
                    visit(sub)

    visit(jaxpr.jaxpr)
    return dtypes


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_computes_in_bf16_with_float32_params(name):
    x = _abstract_input(name, batch=1)
    for dtype, compute in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        model = models.get_model(name, dtype=dtype)
        variables = models.variable_shapes(name, dtype=dtype)
        assert {leaf.dtype for leaf in _leaves(variables)} == {jnp.dtype(jnp.float32)}
        assert _heavy_op_input_dtypes(model, variables, x) == {jnp.dtype(compute)}
        logits = jax.eval_shape(model.apply, variables, x)
        assert logits.dtype == jnp.float32


def test_bfloat16_resnet32_runs_close_to_float32(resnet32_variables):
    variables, x = resnet32_variables
    f32, bf16 = (models.get_model("resnet32", dtype=d) for d in ("float32", "bfloat16"))
    out32, out16 = (jax.jit(m.apply)(variables, x) for m in (f32, bf16))
    assert out16.dtype == jnp.float32
    assert not np.array_equal(out32, out16)  # really computed in lower precision
    np.testing.assert_allclose(out16, out32, atol=0.1 * float(jnp.abs(out32).max()) + 1e-3)


# --- BatchNorm and dropout ----------------------------------------------------


def test_batchnorm_stats_update_in_train_mode_only(resnet32_variables):
    variables, x = resnet32_variables
    model = models.get_model("resnet32")
    before = variables["batch_stats"]
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    _, train_updates = apply(variables, x, train=True, mutable=("batch_stats",))
    _, eval_updates = apply(variables, x, train=False, mutable=("batch_stats",))
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, train_updates["batch_stats"])
    assert all(_leaves(changed))
    jax.tree.map(np.testing.assert_array_equal, before, eval_updates["batch_stats"])


def test_vgg16_dropout_depends_on_rng_in_train_mode_only():
    model = models.get_model("vgg16")
    x = _images("vgg16", 2)
    variables = _numpy_init("vgg16")

    @jax.jit
    def both_modes(variables, seed):
        rngs = {"dropout": jax.random.key(seed)}
        return [model.apply(variables, x, train=train, mutable=["batch_stats"], rngs=rngs)[0]
                for train in (True, False)]

    outputs = {seed: [np.asarray(out) for out in both_modes(variables, seed)] for seed in (1, 2)}
    (train1, eval1), (train2, eval2) = outputs[1], outputs[2]
    np.testing.assert_array_equal(train1, both_modes(variables, 1)[0])
    assert not np.allclose(train1, train2)
    assert not np.allclose(train1, eval1)
    np.testing.assert_array_equal(eval1, eval2)


# --- the vmapped-learner pattern ----------------------------------------------


LEARNERS = 3


@pytest.mark.parametrize("name", NAMES)
def test_vmapped_init_adds_learner_axis(name):
    model = models.get_model(name)
    rngs = jax.random.split(jax.random.key(0), LEARNERS)
    stacked = jax.eval_shape(jax.vmap(model.init, in_axes=(0, None)), rngs, _abstract_input(name))
    single = models.variable_shapes(name)
    assert jax.tree.structure(stacked) == jax.tree.structure(single)
    for s, one in zip(_leaves(stacked), _leaves(single), strict=True):
        assert s.shape == (LEARNERS, *one.shape) and s.dtype == one.dtype


def _check_vmapped_train_apply(model, variables, xs):
    """Runs the vmapped train-mode apply and compares it with per-learner applies."""
    apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    logits, updates = jax.jit(jax.vmap(apply))(variables, xs)
    assert logits.shape == (*xs.shape[:2], model.num_classes) and logits.dtype == jnp.float32
    assert np.isfinite(logits).all()
    for j in range(LEARNERS):
        learner = jax.tree.map(operator.itemgetter(j), variables)
        logits_j, updates_j = apply(learner, xs[j])
        np.testing.assert_allclose(logits[j], logits_j, rtol=1e-4, atol=1e-4)
        updates_of_j = jax.tree.map(operator.itemgetter(j), updates)
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
                     updates_of_j, updates_j)
    return updates


def test_vmapped_learners_lenet():
    model = models.get_model("lenet")
    rngs = jax.random.split(jax.random.key(0), LEARNERS)
    variables = jax.jit(jax.vmap(model.init, in_axes=(0, None)))(rngs, _images("lenet", 2))
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
               if "kernel" in jax.tree_util.keystr(path)]
    assert len(kernels) == 4
    assert not any(np.allclose(k[0], k[1]) for k in kernels)  # independent learners
    xs = _images("lenet", LEARNERS * 2, seed=1).reshape(LEARNERS, 2, 28, 28, 1)
    _check_vmapped_train_apply(model, variables, xs)


def test_vmapped_learners_resnet32_keep_own_batch_stats(resnet32_variables):
    variables, _ = resnet32_variables  # one model stacked: a real vmapped init compiles slowly
    stacked = jax.tree.map(lambda leaf: jnp.stack([leaf] * LEARNERS), variables)
    xs = _images("resnet32", LEARNERS * 2, seed=1).reshape(LEARNERS, 2, 32, 32, 3)
    updates = _check_vmapped_train_apply(models.get_model("resnet32"), stacked, xs)
    means = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(updates["batch_stats"])
             if "mean" in jax.tree_util.keystr(path)]
    assert means and all(m.shape[0] == LEARNERS for m in means)
    assert not np.allclose(means[0][0], means[0][1])  # each learner saw its own data


def test_lenet_sgd_reduces_loss_on_fixed_batch():
    model = models.get_model("lenet")
    x = _images("lenet", 16)
    labels = jnp.arange(16) % 10
    params = _numpy_init("lenet")["params"]
    optimizer = optax.sgd(0.05, momentum=0.9)
    opt_state = optimizer.init(params)

    def loss_fn(params):
        logits = model.apply({"params": params}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(15):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


# --- FLOPs and the model table ------------------------------------------------


def test_lenet_flops_match_mac_count():
    # VALID convolutions, so XLA's count is 2 x MACs plus a little element-wise work.
    macs = 24 * 24 * 20 * 25 + 8 * 8 * 50 * 500 + 800 * 500 + 500 * 10
    flops = models.flops_per_image("lenet")
    assert 2 * macs <= flops <= 1.02 * 2 * macs
    assert models.flops_per_image("lenet", batch_size=4) == pytest.approx(flops, rel=0.01)


@pytest.mark.parametrize(
    "name, low, high",
    # ResNet-50: ~4.1 GMACs dense; XLA skips taps on zero padding, so ~8.0 GFLOPs.
    [("resnet32", 0.12e9, 0.14e9), ("vgg16", 0.45e9, 0.63e9), ("resnet50", 7.8e9, 8.3e9)],
)
def test_flops_per_image_in_known_range(name, low, high):
    assert low <= models.flops_per_image(name) <= high


def test_cost_analysis_list_or_dict():
    for analysis in ({"flops": 6.0}, [{"flops": 6.0}]):
        compiled = types.SimpleNamespace(cost_analysis=lambda a=analysis: a)
        assert stats._flops_of(compiled) == 6.0
    with pytest.raises(RuntimeError, match="flops"):
        stats._flops_of(types.SimpleNamespace(cost_analysis=lambda: None))


def test_model_table():
    rows = models.model_table()
    assert [row.name for row in rows] == list(NAMES)
    for row in rows:
        assert row.params == models.param_count(row.name)
        assert row.flops_per_image == models.flops_per_image(row.name) > 0
        assert row.input_shape == models.MODELS[row.name].input_shape
    text = models.format_model_table(rows)
    assert all(name in text for name in NAMES) and "25,557,032" in text
