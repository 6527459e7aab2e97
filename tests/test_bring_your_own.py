"""Bring your own model, loss and data: Linen mode keywords, NNX, pure functions, other
tasks, checks before any work, and results you can use (predict, load_run, repr)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _engine_fixtures import MLP, split
from flax import nnx

import crossbow_jax
from crossbow_jax.engine import programs

TRAIN, TEST = split()
RUN = dict(batch_size=8, learners_per_device=2, num_devices=2, progress=False)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture
def no_work(monkeypatch):
    """Refusals must come before the training data is placed on a device."""
    monkeypatch.setattr(programs, "TrainData", lambda *a, **k: pytest.fail("work started"))


# -- Linen: the mode keyword -------------------------------------------------------------


def dropout_mlp(x, rate, training):
    """Dense -> dropout -> Dense, built inside the caller's compact `__call__`."""
    x = nn.Dropout(rate, deterministic=not training)(nn.relu(nn.Dense(32)(x)))
    return nn.Dense(4)(x)


class TrainNet(nn.Module):
    rate: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = False):
        return dropout_mlp(x, self.rate, train)


class TrainingNet(TrainNet):
    @nn.compact
    def __call__(self, x, training=False):
        return dropout_mlp(x, self.rate, training)


class IsTrainingNet(TrainNet):
    @nn.compact
    def __call__(self, x, is_training=False):
        return dropout_mlp(x, self.rate, is_training)


class DeterministicNet(TrainNet):
    @nn.compact
    def __call__(self, x, *, deterministic):  # required, and True in evaluation
        return dropout_mlp(x, self.rate, not deterministic)


@pytest.fixture(scope="module")
def without_dropout():
    """The same network (`dropout_mlp`) at rate 0, whatever its mode keyword: the baseline."""
    return crossbow_jax.train(TrainNet(rate=0.0), TRAIN, TEST, epochs=1, **RUN)


@pytest.mark.parametrize("net", [TrainNet, TrainingNet, IsTrainingNet, DeterministicNet])
def test_recognised_mode_keywords_train_with_dropout_and_evaluate_without(net, without_dropout):
    heavy = crossbow_jax.train(net(rate=0.9), TRAIN, TEST, epochs=1, **RUN)
    # Dropout 0.9 is active in training (a higher training loss), not in evaluation.
    assert heavy.history[-1]["loss"] > without_dropout.history[-1]["loss"] + 0.1
    assert heavy.accuracy > 0.5


def test_an_explicit_mode_keyword_names_any_other():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, eval_mode=True):
            x = nn.Dropout(0.9, deterministic=eval_mode)(nn.relu(nn.Dense(32)(x)))
            return nn.Dense(4)(x)

    heavy = crossbow_jax.train(Net(), TRAIN, TEST, epochs=1, mode_keyword="not eval_mode", **RUN)
    assert heavy.history[-1]["loss"] > 0.3 and heavy.accuracy > 0.5
    with pytest.raises(crossbow_jax.ConfigError, match="takes no 'evaluating'"):
        crossbow_jax.train(Net(), TRAIN, TEST, epochs=1, mode_keyword="evaluating", **RUN)


def test_dropout_or_batchnorm_without_a_mode_keyword_is_refused(no_work):
    class Fixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=True)(nn.Dense(8)(x))
            return nn.Dense(4)(nn.Dropout(0.5, deterministic=True)(x))

    with pytest.raises(crossbow_jax.ConfigError, match=r"has BatchNorm and Dropout but its "
                       r"__call__ takes none of train, training"):  # fmt: skip
        crossbow_jax.train(Fixed(), TRAIN, TEST, epochs=1, **RUN)


# -- NNX and pure functions ----------------------------------------------------------------


class NNXNet(nnx.Module):
    def __init__(self, rate: float, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.out = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.norm(self.hidden(x)))))


def test_an_nnx_module_trains_with_batchnorm_and_dropout():
    heavy = crossbow_jax.train(NNXNet(0.9, nnx.Rngs(0)), TRAIN, TEST, epochs=2, **RUN)
    none = crossbow_jax.train(NNXNet(0.0, nnx.Rngs(0)), TRAIN, TEST, epochs=2, **RUN)
    assert none.accuracy > 0.9 and heavy.accuracy > 0.5
    assert heavy.history[-1]["loss"] > none.history[-1]["loss"] + 0.1  # dropout in training
    # The central model's BatchNorm statistics moved away from (0, 1) and evaluate it.
    model = NNXNet(0.0, nnx.Rngs(1))
    nnx.update(model, none.params)
    assert np.abs(np.asarray(model.norm.mean[...])).max() > 0.1
    model.eval()
    x, y = TEST
    accuracy = float(np.mean(np.argmax(np.asarray(model(jnp.asarray(x))), -1) == y))
    assert accuracy == pytest.approx(none.accuracy)


