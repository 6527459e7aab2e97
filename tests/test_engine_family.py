"""The replica-averaging family in the engine: resume in the middle of a period, bytes
of collectives per step by mesh axis (mean and peak), auto learners, and bad settings
refused."""

import jax
import numpy as np
import pytest
from _engine_fixtures import MLP, split

import crossbow_jax
from crossbow_jax import ConfigError
from crossbow_jax.engine import inputs

TRAIN, TEST = split()
# 4 devices x 2 learners x batch 16 = 128 images a step: 6 steps an epoch, so with a
# period of 4 the first epoch ends in the middle of a period.
KW = {"learners_per_device": 2, "num_devices": 4, "batch_size": 16, "progress": False,
      "execution": "unroll", "learning_rate": 0.1}  # fmt: skip
PARAM_BYTES = 4 * (8 * 32 + 32 + 32 * 4 + 4)  # the MLP's float32 parameters
METRIC_BYTES = 8  # loss and accuracy, averaged over the devices every step
FAMILY = [
    {"algorithm": "sma", "sync_every": 4},
    {"algorithm": "local_sgd", "sync_every": 4},
    {"algorithm": "diloco", "sync_every": 4, "outer_learning_rate": 0.5},
    {"algorithm": "hierarchical", "sync_every": 4, "hosts": 2},
]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("member", FAMILY, ids=lambda m: m["algorithm"])
def test_resume_in_the_middle_of_a_period_is_exact(tmp_path, member):
    straight = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=3, **member, **KW)
    folder = str(tmp_path / "run")
    first = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, checkpoint_dir=folder, **member, **KW)
    assert first.steps == 6  # stopped two updates past the sync at 4, before the one at 8
    resumed = crossbow_jax.train(
        MLP(), TRAIN, TEST, epochs=3, checkpoint_dir=folder, resume=True, **member, **KW
    )
    assert resumed.steps == straight.steps == 18
    for a, b in zip(leaves(resumed.params), leaves(straight.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.accuracy == straight.accuracy > 0.9  # the central model learned


def test_bytes_all_reduced_per_step_follow_the_period():
    results = {
        (m["algorithm"], m.get("sync_every")): crossbow_jax.train(
            MLP(), TRAIN, None, epochs=2, **m, **KW
        )
        for m in [{"algorithm": "sma"}, {"algorithm": "ssgd"}, *FAMILY]
    }
    runs = {key: r.all_reduce_bytes for key, r in results.items()}
    peaks = {key: r.peak_bytes for key, r in results.items()}
    every = PARAM_BYTES + METRIC_BYTES
    assert runs["sma", None] == peaks["sma", None] == {"devices": every}  # SMA's corrections
    assert runs["ssgd", None] == peaks["ssgd", None] == {"devices": every}  # the gradients
    # 12 steps, period 4: 3 syncs, so a quarter of the model per step on average; a sync
    # step sends the whole model.
    quarter = PARAM_BYTES * 3 / 12 + METRIC_BYTES
    for name in ("sma", "local_sgd", "diloco"):
        assert runs[name, 4] == {"devices": pytest.approx(quarter)}, name
        assert peaks[name, 4] == {"devices": every}, name
    # SMA inside each host at every step, DiLoCo across the hosts every 4.
    assert runs["hierarchical", 4] == {
        "devices": PARAM_BYTES,
        "hosts": pytest.approx(PARAM_BYTES * 3 / 12),
        "hosts,devices": METRIC_BYTES,
    }
    assert peaks["hierarchical", 4] == {
        "devices": PARAM_BYTES, "hosts": PARAM_BYTES, "hosts,devices": METRIC_BYTES,
    }  # fmt: skip
    # Each history row: its own steps' mean, and a whole model at its peak if a sync ran.
    start = 0
    for row in results["local_sgd", 4].history:
        syncs = sum((t + 1) % 4 == 0 for t in range(start, row["step"]))
        mean = METRIC_BYTES + PARAM_BYTES * syncs / (row["step"] - start)
        assert row["all_reduce_bytes"] == pytest.approx(mean), row
        assert row["peak_bytes"] == (every if syncs else METRIC_BYTES), row
        start = row["step"]
    assert start == 12


def test_auto_learners_tune_a_member_of_the_family():
    result = crossbow_jax.train(
        MLP(), TRAIN, TEST, epochs=2, algorithm="diloco", sync_every=4,
        **dict(KW, learners_per_device="auto", tune_max_learners=2, tune_steps=2, tune_repeats=2),
    )  # fmt: skip
    assert result.tuning["chosen"] in (1, 2)
    assert [row["learners"] for row in result.tuning["curve"]] == [1, 2]
    assert result.accuracy > 0.9


@pytest.mark.parametrize(
    "options, message",
    [
        ({"algorithm": "hierarchical", "sync_every": 4, "hosts": 3}, "hosts=3 must divide the 4"),
        ({"algorithm": "hierarchical", "sync_every": 4}, "set hosts=2"),
        ({"algorithm": "local_sgd"}, "needs sync_every"),
        ({"algorithm": "hierarchical", "sync_every": 4, "mapper": "pmap"}, "only mapper='shard"),
    ],
)
def test_bad_family_settings_are_refused_before_any_work(options, message, monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("the data were loaded before the settings were checked")

    monkeypatch.setattr(inputs, "resolve_data", touched)
    with pytest.raises(ConfigError, match=message):
        crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, **dict(KW, **options))
