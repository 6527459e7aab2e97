"""What a resumed run must share beyond its config: its data and its optimiser's behaviour."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crossbow_jax.data.preprocess import for_arrays
from crossbow_jax.engine import identity
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.identity import (
    data_fingerprint,
    describe_behaviour_difference,
    describe_data_difference,
    optimizer_behaviour,
    same_behaviour,
)
from crossbow_jax.engine.inputs import Arrays
from crossbow_jax.engine.optimizers import default_optimizer
from crossbow_jax.engine.plan import Clock, Position

TREE = {  # one learner's parameters: arrays or shapes
    "dense": {"kernel": np.zeros((30, 20), np.float32)},
    "bias": jax.ShapeDtypeStruct((20,), jnp.float32),
}


def arrays(x, y, tx=None, ty=None) -> Arrays:
    return Arrays("arrays", x, y, tx, ty, 10, for_arrays(x, None))


def images(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28, 1), np.uint8), rng.integers(0, 10, n).astype(np.int32)


def test_the_same_data_twice_has_the_same_fingerprint():
    (x, y), (tx, ty) = images(), images(16, seed=1)
    saved = data_fingerprint(arrays(x, y, tx, ty))
    now = data_fingerprint(arrays(x.copy(), y.copy(), tx.copy(), ty.copy()))
    assert saved == now and describe_data_difference(saved, now) == ""
    assert json.loads(json.dumps(saved)) == saved
    assert saved["train inputs"].startswith("uint8[64, 28, 28, 1] sha256:")
    assert saved["test labels"].startswith("int32[16] sha256:")


def test_one_changed_pixel_changes_the_fingerprint():
    x, y = images()
    saved = data_fingerprint(arrays(x, y))
    x = x.copy()
    x[37, 5, 9, 0] ^= 1
    now = data_fingerprint(arrays(x, y))
    assert saved != now
    assert describe_data_difference(saved, now).startswith(
        f"train inputs were {saved['train inputs']}, now uint8[64, 28, 28, 1] sha256:"
    )


def test_fewer_examples_or_another_dtype_or_no_test_set_change_the_fingerprint():
    (x, y), (tx, ty) = images(), images(16, seed=1)
    saved = data_fingerprint(arrays(x, y, tx, ty))
    fewer = describe_data_difference(saved, data_fingerprint(arrays(x[:60], y[:60], tx, ty)))
    assert fewer.startswith("train inputs were uint8[64, 28, 28, 1] sha256:")
    assert ", now uint8[60, 28, 28, 1] sha256:" in fewer and fewer.endswith("(and 1 more)")
    as_floats = data_fingerprint(arrays(x.astype(np.float32), y, tx, ty))
    floats = describe_data_difference(saved, as_floats)
    assert ", now float32[64, 28, 28, 1] sha256:" in floats
    no_test = describe_data_difference(saved, data_fingerprint(arrays(x, y)))
    assert no_test.startswith("test inputs were uint8[16, 28, 28, 1]") and ", now none" in no_test


def test_a_big_array_is_hashed_by_a_sample_of_rows_fast(tmp_path):
    # 300 MiB of uint8 images in a sparse file: nothing is written but the rows changed
    big = np.memmap(tmp_path / "big.bin", np.uint8, "w+", shape=(100_000, 56, 56, 1))
    assert big.nbytes > identity.FULL_HASH_BYTES
    saved = identity.array_fingerprint(big)
    assert saved.startswith("uint8[100000, 56, 56, 1] sha256 of ")
    big[-1, 0, 0, 0] = 1  # the last row is always in the sample
    last = identity.array_fingerprint(big)
    big[0, 3, 3, 0] = 1  # and the first
    assert len({saved, last, identity.array_fingerprint(big)}) == 3


def test_a_sampled_array_sees_its_sampled_rows_only(monkeypatch):
    x = np.zeros((1000, 64), np.uint8)  # 64 kB, hashed by samples over 32 kB
    sampled = identity.array_fingerprint(x, full_hash_bytes=32 << 10)
    assert sampled.startswith("uint8[1000, 64] sha256 of 1000 rows:")  # 32 MiB holds them all
    monkeypatch.setattr(identity, "SAMPLE_BYTES", 16 << 10)
    before = identity.array_fingerprint(x, full_hash_bytes=32 << 10)
    assert before.startswith("uint8[1000, 64] sha256 of 256 rows:")
    x[1] = 7  # between the samples at rows 0 and 4
    assert identity.array_fingerprint(x, full_hash_bytes=32 << 10) == before
    x[4] = 7
    assert identity.array_fingerprint(x, full_hash_bytes=32 << 10) != before


def test_a_streamed_data_set_is_named_by_its_size_and_example_shape():
    def streamed(num_train):
        example = np.zeros((1, 224, 224, 3), np.uint8)
        pre = for_arrays(example, None)
        streams = {"stream": lambda *a: None, "test_stream": lambda b: None}
        return Arrays(
            "imagenet", *[None] * 4, 1000, pre, num_train=num_train, example=example, **streams
        )

    saved = data_fingerprint(streamed(1_281_167))
    inputs = "uint8[1281167, 224, 224, 3] streamed from 'imagenet', not hashed"
    assert saved["train inputs"] == inputs
    assert saved["train labels"].startswith("int32[1281167] ")
    assert saved == data_fingerprint(streamed(1_281_167))
    assert describe_data_difference(saved, data_fingerprint(streamed(1000))).startswith(
        "train inputs were uint8[1281167, 224, 224, 3]"
    )


@pytest.fixture(scope="module")
def adam():
    return optimizer_behaviour(optax.adam(1e-2), TREE)


def test_the_same_optimizer_built_twice_behaves_the_same(adam):
    assert adam is not None and list(adam) == ["['bias']", "['dense']['kernel']"]
    assert all(len(v) == identity.STEPS * len(identity.PROBES) for v in adam.values())
    again = optimizer_behaviour(optax.adam(1e-2), TREE)
    assert same_behaviour(adam, again)
    assert same_behaviour(json.loads(json.dumps(adam)), again)  # as config.json keeps it
    # another construction of the same optimiser behaves the same
    injected = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    assert describe_behaviour_difference(adam, optimizer_behaviour(injected, TREE)) is None


def test_another_learning_rate_differs_in_the_first_update_size(adam):
    other = optimizer_behaviour(optax.adam(1e-1), TREE)
    assert not same_behaviour(adam, other)
    size = np.hypot(*(v[0] for v in adam.values()))
    assert describe_behaviour_difference(adam, other) == (
        f"its updates differ (first update's size was {size:.4g}, now {10 * size:.4g})"
    )


def test_momentum_shows_in_the_second_update():
    plain = optimizer_behaviour(optax.sgd(0.1), TREE)
    momentum = optimizer_behaviour(optax.sgd(0.1, momentum=0.9), TREE)
    assert describe_behaviour_difference(plain, momentum).startswith(
        "its updates differ (second update's size was"
    )


def test_weight_decay_and_clipping_show():
    decays = [optimizer_behaviour(optax.adamw(1e-3, weight_decay=wd), TREE) for wd in (1e-4, 1e-2)]
    assert not same_behaviour(*decays)
    clipped = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    assert not same_behaviour(
        optimizer_behaviour(optax.sgd(0.1), TREE), optimizer_behaviour(clipped, TREE)
    )


def test_an_optimizer_that_needs_extra_arguments_is_not_fingerprinted(adam):
    plateau = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau())
    assert optimizer_behaviour(plateau, TREE) is None
    assert same_behaviour(None, None)
    assert describe_behaviour_difference(None, adam) == (
        "it could not run on gradients alone, and now can"
    )


def test_last_bit_differences_still_match(adam):
    """Other hardware rounds float32 otherwise; so does adam with its hyperparameters
    injected (bias correction computed another way): not equal, yet the same optimiser."""
    injected = optimizer_behaviour(optax.inject_hyperparams(optax.adam)(1e-2), TREE)
    assert injected != adam  # the numbers differ in their last bits...
    assert same_behaviour(adam, injected)  # ...within the tolerance
    assert not same_behaviour(adam, optimizer_behaviour(optax.adam(1.001e-2), TREE))


def test_the_engines_default_optimizer_is_fingerprinted():
    clock = Clock(Position(), images_per_step=64, num_train=1024)
    sgd, decayed = (
        optimizer_behaviour(default_optimizer(TrainConfig(weight_decay=wd), clock), TREE)
        for wd in (0.0, 5e-4)
    )
    assert sgd is not None and not same_behaviour(sgd, decayed)
