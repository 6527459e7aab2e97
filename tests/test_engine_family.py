"""The replica-averaging family in the engine: resume in the middle of a period (and of a
run folder from before the family's options), bytes of collectives per step by mesh axis
(mean and peak), auto learners, the family's options passed to the transformations, and
bad settings refused."""

import json

import jax
import numpy as np
import pytest
from _engine_fixtures import MLP, split

import crossbow_jax
from crossbow_jax import ConfigError
from crossbow_jax.engine import identity, inputs, optimizers
from crossbow_jax.engine.config import TrainConfig, make_config
from crossbow_jax.engine.plan import Clock, Position

TRAIN, TEST = split()
# 4 devices x 2 learners x batch 16 = 128 images a step: 6 steps an epoch, so with a
# period of 4 the first epoch ends in the middle of a period.
KW = {"learners_per_device": 2, "num_devices": 4, "batch_size": 16, "progress": False,
      "execution": "unroll", "learning_rate": 0.1}  # fmt: skip
PARAM_BYTES = 4 * (8 * 32 + 32 + 32 * 4 + 4)  # the MLP's float32 parameters
METRIC_BYTES = 8  # loss and accuracy, averaged over the devices every step
RING = 2 * 3 / 4  # a ring all-reduce over 4 devices sends 2 (D - 1) / D of its operand
FAMILY = [
    {"algorithm": "sma", "sync_every": 4},
    {"algorithm": "local_sgd", "sync_every": 4},
    {"algorithm": "diloco", "sync_every": 4, "outer_learning_rate": 0.5},
    {"algorithm": "hierarchical", "sync_every": 4, "hosts": 2},
]
OPTIONS = {"fragments": 1, "compress": None, "error_feedback": True, "participation": None,
           "overlap": 0, "sync_warmup_steps": 0}  # the family's options, at their defaults


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("member", FAMILY, ids=lambda m: m["algorithm"])
def test_resume_in_the_middle_of_a_period_is_exact(tmp_path, member):
    straight = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=3, **member, **KW)
    folder = str(tmp_path / "run")
    first = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, checkpoint_dir=folder, **member, **KW)
    assert first.steps == 6  # stopped two updates past the sync at 4, before the one at 8
    saved = tmp_path / "run" / "config.json"  # as a folder from before the family's options
    settings = json.loads(saved.read_text())
    assert {k: settings.pop(k) for k in OPTIONS} == OPTIONS
    saved.write_text(json.dumps(settings))
    resumed = crossbow_jax.train(
        MLP(), TRAIN, TEST, epochs=3, checkpoint_dir=folder, resume=True, **member, **KW
    )
    assert resumed.steps == straight.steps == 18
    for a, b in zip(leaves(resumed.params), leaves(straight.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.accuracy == straight.accuracy > 0.9  # the central model learned


def test_diloco_with_its_options_trains_and_resumes_exactly(tmp_path):
    """Fragments, int8 outer gradients with error feedback, partial participation and the
    overlap of one step: the new state (an outer state per fragment, a residual per device,
    the pending outer gradient) is checkpointed and resumed bit for bit."""
    options = dict(DILOCO, fragments=2, compress="int8", participation=0.75, overlap=1)
    straight = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=3, **options, **KW)
    folder = str(tmp_path / "run")
    first = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, checkpoint_dir=folder,
                               **options, **KW)  # fmt: skip
    assert first.steps == 6  # fragment 1 synced at update 6: its outer step is pending
    resumed = crossbow_jax.train(
        MLP(), TRAIN, TEST, epochs=3, checkpoint_dir=folder, resume=True, **options, **KW
    )
    for a, b in zip(leaves(resumed.params), leaves(straight.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.accuracy == straight.accuracy > 0.9


@pytest.mark.parametrize(
    "options",
    [
        {"algorithm": "sma", "participation": 0.5},
        {"algorithm": "local_sgd", "sync_every": 4, "sync_warmup_steps": 4,
         "participation": 0.75},
        {"algorithm": "hierarchical", "sync_every": 4, "hosts": 2, "compress": "int4"},
    ],
    ids=["sma-participation", "local_sgd-warmup-participation", "hierarchical-int4"],
)  # fmt: skip
def test_the_other_members_options_train_in_the_engine(options):
    result = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=2, **options, **KW)
    assert result.accuracy > 0.9
    if options["algorithm"] == "local_sgd":  # 12 steps: t = 0..3 warm up, then 7 and 11
        assert result.all_reduce_bytes == {
            "devices": pytest.approx(RING * (PARAM_BYTES * 6 / 12 + METRIC_BYTES))
        }
    if options["algorithm"] == "hierarchical":  # 3 syncs in 12 steps, each int4-packed
        # 420 values end to end, padded to 2 hosts x 1 block of 256: int4 codes two a byte
        # and a float32 scale a block, 264 bytes; the all_to_all sends the other host's
        # half (132), the all_gather this host's summed block (132)
        assert result.all_reduce_bytes["hosts"] == pytest.approx(264 * 3 / 12)
        assert result.peak_bytes["hosts"] == 264


def test_bytes_all_reduced_per_step_follow_the_period():
    results = {
        (m["algorithm"], m.get("sync_every")): crossbow_jax.train(
            MLP(), TRAIN, None, epochs=2, **m, **KW
        )
        for m in [{"algorithm": "sma"}, {"algorithm": "ssgd"}, *FAMILY]
    }
    runs = {key: r.all_reduce_bytes for key, r in results.items()}
    peaks = {key: r.peak_bytes for key, r in results.items()}
    every = RING * (PARAM_BYTES + METRIC_BYTES)
    assert runs["sma", None] == peaks["sma", None] == {"devices": every}  # SMA's corrections
    assert runs["ssgd", None] == peaks["ssgd", None] == {"devices": every}  # the gradients
    # 12 steps, period 4: 3 syncs, so a quarter of the model per step on average; a sync
    # step sends the whole model.
    quarter = RING * (PARAM_BYTES * 3 / 12 + METRIC_BYTES)
    for name in ("sma", "local_sgd", "diloco"):
        assert runs[name, 4] == {"devices": pytest.approx(quarter)}, name
        assert peaks[name, 4] == {"devices": every}, name
    # SMA inside each host at every step, DiLoCo across the hosts every 4 (2 x 2: a ring
    # of 2 sends its operand once; the metrics go round all 4 devices).
    assert runs["hierarchical", 4] == {
        "devices": PARAM_BYTES,
        "hosts": pytest.approx(PARAM_BYTES * 3 / 12),
        "hosts,devices": RING * METRIC_BYTES,
    }
    assert peaks["hierarchical", 4] == {
        "devices": PARAM_BYTES, "hosts": PARAM_BYTES, "hosts,devices": RING * METRIC_BYTES,
    }  # fmt: skip
    # Each history row: its own steps' mean, and a whole model at its peak if a sync ran.
    start = 0
    for row in results["local_sgd", 4].history:
        syncs = sum((t + 1) % 4 == 0 for t in range(start, row["step"]))
        mean = RING * (METRIC_BYTES + PARAM_BYTES * syncs / (row["step"] - start))
        assert row["all_reduce_bytes"] == pytest.approx(mean), row
        assert row["peak_bytes"] == pytest.approx(every if syncs else RING * METRIC_BYTES), row
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


DILOCO = {"algorithm": "diloco", "sync_every": 4}
ELASTIC = {"elastic": True, "resume": True, "checkpoint_dir": "/nowhere/run"}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"algorithm": "hierarchical", "sync_every": 4, "hosts": 3}, "hosts=3 must divide the 4"),
        ({"algorithm": "hierarchical", "sync_every": 4}, "set hosts=2"),
        ({"algorithm": "local_sgd"}, "needs sync_every"),
        ({"algorithm": "hierarchical", "sync_every": 4, "mapper": "pmap"}, "only mapper='shard"),
        ({"algorithm": "sma", "fragments": 2}, "fragments=2 applies to algorithm='diloco' only"),
        (dict(DILOCO, sync_every=6, fragments=4), "fragments=4 must divide sync_every=6"),
        (dict(DILOCO, fragments=0), "fragments=0 must be an int >= 1"),
        ({"algorithm": "local_sgd", "sync_every": 4, "compress": "int8"},
         "compress='int8' applies to algorithm='diloco' or 'hierarchical' only"),
        ({"algorithm": "ssgd", "compress": "bf16"}, "compress='bf16' applies to"),
        (dict(DILOCO, compress="int2"), "compress='int2' is not one of bf16, int8, int4"),
        (dict(DILOCO, error_feedback=False), "error_feedback=False .* without compress"),
        ({"algorithm": "sma", "error_feedback": False}, "without compress"),
        ({"algorithm": "ssgd", "participation": 0.5},
         "participation=0.5 applies to algorithm='sma', 'local_sgd' or 'diloco' only"),
        ({"algorithm": "hierarchical", "sync_every": 4, "hosts": 2, "participation": 0.5},
         "algorithm='hierarchical' has no partial participation"),
        (dict(DILOCO, participation=0.0), r"participation=0.0 must be in \(0, 1\]"),
        (dict(DILOCO, participation=lambda count: None),
         "the engine takes a probability .* the transformations"),
        ({"algorithm": "local_sgd", "sync_every": 4, "overlap": 1},
         "overlap=1 applies to algorithm='diloco' only"),
        (dict(DILOCO, sync_every=1, overlap=1), "overlap=1 .* sync_every=1"),
        (dict(DILOCO, fragments=4, overlap=1), "overlap=1 .* not sync_every=4 with fragments=4"),
        (dict(DILOCO, overlap=2), "overlap=2 is not one of 0, 1"),
        (dict(DILOCO, sync_warmup_steps=8), "sync_warmup_steps=8 applies to algorithm='local_s"),
        ({"algorithm": "local_sgd", "sync_every": 1, "sync_warmup_steps": 8},
         "sync_warmup_steps=8 .* sync_every=1"),
        (dict(DILOCO, compress="int8", **ELASTIC), "elastic=True cannot carry compress='int8'"),
    ],
)
def test_bad_family_settings_are_refused_before_any_work(options, message, monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("the data were loaded before the settings were checked")

    monkeypatch.setattr(inputs, "resolve_data", touched)
    with pytest.raises(ConfigError, match=message):
        crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, **dict(KW, **options))


