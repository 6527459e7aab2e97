"""local_sgd's warm-up and average dtype, and partial participation in local_sgd and sma,
against the float64 references (tests/reference.py), under shard_map and pmap.

The reference of a probability draws its masks with `_participation.global_mask`, as
the transformations do: that function is the spec of who takes part.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _harness import flatten, linear_grads, problem, rel_err, run_mapped, run_single, unflatten
from reference import local_sgd_reference, sma_period_reference
from test_family import BETA, LR, PERIOD, STEPS, check_central

import crossbow_jax
from crossbow_jax.transformation import _participation

WARMUP = 4  # with a period of 3 and 7 updates: syncs after updates 1, 2, 3, 4 and 6


def run(member, devices, mapper, m=2, **options):
    """`member` ("local_sgd" or "sma") with the family's settings and `options`."""
    alpha = 0.5 / (devices * m)

    def make(ax):
        sgd = optax.sgd(LR, momentum=BETA)
        if member == "sma":
            return crossbow_jax.sma(sgd, alpha=alpha, sync_every=PERIOD, axis_name=ax, **options)
        return crossbow_jax.local_sgd(sgd, every=PERIOD, axis_name=ax, **options)

    return run_mapped(make, devices=devices, m=m, steps=STEPS, mapper=mapper), alpha


def reference(member, w0, s, t, alpha, **options):
    """(learners, model to evaluate) of the float64 reference of `member`."""
    kw = {"steps": STEPS, "lr": LR, "beta": BETA}
    if member == "sma":
        return sma_period_reference(w0, s, t, alpha=alpha, mu=0.9, sync_every=PERIOD, **kw,
                                    **options)  # fmt: skip
    return local_sgd_reference(w0, s, t, every=PERIOD, **kw, **options)


@pytest.mark.parametrize("mapper", ["shard_map", "pmap"])
@pytest.mark.parametrize("devices", [1, 4])
def test_local_sgd_warmup_matches_reference(mapper, devices):
    (w, state, w0, s, t), _ = run("local_sgd", devices, mapper, warmup_steps=WARMUP)
    w_ref, average = reference("local_sgd", w0, s, t, None, warmup_steps=WARMUP)
    assert rel_err(w, w_ref) < 1e-4
    check_central(state, devices, average)
    assert rel_err(w_ref, reference("local_sgd", w0, s, t, None)[0]) > 1e-3  # it mattered


def test_local_sgd_warmup_set_at_run_time_and_no_cond_for_period_one():
    """optax.inject_hyperparams passes warmup_steps as a traced array: the same syncs.
    Period 1 syncs at every update: no lax.cond (and a warm-up with it is refused)."""
    injected = optax.inject_hyperparams(crossbow_jax.local_sgd)(
        optax.sgd(LR, momentum=BETA), every=PERIOD, warmup_steps=WARMUP
    )
    w, _, w0, s, t = run_single(injected, m=4, steps=STEPS)
    w_ref = local_sgd_reference(w0, s, t, steps=STEPS, lr=LR, beta=BETA, every=PERIOD,
                                warmup_steps=WARMUP)[0]  # fmt: skip
    assert rel_err(w, w_ref) < 1e-4
    params = {"w": jnp.zeros((4, 3))}

    def program(every, warmup):
        opt = crossbow_jax.local_sgd(optax.sgd(0.1), every=every, warmup_steps=warmup)
        return str(jax.make_jaxpr(opt.update)(params, opt.init(params), params))

    assert "cond[" not in program(1, 0) and "cond[" in program(PERIOD, WARMUP)


@pytest.mark.parametrize("mapper", ["shard_map", "pmap"])
@pytest.mark.parametrize("member", ["local_sgd", "sma"])
def test_participation_probability_matches_reference(member, mapper):
    devices, m, seed = 4, 2, 3
    k = devices * m
    (w, state, w0, s, t), alpha = run(member, devices, mapper, participation=0.75, seed=seed)
    drawn = lambda step: np.asarray(_participation.global_mask(0.75, seed, jnp.int32(step), k))
    w_ref, central = reference(member, w0, s, t, alpha, mask=drawn)
    assert rel_err(w, w_ref) < 1e-4
    check_central(state, devices, central)
    syncs = [step for step in range(STEPS) if (step + 1) % PERIOD == 0]
    assert any(0 < drawn(step).sum() < k for step in syncs)  # some learner sat one out
    assert rel_err(w_ref, reference(member, w0, s, t, alpha)[0]) > 1e-3


