"""Checkpoints and resume, bad input before any work, divergence."""

import pathlib

import jax
import numpy as np
import optax
import pytest
from _engine_fixtures import MLP, prepared, split

import crossbow_jax
from crossbow_jax.engine import programs
from crossbow_jax.engine.checkpoint import Checkpointer
from crossbow_jax.engine.config import ConfigError

TRAIN, TEST = split()
HERE = pathlib.Path(__file__).resolve().parent
RESUME_KW = {
    "batch_size": 8,
    "learners_per_device": 2,
    "epochs": 4,
    "num_devices": 2,
    "steps_per_dispatch": 4,
    "checkpoint_every": 8,
    "eval_every": 12,
    "progress": False,
    "seed": 3,
}
# kill -9, SIGTERM and Ctrl-C mid-run, and their resumes: test_run_folder.py


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def checkpoint_steps(run_dir):
    folder = pathlib.Path(run_dir) / "checkpoints"
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
    )


def test_finished_run_folder_needs_resume_and_the_same_config(tmp_path):
    kw = dict(RESUME_KW, epochs=1, progress=False)
    crossbow_jax.train(MLP(), TRAIN, TEST, checkpoint_dir=str(tmp_path), **kw)
    before = checkpoint_steps(tmp_path)
    with pytest.raises(
        ConfigError, match=r"already holds a run \(checkpoints up to step \d+\); pass resume=True"
    ):
        crossbow_jax.train(MLP(), TRAIN, TEST, checkpoint_dir=str(tmp_path), **kw)
    with pytest.raises(ConfigError, match=r"another config \(batch_size: 8 -> 16"):
        crossbow_jax.train(
            MLP(), TRAIN, TEST, checkpoint_dir=str(tmp_path), resume=True, **dict(kw, batch_size=16)
        )
    assert checkpoint_steps(tmp_path) == before  # nothing written is lost
    longer = crossbow_jax.train(
        MLP(), TRAIN, TEST, checkpoint_dir=str(tmp_path), resume=True, **dict(kw, epochs=2)
    )  # more epochs may be added on resume
    assert longer.steps == 2 * (768 // 32)


def test_divergence_stops_with_a_clear_message_and_keeps_good_checkpoints(tmp_path):
    lr = optax.piecewise_constant_schedule(0.05, {30: 1e12})
    kw = dict(
        batch_size=8,
        learners_per_device=2,
        num_devices=2,
        epochs=8,
        steps_per_dispatch=4,
        checkpoint_every=8,
        checkpoint_dir=str(tmp_path),
        progress=False,
        divergence_factor=0,  # the NaN check (the finite rise before it: test_divergence.py)
    )
    with pytest.raises(crossbow_jax.TrainingDiverged, match=r"loss became (nan|inf) at step"):
        crossbow_jax.train(MLP(), TRAIN, TEST, optimizer=optax.sgd(lr), **kw)
    saved = checkpoint_steps(tmp_path)
    assert saved and saved[-1] <= 32
    cfg = crossbow_jax.TrainConfig(resume=True, **kw)
    setup, data = prepared(cfg, MLP(), TRAIN, TEST, optimizer=optax.sgd(lr))
    with Checkpointer(cfg.checkpoint_dir, cfg) as checkpointer:
        state, record = checkpointer.restore(setup.compiler.init_state(cfg.seed, data.example))
    assert all(np.all(np.isfinite(x)) for x in leaves(state.params))
    assert all(np.isfinite(row["loss"]) for row in record["history"])


BAD = [
    ({"batch_size": 0}, "batch_size=0 must be an int >= 1"),
    ({"learners_per_device": 0}, "learners_per_device=0 must be an int >= 1"),
    ({"algorithm": "asgd"}, "algorithm='asgd' is not one of sma, ssgd"),
    ({"epochs": 0}, "epochs=0 must be > 0"),
    ({"epochs": float("inf")}, "epochs=inf must be a finite number"),
    ({"mapper": "vmap"}, "mapper='vmap' is not one of"),
    ({"batch_size": 1000}, "one step needs 4000 images"),
    ({"num_devices": 99}, "num_devices=99 but only 8 devices"),
    ({"lr_milestones": (9,)}, r"lr_milestones=\(9.0,\) must lie inside"),
    ({"bogus": 1}, r"unknown option\(s\) \['bogus'\]"),
    ({"resume": True}, "resume=True needs checkpoint_dir"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[m for _, m in BAD])
def test_bad_settings_fail_before_any_work(kwargs, match, monkeypatch):
    monkeypatch.setattr(programs, "TrainData", lambda *a, **k: pytest.fail("work started"))
    kw = {
        "batch_size": 8,
        "learners_per_device": 2,
        "num_devices": 2,
        "epochs": 1,
        "progress": False,
        **kwargs,
    }
    with pytest.raises(ConfigError, match=match):
        crossbow_jax.train(MLP(), TRAIN, TEST, **kw)


def test_bad_data_and_model_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "TrainData", lambda *a, **k: pytest.fail("work started"))
    x, y = TRAIN
    with pytest.raises(ConfigError, match=r"test examples have shape \(4,\) but train"):
        crossbow_jax.train(MLP(), TRAIN, (TEST[0][:, :4], TEST[1]), progress=False)
    with pytest.raises(ConfigError, match="labels have shape"):
        crossbow_jax.train(MLP(), (x, y[:10]), TEST, progress=False)
    with pytest.raises(ValueError, match="unknown model 'lenet7'"):
        crossbow_jax.train("lenet7", TRAIN, TEST, progress=False)
    with pytest.raises(ValueError, match="unknown data set .mnist7."):
        crossbow_jax.train("lenet", "mnist7", progress=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write to .*a-file/run"):
        crossbow_jax.train(MLP(), TRAIN, TEST, checkpoint_dir=str(blocker / "run"), progress=False)


def test_fit_without_a_checkpointer_opens_the_run_folder_itself(tmp_path):
    from crossbow_jax.engine import fit
    from crossbow_jax.engine.inputs import resolve

    cfg = crossbow_jax.TrainConfig(
        batch_size=8, learners_per_device=2, num_devices=2, epochs=1, progress=False,
        steps_per_dispatch=8, checkpoint_dir=str(tmp_path / "run"),
    )  # fmt: skip
    model, data, mesh = resolve(cfg, MLP(), TRAIN, TEST)
    result = fit(cfg, model, None, data, mesh, 2)
    assert checkpoint_steps(tmp_path / "run") == [result.steps]
    assert (tmp_path / "run" / "config.json").is_file()


def test_config_keeps_plain_values_for_numpy_scalars_flags_and_paths(tmp_path):
    import json

    cfg = crossbow_jax.TrainConfig(
        seed=np.int64(3), learning_rate=np.float32(0.5), progress=0, checkpoint_dir=tmp_path
    )
    assert type(cfg.seed) is int and type(cfg.learning_rate) is float
    assert cfg.progress is False and cfg.checkpoint_dir == str(tmp_path)
    assert json.loads(cfg.to_json())["seed"] == 3
    with pytest.raises(ConfigError, match="progress=2 must be True or False"):
        crossbow_jax.TrainConfig(progress=2)
    with pytest.raises(ConfigError, match="epochs='5' must be a number > 0"):
        crossbow_jax.TrainConfig(epochs="5")


def folder_bytes(folder):
    """Every file under `folder` and its bytes."""
    root = pathlib.Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_run_folder_gets_a_checkpoint_every_epoch_and_by_time_without_asking(tmp_path):
    kw = dict(batch_size=8, learners_per_device=2, num_devices=2, progress=False,
              steps_per_dispatch=4)  # fmt: skip
    crossbow_jax.train(MLP(), TRAIN, TEST, epochs=2.5, checkpoint_dir=str(tmp_path / "a"), **kw)
    per_epoch = 768 // 32
    assert checkpoint_steps(tmp_path / "a") == [2 * per_epoch, 60]  # the last two kept
    seen = []
    real_save = Checkpointer.save

    def save(self, step, *args, **kwargs):
        seen.append(step)
        return real_save(self, step, *args, **kwargs)

    import unittest.mock

    with unittest.mock.patch.object(Checkpointer, "save", save):
        crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, checkpoint_dir=str(tmp_path / "b"),
                           checkpoint_minutes=1e-9, **kw)  # fmt: skip
    assert seen == list(range(4, per_epoch + 1, 4))  # by time: after every dispatch here
    with pytest.raises(ConfigError, match="checkpoint_every=8 needs checkpoint_dir"):
        crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, checkpoint_every=8, **kw)


