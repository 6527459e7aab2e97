"""Bytes per step read from traced programs (`engine/traffic.py`): what every collective makes
one device send, by mesh axis, the sync schedule's branches apart, and the mean and peak step of a run."""


import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from crossbow_jax.engine import traffic
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.mapping import make_mesh
from crossbow_jax.transformation.schedule import branch_counts

N = 16  # float32 values per device: 64 bytes
RING = [(i, (i + 1) % 8) for i in range(8)]


def traced(f, mesh=None, steps=1):
    """`count` of `f` run per device on a (8 * N,) float32 array sharded over all axes."""
    mesh = mesh or make_mesh(jax.devices()[:8])
    spec = P(mesh.axis_names)
    mapped = jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    x = jnp.zeros((8 * N,), jnp.float32)
    return traffic.count(jax.make_jaxpr(mapped)(x), steps, dict(mesh.shape))


@pytest.mark.parametrize(
    "collective, sent",
    [  # 64 bytes in, 8 devices: a ring all-reduce sends 2 * 7/8 of it, a gather 7 copies
        (lambda x: lax.psum(x, "devices"), 112.0),
        (lambda x: lax.pmean(x, "devices"), 112.0),
        (lambda x: lax.pmax(x, "devices"), 112.0),
        (lambda x: lax.all_gather(x, "devices")[0], 448.0),
        (lambda x: jnp.tile(lax.psum_scatter(x, "devices", tiled=True), 8), 56.0),
        (lambda x: lax.ppermute(x, "devices", RING), 64.0),
        (lambda x: lax.all_to_all(x, "devices", 0, 0, tiled=True), 56.0),
    ],
    ids=["psum", "pmean", "pmax", "all_gather", "psum_scatter", "ppermute", "all_to_all"],
)
def test_every_collective_counts_the_bytes_one_device_sends(collective, sent):
    assert traced(collective) == traffic.Traffic({"devices": sent}, ())


def test_operands_add_up_by_dtype_and_by_axis_label():
    def f(x):
        both = lax.psum((x, x.astype(jnp.bfloat16)), "devices")  # 64 + 32 bytes, 4 devices
        hosts = lax.psum(x[:4], "hosts")  # 16 bytes, 2 hosts
        everywhere = lax.pmean(x[0], ("hosts", "devices"))  # 4 bytes, 8 devices
        return both[0] + hosts.sum() + everywhere

    mesh = make_mesh(jax.devices()[:8], hosts=2)
    assert traced(f, mesh) == traffic.Traffic(
        {"devices": 96.0 * 1.5, "hosts": 16.0 * 1.0, "hosts,devices": 4.0 * 1.75}, ()
    )


def step(x, t):
    """One step: the mean loss every step, and a 3-branch switch on t (no sync, a sync of
    x, a sync of twice x plus a gather of x), as a 2-fragment DiLoCo would."""
    loss = lax.pmean(x.sum(), "devices")  # 4 bytes in: 7 sent

    def big(x):
        twice = lax.psum(jnp.concatenate([x, x]), "devices")  # 128 bytes in: 224 sent
        return twice[:N] + lax.all_gather(x, "devices").sum(0)  # 64 in: 448 sent

    small = lambda x: lax.psum(x, "devices")  # 64 bytes in: 112 sent
    return lax.switch(t % 3, [lambda x: x, small, big], x) + loss


SCHEDULE = traffic.Traffic({"devices": 7.0}, ({}, {"devices": 112.0}, {"devices": 672.0}))


def test_a_switch_counts_each_branch_apart_per_step_in_a_scan_or_unrolled():
    assert traced(lambda x: step(x, 1)) == SCHEDULE

    def scanned(x):
        return lax.scan(lambda x, t: (step(x, t), None), x, jnp.arange(4))[0]

    def unrolled(x):
        for t in range(4):
            x = step(x, jnp.int32(t))
        return x

    assert traced(scanned, steps=4) == SCHEDULE
    assert traced(unrolled, steps=4) == SCHEDULE


def test_a_cond_with_the_same_collectives_in_every_branch_is_every_step_traffic():
    def f(x):
        summed = lambda x: lax.psum(x, "devices")
        return lax.cond(x[0] > 0, summed, lambda x: -summed(x), x)

    assert traced(f) == traffic.Traffic({"devices": 112.0}, ())


def test_mean_and_peak_weigh_the_branches_by_the_steps_that_took_them():
    counts = branch_counts(0, 12, 4, fragments=2)  # fragment 0 at t = 3, 7, 11; 1 at 1, 5, 9
    assert counts == [6, 3, 3]
    assert traffic.per_step(SCHEDULE, counts) == {"devices": 7 + (3 * 112 + 3 * 672) / 12}
    assert traffic.peak(SCHEDULE, counts) == {"devices": 7 + 672}
    counts = branch_counts(2, 4, 4, fragments=2)  # t = 2: nothing; t = 3: fragment 0
    assert counts == [1, 1, 0]
    assert traffic.per_step(SCHEDULE, counts) == {"devices": 7 + 112 / 2}
    assert traffic.peak(SCHEDULE, counts) == {"devices": 7 + 112}  # fragment 1 never ran


def test_a_warm_up_of_every_step_syncs_raises_the_mean_and_sets_the_peak():
    every_4 = traffic.Traffic({"devices": 4.0}, ({}, {"devices": 64.0}))
    counts = branch_counts(0, 12, 4, warmup_steps=5)  # t < 5, then t = 7, 11
    assert counts == [5, 7]
    assert traffic.per_step(every_4, counts) == {"devices": 4 + 64 * 7 / 12}
    assert traffic.peak(every_4, counts) == {"devices": 68.0}
    assert traffic.peak(every_4, branch_counts(5, 7, 4, warmup_steps=5)) == {"devices": 4.0}
    assert traffic.per_step(every_4, [0, 0]) == traffic.peak(every_4, [0, 0]) == {"devices": 4.0}


def test_the_schedule_is_the_configs_period_fragments_and_warm_up():
    config = TrainConfig(algorithm="local_sgd", sync_every=4)
    assert traffic.schedule_counts(config, 0, 12) == [9, 3]
    assert traffic.schedule_counts(TrainConfig(), 0, 12) == [0, 12]  # SMA: every step
    fragmented = TrainConfig(algorithm="diloco", sync_every=4, fragments=2)
    assert traffic.schedule_counts(fragmented, 0, 12) == [6, 3, 3]
    warm = TrainConfig(algorithm="local_sgd", sync_every=4, sync_warmup_steps=5)
    assert traffic.schedule_counts(warm, 0, 12) == [5, 7]


def test_a_cond_that_does_not_match_the_schedule_is_refused():
    with pytest.raises(ValueError, match=r"sync cond has 3 branches but the schedule counts 2"):
        traffic.per_step(SCHEDULE, [9, 3])