def test_a_pure_function_with_its_parameters_trains():
    def apply_fn(params, x):
        return jnp.tanh(x @ params["w1"]) @ params["w2"]

    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(8, 16)).astype(np.float32) * 0.3,
              "w2": rng.normal(size=(16, 4)).astype(np.float32) * 0.3}  # fmt: skip
    r = crossbow_jax.train((apply_fn, params), TRAIN, TEST, epochs=2, **RUN)
    assert r.accuracy > 0.9 and set(r.params) == {"w1", "w2"}
    x, y = TEST
    assert np.mean(np.argmax(apply_fn(r.params, x), -1) == y) == pytest.approx(r.accuracy)


def test_anything_else_is_refused(no_work):
    with pytest.raises(crossbow_jax.ConfigError, match="model must be a flax.linen.Module, a "
                       "flax.nnx.Module, a pair"):  # fmt: skip
        crossbow_jax.train(object(), TRAIN, TEST, epochs=1, **RUN)


# -- other tasks: loss_fn and metrics_fn ------------------------------------------------------


def test_regression_with_mse_reports_loss_and_metrics_not_accuracy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(512, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.3).astype(np.float32)

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(x)

    mse = lambda out, y: jnp.mean((out - y) ** 2, axis=-1)  # noqa: E731
    mae = lambda out, y: {"mae": jnp.mean(jnp.abs(out - y), axis=-1)}  # noqa: E731
    data = (x[:384], y[:384]), (x[384:], y[384:])
    r = crossbow_jax.train(Linear(), *data, epochs=6, loss_fn=mse, metrics_fn=mae,
                           optimizer=optax.sgd(0.05), **RUN)  # fmt: skip
    assert r.accuracy is None and r.test_loss < 0.01
    last = r.history[-1]
    assert "accuracy" not in last and "test_accuracy" not in last
    assert last["test_mae"] < 0.1 and last["mae"] < 0.2
    np.testing.assert_allclose(r.predict(x[384:]), y[384:], atol=0.2)
    with pytest.raises(crossbow_jax.ConfigError, match="target_accuracy=0.9 needs a classif"):
        crossbow_jax.train(Linear(), (x, y), epochs=1, loss_fn=mse, target_accuracy=0.9, **RUN)
    with pytest.raises(crossbow_jax.ConfigError, match="default loss is softmax cross-entropy"):
        crossbow_jax.train(Linear(), (x, y), epochs=1, **RUN)