def alternating(step):
    """Learners 0 and 2 at the sync after update 3, nobody at the one after update 6."""
    return jnp.where(step < 3, jnp.array([1, 0, 1, 0]), jnp.zeros(4, jnp.int32))


@pytest.mark.parametrize("member, mapper", [("local_sgd", "shard_map"), ("sma", "pmap")])
def test_participation_function_with_an_empty_sync_matches_reference(member, mapper):
    (w, state, w0, s, t), alpha = run(member, 1, mapper, m=4, participation=alternating)
    w_ref, central = reference(member, w0, s, t, alpha, mask=alternating)
    assert rel_err(w, w_ref) < 1e-4
    check_central(state, 1, central)
    # The non-participants kept their own weights at the first sync.
    assert rel_err(w_ref, reference(member, w0, s, t, alpha)[0]) > 1e-3


@pytest.mark.parametrize("member", ["local_sgd", "sma"])
def test_every_learner_participating_is_none_bit_for_bit(member):
    devices, m = 4, 2
    ones = lambda step: jnp.ones(devices * m)
    a = run(member, devices, "shard_map", participation=ones)[0]
    b = run(member, devices, "shard_map")[0]
    np.testing.assert_array_equal(a[0], b[0])
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_local_sgd_float32_average_of_bfloat16_learners():
    """The sync's mean is summed and divided in float32: the average is the exact mean of
    the bfloat16 learners, which a bfloat16 average rounds; the learners stay bfloat16."""
    x = jnp.array([[1.0], [1.0 + 2**-7], [1.0 + 2**-7]], jnp.bfloat16)  # mean 1 + 2**-6 / 3
    exact = np.mean(np.asarray(x, np.float64))
    params = jnp.zeros((3, 1), jnp.bfloat16)
    averages = {}
    for dtype in (jnp.float32, None):
        opt = crossbow_jax.local_sgd(optax.sgd(1.0), every=1, average_dtype=dtype)
        updates, state = opt.update(-x, opt.init(params), params)
        assert updates.dtype == jnp.bfloat16
        averages[dtype] = state.average
    assert averages[jnp.float32].dtype == jnp.float32
    assert abs(float(averages[jnp.float32][0]) - exact) < 1e-7
    assert averages[None].dtype == jnp.bfloat16
    assert abs(float(averages[None][0]) - exact) > 1e-3
    # Over the family's problem, in bfloat16, the float32 average follows the reference.
    w0, s, t = problem(4)
    as_tree = lambda a: unflatten(jnp.asarray(a, jnp.bfloat16))
    opt = crossbow_jax.local_sgd(optax.sgd(LR, momentum=BETA), every=PERIOD,
                                 average_dtype=jnp.float32)  # fmt: skip
    params = as_tree(np.tile(w0, (4, 1)))
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(linear_grads(params, as_tree(s), as_tree(t)), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(STEPS):
        params, state = step(params, state)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.average))
    average = local_sgd_reference(w0, s, t, steps=STEPS, lr=LR, beta=BETA, every=PERIOD)[1]
    assert rel_err(flatten(state.average), average) < 3e-2


@pytest.mark.parametrize(
    "options, match",
    [
        ({"participation": 1.5}, r"participation=1.5 must be in \(0, 1\]"),
        ({"participation": "x"}, r"participation='x' must be a probability"),
        ({"warmup_steps": -1}, r"warmup_steps=-1 must be >= 0"),
        ({"warmup_steps": 2.5}, r"warmup_steps=2.5 must be an int >= 0"),
        ({"seed": 1.0}, r"seed=1.0 must be an int >= 0"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises((TypeError, ValueError), match=match):
        crossbow_jax.local_sgd(optax.sgd(0.1), every=2, **options)
    if "warmup_steps" not in options:
        with pytest.raises((TypeError, ValueError), match=match):
            crossbow_jax.sma(optax.sgd(0.1), **options)


@pytest.mark.parametrize("member", ["local_sgd", "sma"])
def test_a_mask_of_the_wrong_shape_is_refused(member):
    opt = getattr(crossbow_jax, member)(optax.sgd(0.1), participation=lambda c: jnp.ones(3),
                                        **({"every": 1} if member == "local_sgd" else {}))  # fmt: skip
    params = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match=r"returned shape \(3,\); .* shape \(4,\)"):
        opt.update(params, opt.init(params), params)
