"""Placement helpers of `crossbow_jax.engine.mapping` on 8 simulated devices."""

import jax
import numpy as np
import pytest

from crossbow_jax.engine import DEVICE_AXIS, device_map, make_mesh, put_on_devices
from crossbow_jax.engine.mapping import device_sharding, first_device


def test_put_on_devices_gives_each_device_its_slice():
    mesh = make_mesh()
    tree = {
        "x": np.arange(mesh.size * 6, dtype=np.uint8).reshape(mesh.size, 2, 3),
        "y": [np.linspace(0, 1, mesh.size, dtype=np.float32)],
    }
    placed = put_on_devices(tree, mesh)
    for host, array in zip(jax.tree.leaves(tree), jax.tree.leaves(placed)):
        assert array.dtype == host.dtype and array.shape == host.shape
        assert array.sharding.is_equivalent_to(device_sharding(mesh), host.ndim)
        for shard in array.addressable_shards:
            i = list(mesh.devices.flat).index(shard.device)
            np.testing.assert_array_equal(np.asarray(shard.data), host[i : i + 1])
    np.testing.assert_array_equal(first_device(placed)["x"], tree["x"][0])


@pytest.mark.parametrize("mapper", ["shard_map", "pmap"])
def test_batches_placed_each_step_feed_a_psum_loop(mapper):
    """The pattern docs/usage.md prescribes: place every batch, wait now and then."""
    mesh = make_mesh()
    step = device_map(lambda t, b: t + jax.lax.psum(b.sum(), DEVICE_AXIS), mesh, mapper)
    step = jax.jit(step) if mapper == "shard_map" else step
    total = put_on_devices(np.zeros((mesh.size,), np.float32), mesh)
    rng = np.random.default_rng(0)
    expected = 0.0
    for i in range(40):
        batch = rng.integers(0, 5, size=(mesh.size, 4)).astype(np.float32)
        expected += batch.sum()
        total = step(total, put_on_devices(batch, mesh))
        if i % 8 == 7:
            jax.block_until_ready(total)
    np.testing.assert_array_equal(np.asarray(total), np.full(mesh.size, expected, np.float32))