def test_a_tiny_next_character_model_learns_token_sequences():
    text = "abcabcabcabd" * 40
    vocab = sorted(set(text))
    ids = np.array([vocab.index(c) for c in text], np.int32)
    windows = np.stack([ids[i : i + 9] for i in range(len(ids) - 9)])
    x, y = windows[:, :-1], windows[:, 1:]  # (N, 8) tokens -> the next 8 tokens

    class NextChar(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            h = nn.Embed(len(vocab), 16)(tokens)
            h = nn.relu(nn.Dense(32)(jnp.concatenate([h, jnp.roll(h, 1, axis=1)], -1)))
            return nn.Dense(len(vocab))(h)  # (N, 8, vocab)

    r = crossbow_jax.train(NextChar(), (x[:384], y[:384]), (x[384:], y[384:]), epochs=4,
                           optimizer=optax.adam(1e-2), **RUN)  # fmt: skip
    assert r.accuracy > 0.8  # per-token accuracy: "c" follows "b" and "a" follows "c"
    assert r.predict(x[384:390]).shape == (6, 8, len(vocab))


# -- the data are checked before any work ----------------------------------------------------


def test_labels_beyond_the_outputs_are_refused_with_split_and_row(no_work):
    x, y = TRAIN
    bad = y.copy()
    bad[17] = 7
    with pytest.raises(crossbow_jax.ConfigError, match=r"train labels row 17 holds 7, outside "
                       r"\[0, 4\): the model scores 4 classes"):  # fmt: skip
        crossbow_jax.train(MLP(), (x, bad), TEST, epochs=1, **RUN)
    tx, ty = TEST
    bad = ty.copy()
    bad[3] = -1
    with pytest.raises(crossbow_jax.ConfigError, match=r"test labels row 3 holds -1"):
        crossbow_jax.train(MLP(), TRAIN, (tx, bad), epochs=1, **RUN)


def test_nan_or_inf_in_either_split_is_refused(no_work):
    x, y = TRAIN
    bad = x.copy()
    bad[5, 2] = np.nan
    with pytest.raises(crossbow_jax.ConfigError, match="train inputs row 5 holds NaN"):
        crossbow_jax.train(MLP(), (bad, y), TEST, epochs=1, **RUN)
    tx, ty = TEST
    bad = tx.copy()
    bad[9, 0] = np.inf
    with pytest.raises(crossbow_jax.ConfigError, match="test inputs row 9 holds NaN or infin"):
        crossbow_jax.train(MLP(), TRAIN, (bad, ty), epochs=1, **RUN)


def test_inputs_the_model_cannot_take_are_refused(no_work):
    class Wants16(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(x.reshape(x.shape[0], 4, 4).sum(1))

    with pytest.raises(crossbow_jax.ConfigError, match=r"Wants16 fails on two training examples "
                       r"\(shape \(8,\), dtype float32\): TypeError: cannot reshape"):  # fmt: skip
        crossbow_jax.train(Wants16(), TRAIN, TEST, epochs=1, **RUN)


# -- results you can use -----------------------------------------------------------------------


def test_predict_applies_the_engines_preprocessing_on_raw_uint8_images(tmp_path):
    from _engine_fixtures import tiny_images

    from crossbow_jax.data.preprocess import Preprocess

    x, y = tiny_images(384)

    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3))(x))
            return nn.Dense(3)(x.mean((1, 2)))

    kw = dict(RUN, checkpoint_dir=str(tmp_path / "run"))
    r = crossbow_jax.train(Conv(), (x[:256], y[:256]), (x[256:], y[256:]), epochs=3, **kw)
    assert isinstance(r.preprocess, Preprocess) and r.preprocess.scale == pytest.approx(1 / 255)
    logits = r.predict(x[256:], batch_size=50)  # raw uint8, in batches
    assert logits.shape == (128, 3)
    assert np.mean(np.argmax(logits, -1) == y[256:]) == pytest.approx(r.accuracy)
    # By hand: the engine's preprocessing, then the central model.
    by_hand = Conv().apply(r.params, r.preprocess(jnp.asarray(x[256:]), None))
    np.testing.assert_allclose(logits, by_hand, rtol=1e-5, atol=1e-5)
    # A run folder gives the same back, with predict (the model's structure passed in).
    loaded = crossbow_jax.load_run(tmp_path / "run", model=Conv())
    assert loaded.steps == r.steps and loaded.accuracy == r.accuracy
    assert loaded.config == r.config and loaded.history == r.history
    for a, b in zip(leaves(loaded.params), leaves(r.params), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loaded.predict(x[256:]), logits, rtol=1e-6, atol=1e-6)
    bare = crossbow_jax.load_run(tmp_path / "run")  # a model of one's own: variables only
    with pytest.raises(crossbow_jax.ConfigError, match="pass it: load_run"):
        bare.predict(x[:2])


def test_load_run_rebuilds_a_named_model_and_refuses_a_folder_without_a_run(tmp_path):
    from crossbow_jax.data import load_dataset

    ds = load_dataset("synthetic", like="mnist", n_train=128, n_test=32)
    data = (ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)
    kw = dict(RUN, learners_per_device=1, batch_size=16)
    r = crossbow_jax.train("lenet", *data, epochs=1, checkpoint_dir=str(tmp_path / "r"), **kw)
    loaded = crossbow_jax.load_run(str(tmp_path / "r"))
    np.testing.assert_allclose(loaded.predict(ds.test_images), r.predict(ds.test_images),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(crossbow_jax.ConfigError, match="holds no checkpoint"):
        crossbow_jax.load_run(tmp_path / "nothing")


def test_repr_is_a_few_lines_not_the_weights():
    r = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, **RUN)
    text = repr(r)
    assert len(text) < 400 and text.count("\n") <= 4
    assert "test accuracy" in text and f"{r.steps} steps" in text and "images/s" in text
    assert f"compile {r.compile_time:.1f} s" in text and "execution " in text  # the fixed costs


# -- optimiser options that are never ignored ----------------------------------------------


