"""Published Flax models run unmodified: NNX modules that take `rngs` at call time (Flax's
NNX MNIST tutorial and examples/mnist), Linen's examples/mnist CNN, mode flags passed
positionally or through the dropout rng; a model that cannot run is refused in one line."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _engine_fixtures import tiny_images
from flax import nnx

import crossbow_jax
from crossbow_jax.engine import programs
from crossbow_jax.models.adapters import as_model

X, Y = tiny_images(192)  # uint8 8x8x3 images, 3 classes
TRAIN, TEST = (X[:128], Y[:128]), (X[128:], Y[128:])
RUN = {"batch_size": 8, "learners_per_device": 2, "num_devices": 1, "epochs": 1,
       "progress": False, "execution": "vmap", "steps_per_dispatch": 1}  # fmt: skip


@pytest.fixture
def no_work(monkeypatch):
    """Refusals must come before the training data is placed on a device."""
    monkeypatch.setattr(programs, "TrainData", lambda *a, **k: pytest.fail("work started"))


class TutorialCNN(nnx.Module):
    """The structure of the CNN of Flax's NNX MNIST tutorial (google/flax,
    docs_nnx/mnist_tutorial.md, 2026): conv-dropout-BatchNorm-relu-avgpool,
    conv-BatchNorm-relu-avgpool, dense-dropout-relu, dense; its Dropout layers hold no
    rngs: `__call__` takes them. Narrower, for 8x8x3 images and 3 classes."""

    def __init__(self, rate: float = 0.025, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 4, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(4, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=rate)
        self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(8, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(32, 16, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=rate)
        self.linear2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x, rngs: nnx.Rngs | None = None):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = nnx.relu(self.dropout2(self.linear1(x.reshape(x.shape[0], -1)), rngs=rngs))
        return self.linear2(x)


class ExampleCNN(TutorialCNN):
    """Flax's examples/mnist/train.py since its NNX port (2026): the same model, `rngs`
    required and given as None in evaluation."""

    def __call__(self, x, rngs: nnx.Rngs):
        return super().__call__(x, rngs)


class LinenExampleCNN(nn.Module):
    """The structure of Flax's Linen examples/mnist CNN (google/flax, examples/mnist/train.py
    before its NNX port): conv 3x3-relu-avgpool twice, dense-relu, dense; no mode flag."""

    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), strides=(2, 2))
        return nn.Dense(3)(nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1)))))


class LinenPositionalTrain(nn.Module):
    @nn.compact
    def __call__(self, x, train):  # a positional flag, no default
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(16)(x.reshape(len(x), -1))))
        return nn.Dense(3)(x)


class LinenModeByRng(nn.Module):
    """No mode flag: dropout is on when the call is given a 'dropout' rng."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x.reshape(len(x), -1)))
        return nn.Dense(3)(nn.Dropout(0.5)(x, deterministic=not self.has_rng("dropout")))


def test_the_nnx_tutorial_cnn_trains_reproducibly_and_predicts_deterministically():
    # Its Dropout layers hold no rngs: training runs only if the engine passes them.
    first = crossbow_jax.train(TutorialCNN(0.5, rngs=nnx.Rngs(0)), TRAIN, TEST, seed=3, **RUN)
    again = crossbow_jax.train(TutorialCNN(0.5, rngs=nnx.Rngs(0)), TRAIN, TEST, seed=3, **RUN)
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the same seed: the same dropout masks
    logits = first.predict(TEST[0])
    np.testing.assert_array_equal(first.predict(TEST[0]), logits)  # no dropout in predict
    model = TutorialCNN(0.5, rngs=nnx.Rngs(1))  # by hand: the central model, in eval mode
    nnx.update(model, first.params)
    model.eval()
    by_hand = model(first.preprocess(jnp.asarray(TEST[0]), None))
    np.testing.assert_allclose(logits, by_hand, rtol=1e-5, atol=1e-5)
    assert np.mean(np.argmax(logits, -1) == TEST[1]) == pytest.approx(first.accuracy)


@pytest.mark.parametrize("cnn", [TutorialCNN, ExampleCNN])
def test_call_time_rngs_are_drawn_from_the_key_in_training_and_none_in_evaluation(cnn):
    module = cnn(0.5, rngs=nnx.Rngs(0))
    model = as_model(module)
    x = jnp.asarray(X[:16], jnp.float32) / 255
    params, state = model.init(None, None)
    apply = jax.jit(lambda key, train: model.apply(params, state, x, train=train, key=key)[0],
                    static_argnums=1)  # fmt: skip
    one, two = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    np.testing.assert_array_equal(apply(one, True), apply(one, True))
    assert not np.allclose(apply(one, True), apply(two, True))  # another learner or step
    module.eval()
    np.testing.assert_allclose(apply(one, False), module(x, None), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(apply(one, False), apply(two, False))


@pytest.mark.parametrize("net", [LinenExampleCNN, LinenModeByRng])
def test_linen_models_without_a_mode_keyword_train(net):
    r = crossbow_jax.train(net(), TRAIN, TEST, **RUN)
    assert r.accuracy > 0.8
    np.testing.assert_array_equal(r.predict(TEST[0]), r.predict(TEST[0]))


def test_positional_mode_flags_are_found_and_an_unknown_required_one_is_refused(no_work):
    class NNXPositionalTrain(nnx.Module):
        def __call__(self, x, train=False):
            return x

    assert as_model(LinenPositionalTrain()).mode == ("train", False)
    assert as_model(NNXPositionalTrain()).mode == ("train", False)

    class Flagged(nn.Module):
        @nn.compact
        def __call__(self, x, use_dropout):
            x = nn.Dropout(0.5, deterministic=not use_dropout)(x.reshape(len(x), -1))
            return nn.Dense(3)(x)

    with pytest.raises(crossbow_jax.ConfigError, match=r"^Flagged.__call__ requires "
                       r"'use_dropout', which the engine does not pass .* pass "
                       r"mode_keyword='use_dropout' \(or 'not use_dropout'"):  # fmt: skip
        crossbow_jax.train(Flagged(), TRAIN, TEST, **RUN)
    assert as_model(Flagged(), mode_keyword="use_dropout").mode == ("use_dropout", False)


def test_an_nnx_dropout_with_no_rngs_anywhere_is_refused_saying_what_to_change(no_work):
    class NoRngs(TutorialCNN):
        def __call__(self, x):
            return super().__call__(x, None)

    with pytest.raises(crossbow_jax.ConfigError) as refused:
        crossbow_jax.train(NoRngs(rngs=nnx.Rngs(0)), TRAIN, TEST, **RUN)
    message = str(refused.value)
    assert "\n" not in message and "(in training, called as model.train(); model(x))" in message
    assert message.endswith(
        "give the layer rngs where it is built (e.g. nnx.Dropout(rate, rngs=rngs)), or take "
        "`rngs` in __call__ and pass it to the layer"
    )


def test_a_linen_layer_drawing_another_rng_is_refused_saying_what_to_change(no_work):
    class NoisyNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(3)(x.reshape(len(x), -1))
            return nn.Dropout(0.5, rng_collection="noise", deterministic=not train)(x)

    with pytest.raises(crossbow_jax.ConfigError) as refused:
        crossbow_jax.train(NoisyNet(), TRAIN, TEST, **RUN)
    message = str(refused.value)
    assert 'needs PRNG for "noise"' in message and "\n" not in message
    assert (
        "(in training, called as apply(variables, x, train=True, rngs={'dropout': key}" in message
    )
    assert message.endswith("; Linen models get one rng, 'dropout', in training only: draw from it")
