"""Auto-tuning of learners per device: the rule on recorded curves, trials, reports."""

import json
import math

import pytest
from _engine_fixtures import MLP, split

import crossbow_jax
from crossbow_jax.engine.config import ConfigError
from crossbow_jax.tuning import Search, decide, format_table, plot_curve, program_memory, tune
from crossbow_jax.tuning import measure as measure_mod
from crossbow_jax.tuning.measure import free_memory, is_out_of_memory

# A step of 1 learner on 2 devices at batch 8 takes 16 images: 48 images cap
# the search at 3 learners per device, 32 at 2, which keeps these tests short.
SMALL_TRAIN, _ = split(n_train=48, n_test=48)
TINY_TRAIN, TINY_TEST = split(n_train=32, n_test=32)
TUNE = {"batch_size": 8, "num_devices": 2, "tune_steps": 3, "tune_repeats": 2, "log": None}

# Recorded curves: images/s by learners per device.
RISING = {m: 100.0 * 1.2**m for m in range(1, 33)}  # always +20%
FLAT = {m: 100.0 for m in range(1, 33)}
PEAK_AT_3 = {1: 100.0, 2: 150.0, 3: 180.0, 4: 170.0, 5: 160.0, 6: 150.0, 7: 140.0, 8: 130.0}
NOISY = {1: 100.0, 2: 128.0, 3: 131.0, 4: 175.0, 5: 180.0}  # a dip in the gains at 3
OOM_AT_3 = {1: 100.0, 2: 150.0, 3: None, 4: None}


def concave(m):
    """Diminishing returns: gains 1 -> 2 of 100%, then +25%, +13%, +7%: linear stops at 4."""
    return 1000.0 * (1 - math.exp(-0.45 * m))


# -- the decision rule on recorded curves ------------------------------------------------


def test_rising_curve_stops_at_the_cap():
    assert decide(RISING, max_learners=16).chosen == 16
    assert decide(RISING, max_learners=5).tried == [1, 2, 3, 4, 5]


def test_flat_curve_keeps_one_learner():
    d = decide(FLAT)
    assert d.chosen == 1 and d.tried == [1, 2]


def test_rise_then_fall_picks_the_peak():
    d = decide(PEAK_AT_3)
    assert d.chosen == 3 and d.tried == [1, 2, 3, 4]


def test_noisy_curve_stops_at_the_first_small_gain():
    # The paper's rule is greedy: a gain of 2.3% at 3 stops it, though 4 would be faster.
    assert decide(NOISY).chosen == 2
    assert decide(NOISY, threshold=0.02).chosen == 5


def test_out_of_memory_at_three_goes_back_to_two():
    assert decide(OOM_AT_3).chosen == 2
    assert decide(OOM_AT_3, strategy="doubling").chosen == 2
    assert decide({1: None}).chosen is None


def test_threshold_edge_equal_gain_is_not_enough():
    assert decide({1: 100.0, 2: 110.0, 3: 200.0}).chosen == 1  # exactly +10%: stop
    assert decide({1: 100.0, 2: 110.001, 3: 110.0}).chosen == 2
    assert decide({1: 100.0, 2: 130.0, 3: 135.0}, threshold=0.3).chosen == 1
    assert decide({1: 100.0, 2: 101.0, 3: 102.0}, threshold=0.0).chosen == 3


def test_linear_search_takes_one_learner_at_a_time():
    d = decide(concave)
    assert d.chosen == 4 and d.tried == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "curve, chosen, tried",
    [
        (RISING, 16, [1, 2, 4, 8, 16]),
        (FLAT, 1, [1, 2]),
        (PEAK_AT_3, 3, [1, 2, 4, 3]),
        (OOM_AT_3, 2, [1, 2, 4, 3]),
        (concave, 4, [1, 2, 4, 8, 5]),
    ],
)
def test_doubling_search_on_recorded_curves(curve, chosen, tried):
    d = decide(curve, strategy="doubling")
    assert (d.chosen, d.tried) == (chosen, tried)


def test_doubling_needs_fewer_trials_for_large_settings():
    steep = lambda m: 100.0 * 1.15 ** min(m, 12)  # gains until 12, flat after
    lin, dbl = decide(steep, max_learners=32), decide(steep, strategy="doubling", max_learners=32)
    assert lin.chosen == dbl.chosen == 12
    assert len(dbl.tried) < len(lin.tried)


def test_doubling_respects_a_cap_that_is_not_a_power_of_two():
    d = decide(RISING, strategy="doubling", max_learners=6)
    assert d.chosen == 6 and d.tried == [1, 2, 4, 6]


