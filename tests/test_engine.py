"""The training engine: learning, layouts, mappers, determinism, schedules."""

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _engine_fixtures import MLP, BNNet, prepared, split, tiny_images

import crossbow_jax
from crossbow_jax.data.preprocess import crop_flip
from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.mapping import simulated_devices_flags
from crossbow_jax.engine.optimizers import learning_rate_schedule
from crossbow_jax.engine.plan import Clock, Layout, Position, plan_chunks
from crossbow_jax.engine.programs import Compiler
from crossbow_jax.engine.step import batch_indices

TRAIN, TEST = split()
HERE = pathlib.Path(__file__).resolve().parent
FAST = dict(progress=False)  # 2 unrolled steps a dispatch: the CPU default, the fastest to compile


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sma_learns_on_several_devices_and_reports_its_run():
    rows = []
    r = crossbow_jax.train(
        MLP(),
        TRAIN,
        TEST,
        batch_size=8,
        learners_per_device=3,
        epochs=3,
        num_devices=4,
        callback=rows.append,
        target_accuracy=None,
        **FAST,
    )
    assert r.accuracy > 0.9
    assert r.devices == 4 and r.learners_per_device == 3
    assert r.history[-1]["step"] == r.steps == 3 * (768 // (4 * 3 * 8))
    assert r.history[0]["loss"] > r.history[-1]["loss"]
    assert rows and rows[-1]["step"] == r.steps
    assert r.images_per_second > 0 and r.compile_time > 0 and r.wall_time > r.compile_time
    assert set(r.params) == {"params"} and r.params["params"]["Dense_1"]["kernel"].shape == (8, 32)


@pytest.mark.parametrize("algorithm", ["sma", "ssgd"])
def test_shard_map_and_pmap_give_equal_results(algorithm):
    kw = dict(
        batch_size=8, learners_per_device=2, epochs=1, num_devices=4, algorithm=algorithm, **FAST
    )
    a = crossbow_jax.train(MLP(), TRAIN, TEST, mapper="shard_map", **kw)
    b = crossbow_jax.train(MLP(), TRAIN, TEST, mapper="pmap", **kw)
    for x, y in zip(leaves(a.params), leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert a.accuracy == b.accuracy


def test_same_seed_same_result_other_seed_other_result():
    kw = dict(batch_size=8, learners_per_device=2, epochs=1, num_devices=2, **FAST)
    a = crossbow_jax.train(MLP(), TRAIN, TEST, seed=1, **kw)
    b = crossbow_jax.train(MLP(), TRAIN, TEST, seed=1, **kw)
    c = crossbow_jax.train(MLP(), TRAIN, TEST, seed=2, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a.params), leaves(b.params)))
    assert not all(np.array_equal(x, y) for x, y in zip(leaves(a.params), leaves(c.params)))


