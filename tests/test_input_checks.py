"""Inputs a new user gets wrong, refused before any work with one line naming the value and
the fix (issue 21): splits one preprocessing would scale apart, channels-first images, float
pixels left at 0..255, class labels from 1, a data set name as the test split of arrays, an
optax mask built on the whole Linen variables; and optax's loss argument (`value=`) given to
the learner optimiser (`optax.contrib.reduce_on_plateau`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _engine_fixtures import MLP, split, tiny_images
from test_requests import no_work  # noqa: F401 -- the fixture, used by name

import crossbow_jax
from crossbow_jax.engine.config import ConfigError
from crossbow_jax.engine.inputs import resolve_data

X, Y = tiny_images()  # uint8 (256, 8, 8, 3), 3 classes
RUN = {"batch_size": 8, "learners_per_device": 2, "num_devices": 2, "epochs": 1,
       "progress": False, "execution": "unroll"}  # fmt: skip
DIGITS = np.zeros((40, 28, 28, 1), np.uint8), np.arange(40) % 10


def train(model, data, test=None, **kw):
    return crossbow_jax.train(model, data, test, **{**RUN, **kw})


@pytest.mark.usefixtures("no_work")
def test_splits_of_different_dtypes_are_refused():
    test = (X[192:].astype(np.float32) / 255, Y[192:])  # the uint8 split would be scaled apart
    with pytest.raises(ConfigError, match=r"^train inputs are uint8 \(pixels: scaled by 1/255, "
                       r"then normalised\) but test inputs are float32 \(used as they are; values "
                       r"0\.\.0\.9\d+\); .* same dtype and scale \(e\.g\. both uint8"):  # fmt: skip
        train(MLP(3), (X[:192], Y[:192]), test)


@pytest.mark.usefixtures("no_work")
def test_float_splits_of_different_scales_are_refused():
    (x, y), (tx, ty) = split()
    with pytest.raises(ConfigError, match=r"^train inputs span -\d.* but test inputs -\d.*, "
                                          r"\d+x apart; .*same scale"):  # fmt: skip
        train(MLP(), (x, y), (tx * 255, ty))


@pytest.mark.parametrize("model", ["own", "lenet"])
@pytest.mark.usefixtures("no_work")
def test_channels_first_images_are_refused_with_the_transpose(model):
    nchw = DIGITS[0].transpose(0, 3, 1, 2)
    x, y = (X.transpose(0, 3, 1, 2), Y) if model == "own" else (nchw, DIGITS[1])
    shape = re_tuple(x.shape)
    with pytest.raises(ConfigError, match=rf"^train inputs look channels-first \(N, C, H, W\) = "
                       rf"{shape}; crossbow_jax expects NHWC: pass x\.transpose\(0, 2, 3, 1\)$"):  # fmt: skip
        train(MLP(3) if model == "own" else model, (x, y))


def re_tuple(shape) -> str:
    return r"\(" + ", ".join(map(str, shape)) + r"\)"


@pytest.mark.usefixtures("no_work")
def test_a_named_model_on_images_too_small_or_not_images_says_what_fits():
    with pytest.raises(ConfigError, match=r"^LeNet fails on two training examples \(shape "
                       r"\(8, 8, 3\), dtype uint8\): a layer's input is empty .* \(lenet is built "
                       r"for \(28, 28, 1\)\); pass larger inputs"):  # fmt: skip
        train("lenet", (X, Y))
    flat = DIGITS[0].reshape(40, -1).astype(np.float32)
    with pytest.raises(ConfigError, match=r"^model 'lenet' takes \(N, H, W, C\) images .* have "
                                          r"shape \(N, 784\); .*x\.reshape\(-1, 28, 28, 1\)$"):  # fmt: skip
        train("lenet", (flat, DIGITS[1]))


@pytest.mark.usefixtures("no_work")
def test_float_images_at_pixel_scale_are_refused_unless_the_model_scales_them():
    with pytest.raises(ConfigError, match=r"^train inputs are float images with values 0\.\.239,"
                                          r" .*pass x / 255\.0 .*unscaled_images=True"):  # fmt: skip
        train(MLP(3), (X.astype(np.float32), Y))
    with pytest.raises(ConfigError, match=r"^unscaled_images=True is for float \(N, H, W, C\) "
                                          r"images, but the train inputs are uint8"):  # fmt: skip
        train(MLP(3), (X, Y), unscaled_images=True)
    resolve_data((X.astype(np.float32), Y), None, unscaled_images=True)  # the user's choice
    (x, y), _ = split()
    resolve_data((x * 100, y), None)  # features of any scale are not images


@pytest.mark.usefixtures("no_work")
def test_a_data_set_name_as_the_test_split_of_arrays_says_what_to_pass():
    with pytest.raises(ConfigError, match=r"^test='mnist' is a string, but train is arrays: .* "
                       r"\(train='mnist'\); for arrays pass test=\(inputs, labels\), e\.g\. ds = "
                       r"crossbow_jax\.data\.load_dataset\('mnist'\) and "
                       r"test=\(ds\.test_images, ds\.test_labels\)$"):  # fmt: skip
        train(MLP(3), (X, Y), "mnist")


@pytest.mark.parametrize("model", ["own", "lenet"])
@pytest.mark.usefixtures("no_work")
def test_class_labels_from_one_are_refused(model):
    data = (X, Y + 1) if model == "own" else (DIGITS[0], DIGITS[1] + 1)  # own: 3 outputs
    top = 3 if model == "own" else 10
    with pytest.raises(ConfigError, match=rf"^train labels run 1\.\.{top}; class labels must "
                                          r"start at 0: pass y - 1$"):  # fmt: skip
        train(MLP(3) if model == "own" else model, data)


@pytest.mark.usefixtures("no_work")
def test_a_named_models_classes_come_from_the_train_labels():
    x, y = DIGITS
    with pytest.raises(ConfigError, match=r"^test labels row 9 holds 9, outside \[0, 9\): the "
                       r"named model 'lenet' scores 9 classes, the train labels' largest \+ 1"):  # fmt: skip
        train("lenet", (x, y % 9), (x, y))


def whole_variables():
    return jax.eval_shape(MLP(3).init, jax.random.PRNGKey(0), X[:1].astype(np.float32))


@pytest.mark.parametrize("build", ["masked", "multi_transform"])
@pytest.mark.usefixtures("no_work")
def test_an_optax_mask_built_on_the_whole_variables_says_to_use_params(build):
    variables = whole_variables()  # {"params": ...}: what Linen's model.init returns
    if build == "masked":
        opt = optax.masked(optax.sgd(0.1), jax.tree.map(lambda p: len(p.shape) > 1, variables))
    else:
        labels = jax.tree.map(lambda p: "w" if len(p.shape) > 1 else "b", variables)
        opt = optax.multi_transform({"w": optax.sgd(0.1), "b": optax.set_to_zero()}, labels)
    with pytest.raises(ConfigError, match=r"^the optimizer's mask/labels were built from the "
                       r"whole variables dict \{'params': \.\.\.\}; the optimizer sees "
                       r"variables\['params'\]: build it from variables\['params'\]$"):  # fmt: skip
        train(MLP(3), (X, Y), optimizer=opt)


@pytest.mark.usefixtures("no_work")
def test_an_optimizer_error_keeps_its_path():
    params = dict(whole_variables()["params"])
    del params["Dense_1"]  # a mask for part of the model: optax names the keys that differ
    opt = optax.masked(optax.sgd(0.1), jax.tree.map(lambda p: True, params))
    with pytest.raises(ConfigError, match=r"^optimizer cannot initialise on the model's "
                       r"parameters: ValueError: pytree structure error: .* 2 child keys "
                       r"Dense_0 Dense_1 so the symmetric difference on key sets is Dense_1$"):  # fmt: skip
        train(MLP(3), (X, Y), optimizer=opt)


@pytest.mark.usefixtures("no_work")
def test_an_optimizer_needing_another_extra_argument_is_refused():
    def update(updates, state, params=None, *, loss, **extra):
        return updates, state

    opt = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    with pytest.raises(ConfigError, match=r"^optimizer cannot update the model's parameters: "
                       r"TypeError: .*'loss'.*; the engine calls update\(grads, state, params, "
                       r"value=the learner's loss\)"):  # fmt: skip
        train(MLP(3), (X, Y), optimizer=opt)


def plateau():
    """Scale halves at every update after the first (nothing improves by atol=1e9 more)."""
    return optax.contrib.reduce_on_plateau(factor=0.5, patience=1, atol=1e9)


@pytest.mark.parametrize("kind", ["sma", "ssgd"])
def test_the_value_argument_is_each_learners_own(kind):
    params = {"w": jnp.zeros((2, 3))}
    wrap = crossbow_jax.sma if kind == "sma" else crossbow_jax.ssgd
    opt = wrap(optax.chain(optax.sgd(0.1), plateau()))
    state, update = opt.init(params), jax.jit(opt.update)
    for value in ([1.0, 2.0], [0.5, 0.5], [0.1, 0.1]):
        value = jnp.asarray(value if kind == "sma" else value[0])  # ssgd: one (mean) loss
        _, state = update(jax.tree.map(jnp.ones_like, params), state, params, value=value)
    inner = state.learner_state if kind == "sma" else state.inner_state
    np.testing.assert_array_equal(inner[1].best_value, [1.0, 2.0] if kind == "sma" else 1.0)
    np.testing.assert_array_equal(inner[1].scale, [0.25, 0.25] if kind == "sma" else 0.25)


def test_train_gives_reduce_on_plateau_each_learners_loss(tmp_path):
    opt = optax.chain(optax.sgd(0.1), plateau())
    result = train(MLP(3), (X, Y), optimizer=opt, epochs=0.5, checkpoint_dir=str(tmp_path))
    assert result.steps == 4  # 32 images per step
    with ocp.StandardCheckpointer() as reader:
        state = reader.restore(tmp_path / "checkpoints" / "4" / "state")
    found = {}

    def find(path, leaf):
        found[jax.tree_util.keystr(path[-1:])] = np.asarray(leaf)

    jax.tree_util.tree_map_with_path(find, state["opt_state"]["learner_state"])
    best, scale = found["['best_value']"], found["['scale']"]
    assert best.shape == scale.shape == (2, 2)  # devices x learners
    np.testing.assert_array_equal(scale, np.full((2, 2), 0.5**3))  # reduced at steps 2, 3, 4
    assert np.all((0.1 < best) & (best < 5)) and len(np.unique(best)) == 4  # each its own loss