def test_search_stepper_protocol_and_bad_options():
    s = Search(max_learners=3)
    assert s.propose() == 1
    s.record(10.0)
    s.record(20.0)
    s.record(40.0)
    assert s.done and s.chosen == 3 and s.propose() is None
    assert s.results == {1: 10.0, 2: 20.0, 3: 40.0}
    with pytest.raises(RuntimeError):
        s.record(1.0)
    with pytest.raises(ValueError, match="strategy"):
        Search("binary")
    with pytest.raises(ValueError, match="threshold"):
        Search(threshold=-0.1)
    with pytest.raises(ValueError, match="max_learners"):
        Search(max_learners=0)


# -- measurement -------------------------------------------------------------------------


def test_memory_estimate_is_positive_for_a_compiled_program():
    import jax
    import jax.numpy as jnp

    compiled = jax.jit(lambda x: jnp.tanh(x @ x).sum(0)).lower(jnp.ones((64, 64))).compile()
    assert program_memory(compiled) >= 64 * 64 * 4

    class NoAnalysis:
        def memory_analysis(self):
            return None

    assert program_memory(NoAnalysis()) is None
    assert free_memory(jax.devices("cpu")[:1]) is None  # the CPU reports no limit: no guard


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("shapes do not match"))


def test_tune_measures_a_curve_and_guards_memory(tmp_path):
    r = tune(MLP(), SMALL_TRAIN, tune_max_learners=2, json_path=tmp_path / "t.json", **TUNE)
    assert r["max_learners"] == 2 and r["devices"] == 2 and r["platform"] == "cpu"
    rows = r["curve"]
    assert r["chosen"] in (1, 2) and [row["learners"] for row in rows] == [1, 2]
    assert all(row["status"] == "ok" and row["images_per_second"] > 0 for row in rows)
    assert all(row["compile_seconds"] > 0 for row in rows)
    assert 0 < rows[0]["memory_bytes"] < rows[1]["memory_bytes"]  # grows with learners
    assert r["seconds"] >= r["compile_seconds"] > 0
    assert json.loads((tmp_path / "t.json").read_text())["chosen"] == r["chosen"]
    assert "*" in format_table(r)

    # A limit of the 1-learner estimate: 2 learners are compiled but not run.
    one = rows[0]["memory_bytes"]
    r = tune(MLP(), SMALL_TRAIN, tune_memory_limit=one, **TUNE)
    assert r["chosen"] == 1
    assert [row["status"] for row in r["curve"]] == ["ok", "memory"]
    assert r["curve"][1]["images_per_second"] is None
    with pytest.raises(ConfigError, match="even 1 learner"):
        tune(MLP(), SMALL_TRAIN, tune_memory_limit=one - 1, **TUNE)


def test_out_of_memory_during_a_trial_ends_the_search(monkeypatch):
    real = measure_mod._dispatch

    def dispatch(setup, program, chunks, state):
        if setup.layout.learners >= 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return real(setup, program, chunks, state)

    monkeypatch.setattr(measure_mod, "_dispatch", dispatch)
    r = tune(MLP(), SMALL_TRAIN, **TUNE)
    assert r["chosen"] == 1
    assert [row["status"] for row in r["curve"]] == ["ok", "oom"]
    assert "RESOURCE_EXHAUSTED" in r["curve"][-1]["error"]
    assert r["curve"][-1]["memory_bytes"] > 0  # compiled, then failed while running

    def broken(*args):
        raise RuntimeError("something else went wrong")

    monkeypatch.setattr(measure_mod, "prepare", broken)
    with pytest.raises(RuntimeError, match="something else"):
        tune(MLP(), SMALL_TRAIN, **TUNE)  # not out of memory: the error propagates


def test_bad_tuning_options_are_config_errors():
    with pytest.raises(ConfigError, match="strategy"):
        tune(MLP(), SMALL_TRAIN, tune_strategy="random", **TUNE)
    with pytest.raises(ConfigError, match="training set"):
        tune(MLP(), SMALL_TRAIN, **{**TUNE, "batch_size": 64})


# -- end to end --------------------------------------------------------------------------


