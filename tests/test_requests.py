"""Requests the engine cannot serve, refused before any work with one line naming the value
and the fix: integers beyond int32, runs too long to plan, state beyond the devices' memory,
test labels shaped unlike the training labels; and the divergence message names a
checkpoint only where one was saved."""

import os

import flax.linen as nn
import numpy as np
import optax
import pytest
from _engine_fixtures import MLP, split

import crossbow_jax
from crossbow_jax.engine import checks, programs
from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.history import History, TrainingDiverged
from crossbow_jax.engine.plan import Chunk, Clock, Position

TRAIN, TEST = split()
RUN = {"batch_size": 8, "learners_per_device": 2, "num_devices": 2, "epochs": 1, "progress": False}


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the training set is placed or anything is compiled."""

    def fail(*args, **kwargs):
        pytest.fail("work started")

    monkeypatch.setattr(programs, "TrainData", fail)
    monkeypatch.setattr(programs.Compiler, "_compile", fail)


@pytest.mark.parametrize("split_name", ["train", "test"])
def test_integer_labels_beyond_int32_are_refused_not_wrapped(split_name, no_work):
    data = {"train": TRAIN, "test": TEST}
    x, y = data[split_name]
    y = y.astype(np.int64)
    y[5] = 2**32 + 1  # astype(int32) would make it class 1
    data[split_name] = (x, y)
    with pytest.raises(ConfigError, match=rf"^{split_name} labels row 5 holds 4294967297, "
                                          r"outside int32 .* renumber"):  # fmt: skip
        crossbow_jax.train(MLP(), data["train"], data["test"], **RUN)


def test_integer_labels_inside_int32_pass_from_int64():
    from crossbow_jax.engine.inputs import as_engine_dtype

    y = np.array([0, 3, 2**31 - 1, -(2**31)], np.int64)
    assert as_engine_dtype(y).dtype == np.int32
    assert list(as_engine_dtype(y)) == list(y)


def test_an_epoch_count_beyond_the_step_bound_is_refused(no_work):
    with pytest.raises(ConfigError, match=r"^epochs=1e\+12 is 24000000000000 steps .* at most "
                                          r"2147483647 steps"):  # fmt: skip
        crossbow_jax.train(MLP(), TRAIN, TEST, **{**RUN, "epochs": 1e12})


def test_a_plan_of_too_many_dispatches_is_refused(no_work):
    # 24 steps per epoch, one step per dispatch: 24 million dispatches to plan up front
    with pytest.raises(ConfigError, match=r"^epochs=1e\+06 is 24000000 steps in 24000000 "
                                          r"dispatches .* at most 16777216 .*steps_per_dispatch"):  # fmt: skip
        crossbow_jax.train(MLP(), TRAIN, TEST, **{**RUN, "epochs": 1e6, "steps_per_dispatch": 1})


def test_a_plan_cut_at_every_epoch_end_counts_its_epochs(no_work):
    # one step per epoch: long dispatches do not help, every epoch end is a cut
    one_step = (TRAIN[0][:32], TRAIN[1][:32])
    with pytest.raises(ConfigError, match=r"^epochs=2e\+07 is 20000000 steps in 20000000 "
                                          r"dispatches of at most 1024 steps"):  # fmt: skip
        crossbow_jax.train(MLP(), one_step, TEST,
                           **{**RUN, "epochs": 2e7, "steps_per_dispatch": 1024})  # fmt: skip


class Huge(nn.Module):
    """An MLP of 2**36 hidden units: 3.5 TB of float32 parameters (only ever abstract here)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.Dense(2**36)(x))


@pytest.mark.parametrize("learners", [2, "auto"])
def test_state_beyond_memory_is_refused_with_the_numbers(learners, no_work):
    expect = (r"^2 learners per device need" if learners == 2 else
              r"^learners_per_device='auto': even 1 learner per device needs")  # fmt: skip
    with pytest.raises(ConfigError, match=expect + r" at least \d+\.\d+ TiB on each device "
                       r"\(parameters \d+\.\d+ TiB, optimiser state .* training set .*\), but "
                       r"this process's 2 CPU devices share the host's .*B"):  # fmt: skip
        crossbow_jax.train(Huge(), TRAIN, TEST, **{**RUN, "learners_per_device": learners})


class FakeDevice:
    def __init__(self, platform, stats):
        self.platform, self.stats, self.process_index = platform, stats, 0

    def memory_stats(self):
        return self.stats


def test_memory_limit_is_per_device_where_reported_and_the_host_shared_on_cpu():
    gpus = [
        FakeDevice("gpu", {"bytes_limit": 80 << 30}),
        FakeDevice("gpu", {"bytes_limit": 70 << 30}),
    ]
    assert checks.memory_limit(gpus) == (70 << 30, 1)
    cpus = [FakeDevice("cpu", None)] * 4
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert checks.memory_limit(cpus) == (host, 4)
    assert checks.memory_limit([FakeDevice("tpu", {})]) is None  # unknown: not checked


def test_test_labels_of_another_shape_than_train_labels_are_refused(no_work):
    x, y = TEST
    with pytest.raises(ConfigError, match=r"^test labels have shape \(256, 1\) but train labels "
                                          r"have \(768,\); .*\(256,\)"):  # fmt: skip
        crossbow_jax.train(MLP(), TRAIN, (x, y[:, None]), **RUN)


def diverged(folder) -> str:
    config = TrainConfig(progress=False)
    history = History(config, [], 0.0, 0.0, clock=Clock(Position(), 32, 768), total_steps=24,
                      devices=2, checkpoint_dir=str(folder))  # fmt: skip
    with pytest.raises(TrainingDiverged) as raised:
        history._check_finite(Chunk(8, 2, 0, 256, False, False), np.array([1.0, np.nan]))
    return str(raised.value)


def test_divergence_names_a_checkpoint_only_where_one_is_saved(tmp_path):
    assert "checkpoint" not in diverged(tmp_path)  # an empty run folder
    (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
    assert "checkpoint" not in diverged(tmp_path)  # a save cut off half way
    (tmp_path / "checkpoints" / "8").mkdir()
    assert f"the last good checkpoint (step 8) is in {tmp_path};" in diverged(tmp_path)


def test_a_run_that_diverges_before_its_first_checkpoint_names_none(tmp_path):
    kw = {**RUN, "steps_per_dispatch": 2, "checkpoint_dir": str(tmp_path / "run")}
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step") as raised:
        crossbow_jax.train(MLP(), TRAIN, TEST, optimizer=optax.sgd(1e30), **kw)
    assert "checkpoint" not in str(raised.value)