def test_more_fragments_than_the_model_has_layers_are_refused_before_training():
    with pytest.raises(ConfigError, match=r"fragments=4 but the parameters have 2 layers"):
        crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, algorithm="diloco", sync_every=4,
                           fragments=4, **KW)  # fmt: skip


def test_the_family_options_round_trip_and_an_old_run_folder_has_them_at_their_defaults():
    config = make_config(**DILOCO, fragments=2, compress="int4", error_feedback=False,
                         participation=0.75, overlap=1)  # fmt: skip
    assert TrainConfig(**json.loads(config.to_json())) == config
    local = make_config(algorithm="local_sgd", sync_every=4, sync_warmup_steps=16)
    assert TrainConfig(**json.loads(local.to_json())) == local
    # resume must match them: they are part of the run's identity
    assert {k: config.identity()[k] for k in OPTIONS} == {
        "fragments": 2, "compress": "int4", "error_feedback": False, "participation": 0.75,
        "overlap": 1, "sync_warmup_steps": 0,
    }  # fmt: skip
    assert local.identity()["sync_warmup_steps"] == 16
    # compress without error feedback has no per-device residuals: elastic carries it
    make_config(**DILOCO, compress="int8", error_feedback=False, **ELASTIC)
    before = {k: v for k, v in config.identity().items() if k not in OPTIONS}
    assert identity.saved_settings(before) == {**config.identity(), **OPTIONS}


