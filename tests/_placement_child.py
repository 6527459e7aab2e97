"""Host-fed against device-resident training data, under XLA's default compile options
(see `test_engine.py::test_host_fed_data_trains_exactly_like_device_resident_data`).

The suite compiles with fast-compile flags (tests/conftest.py); with XLA:CPU's older
fusion emitters the two programs may sum a batch in another order, so the promise users
get (the same bits, with XLA's defaults) is checked in a process of its own.

Usage: python _placement_child.py OUT_DIR    (writes OUT_DIR/<mapper>-<placement>.npz)
"""

import sys

import numpy as np

MAPPERS, PLACEMENTS = ("shard_map", "pmap"), ("device", "host")


def run(out: str) -> None:
    import jax

    import crossbow_jax
    from _engine_fixtures import MLP, tiny_images

    x, y = tiny_images(256)
    data = ((x[:192], y[:192]), (x[192:], y[192:]))
    kw = dict(batch_size=8, learners_per_device=2, epochs=2, num_devices=2, progress=False,
              steps_per_dispatch=3, augment="crop_flip", execution="unroll")  # fmt: skip
    for mapper in MAPPERS:
        for placement in PLACEMENTS:
            r = crossbow_jax.train(MLP(classes=3), *data, mapper=mapper, data_placement=placement,
                                   **kw)  # fmt: skip
            leaves = {f"leaf{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(r.params))}
            np.savez(f"{out}/{mapper}-{placement}.npz", accuracy=r.accuracy, steps=r.steps,
                     **leaves)  # fmt: skip


if __name__ == "__main__":
    run(sys.argv[1])
