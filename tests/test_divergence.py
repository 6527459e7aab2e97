"""A blow-up that stays finite is divergence: the rule of `TrainConfig.divergence_factor`."""

import math
import re

import jax.numpy as jnp
import optax
import pytest
from _engine_fixtures import MLP, split

import crossbow_jax
from crossbow_jax.engine.checkpoint import read_record
from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.history import Dispatch, History, TrainingDiverged
from crossbow_jax.engine.plan import Chunk, Clock, Position

TRAIN, TEST = split()
RUN = {"batch_size": 8, "learners_per_device": 2, "num_devices": 2, "epochs": 0.5,
       "steps_per_dispatch": 4, "checkpoint_every": 8, "progress": False}  # fmt: skip


def logged(dispatches, factor=10.0, start=None, uniform=None, first_step=0) -> History:
    """A `History` that has read dispatches of these per-step losses, from `first_step`."""
    config = TrainConfig(progress=False, divergence_factor=factor)
    history = History(config, [], 0.0, 0.0, clock=Clock(Position(), 32, 768), total_steps=24,
                      devices=1, start_loss=start, uniform_loss=uniform)  # fmt: skip
    step = first_step
    for losses in dispatches:
        chunk = Chunk(step, len(losses), 0, 0, False, False)
        history.add_dispatches([Dispatch(chunk, {"loss": jnp.asarray([losses])}, 0.0, 0.0)])
        step += len(losses)
    return history


def test_the_start_is_the_first_steps_loss_and_ln_classes_a_floor_under_it():
    ln4 = math.log(4)
    fine = [[0.01, 0.5], [1.0, 2.0], [13.0, 14.0]]  # a good start, then rows up to 13.5
    assert logged(fine, uniform=ln4).start_loss == pytest.approx(0.01)  # not the row mean
    with pytest.raises(TrainingDiverged, match=r"^the training loss rose from 0.01 to 14.5 "
                       r"\(over 10x 1.39, the loss of a uniform guess\) at step 6 \(epoch "
                       r"0.25\); lower the learning rate or alpha; for a loss that may grow, "
                       r"raise divergence_factor \(0: off\)$"):  # fmt: skip
        logged(fine[:2] + [[14.0, 15.0]], uniform=ln4)
    with pytest.raises(TrainingDiverged, match=r"rose from 3 to 40 \(over 10x its start\) at "
                                               r"step 2 "):  # fmt: skip
        logged([[3.0, 77.0]], uniform=ln4)  # a start above ln(classes) is the reference
    logged([[3.0, 77.0]], uniform=ln4, factor=0.0)  # off
    with pytest.raises(TrainingDiverged, match="over 50x its start"):
        logged([[3.0, 77.0], [200.0, 200.0]], factor=50.0)


def test_a_users_loss_is_measured_against_its_own_start_when_positive():
    big_start = [[1e4, 5e3], [100.0, 50.0], [9e4, 9e4]]  # falls from a large start: fine
    logged(big_start)
    with pytest.raises(TrainingDiverged, match=r"rose from 1e\+04 to 1.5e\+05 \(over 10x its"):
        logged(big_start[:2] + [[1e5, 2e5]])
    logged([[-3.0, -1.0], [100.0, 1e6]])  # a start at or below 0 is no scale: no rule
    resumed = logged([[1.0, 1.0]], start=0.5, first_step=8)  # the recorded start counts
    with pytest.raises(TrainingDiverged, match=r"rose from 0.5 to 6 \(over 10x its start\) at "
                                               r"step 12 "):  # fmt: skip
        logged([[6.0, 6.0]], start=resumed.start_loss, first_step=10)


def test_the_factor_is_zero_or_above_one():
    for bad in (0.5, 1, -1.0):
        with pytest.raises(ConfigError, match=r"^divergence_factor=-?[\d.]+ must be "):
            TrainConfig(divergence_factor=bad)


def adam_jumping_at(step):
    """adam at 1e-3, at 1e4 from `step` on: a finite blow-up after good steps."""
    return optax.adam(optax.piecewise_constant_schedule(1e-3, {step: 1e7}))


def test_a_finite_blow_up_keeps_the_last_good_checkpoint_and_the_start_on_resume(tmp_path):
    kw = dict(RUN, checkpoint_dir=str(tmp_path), optimizer=adam_jumping_at(8))
    with pytest.raises(TrainingDiverged) as raised:
        crossbow_jax.train(MLP(), TRAIN, **kw)
    found = re.fullmatch(
        r"the training loss rose from (\S+) to [\d,.e+]+ \(over 10x its start\) at step 12 "
        rf"\(epoch 0.50\); the last good checkpoint \(step 8\) is in {tmp_path}; lower the "
        r"learning rate or alpha; for a loss that may grow, raise divergence_factor \(0: off\)",
        str(raised.value),
    )  # fmt: skip
    assert found, str(raised.value)
    good = read_record(tmp_path)
    assert good["step"] == 8 and f"{good['start_loss']:.3g}" == found[1]
    assert max(row["loss"] for row in good["history"]) < 2 * good["start_loss"]
    # resumed with the rule off (not part of the run's identity), it runs to its end, and
    # carries the first step's loss on (the rule after a resume: test_a_users_loss_...)
    result = crossbow_jax.train(MLP(), TRAIN, resume=True, divergence_factor=0, **kw)
    assert result.steps == 12 and result.history[-1]["loss"] > 100 * good["start_loss"]
    assert read_record(tmp_path)["start_loss"] == good["start_loss"]


def test_sma_with_alpha_times_k_over_2_ends_in_training_diverged():
    with (
        pytest.warns(UserWarning, match=r"alpha\*k=3 >= 2"),
        pytest.raises(TrainingDiverged, match="the training loss rose from"),
    ):
        crossbow_jax.train(MLP(), TRAIN, optimizer=optax.adam(1e-3), alpha=1.5,
                           learners_per_device=2, num_devices=1, batch_size=16,
                           steps_per_dispatch=2, progress=False)  # fmt: skip