def test_vmap_and_unrolled_execution_agree():
    kw = dict(batch_size=8, learners_per_device=3, epochs=1, num_devices=2, **FAST)
    a = crossbow_jax.train(MLP(), TRAIN, TEST, execution="vmap", **kw)
    b = crossbow_jax.train(MLP(), TRAIN, TEST, execution="unroll", **kw)
    for x, y in zip(leaves(a.params), leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


class SmallCNN(nn.Module):
    """Strided, dilated and grouped convolutions with BatchNorm: what im2col must rewrite."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))  # 8x8
        x = nn.Conv(4, (3, 3), kernel_dilation=2, padding="VALID", feature_group_count=2)(x)
        x = nn.relu(nn.Conv(4, (2, 2), strides=2, padding=((0, 1), (1, 0)))(x))  # 4x4 -> 2x2
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(1, 2)))


def test_im2col_execution_trains_like_vmap():
    x, y = tiny_images(192)
    kw = dict(batch_size=4, learners_per_device=3, epochs=1, num_devices=2, **FAST)
    runs = {e: crossbow_jax.train(SmallCNN(), (x[:160], y[:160]), (x[160:], y[160:]),
                                  execution=e, **kw) for e in ("vmap", "im2col")}  # fmt: skip
    for a, b in zip(leaves(runs["vmap"].params), leaves(runs["im2col"].params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert runs["im2col"].config.execution == "im2col"


def test_ssgd_is_one_learner_per_device_at_batch_m_times_b():
    r = crossbow_jax.train(
        MLP(),
        TRAIN,
        TEST,
        batch_size=8,
        learners_per_device=3,
        epochs=2,
        num_devices=4,
        algorithm="ssgd",
        **FAST,
    )
    assert r.steps == 2 * (768 // (4 * 3 * 8))  # same images per step as SMA
    assert r.accuracy > 0.8


def test_batchnorm_statistics_are_kept_and_used_for_z():
    r = crossbow_jax.train(
        BNNet(), TRAIN, TEST, batch_size=16, learners_per_device=2, epochs=2, num_devices=2, **FAST
    )
    stats = r.params["batch_stats"]["BatchNorm_0"]
    assert np.any(np.abs(stats["mean"]) > 0.1) and np.all(stats["var"] > 0)
    x, y = TEST
    logits = BNNet().apply(r.params, jnp.asarray(x), train=False)
    accuracy = float(np.mean(np.argmax(logits, -1) == y))
    assert accuracy == pytest.approx(r.accuracy)  # evaluation used z with these stats


def test_uint8_images_with_crop_flip_augmentation_train():
    x, y = tiny_images(384)

    class Conv(MLP):
        pass

    r = crossbow_jax.train(
        Conv(classes=3),
        (x[:256], y[:256]),
        (x[256:], y[256:]),
        batch_size=8,
        learners_per_device=2,
        epochs=4,
        num_devices=2,
        augment="crop_flip",
        learning_rate=0.02,
        **FAST,
    )
    assert r.accuracy > 0.8


def test_target_accuracy_stops_early_and_times_it():
    r = crossbow_jax.train(
        MLP(),
        TRAIN,
        TEST,
        batch_size=8,
        learners_per_device=2,
        epochs=10,
        num_devices=2,
        eval_every=4,
        target_accuracy=0.7,
        **FAST,
    )
    assert r.accuracy >= 0.7
    assert r.time_to_accuracy is not None and r.time_to_accuracy <= r.wall_time
    assert r.steps < 10 * (768 // 32)
    assert r.history[-1]["reached_target"]


def test_reset_at_drops_puts_every_learner_on_z(monkeypatch):
    seen = {}
    # One device, lr drop at epoch 1; stop right after the drop step.
    spe = 768 // (4 * 8)
    kw = dict(
        batch_size=8,
        learners_per_device=4,
        num_devices=1,
        lr_milestones=(1,),
        reset_at_drops=True,
        progress=False,
        steps_per_dispatch=1,
    )
    compile_train = Compiler.train_program
    calls = []

    def spy(self, *args, **kwargs):
        program = compile_train(self, *args, **kwargs)

        def run(state, *inputs):
            state, metrics = program(state, *inputs)
            calls.append(1)
            if len(calls) == spe + 1:  # one step per dispatch: this is step spe + 1
                seen["params"] = np.asarray(state.params["Dense_0"]["kernel"])[0]
                seen["z"] = np.asarray(state.opt_state.z["Dense_0"]["kernel"])[0]
            return state, metrics

        return run

    monkeypatch.setattr(Compiler, "train_program", spy)
    crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1 + 1 / spe, **kw)
    assert len(calls) == spe + 1
    learners = seen["params"]
    assert all(np.array_equal(learners[0], learners[j]) for j in range(4))
    np.testing.assert_array_equal(learners[0], seen["z"])


def test_batch_indices_are_disjoint_and_cover_the_epoch():
    lay = Layout(devices=3, learners=2, batch=4)
    perm = jnp.asarray(np.random.default_rng(0).permutation(72), jnp.int32)
    offsets = [t * lay.images_per_step for t in range(3)]  # images of the epoch consumed
    rows = [np.asarray(batch_indices(perm, o, d, lay)) for o in offsets for d in range(3)]
    assert all(r.shape == (2, 4) for r in rows)
    everything = np.concatenate([r.ravel() for r in rows])
    assert sorted(everything.tolist()) == list(range(72))


def test_crop_flip_keeps_shape_and_content_and_differs_per_image():
    x = jnp.tile(jnp.arange(64.0).reshape(1, 8, 8, 1), (16, 1, 1, 1))
    out = np.asarray(crop_flip(x, jax.random.PRNGKey(0)))
    assert out.shape == x.shape
    assert len({o.tobytes() for o in out}) > 4  # images get their own crop / flip
    assert set(np.unique(out)) <= set(range(64)) | {0}


def test_schedule_warms_up_and_drops_at_epoch_milestones():
    cfg = TrainConfig(
        learning_rate=0.1, lr_milestones=(2, 3), lr_gamma=0.1, warmup_epochs=1, epochs=4
    )
    lr = learning_rate_schedule(cfg, Clock(Position(), images_per_step=10, num_train=100))
    assert float(lr(0)) == pytest.approx(0.01)
    assert float(lr(9)) == pytest.approx(0.1)
    assert float(lr(19)) == pytest.approx(0.1)
    assert float(lr(20)) == pytest.approx(0.01)
    assert float(lr(30)) == pytest.approx(0.001)


def test_plan_cuts_chunks_at_epochs_evals_and_checkpoints():
    cfg = TrainConfig(
        steps_per_dispatch=4, eval_every=6, checkpoint_every=5, checkpoint_dir="/tmp/x", epochs=2
    )
    chunks = plan_chunks(Clock(Position(), 10, 100), 20, cfg, cfg.steps_per_dispatch)
    assert [c.end for c in chunks] == [4, 5, 6, 10, 12, 15, 18, 20]
    assert [c.end for c in chunks if c.evaluate] == [6, 10, 12, 18, 20]
    assert [c.end for c in chunks if c.checkpoint] == [5, 10, 15, 20]
    assert [c.offset for c in chunks] == [0, 40, 50, 60, 0, 20, 50, 80]  # images
    assert [c.epochs for c in chunks][3] == 1.0 and chunks[-1].epochs == 2.0
    assert sum(c.length for c in chunks) == 20


def test_user_optimizer_is_used():
    r = crossbow_jax.train(
        MLP(),
        TRAIN,
        TEST,
        optimizer=optax.adam(1e-2),
        batch_size=8,
        learners_per_device=2,
        epochs=2,
        num_devices=2,
        **FAST,
    )
    assert r.accuracy > 0.9


def test_host_fed_data_trains_exactly_like_device_resident_data(tmp_path):
    """Under shard_map and pmap, with crop+flip: the same bits either way. Run under XLA's
    default compile options, in a process of its own (`_placement_child.py`)."""
    from _placement_child import MAPPERS

    env = dict(os.environ, XLA_FLAGS=simulated_devices_flags(2), PYTHONPATH=str(HERE))
    done = subprocess.run([sys.executable, str(HERE / "_placement_child.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for mapper in MAPPERS:
        device, host = (np.load(tmp_path / f"{mapper}-{p}.npz") for p in ("device", "host"))
        assert sorted(device.files) == sorted(host.files)
        for name in device.files:
            np.testing.assert_array_equal(device[name], host[name], err_msg=f"{mapper}: {name}")
        assert int(device["steps"]) == 2 * (192 // 32)


@pytest.mark.parametrize("mapper", ["shard_map", "pmap"])
def test_compile_time_counts_the_initialisation_programs(mapper):
    cfg = TrainConfig(batch_size=8, learners_per_device=2, num_devices=2, mapper=mapper)
    setup, data = prepared(cfg, MLP(), TRAIN, TEST)
    assert setup.compiler.seconds == 0.0
    setup.compiler.init_state(cfg.seed, data.example)
    assert setup.compiler.seconds > 0.0
