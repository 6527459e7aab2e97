"""The replica-averaging family against float64 references, on several devices x learners.

sma with a period, local SGD, DiLoCo and SMA inside / DiLoCo across hosts,
each under shard_map and pmap; 7 updates with a period of 3 cross two syncs
and end one update past the last, so the step counter is checked too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _harness import flatten, rel_err, run_mapped, run_single
from reference import (
    diloco_reference,
    hierarchical_reference,
    local_sgd_reference,
    sma_period_reference,
    sma_reference,
)

import crossbow_jax

STEPS, PERIOD, LR, BETA = 7, 3, 0.05, 0.9
OUTER_LR, OUTER_BETA = 0.7, 0.9
MAPPERS = ["shard_map", "pmap"]


def per_device(tree, devices):
    """Flattened central model of every device: (devices, N)."""
    return flatten(jax.tree.map(lambda x: np.asarray(x).reshape(devices, -1), tree))


def check_central(state, devices, expected):
    central = per_device(crossbow_jax.central_params(state), devices)
    for d in range(devices):
        assert rel_err(central[d], expected) < 1e-4


@pytest.mark.parametrize("mapper", MAPPERS)
@pytest.mark.parametrize("devices", [1, 4])
def test_sma_with_a_period_matches_reference(mapper, devices):
    m = 2
    alpha = 0.5 / (devices * m)
    make = lambda ax: crossbow_jax.sma(
        optax.sgd(LR, momentum=BETA), alpha=alpha, sync_every=PERIOD, axis_name=ax
    )
    w, state, w0, s, t = run_mapped(make, devices=devices, m=m, steps=STEPS, mapper=mapper)
    kw = {"steps": STEPS, "lr": LR, "beta": BETA, "alpha": alpha, "mu": 0.9}
    w_ref, z_ref = sma_period_reference(w0, s, t, sync_every=PERIOD, **kw)
    assert rel_err(w, w_ref) < 1e-4
    check_central(state, devices, z_ref)
    assert np.all(np.asarray(state.count) == STEPS)
    # The period changed the result: Algorithm 1 at every step is far from it.
    assert rel_err(w_ref, sma_reference(w0, s, t, **kw)[0]) > 1e-3


def test_sma_sync_every_one_runs_algorithm_1_with_no_cond():
    """Period 1 is Algorithm 1 at every step with no `lax.cond` in the program (the
    update `sma` had before periods existed); a period of 3 puts one there."""
    kw = {"steps": STEPS, "lr": LR, "beta": BETA, "alpha": 0.1, "mu": 0.9}
    make = lambda every: crossbow_jax.sma(optax.sgd(LR, momentum=BETA), alpha=0.1, sync_every=every)
    w, state, w0, s, t = run_single(make(1), m=4, steps=STEPS)
    w_ref, z_ref = sma_reference(w0, s, t, **kw)
    assert rel_err(w, w_ref) < 1e-4
    assert rel_err(flatten(crossbow_jax.central_params(state)), z_ref) < 1e-4
    params = {"w": jnp.zeros((4, 3))}

    def program(every):
        opt = make(every)
        return str(jax.make_jaxpr(opt.update)(params, opt.init(params), params))

    assert "cond[" not in program(1) and "cond[" in program(3)


@pytest.mark.parametrize("mapper", MAPPERS)
@pytest.mark.parametrize("devices", [1, 4])
def test_local_sgd_matches_reference(mapper, devices):
    make = lambda ax: crossbow_jax.local_sgd(
        optax.sgd(LR, momentum=BETA), every=PERIOD, axis_name=ax
    )
    w, state, w0, s, t = run_mapped(make, devices=devices, m=2, steps=STEPS, mapper=mapper)
    w_ref, average = local_sgd_reference(w0, s, t, steps=STEPS, lr=LR, beta=BETA, every=PERIOD)
    assert rel_err(w, w_ref) < 1e-4
    check_central(state, devices, average)
    assert np.max(np.abs(w_ref - w_ref.mean(0))) > 1e-3  # one step past the sync: apart again


@pytest.mark.parametrize("mapper", MAPPERS)
@pytest.mark.parametrize("devices", [1, 4])
def test_diloco_matches_reference(mapper, devices):
    make = lambda ax: crossbow_jax.diloco(optax.sgd(LR, momentum=BETA), every=PERIOD, axis_name=ax)
    w, state, w0, s, t = run_mapped(make, devices=devices, m=2, steps=STEPS, mapper=mapper)
    w_ref, theta = diloco_reference(
        w0, s, t, steps=STEPS, lr=LR, beta=BETA, every=PERIOD, outer_lr=OUTER_LR,
        outer_beta=OUTER_BETA,
    )  # fmt: skip
    assert rel_err(w, w_ref) < 1e-4
    check_central(state, devices, theta)
    # The outer step is not a plain mean: local SGD lands elsewhere.
    assert (
        rel_err(theta, local_sgd_reference(w0, s, t, steps=6, lr=LR, beta=BETA, every=3)[1]) > 1e-3
    )


def test_diloco_with_another_outer_optimizer():
    opt = crossbow_jax.diloco(optax.sgd(LR), optax.sgd(1.0), every=2)
    w, state, w0, s, t = run_single(opt, m=3, steps=4)
    w_ref, average = local_sgd_reference(w0, s, t, steps=4, lr=LR, beta=0.0, every=2)
    assert rel_err(w, w_ref) < 1e-4  # outer sgd(1.0) steps onto the mean: local SGD
    assert rel_err(flatten(crossbow_jax.central_params(state)), average) < 1e-4


@pytest.mark.parametrize("mapper", MAPPERS)
def test_hierarchical_matches_reference(mapper):
    """Under shard_map the hosts x devices mesh is mapped as the engine maps it; under pmap,
    pmap maps the hosts and a named vmap the devices (the engine refuses pmap with hosts),
    where the batched step counter turns the `lax.cond` into a select."""
    hosts, devices, m = 2, 4, 2
    alpha = 0.5 / (devices // hosts * m)

    def make(ax, host_ax):
        return crossbow_jax.hierarchical(
            optax.sgd(LR, momentum=BETA), every=PERIOD, alpha=alpha, axis_name=ax,
            host_axis=host_ax,
        )  # fmt: skip

    w, state, w0, s, t = run_mapped(
        make, devices=devices, m=m, steps=STEPS, mapper=mapper, hosts=hosts
    )
    w_ref, z_ref, theta = hierarchical_reference(
        w0, s, t, hosts=hosts, steps=STEPS, lr=LR, beta=BETA, alpha=alpha, mu=0.9,
        every=PERIOD, outer_lr=OUTER_LR, outer_beta=OUTER_BETA,
    )  # fmt: skip
    assert rel_err(w, w_ref) < 1e-4
    check_central(state, devices, theta)
    z = per_device(state.sma_state.z, devices)
    for d in range(devices):
        assert rel_err(z[d], z_ref[d // (devices // hosts)]) < 1e-4
    assert rel_err(z_ref[0], z_ref[1]) > 1e-3  # hosts apart one step past the outer step
    assert np.all(np.asarray(state.count) == STEPS)


def test_hierarchical_with_one_host_is_sma_bit_for_bit():
    sgd = optax.sgd(LR, momentum=BETA)
    h = run_mapped(lambda ax: crossbow_jax.hierarchical(sgd, every=2, axis_name=ax), devices=4,
                   m=2, steps=STEPS, mapper="shard_map")  # fmt: skip
    plain = run_mapped(lambda ax: crossbow_jax.sma(sgd, axis_name=ax), devices=4, m=2,
                       steps=STEPS, mapper="shard_map")  # fmt: skip
    np.testing.assert_array_equal(h[0], plain[0])
    for a, b in zip(jax.tree.leaves(h[1].sma_state), jax.tree.leaves(plain[1])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(per_device(h[1].theta, 4), per_device(plain[1].z, 4))


def test_central_params_finds_the_state_inside_a_chain_and_refuses_others():
    params = {"w": jnp.zeros((2, 3))}
    chained = optax.chain(optax.identity(), crossbow_jax.local_sgd(optax.sgd(0.1), every=2))
    assert crossbow_jax.central_params(chained.init(params))["w"].shape == (3,)
    with pytest.raises(ValueError, match="ssgd keeps no central model"):
        crossbow_jax.central_params(crossbow_jax.ssgd(optax.sgd(0.1)).init(params))
    with pytest.raises(ValueError, match="no sma, local_sgd"):
        crossbow_jax.central_params(optax.sgd(0.1).init(params))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: crossbow_jax.sma(optax.sgd(0.1), sync_every=0), r"sync_every=0 must be >= 1"),
        (lambda: crossbow_jax.local_sgd(optax.sgd(0.1), every=2.5), r"every=2.5 must be an int"),
        (lambda: crossbow_jax.diloco(optax.sgd(0.1), every=-1), r"every=-1 must be >= 1"),
        (lambda: crossbow_jax.diloco(optax.sgd(0.1), "sgd", every=4), r"outer_optimizer must be"),
        (lambda: crossbow_jax.hierarchical(optax.sgd(0.1), every=True), r"every=True must be"),
    ],
)
def test_bad_periods_and_outer_optimizers_are_refused(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


@pytest.mark.parametrize("name, key", [("local_sgd", "every"), ("sma", "sync_every")])
def test_inject_hyperparams_makes_the_period_a_run_time_value(name, key):
    """optax.inject_hyperparams passes the period as an array: a traced one decides by
    lax.cond at every update, matches the int period, and can be changed with tree_set."""
    factory = getattr(crossbow_jax, name)
    make = lambda every: factory(optax.sgd(LR, momentum=BETA), **{key: every})
    injected = optax.inject_hyperparams(factory)(optax.sgd(LR, momentum=BETA), **{key: PERIOD})
    w = run_single(injected, m=4, steps=STEPS)[0]
    np.testing.assert_allclose(w, run_single(make(PERIOD), m=4, steps=STEPS)[0], rtol=1e-6)
    assert rel_err(w, run_single(make(2), m=4, steps=STEPS)[0]) > 1e-3  # the period mattered
    # Set to 2 at run time, it is the period-2 transformation.
    params, grads = jnp.zeros((4, 3)), jnp.arange(12.0).reshape(4, 3)
    ends = []
    for opt, state in [
        (injected, optax.tree_utils.tree_set(injected.init(params), **{key: 2})),
        (make(2), make(2).init(params)),
    ]:
        p = params
        for _ in range(4):
            updates, state = jax.jit(opt.update)(grads * p + 1.0, state, p)
            p = optax.apply_updates(p, updates)
        ends.append(p)
    np.testing.assert_allclose(ends[0], ends[1], rtol=1e-6)
    with pytest.raises(TypeError, match=rf"{key}=.* must be an int >= 1.*float32"):
        factory(optax.sgd(LR), **{key: jnp.float32(2.0)})


def test_outer_momentum_over_momentum_learners_can_diverge_as_documented():
    """docs/sma.md: on a sharp quadratic, DiLoCo's default outer Nesterov over SGD-momentum
    learners diverges where local SGD converges; plain SGD learners converge under DiLoCo."""
    target = jnp.arange(3.0)

    def distance(opt, steps=60):
        @jax.jit
        def step(params, state):
            grads = jax.vmap(jax.grad(lambda w: jnp.sum((w - target) ** 2)))(params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        params = jnp.zeros((4, 3))
        state = opt.init(params)
        for _ in range(steps):
            params, state = step(params, state)
        return float(jnp.max(jnp.abs(crossbow_jax.central_params(state) - target)))

    start = float(jnp.max(target))
    momentum = optax.sgd(0.05, momentum=0.9)
    assert distance(crossbow_jax.local_sgd(momentum, every=4)) < 0.1 * start
    assert distance(crossbow_jax.diloco(momentum, every=4)) > start
    assert distance(crossbow_jax.diloco(optax.sgd(0.1), every=4)) < 0.01 * start