def test_train_auto_tunes_then_trains_and_reports(tmp_path):
    kw = {
        "batch_size": 8,
        "learners_per_device": "auto",
        "num_devices": 2,
        "progress": False,
        "steps_per_dispatch": 4,
        "checkpoint_dir": str(tmp_path / "run"),
        "tune_mode": "trials",
    }
    r = crossbow_jax.train(MLP(), TINY_TRAIN, TINY_TEST, epochs=2, **kw)
    t = r.tuning
    assert r.learners_per_device == t["chosen"] and t["chosen"] in (1, 2)
    assert {"chosen", "curve", "strategy", "threshold", "seconds"} <= set(t)
    assert t["strategy"] == "linear" and t["threshold"] == 0.1
    for row in t["curve"]:
        assert {"learners", "images_per_second", "memory_bytes", "status"} <= set(row)
    assert r.steps == 2 * (32 // (2 * t["chosen"] * 8)) and r.accuracy is not None
    assert r.wall_time > t["seconds"]  # tuning counts in the run's wall time
    saved = json.loads((tmp_path / "run" / "tuning.json").read_text())
    assert saved["chosen"] == t["chosen"] and saved["curve"] == t["curve"]

    # Resuming reuses the recorded choice (no trials), so the checkpoint fits.
    again = crossbow_jax.train(MLP(), TINY_TRAIN, TINY_TEST, epochs=3, resume=True, **kw)
    assert again.tuning["reused"] and again.learners_per_device == t["chosen"]
    assert again.steps == 3 * (32 // (2 * t["chosen"] * 8))


def test_plot_is_a_png(tmp_path):
    result = {
        "chosen": 2,
        "strategy": "linear",
        "threshold": 0.1,
        "curve": [
            {"learners": 1, "images_per_second": 100.0, "status": "ok"},
            {"learners": 2, "images_per_second": 150.0, "status": "ok"},
            {"learners": 3, "images_per_second": None, "status": "oom"},
        ],
    }
    path = plot_curve(result, tmp_path / "plots" / "t.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_tune_writes_json_and_png(tmp_path, capsys):
    from crossbow_jax import cli

    json_path, png = tmp_path / "tune.json", tmp_path / "tune.png"
    argv = [
        "tune", "--model", "lenet", "--dataset", "synthetic", "--synthetic-like", "mnist",
        "--train-examples", "64", "--test-examples", "16", "--batch-size", "8",
        "--num-devices", "1", "--tune-max-learners", "1", "--tune-steps", "1",
        "--tune-repeats", "1", "--json", str(json_path), "--plot", str(png),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "chosen: 1 learner(s) per device" in out and str(png) in out
    saved = json.loads(json_path.read_text())
    assert saved["chosen"] == 1 and saved["model"] == "lenet"
    assert saved["curve"][0]["status"] == "ok"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(argv[:1] + ["--learners-per-device", "2"]) == 2
    assert cli.main(argv + ["--tune-threshold", "-1"]) == 2


def test_tuning_options_come_from_the_train_config():
    from crossbow_jax.engine.config import TrainConfig
    from crossbow_jax.engine.inputs import resolve
    from crossbow_jax.tuning.measure import Trial
    from crossbow_jax.tuning.tuner import search_learners

    cfg = TrainConfig(
        batch_size=8,
        tune_strategy="doubling",
        tune_threshold=0.2,
        tune_max_learners=3,
        tune_steps=4,
        tune_repeats=2,
        tune_memory_limit=2**20,
    )
    seen = []

    def measure(cfg, model, optimizer, data, mesh, m, task):  # a rising curve, no device work
        seen.append(cfg)
        return Trial(m, 100.0 * 2**m, None, "ok")

    model, data, mesh = resolve(cfg.replace(num_devices=1), MLP(), SMALL_TRAIN)
    r = search_learners(cfg, model, None, data, mesh, log=None, measure=measure)
    options = ("strategy", "threshold", "max_learners", "steps", "repeats", "memory_limit")
    assert {k: r[k] for k in options} == {
        "strategy": "doubling",
        "threshold": 0.2,
        "max_learners": 3,
        "steps": 4,
        "repeats": 2,
        "memory_limit": 2**20,
    }
    assert [row["learners"] for row in r["curve"]] == [1, 2, 3] and r["chosen"] == 3
    assert all(c is cfg for c in seen)  # each trial reads its options from the config
    r = search_learners(cfg.replace(tune_steps=7), model, None, data, mesh, log=None,
                        measure=measure)  # fmt: skip
    assert r["steps"] == 7


def test_tuning_options_by_their_old_names_are_refused_with_the_field_meant():
    with pytest.raises(ConfigError, match=r"unknown option.*steps -> tune_steps"):
        tune(MLP(), SMALL_TRAIN, steps=3, log=None)
