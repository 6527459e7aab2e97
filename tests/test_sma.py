"""SMA against the float64 reference of Algorithm 1, on 1 and 8 devices."""

import jax
import numpy as np
import optax
import pytest
from _harness import rel_err, run_mapped, run_single
from reference import sma_reference

import crossbow_jax

STEPS = 6
LR = 0.05


@pytest.mark.parametrize("mapper", ["shard_map", "pmap"])
@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("beta", [0.0, 0.9], ids=["sgd", "momentum"])
def test_sma_matches_float64_reference(mapper, devices, beta):
    m = 3
    k = devices * m
    alpha = 0.5 / k

    def make(axis_name):
        return crossbow_jax.sma(
            optax.sgd(LR, momentum=beta or None), alpha=alpha, momentum=0.9, axis_name=axis_name
        )

    w, state, w0, s, t = run_mapped(make, devices=devices, m=m, steps=STEPS, mapper=mapper)
    w_ref, z_ref = sma_reference(w0, s, t, steps=STEPS, lr=LR, beta=beta, alpha=alpha, mu=0.9)
    assert rel_err(w, w_ref) < 1e-4
    z = np.concatenate([np.asarray(state.z["a"]), np.asarray(state.z["b"]).reshape(devices, 4)], 1)
    for d in range(devices):
        assert rel_err(z[d], z_ref) < 1e-4
    # Learners really moved apart and z really moved: the test can tell them apart.
    assert np.max(np.abs(w_ref - w_ref.mean(0))) > 1e-2
    assert np.max(np.abs(z_ref - w0)) > 1e-2


def test_default_alpha_is_one_over_k_across_devices():
    devices, m = 8, 2
    k = devices * m
    make = lambda ax: crossbow_jax.sma(optax.sgd(LR), axis_name=ax)
    w, state, w0, s, t = run_mapped(make, devices=devices, m=m, steps=STEPS, mapper="shard_map")
    w_ref, _ = sma_reference(w0, s, t, steps=STEPS, lr=LR, beta=0.0, alpha=1 / k, mu=0.9)
    assert rel_err(w, w_ref) < 1e-4
    w_wrong, _ = sma_reference(w0, s, t, steps=STEPS, lr=LR, beta=0.0, alpha=1 / m, mu=0.9)
    assert rel_err(w, w_wrong) > 1e-3


def test_single_device_without_axis_name_matches_reference():
    m = 4
    opt = crossbow_jax.sma(optax.sgd(LR, momentum=0.9), alpha=0.2, momentum=0.5)
    w, state, w0, s, t = run_single(opt, m=m, steps=STEPS)
    w_ref, z_ref = sma_reference(w0, s, t, steps=STEPS, lr=LR, beta=0.9, alpha=0.2, mu=0.5)
    assert rel_err(w, w_ref) < 1e-4
    z = np.concatenate([np.asarray(state.z["a"]), np.asarray(state.z["b"]).reshape(4)])
    assert rel_err(z, z_ref) < 1e-4


def test_shard_map_and_pmap_agree_and_z_is_identical_on_every_device():
    make = lambda ax: crossbow_jax.sma(optax.sgd(LR, momentum=0.9), alpha=0.02, axis_name=ax)
    runs = {
        mp: run_mapped(make, devices=8, m=2, steps=STEPS, mapper=mp) for mp in ("shard_map", "pmap")
    }
    (w_s, st_s, *_), (w_p, st_p, *_) = runs["shard_map"], runs["pmap"]
    np.testing.assert_allclose(w_s, w_p, rtol=1e-6, atol=1e-6)
    for st in (st_s, st_p):
        for leaf in jax.tree.leaves(st.z):
            leaf = np.asarray(leaf)
            assert all(np.array_equal(leaf[0], leaf[d]) for d in range(8))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), st_s.z, st_p.z
    )


def test_state_holds_one_average_per_device_and_per_learner_optimiser_state():
    make = lambda ax: crossbow_jax.sma(optax.sgd(LR, momentum=0.9), axis_name=ax)
    _, state, *_ = run_mapped(make, devices=8, m=3, steps=1, mapper="shard_map")
    assert state.z["a"].shape == (8, 3) and state.z["b"].shape == (8, 2, 2)
    assert state.z_prev["b"].shape == (8, 2, 2)
    trace = state.learner_state[0].trace
    assert trace["a"].shape == (8, 3, 3) and trace["b"].shape == (8, 3, 2, 2)
    assert np.all(np.asarray(state.count) == 1)


def test_learners_converge_to_the_average_when_gradients_vanish():
    """With u_j = 0, the recursion contracts every learner and z to their mean."""
    params = {"w": jax.numpy.asarray(np.random.default_rng(0).normal(size=(4, 5)), "float32")}
    opt = crossbow_jax.sma(optax.sgd(0.0), alpha=0.2, momentum=0.0)
    state = opt.init(params)
    state = state._replace(z=jax.tree.map(lambda x: x * 0 + 3.0, state.z))
    zeros, update = jax.tree.map(jax.numpy.zeros_like, params), jax.jit(opt.update)
    for _ in range(200):
        updates, state = update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    spread = np.asarray(params["w"]) - np.asarray(crossbow_jax.sma_average(state)["w"])[None]
    assert np.max(np.abs(spread)) < 1e-4
