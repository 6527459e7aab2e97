"""TensorBoard event files in the run folder, read back with TensorBoard's own reader."""

import glob
import os

import numpy as np
import pytest
from _engine_fixtures import MLP, split
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

import crossbow_jax
from crossbow_jax.engine.config import ConfigError
from crossbow_jax.engine.events import scalars

TRAIN, TEST = split()
RUN = dict(batch_size=8, learners_per_device=2, num_devices=2, steps_per_dispatch=2,
           progress=False)  # fmt: skip  (24 steps an epoch)


def event_files(folder) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")))


def shown(folder) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: (step, value) by tag."""
    reader = EventAccumulator(str(folder))
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)]
            for tag in reader.Tags()["scalars"]}  # fmt: skip


def expected(history) -> dict[str, list[tuple[int, float]]]:
    """The history rows by tag, as float32 (what an event file holds)."""
    out = {}
    for row in history:
        for tag, value in scalars(row).items():
            out.setdefault(tag, []).append((row["step"], float(np.float32(value))))
    return out


def test_a_run_folder_shows_every_rows_figures_under_standard_tags(tmp_path):
    r = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, eval_every=6, lr_milestones=(0.5,),
                           checkpoint_dir=str(tmp_path), **RUN)  # fmt: skip
    assert len(event_files(tmp_path)) == 1
    got = shown(tmp_path)
    assert set(got) == {
        "train/loss", "train/accuracy", "train/learning_rate", "test/loss", "test/accuracy",
        "perf/images_per_second", "perf/learners_per_device", "perf/all_reduce_bytes",
        "perf/peak_bytes",
    }  # fmt: skip
    assert got == expected(r.history)
    assert [s for s, _ in got["train/loss"]] == list(range(2, 25, 2))
    assert [s for s, _ in got["test/accuracy"]] == [6, 12, 18, 24]
    rates = dict(got["train/learning_rate"])  # the rate of a row's last step: drops at 12
    assert rates[12] == np.float32(0.05) and rates[14] == np.float32(0.005)
    assert dict(got["perf/learners_per_device"])[24] == 2
    assert dict(got["perf/all_reduce_bytes"])[24] == pytest.approx(r.all_reduce_bytes["devices"])
    assert dict(got["perf/peak_bytes"])[24] == pytest.approx(r.peak_bytes["devices"])  # SMA


def test_tensorboard_false_writes_none_and_true_needs_a_run_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"tensorboard=True .* needs checkpoint_dir"):
        crossbow_jax.TrainConfig(tensorboard=True)
    crossbow_jax.train(MLP(), TRAIN, TEST, epochs=0.25, checkpoint_dir=str(tmp_path), **RUN)
    assert len(event_files(tmp_path)) == 1
    crossbow_jax.train(MLP(), TRAIN, TEST, epochs=0.25, checkpoint_dir=str(tmp_path),
                       overwrite=True, tensorboard=False, **RUN)  # fmt: skip
    assert event_files(tmp_path) == []  # the older run's went with it (overwrite)


class Stop(Exception):
    pass


def test_a_resumed_run_writes_each_step_once_more_only_past_its_checkpoint(tmp_path):
    def stop(row):
        if row["step"] == 18:  # written; the checkpoint is at 16
            raise Stop

    folder = str(tmp_path)
    with pytest.raises(Stop):
        crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, eval_every=8, checkpoint_every=8,
                           checkpoint_dir=folder, callback=stop, **RUN)  # fmt: skip
    r = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, eval_every=8, checkpoint_every=8,
                           checkpoint_dir=folder, resume=True, **RUN)  # fmt: skip
    first, second = event_files(tmp_path)
    steps = [[e.step for e in EventFileLoader(f).Load() if e.summary.value
              and e.summary.value[0].tag == "train/loss"] for f in (first, second)]  # fmt: skip
    assert steps == [list(range(2, 19, 2)), list(range(18, 25, 2))]  # restored rows not again
    assert shown(tmp_path) == expected(r.history)  # the resumed run's 18 hides the first's
    again = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=0.25, checkpoint_dir=folder,
                               overwrite=True, **RUN)  # fmt: skip
    assert len(event_files(tmp_path)) == 1 and shown(tmp_path) == expected(again.history)
