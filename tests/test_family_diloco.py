"""DiLoCo's options against the float64 reference `diloco_options_reference`:
fragments (Streaming DiLoCo), compressed outer gradients with and without error
feedback, partial participation and the overlapped outer step, on 1 and 4 devices
x 2 learners under shard_map and pmap; 9 updates with H = 4 cross several syncs
of every fragment and end one update past a sync."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _harness import rel_err, run_mapped
from reference import LEAVES, diloco_options_reference, hierarchical_reference

import crossbow_jax
from crossbow_jax.transformation import _compress, _participation

STEPS, EVERY, LR, BETA, M = 9, 4, 0.05, 0.9, 2
FRAGMENTS = [np.arange(7)[LEAVES[0]], np.arange(7)[LEAVES[1]]]  # the two leaves: a, then b


def ones(k):
    return lambda count: jnp.ones((k,))


OPTIONS = {
    "fragments": ({"fragments": 2}, {"fragments": FRAGMENTS}),
    "int8": ({"compress": "int8"}, {"compress": "int8"}),
    "int4-no-feedback": ({"compress": "int4", "error_feedback": False},
                         {"compress": "int4", "error_feedback": False}),
    "bf16-participation": ({"compress": "bf16", "participation": 0.75},
                           {"compress": "bf16", "participation": 0.75}),
    "participation-fragments": ({"participation": 0.5, "fragments": 2},
                                {"participation": 0.5, "fragments": FRAGMENTS}),
    "overlap-fragments": ({"overlap": 1, "fragments": 2}, {"overlap": 1, "fragments": FRAGMENTS}),
    "overlap-int8-participation": ({"overlap": 1, "compress": "int8", "participation": 0.75},
                                   {"overlap": 1, "compress": "int8", "participation": 0.75}),
}  # fmt: skip
PMAP = ("fragments", "bf16-participation", "overlap-int8-participation")
CASES = [(o, "shard_map", 4) for o in OPTIONS] + [(o, "pmap", 4) for o in PMAP] + [
    ("fragments", "shard_map", 1), ("int8", "pmap", 1), ("overlap-int8-participation", "shard_map", 1),
]  # fmt: skip


def reference(w0, s, t, devices, seed=0, **options):
    p = options.pop("participation", None)
    if isinstance(p, float):
        k = devices * M
        options["mask"] = lambda step: np.asarray(
            _participation.global_mask(p, seed, jnp.int32(step), k)
        )
    return diloco_options_reference(
        w0, s, t, devices=devices, steps=STEPS, lr=LR, beta=BETA, every=EVERY, outer_lr=0.7,
        outer_beta=0.9, **options,
    )  # fmt: skip


@pytest.mark.parametrize("name, mapper, devices", CASES)
def test_diloco_options_match_the_reference(name, mapper, devices):
    options, ref_options = OPTIONS[name]
    make = lambda ax: crossbow_jax.diloco(
        optax.sgd(LR, momentum=BETA), every=EVERY, axis_name=ax, **options
    )
    w, state, w0, s, t = run_mapped(make, devices=devices, m=M, steps=STEPS, mapper=mapper)
    w_ref, theta = reference(w0, s, t, devices, **dict(ref_options))
    assert rel_err(w, w_ref) < 1e-4
    central = np.asarray(jax.tree.leaves(crossbow_jax.central_params(state))[0])
    assert rel_err(central.reshape(devices, -1)[-1], theta[LEAVES[0]]) < 1e-4
    plain, _ = reference(w0, s, t, devices)  # the option changed the result
    assert rel_err(w_ref, plain) > 1e-4


def test_participation_of_every_learner_is_plain_diloco_bit_for_bit():
    sgd = optax.sgd(LR, momentum=BETA)
    runs = [
        run_mapped(lambda ax, p=p: crossbow_jax.diloco(sgd, every=3, axis_name=ax, participation=p),
                   devices=4, m=M, steps=7, mapper="shard_map")
        for p in (None, ones(4 * M), 1.0)
    ]  # fmt: skip
    for other in runs[1:]:
        np.testing.assert_array_equal(other[0], runs[0][0])
        for a, b in zip(jax.tree.leaves(other[1]), jax.tree.leaves(runs[0][1])):
            np.testing.assert_array_equal(a, b)


def test_error_feedback_sends_what_rounding_dropped():
    """Over 20 rounds the sum of what int4 sent is the sum of the contributions less the
    last residual (so the drift stays within one rounding); without feedback it drifts.
    The payload is packed: int4 codes two a byte, one float32 scale a block."""
    rng = np.random.default_rng(0)
    rounds = [jnp.asarray(rng.normal(size=(300,)), jnp.float32) for _ in range(20)]
    drift = {}
    send = jax.jit(lambda c, e: _compress.compressed_sum([c], e, "int4", None))
    for feedback in (True, False):
        error = [jnp.zeros(300)] if feedback else None
        sent = 0.0
        for c in rounds:
            total, error = send(c, error)
            sent = sent + total[0]
        truth = np.sum(rounds, axis=0)
        if feedback:
            np.testing.assert_allclose(sent + error[0], truth, rtol=1e-5, atol=1e-5)
        drift[feedback] = float(np.max(np.abs(sent - truth)))
    assert drift[True] < 0.5 * drift[False]
    codes, scales = _compress.quantise(rounds[0], "int4")
    assert (codes.dtype, codes.shape, scales.shape) == (jnp.uint8, (2, 128), (2,))


def test_a_mask_function_and_a_float32_average_of_bfloat16_learners():
    mask = lambda count: (jnp.arange(4) % 2 == count % 2).astype(jnp.float32)  # noqa: E731
    opt = crossbow_jax.diloco(optax.sgd(LR), every=2, participation=mask,
                              average_dtype=jnp.float32)  # fmt: skip
    params = {"w": jnp.zeros((4, 3), jnp.bfloat16)}
    state = opt.init(params)
    assert state.theta["w"].dtype == jnp.float32
    grads = {"w": jnp.arange(12.0).reshape(4, 3).astype(jnp.bfloat16)}
    for _ in range(2):  # count 1 syncs: learners 1 and 3 take part, 0 and 2 keep theirs
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.bfloat16
    moved = -2 * LR * np.arange(12.0).reshape(4, 3)
    # the outer gradient is -mean(moved of 1 and 3); Nesterov's first step is lr (1 + mu) g
    expected = moved[[1, 3]].mean(0) * 0.7 * 1.9
    np.testing.assert_allclose(np.asarray(state.theta["w"]), expected, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(params["w"], np.float32)[[0, 2]], moved[[0, 2]], rtol=1e-2)
    # participants land on theta rounded to bfloat16, give or take the rounding of the
    # update w + (theta - w) in bfloat16 (2^-7 relative, bfloat16's spacing)
    bf16_theta = np.asarray(state.theta["w"].astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(np.asarray(params["w"], np.float32)[[1, 3]],
                               np.tile(bf16_theta, (2, 1)), rtol=2**-7)  # fmt: skip


@pytest.mark.parametrize(
    "options, match",
    [
        ({"every": 6, "fragments": 4}, r"fragments=4 must divide every=6"),
        ({"every": 4, "fragments": 0}, r"fragments=0 must be an int >= 1"),
        ({"every": 4, "compress": "fp8"}, r"compress='fp8' is not a compression"),
        ({"every": 4, "compress": "int8", "error_feedback": "yes"}, r"error_feedback='yes'"),
        ({"every": 4, "overlap": 2}, r"overlap=2 must be 0"),
        ({"every": 1, "overlap": 1}, r"overlap=1 needs at least 2 updates between syncs"),
        ({"every": 4, "fragments": 4, "overlap": 1}, r"every=4 with fragments=4"),
        ({"every": 4, "participation": 0.0}, r"participation=0.0 must be in \(0, 1\]"),
        ({"every": 4, "participation": "half"}, r"participation='half' must be a probability"),
        ({"every": 4, "error_feedback": False}, r"error_feedback=False does nothing without"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises((TypeError, ValueError), match=match):
        crossbow_jax.diloco(optax.sgd(0.1), **options)


def test_more_fragments_than_layers_and_a_mask_of_the_wrong_shape_are_refused():
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros((2,))}
    with pytest.raises(ValueError, match=r"fragments=4 but the parameters have 2 layers"):
        crossbow_jax.diloco(optax.sgd(0.1), every=4, fragments=4).init(params)
    opt = crossbow_jax.diloco(optax.sgd(0.1), every=1, participation=lambda c: jnp.ones(3))
    with pytest.raises(ValueError, match=r"returned shape \(3,\).*shape \(2,\)"):
        opt.update(params, opt.init(params), params)


@pytest.mark.parametrize("mapper, compress, feedback", [("shard_map", "int8", True),
                                                        ("pmap", "int4", False)])  # fmt: skip
def test_hierarchical_with_a_compressed_outer_step_matches_the_reference(mapper, compress,
                                                                         feedback):  # fmt: skip
    hosts, devices = 2, 4
    alpha = 0.5 / (devices // hosts * M)
    make = lambda ax, host_ax: crossbow_jax.hierarchical(
        optax.sgd(LR, momentum=BETA), every=3, alpha=alpha, axis_name=ax, host_axis=host_ax,
        compress=compress, error_feedback=feedback,
    )  # fmt: skip
    w, state, w0, s, t = run_mapped(make, devices=devices, m=M, steps=7, mapper=mapper,
                                    hosts=hosts)  # fmt: skip
    kw = {"hosts": hosts, "steps": 7, "lr": LR, "beta": BETA, "alpha": alpha, "mu": 0.9,
          "every": 3, "outer_lr": 0.7, "outer_beta": 0.9}  # fmt: skip
    w_ref, _, theta = hierarchical_reference(w0, s, t, compress=compress,
                                             error_feedback=feedback, **kw)  # fmt: skip
    assert rel_err(w, w_ref) < 1e-4
    assert rel_err(w_ref, hierarchical_reference(w0, s, t, **kw)[0]) > 1e-4


def test_fragments_take_layers_in_depth_order_strided():
    """Dense_2 before Dense_10 (the tree sorts Dense_10 first), then i % F; a layer's leaves
    stay together."""
    from crossbow_jax.transformation import _fragments

    tree = {f"Dense_{i}": {"bias": np.zeros(2), "kernel": np.zeros((2, 2))} for i in range(12)}
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    layers = [{paths[i].split("'")[1] for i in f} for f in _fragments.assign(tree, 3)]
    assert layers == [{f"Dense_{i}" for i in range(f, 12, 3)} for f in range(3)]
    assert _fragments.fragment_sizes(tree, 3) == [24, 24, 24]


def test_options_that_would_do_nothing_are_refused_by_the_other_members():
    with pytest.raises(ValueError, match=r"compress='int8' compresses the outer step across"):
        crossbow_jax.hierarchical(optax.sgd(0.1), every=4, compress="int8")
    with pytest.raises(ValueError, match=r"warmup_steps=3 does nothing with every=1"):
        crossbow_jax.local_sgd(optax.sgd(0.1), every=1, warmup_steps=3)