def test_default_optimiser_settings_with_an_optimizer_are_refused():
    with pytest.raises(crossbow_jax.ConfigError, match=r"optimizer= is given, so "
                       r"learning_rate, lr_milestones \(settings of the default SGD"):  # fmt: skip
        crossbow_jax.train(MLP(), TRAIN, TEST, epochs=2, optimizer=optax.adam(1e-3),
                           learning_rate=0.1, lr_milestones=(1,), **RUN)  # fmt: skip
    # Milestones that mark resets onto z are not an optimiser setting.
    r = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=2, optimizer=optax.adam(1e-2),
                           lr_milestones=(1,), reset_at_drops=True, **RUN)  # fmt: skip
    assert r.accuracy > 0.9


@pytest.mark.parametrize(
    "optimizer, match",
    [
        (crossbow_jax.sma(optax.sgd(0.1)), "contains a crossbow_jax.sma or ssgd; pass the "
                                            "learner optimiser; the engine wraps it"),
        (optax.chain(optax.clip(1.0), crossbow_jax.ssgd(optax.sgd(0.1))), "the engine wraps it"),
        (optax.lookahead(optax.sgd(0.1), 5, 0.5), "optax.lookahead keeps slow weights"),
        ("adam", "optimizer must be an optax GradientTransformation"),
    ],
)  # fmt: skip
def test_wrapped_or_unusable_learner_optimisers_are_refused(optimizer, match, no_work):
    with pytest.raises(crossbow_jax.ConfigError, match=match):
        crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, optimizer=optimizer, **RUN)


def test_injected_learner_hyperparameters_are_shared_and_settable():
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.9)
    r = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, optimizer=opt, **RUN)
    assert r.accuracy > 0.9
    sma = crossbow_jax.sma(opt, alpha=0.25)
    params = {"w": jnp.zeros((4, 3))}
    state = sma.init(params)
    assert state.learner_state.hyperparams["learning_rate"].shape == ()  # one for all learners
    state = optax.tree_utils.tree_set(state, learning_rate=0.01)
    grads = {"w": jnp.ones((4, 3))}
    updates, _ = jax.jit(sma.update)(grads, state, params)
    np.testing.assert_allclose(updates["w"], -0.01 * np.ones((4, 3)), rtol=1e-6)


