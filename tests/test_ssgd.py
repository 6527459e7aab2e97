"""SSGD against the float64 reference, on 1 and 8 devices."""

import numpy as np
import optax
import pytest
from _harness import rel_err, run_mapped, run_single
from reference import ssgd_reference

import crossbow_jax

STEPS = 6
LR = 0.05


@pytest.mark.parametrize("mapper", ["shard_map", "pmap"])
@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("beta", [0.0, 0.9], ids=["sgd", "momentum"])
def test_ssgd_matches_float64_reference(mapper, devices, beta):
    make = lambda ax: crossbow_jax.ssgd(optax.sgd(LR, momentum=beta or None), axis_name=ax)
    w, state, w0, s, t = run_mapped(make, devices=devices, m=2, steps=STEPS, mapper=mapper)
    w_ref = ssgd_reference(w0, s, t, steps=STEPS, lr=LR, beta=beta)
    for row in w:  # every learner on every device stays identical to the reference
        assert rel_err(row, w_ref) < 1e-4
    assert np.max(np.abs(w_ref - w0)) > 1e-2


def test_ssgd_single_device_mean_not_sum():
    w, _, w0, s, t = run_single(crossbow_jax.ssgd(optax.sgd(LR)), m=4, steps=STEPS)
    assert rel_err(w[0], ssgd_reference(w0, s, t, steps=STEPS, lr=LR, beta=0.0)) < 1e-4
    assert np.array_equal(w[0], w[3])


def test_ssgd_state_has_no_learner_axis():
    make = lambda ax: crossbow_jax.ssgd(optax.sgd(LR, momentum=0.9), axis_name=ax)
    _, state, *_ = run_mapped(make, devices=8, m=3, steps=1, mapper="pmap")
    assert state.inner_state[0].trace["a"].shape == (8, 3)