def test_resuming_with_another_model_or_optimiser_is_refused_and_changes_nothing(tmp_path):
    kw = dict(batch_size=8, learners_per_device=2, num_devices=2, progress=False,
              checkpoint_dir=str(tmp_path))  # fmt: skip
    crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, **kw)
    before = folder_bytes(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"the model differs from the one the run was started "
        r"with \(\['Dense_0'\]\['bias'\] was float32\[4\], now float32\[5\]",
    ):
        crossbow_jax.train(MLP(classes=5), TRAIN, TEST, epochs=2, resume=True, **kw)
    with pytest.raises(ConfigError, match="the optimiser differs from the one the run"):
        crossbow_jax.train(MLP(), TRAIN, TEST, epochs=2, resume=True, optimizer=optax.adam(1e-3),
                           **kw)  # fmt: skip
    assert folder_bytes(tmp_path) == before  # nothing written, nothing lost
    again = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=2, resume=True, **kw)
    assert again.steps == 2 * (768 // 32)


def test_resuming_on_other_data_or_with_an_optimiser_that_behaves_otherwise_is_refused(
    tmp_path,
):
    """The data (shapes, dtypes, content) and the optimiser's behaviour are part of the
    run's identity; elastic=True does not waive them."""
    kw = {"batch_size": 8, "learners_per_device": 2, "num_devices": 2, "progress": False,
          "checkpoint_dir": str(tmp_path), "epochs": 1}  # fmt: skip
    crossbow_jax.train(MLP(), TRAIN, TEST, optimizer=optax.adam(1e-2), **kw)
    before = folder_bytes(tmp_path)
    fewer = (TRAIN[0][:-32], TRAIN[1][:-32])
    shifted = (TRAIN[0] + np.float32(1e-3), TRAIN[1])
    refusals = [
        ({"train": fewer}, r"the data differs from the run's \(train inputs were float32\[768,"),
        ({"train": shifted}, r"train inputs were float32\[768, 8\] sha256:\w+, now float32\[768, 8\] sha256"),
        ({"test": (TEST[0], (TEST[1] + 1) % 4)}, "test labels were"),
        ({"optimizer": optax.adam(1e-1)}, r"the optimiser behaves differently from the run's: .*first update's size was"),
        ({"optimizer": optax.adam(1e-1), "elastic": True, "learners_per_device": 1}, "behaves differently"),
    ]  # fmt: skip
    for change, match in refusals:
        args = {"train": TRAIN, "test": TEST, "optimizer": optax.adam(1e-2), **change}
        with pytest.raises(ConfigError, match=match):
            crossbow_jax.train(MLP(), resume=True, **{**kw, **args})
    assert folder_bytes(tmp_path) == before
    again = crossbow_jax.train(MLP(), TRAIN, TEST, optimizer=optax.adam(1e-2), resume=True,
                               **{**kw, "epochs": 2})  # fmt: skip
    assert again.steps == 2 * (768 // 32)
