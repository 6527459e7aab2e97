"""SMA and SSGD behave as optax transformations: jit, wrappers, dtypes, errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import crossbow_jax


def stacked(m=3, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(m, 4, 2)), dtype),
        "b": jnp.asarray(rng.normal(size=(m, 2)), dtype),
    }


def grads_like(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def run(opt, params, steps=3, **extra):
    state = opt.init(params)
    step = jax.jit(lambda p, s: opt.update(grads_like(p), s, p, **extra))
    for _ in range(steps):
        updates, new_state = step(params, state)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        jax.tree.map(
            lambda a, b: (
                (a.shape, a.dtype) == (b.shape, b.dtype)
                or pytest.fail(f"state leaf changed {a.shape}{a.dtype} -> {b.shape}{b.dtype}")
            ),
            state,
            new_state,
        )
        params, state = optax.apply_updates(params, updates), new_state
    return params, state, updates


TRANSFORMS = {
    "sma": lambda inner: crossbow_jax.sma(inner, alpha=0.1),
    "ssgd": lambda inner: crossbow_jax.ssgd(inner),
}


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize(
    "inner",
    [
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
        optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.sgd(optax.exponential_decay(0.1, 1, 0.5), momentum=0.9),
        ),
        optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
        optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9)),
    ],
    ids=["inject_hyperparams", "chain_clip_schedule", "multisteps", "weight_decay"],
)
def test_wrapped_learner_optimizers_run_under_jit(kind, inner):
    params, state, _ = run(TRANSFORMS[kind](inner), stacked())
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_inject_hyperparams_gives_the_same_result_as_the_plain_optimizer():
    plain, _, _ = run(crossbow_jax.sma(optax.sgd(0.1, momentum=0.9), alpha=0.1), stacked())
    injected, state, _ = run(
        crossbow_jax.sma(
            optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9), alpha=0.1
        ),
        stacked(),
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), plain, injected)
    # Injected hyperparameters are shared by all learners: one scalar (issue: set with tree_set).
    assert state.learner_state.hyperparams["learning_rate"].shape == ()


def test_global_norm_clipping_is_per_learner():
    params = {"w": jnp.zeros((2, 4))}
    grads = {"w": jnp.stack([jnp.full(4, 100.0), jnp.full(4, 0.1)])}  # norms 200 and 0.2
    opt = crossbow_jax.sma(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), alpha=0.1)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    np.testing.assert_allclose(np.linalg.norm(updates["w"][0]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(updates["w"][1], -0.1, rtol=1e-5)  # small learner untouched


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_bfloat16_params_stay_bfloat16(kind):
    params, state, updates = run(
        TRANSFORMS[kind](optax.sgd(0.1, momentum=0.9)), stacked(dtype=jnp.bfloat16)
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((params, updates)))
    if kind == "sma":
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.z))


def test_average_dtype_keeps_a_float32_average_of_bfloat16_learners():
    opt = crossbow_jax.sma(optax.sgd(0.1), alpha=0.1, average_dtype=jnp.float32)
    params, state, updates = run(opt, stacked(dtype=jnp.bfloat16))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.z))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(updates))


def test_reset_learners_moves_every_learner_onto_z_even_when_traced():
    opt = crossbow_jax.sma(optax.sgd(0.1, momentum=0.9), alpha=0.1)
    params, state, _ = run(opt, stacked(), steps=2)
    z = crossbow_jax.sma_average(state)
    step = jax.jit(lambda p, s, r: opt.update(grads_like(p), s, p, reset_learners=r))
    updates, new_state = step(params, state, jnp.asarray(True))
    moved = optax.apply_updates(params, updates)
    for leaf, zl in zip(jax.tree.leaves(moved), jax.tree.leaves(z)):
        np.testing.assert_allclose(leaf, np.broadcast_to(zl, leaf.shape), atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, new_state.z, state.z)
    updates_off, off_state = step(params, state, jnp.asarray(False))
    plain, plain_state = jax.jit(opt.update)(grads_like(params), state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates_off, plain)
    assert int(off_state.count) == int(plain_state.count) == 3


def test_sma_average_finds_the_state_inside_a_chain():
    opt = optax.chain(optax.identity(), crossbow_jax.sma(optax.sgd(0.1), alpha=0.1))
    _, state, _ = run(opt, stacked())
    assert crossbow_jax.sma_average(state)["w"].shape == (4, 2)
    with pytest.raises(ValueError, match="no SMAState"):
        crossbow_jax.sma_average(optax.sgd(0.1).init(stacked()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 0.0}, "alpha=0.0 must be > 0"),
        ({"alpha": -0.1}, "alpha=-0.1 must be > 0"),
        ({"momentum": 1.0}, r"momentum=1.0 must be in \[0, 1\)"),
        ({"momentum": -0.1}, r"momentum=-0.1 must be in \[0, 1\)"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        crossbow_jax.sma(optax.sgd(0.1), **kwargs)


def test_not_an_optimizer_is_refused():
    with pytest.raises(TypeError, match="learner_optimizer must be an optax"):
        crossbow_jax.sma(0.1)


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_mismatched_learner_axes_are_refused(kind):
    opt = TRANSFORMS[kind](optax.sgd(0.1))
    bad = {"w": jnp.zeros((3, 4)), "b": jnp.zeros((2, 4))}
    with pytest.raises(ValueError, match=r"different leading learner axes \[2, 3\]"):
        opt.init(bad)
    params = stacked(m=3)
    state = opt.init(params)
    with pytest.raises(ValueError, match="updates have 2 learners but params have 3"):
        opt.update(stacked(m=2), state, params)
    with pytest.raises(ValueError, match="params is None"):
        opt.update(params, state)
    with pytest.raises(ValueError, match="is a scalar"):
        opt.init({"w": jnp.zeros(())})


def test_unstable_alpha_warns():
    with pytest.warns(UserWarning, match="alpha\\*k=2.4"):
        crossbow_jax.sma(optax.sgd(0.1), alpha=0.8).init(stacked(m=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crossbow_jax.sma(optax.sgd(0.1)).init(stacked(m=3))


def test_lookahead_as_a_learner_optimiser_is_refused_clearly():
    with pytest.raises(ValueError, match="optax.lookahead keeps slow weights"):
        crossbow_jax.sma(optax.lookahead(optax.sgd(0.1), 5, 0.5))
    lookahead = optax.lookahead(optax.sgd(0.1), 5, 0.5)
    chained = crossbow_jax.sma(optax.chain(optax.identity(), lookahead))
    with pytest.raises(ValueError, match="optax.lookahead keeps slow weights"):
        chained.init(stacked())