def test_inject_hyperparams_around_sma_takes_array_alpha_and_momentum():
    opt = optax.inject_hyperparams(crossbow_jax.sma)(optax.sgd(0.1), alpha=0.1, momentum=0.5)
    params = {"w": jnp.zeros((4, 3))}
    grads = {"w": jnp.arange(12.0).reshape(4, 3)}
    state = opt.init(params)
    plain = crossbow_jax.sma(optax.sgd(0.1), alpha=0.1, momentum=0.5)
    expected, _ = plain.update(grads, plain.init(params), params)
    updates, state = jax.jit(opt.update)(grads, state, params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
    state = optax.tree_utils.tree_set(state, alpha=0.2)
    updates, _ = jax.jit(opt.update)(grads, state, params)
    assert float(state.hyperparams["alpha"]) == pytest.approx(0.2)


# -- what the review of this change found ---------------------------------------------------


class NNXKeyword(nnx.Module):
    """An NNX module that passes its own mode keyword to dropout."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden, self.out = nnx.Linear(8, 32, rngs=rngs), nnx.Linear(32, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.9, rngs=rngs)

    def __call__(self, x, train: bool = False):
        return self.out(self.drop(nnx.relu(self.hidden(x)), deterministic=not train))


def test_an_nnx_module_with_a_mode_keyword_gets_it():
    r = crossbow_jax.train(NNXKeyword(nnx.Rngs(0)), TRAIN, TEST, epochs=1,
                           optimizer=optax.adam(1e-2), **RUN)  # fmt: skip
    assert r.history[-1]["loss"] > 0.3  # dropout 0.9 in training, because train=True reached it
    assert r.accuracy > 0.8


def test_nnx_rng_streams_of_any_shape_are_rekeyed_in_shape():
    import dataclasses

    from crossbow_jax.models.adapters import NNXModel

    model = NNXModel.of(NNXNet(0.5, nnx.Rngs(0)))
    # Streams split over 3 stacked layers (as nnx.vmap / nnx.scan over layers makes them).
    leaves, tree = jax.tree.flatten(model.rngs)
    split = [jax.random.split(leaf, 3) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
             else jnp.zeros((3,), leaf.dtype) for leaf in leaves]  # fmt: skip
    model = dataclasses.replace(model, rngs=jax.tree.unflatten(tree, split))
    keyed = model._keyed_rngs(jax.random.PRNGKey(1))
    assert jax.tree.map(jnp.shape, keyed) == jax.tree.map(jnp.shape, model.rngs)
    keys = [k for k in jax.tree.leaves(keyed) if jax.dtypes.issubdtype(k.dtype,
                                                                     jax.dtypes.prng_key)]
    assert len({tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys[0]}) == 3


@pytest.mark.parametrize(
    "model, match",
    [
        (MLP, "model is the class MLP; pass an instance"),
        ((MLP().apply, {"params": {}}), "pass the module alone"),
        ((lambda p, x: x @ p["w"], {"w": np.ones((8, 4), np.int32)}),
         r"parameter \['w'\] is int32"),
    ],
)  # fmt: skip
def test_models_given_the_wrong_way_are_refused(model, match, no_work):
    with pytest.raises(crossbow_jax.ConfigError, match=match):
        crossbow_jax.train(model, TRAIN, TEST, epochs=1, **RUN)


def test_loss_and_metric_functions_are_checked(no_work):
    ce = optax.softmax_cross_entropy_with_integer_labels
    with pytest.raises(crossbow_jax.ConfigError, match=r"loss_fn must give one value per "
                       r"example, shape \(batch, ...\), but 'loss' has shape \(\)"):  # fmt: skip
        crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, loss_fn=lambda o, y: ce(o, y).mean(),
                           **RUN)  # fmt: skip
    with pytest.raises(crossbow_jax.ConfigError, match="names are not loss, accuracy, count"):
        crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1,
                           metrics_fn=lambda o, y: {"step": ce(o, y)}, **RUN)  # fmt: skip


def test_three_dimensional_float_inputs_stay_as_given():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(256, 5, 3)).astype(np.float32)  # (N, T, F) sequences
    y = (x[:, :, 0].sum(1) > 0).astype(np.int32)

    class Seq(nn.Module):
        @nn.compact
        def __call__(self, x):
            assert x.ndim == 3  # no channel axis was added
            return nn.Dense(2)(nn.relu(nn.Dense(16)(x)).mean(1))

    r = crossbow_jax.train(Seq(), (x[:192], y[:192]), (x[192:], y[192:]), epochs=3,
                           optimizer=optax.adam(1e-2), **RUN)  # fmt: skip
    assert r.accuracy > 0.8 and r.predict(x[:4]).shape == (4, 2)


def test_options_that_cannot_take_effect_are_refused(no_work):
    for options, match in [
        ({"reset_at_drops": True}, "reset_at_drops=True moves SMA's learners"),
        ({"reset_at_drops": True, "lr_milestones": (0.5,), "algorithm": "ssgd"}, "needs algor"),
        ({"mode_keyword": "train"}, "mode_keyword='train' is for models of your own"),
    ]:
        with pytest.raises(crossbow_jax.ConfigError, match=match):
            crossbow_jax.train("lenet" if "mode_keyword" in options else MLP(), TRAIN, TEST,
                               epochs=1, **RUN, **options)  # fmt: skip


def test_a_layer_fixed_in_training_mode_without_a_mode_keyword_is_named(no_work):
    class AlwaysDropout(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.Dropout(0.5, deterministic=False)(nn.Dense(8)(x)))

    with pytest.raises(crossbow_jax.ConfigError, match="has Dropout but its __call__ takes none"):
        crossbow_jax.train(AlwaysDropout(), TRAIN, TEST, epochs=1, **RUN)


def test_load_run_checks_the_model_and_predict_checks_the_inputs(tmp_path):
    kw = dict(RUN, checkpoint_dir=str(tmp_path / "run"))
    r = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, **kw)
    with pytest.raises(crossbow_jax.ConfigError, match=r"predict takes inputs like the training "
                       r"inputs, \(N, 8\); got shape \(8,\)"):  # fmt: skip
        r.predict(TEST[0][0])
    with pytest.raises(crossbow_jax.ConfigError, match=r"the model differs from the one .* was "
                       r"trained with \(\['Dense_0'\]\['bias'\] was float32\[4\]"):  # fmt: skip
        crossbow_jax.load_run(tmp_path / "run", model=MLP(classes=5))
    bare = crossbow_jax.load_run(tmp_path / "run")
    assert set(bare.params) == {"params", "state"} and "Dense_1" in bare.params["params"]
