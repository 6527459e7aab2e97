"""Online tuning (learners added and dropped between real steps) and elastic resume."""

import jax
import numpy as np
import optax
import pytest
from _engine_fixtures import MLP, split

import crossbow_jax
from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.plan import Clock, Position, plan_chunks, run_end
from crossbow_jax.engine.programs import Compiler
from crossbow_jax.transformation import sma
from crossbow_jax.transformation.resize import resize_params, resize_state
from crossbow_jax.tuning import online

TRAIN, TEST = split()  # 768 training examples
KW = dict(batch_size=8, num_devices=2, progress=False, tune_steps=2, tune_repeats=1,
          execution="vmap", seed=3)  # fmt: skip


@pytest.fixture
def scripted(monkeypatch):
    """Throughput by learners per device, instead of the measured one."""
    curve = {1: 100.0, 2: 150.0, 3: 155.0, 4: 300.0}
    seen = []

    def throughput(samples, windows):
        m = online_setting[-1]
        seen.append(m)
        return curve[m]

    online_setting = []
    observe = online.OnlineTuner.observe

    def spy(self, learners, samples, compile_seconds):
        online_setting.append(learners)
        return observe(self, learners, samples, compile_seconds)

    monkeypatch.setattr(online, "windows_throughput", throughput)
    monkeypatch.setattr(online.OnlineTuner, "observe", spy)
    return seen


def test_online_tuning_trains_while_it_tunes(scripted):
    r = crossbow_jax.train(MLP(), TRAIN, TEST, learners_per_device="auto", epochs=2, **KW)
    assert scripted == [1, 2, 3]  # 3 gains 3.3% < 10%: back to 2, 4 never tried
    assert r.learners_per_device == 2 and r.tuning["chosen"] == 2
    assert [row["learners"] for row in r.tuning["curve"]] == [1, 2, 3]
    interval = 2 * (1 + 1)  # tune_steps (whole dispatches of 2 steps) x (repeats + 1)
    assert [row["steps"] for row in r.tuning["curve"]] == [interval] * 3
    settings = [row["learners_per_device"] for row in r.history]
    assert settings[:6] == [1, 1, 2, 2, 3, 3] and set(settings[6:]) == {2}
    # Every step is a training step; epoch 0 = one pass, whatever the layouts.
    per_step = {m: 2 * m * 8 for m in (1, 2, 3)}
    steps = np.diff([0] + [row["step"] for row in r.history])
    images = [per_step[m] * n for m, n in zip(settings, steps)]
    ends = [i for i, row in enumerate(r.history) if row["epoch"] == 1.0]
    first_epoch = sum(images[: ends[0] + 1])
    assert 768 - per_step[2] < first_epoch <= 768
    assert r.history[-1]["epoch"] == 2.0 and r.steps == r.history[-1]["step"]
    assert r.accuracy > 0.9


def test_online_tuning_feeds_the_same_batches_from_the_host(scripted):
    kw = dict(learners_per_device="auto", epochs=1, **KW)
    a = crossbow_jax.train(MLP(), TRAIN, TEST, data_placement="device", **kw)
    b = crossbow_jax.train(MLP(), TRAIN, TEST, data_placement="host", **kw)
    assert [r["learners_per_device"] for r in a.history] == [
        r["learners_per_device"] for r in b.history
    ]
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_online_run_resumes_where_it_stopped(scripted, tmp_path):
    kw = dict(learners_per_device="auto", checkpoint_every=6, **KW)
    whole = crossbow_jax.train(
        MLP(), TRAIN, TEST, epochs=1, checkpoint_dir=str(tmp_path / "whole"), **kw
    )
    folder = str(tmp_path / "run")
    part = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=0.25, checkpoint_dir=folder, **kw)
    assert part.tuning["deciding"]  # stopped while the tuner was still deciding
    rest = crossbow_jax.train(
        MLP(), TRAIN, TEST, epochs=1, checkpoint_dir=folder, resume=True, **kw
    )
    assert rest.learners_per_device == whole.learners_per_device == 2
    assert rest.steps == whole.steps
    for x, y in zip(jax.tree.leaves(whole.params), jax.tree.leaves(rest.params)):
        np.testing.assert_array_equal(x, y)


def test_clock_counts_epochs_in_images_across_layouts():
    clock = Clock(Position(10, 0, 160), images_per_step=48, num_train=768)
    assert clock.first == (768 - 160) // 48
    assert clock.position(10 + clock.first) == Position(10 + clock.first, 1, 0)
    assert clock.epochs(10 + clock.first) == 1.0
    assert clock.step_at(2.0) == 10 + clock.first + 16
    assert clock.step_at(0.1) is None  # already past
    cfg = TrainConfig(steps_per_dispatch=5, epochs=2)
    chunks = plan_chunks(clock, run_end(clock, 2.0), cfg, 5)
    offsets = [(c.epoch, c.offset) for c in chunks]
    assert offsets[0] == (0, 160)
    assert all(o + c.length * 48 <= 768 for (_, o), c in zip(offsets, chunks))
    assert chunks[-1].epochs == 2.0


