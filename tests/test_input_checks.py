"""optax's loss argument (`value=`) given to the learner optimiser: each learner's own loss
(`optax.contrib.reduce_on_plateau`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _engine_fixtures import MLP, tiny_images

import crossbow_jax

X, Y = tiny_images()  # uint8 (256, 8, 8, 3), 3 classes
RUN = {"batch_size": 8, "learners_per_device": 2, "num_devices": 2, "epochs": 1,
       "progress": False, "execution": "unroll"}  # fmt: skip


def train(model, data, test=None, **kw):
    return crossbow_jax.train(model, data, test, **{**RUN, **kw})


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
