"""The family's defaults train (docs/sma.md, "Defaults that train"): under an outer
Nesterov step (diloco, hierarchical) the default learner is plain SGD, which converges
where the momentum learner of the other members diverges; momentum set under an outer
step is warned of, before any work."""

import functools
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from _engine_fixtures import MLP, split

import crossbow_jax
from crossbow_jax.engine import device_map, inputs, make_mesh
from crossbow_jax.engine.config import TrainConfig, make_config
from crossbow_jax.engine.mapping import device_axes
from crossbow_jax.engine.optimizers import learner_transform
from crossbow_jax.engine.plan import Clock, Position

TARGET = jnp.arange(3.0)
CLOCK = Clock(Position(), images_per_step=64, num_train=1024)
OUTER = {"diloco": {}, "hierarchical": {"hosts": 2}}


def distance(config: TrainConfig, steps: int = 200) -> float:
    """The central model's distance to the minimum of a sharp quadratic (gradient
    2 (w - t)) after `steps` updates of `config`'s default learners, 2 learners on each
    of 2 devices (for hierarchical: 2 hosts of 1 device)."""
    mesh = make_mesh(jax.devices()[:2], hosts=config.hosts or 1)
    tx = learner_transform(config, None, CLOCK, axes=device_axes(mesh))

    def step(params, state):
        grads = jax.vmap(jax.grad(lambda w: jnp.sum((w - TARGET) ** 2)))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = jnp.zeros((2, 2, 3))
    state = jax.jit(device_map(tx.init, mesh))(params)
    run = jax.jit(
        device_map(lambda p, s: jax.lax.fori_loop(0, steps, lambda _, c: step(*c), (p, s)), mesh)
    )
    params, state = run(params, state)
    return float(jnp.max(jnp.abs(crossbow_jax.central_params(state)[0] - TARGET)))


@pytest.mark.parametrize("algorithm", list(OUTER))
def test_outer_step_members_default_to_learners_that_converge(algorithm):
    config = make_config(algorithm=algorithm, sync_every=4, **OUTER[algorithm])
    start = float(jnp.max(TARGET))
    assert distance(config) < 0.01 * start
    assert config.momentum is None and config.learner_momentum == 0.0
    assert config.identity()["momentum"] == 0.0  # a resumed run compares the learner's own
    if algorithm == "hierarchical":  # diloco's: tests/test_family.py, with optax.sgd
        assert distance(config.replace(momentum=0.9)) > start  # the other members' learner


def test_the_other_members_keep_momentum_learners_and_a_set_momentum_is_kept():
    for options in ({"algorithm": "sma"}, {"algorithm": "local_sgd", "sync_every": 4}, {}):
        assert make_config(**options).learner_momentum == 0.9
    assert make_config(algorithm="ssgd").learner_momentum == 0.9
    assert make_config(algorithm="diloco", sync_every=4, momentum=0.5).learner_momentum == 0.5
    assert "0 for diloco and hierarchical" in TrainConfig.__doc__  # and so in --help


def test_momentum_set_under_an_outer_step_warns_before_any_work(monkeypatch):
    def touched(*args, **kwargs):
        raise RuntimeError("the data were loaded")

    monkeypatch.setattr(inputs, "resolve_data", touched)
    train, test = split(n_train=64, n_test=16)
    run = functools.partial(crossbow_jax.train, MLP(), train, test, sync_every=4)
    warned = pytest.warns(UserWarning, match=r"^momentum=0.9 with algorithm='diloco'.* leave")
    with warned, pytest.raises(RuntimeError, match="data were loaded"):
        run(algorithm="diloco", momentum=0.9)
    with warnings.catch_warnings():  # the defaults, and a momentum the member keeps: quiet
        warnings.simplefilter("error")
        for options in ({"algorithm": "diloco"}, {"algorithm": "local_sgd", "momentum": 0.9}):
            with pytest.raises(RuntimeError, match="data were loaded"):
                run(**options)