def test_new_learners_are_copies_of_z_with_a_fresh_optimiser_state():
    tx = sma(optax.sgd(optax.linear_schedule(0.1, 0.0, 50), momentum=0.9))
    params = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
    state, update = tx.init(params), jax.jit(tx.update)  # compiled once, not op by op
    for g in (1.0, -2.0):
        updates, state = update({"w": np.full((2, 3), g, np.float32)}, state, params)
        params = optax.apply_updates(params, updates)
    grown = resize_params(params, state.z, 3, keep=2)
    new_state = resize_state(state, tx.init(grown), keep=2)
    np.testing.assert_array_equal(grown["w"][:2], params["w"])
    np.testing.assert_array_equal(grown["w"][2], state.z["w"])
    momentum, schedule = new_state.learner_state
    np.testing.assert_array_equal(momentum.trace["w"][:2], state.learner_state[0].trace["w"])
    assert not np.any(momentum.trace["w"][2])  # fresh
    assert list(schedule.count) == [2, 2, 2]  # the schedule goes on for the new learner
    for a, b in ((new_state.z, state.z), (new_state.z_prev, state.z_prev)):
        np.testing.assert_array_equal(a["w"], b["w"])
    shrunk = resize_state(new_state, tx.init(resize_params(grown, state.z, 1, 1)), keep=1)
    assert shrunk.learner_state[0].trace["w"].shape == (1, 3)


def test_elastic_resume_on_other_devices_and_learners(tmp_path):
    folder = str(tmp_path / "run")
    kw = dict(batch_size=8, progress=False, execution="vmap", checkpoint_dir=folder)
    first = crossbow_jax.train(MLP(), TRAIN, TEST, learners_per_device=2, num_devices=4,
                               epochs=1, **kw)  # fmt: skip
    with pytest.raises(ConfigError, match="elastic"):
        crossbow_jax.train(MLP(), TRAIN, TEST, learners_per_device=4, num_devices=2, epochs=2,
                           resume=True, **kw)  # fmt: skip
    resized = []
    original = Compiler.resized

    def spy(self, state, before, keep):
        out = original(self, state, before, keep)
        resized.append((before.layout, keep, jax.tree.map(np.asarray, out)))
        return out

    Compiler.resized = spy
    try:
        second = crossbow_jax.train(MLP(), TRAIN, TEST, learners_per_device=4, num_devices=2,
                                    epochs=2, resume=True, elastic=True, **kw)  # fmt: skip
    finally:
        Compiler.resized = original
    (before, keep, state), = resized
    assert (before.devices, before.learners, keep) == (2, 2, 0)
    z = first.central[0]
    for path_z, now in zip(jax.tree.leaves(z), jax.tree.leaves(state.opt_state.z)):
        np.testing.assert_array_equal(now[0], path_z)  # the central model carries over
    for learner, central in zip(jax.tree.leaves(state.params), jax.tree.leaves(z)):
        assert learner.shape[:2] == (2, 4)
        np.testing.assert_array_equal(learner[1, 3], central)  # learners restart from z
    assert int(state.step[0]) == first.steps  # the step count carries over
    assert second.devices == 2 and second.learners_per_device == 4
    epochs = [row["epoch"] for row in second.history]
    assert epochs[: len(first.history)] == [row["epoch"] for row in first.history]
    assert epochs[-1] == 2.0 and second.accuracy > 0.9


def test_a_setting_that_does_not_fit_sends_the_run_back(scripted, monkeypatch):
    kw = dict(learners_per_device="auto", epochs=1, **KW)
    monkeypatch.setattr(online, "program_memory", lambda program: 2**30)  # every estimate: 1 GiB
    r = crossbow_jax.train(MLP(), TRAIN, TEST, tune_memory_limit=2**20, **kw)
    assert [(c["learners"], c["status"]) for c in r.tuning["curve"]] == [(1, "ok"), (2, "memory")]
    assert r.learners_per_device == 1 and {row["learners_per_device"] for row in r.history} == {1}

    original = Compiler.resized

    def out_of_memory(self, state, before, keep):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

    monkeypatch.setattr(Compiler, "resized", out_of_memory)
    r = crossbow_jax.train(MLP(), TRAIN, TEST, **kw)
    assert [c["status"] for c in r.tuning["curve"]] == ["ok", "oom"] and r.tuning["chosen"] == 1
    monkeypatch.setattr(Compiler, "resized", original)
    with pytest.raises(ZeroDivisionError):  # anything else is not the tuner's to absorb
        monkeypatch.setattr(Compiler, "resized", lambda *a: 1 / 0)
        crossbow_jax.train(MLP(), TRAIN, TEST, **kw)