def test_the_engine_passes_the_options_that_are_set_and_no_others(monkeypatch):
    calls = {}
    for name in ("sma", "local_sgd", "diloco", "hierarchical"):
        monkeypatch.setattr(optimizers, name, lambda *a, _n=name, **kw: calls.update({_n: kw}))
    clock = Clock(Position(), 128, 1024)

    def passed(**settings):
        config = make_config(**settings)
        optimizers.learner_transform(config, None, clock)
        return {k: v for k, v in calls.pop(config.algorithm).items() if k not in (
            "every", "sync_every", "axis_name", "alpha", "momentum", "host_axis")}  # fmt: skip

    for member in FAMILY:  # at the defaults: the programs of before these options
        assert passed(**member) == {}, member
    assert passed(**DILOCO, fragments=2, compress="int8", participation=0.75, overlap=1,
                  seed=3) == {"fragments": 2, "compress": "int8", "participation": 0.75,
                              "seed": 3, "overlap": 1}  # fmt: skip
    assert passed(algorithm="hierarchical", sync_every=4, hosts=2, compress="bf16",
                  error_feedback=False) == {"compress": "bf16", "error_feedback": False}
    assert passed(algorithm="local_sgd", sync_every=4, sync_warmup_steps=16,
                  participation=0.5) == {"warmup_steps": 16, "participation": 0.5, "seed": 0}
    assert passed(algorithm="sma", participation=0.5) == {"participation": 0.5, "seed": 0}
