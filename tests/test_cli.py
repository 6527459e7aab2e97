"""The shell front door: `crossbow-jax` flags, a run end to end, errors, `models`, `data`."""

import contextlib
import importlib.util
import io
import json
import subprocess
import sys

import pytest

import crossbow_jax
from crossbow_jax import cli
from crossbow_jax.cli import _common
from crossbow_jax.engine.config import TrainConfig

TINY = [
    "train", "--model", "lenet", "--dataset", "synthetic", "--synthetic-like", "mnist",
    "--train-examples", "256", "--test-examples", "64", "--batch-size", "8",
    "--learners-per-device", "2", "--num-devices", "2", "--epochs", "1",
    "--steps-per-dispatch", "2", "--no-progress",
]  # fmt: skip

FLAGS = [
    "--model", "--dataset", "--data-dir", "--train-examples", "--test-examples",
    "--synthetic-like", "--batch-size", "--learners-per-device", "--algorithm", "--epochs",
    "--seed", "--target-accuracy", "--lr", "--momentum", "--weight-decay", "--lr-milestones",
    "--lr-gamma", "--warmup-epochs", "--reset-at-drops", "--alpha", "--central-momentum",
    "--eval-every", "--steps-per-dispatch", "--execution", "--mapper", "--num-devices",
    "--dtype", "--no-progress", "--output", "--checkpoint-every", "--resume", "--unroll-steps", "--data-placement",
    "--coordinator-address", "--num-processes", "--process-id", "--fragments", "--compress",
    "--no-error-feedback", "--participation", "--overlap", "--sync-warmup-steps",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in (
        "CROSSBOW_JAX_COORDINATOR",
        "CROSSBOW_JAX_NUM_PROCESSES",
        "CROSSBOW_JAX_PROCESS_ID",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_training(monkeypatch):
    """Bad input must be refused before `train` is ever called."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(crossbow_jax, "train", refuse)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """One tiny run through the shell, shared by the tests that read its folder."""
    folder = tmp_path_factory.mktemp("cli") / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(TINY + ["--output", str(folder)])
    return folder, code, out.getvalue(), err.getvalue()


def _train_parser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["train"]


def test_help_explains_every_flag_with_its_default(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    parser = _train_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert sorted(o for a in options for o in a.option_strings if o in FLAGS) == sorted(FLAGS)
    formatter = parser._get_formatter()
    for action in options:
        assert action.option_strings[0] in text
        assert "(default" in formatter._get_help_string(action), action.option_strings
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(name in top for name in ("train", "models", "data"))


def test_every_train_flag_is_in_the_docs_table():
    """docs/usage.md lists every flag the parser (made from `TrainConfig`) accepts."""
    import pathlib

    table = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "usage.md").read_text()
    options = [o for a in _train_parser()._actions for o in a.option_strings if o != "-h"]
    missing = [o for o in options if o != "--help" and f"`{o}" not in table]
    assert not missing, f"docs/usage.md lacks {missing}"


def test_flag_defaults_are_the_config_defaults():
    args = _train_parser().parse_args([])
    cfg = _common.config_from_args(args, learners_per_device=4)
    assert args.learners_per_device == "auto"
    assert cfg == TrainConfig(learners_per_device=4)


def test_flags_reach_the_config():
    flags = (
        "--batch-size 32 --learners-per-device 3 --algorithm sma --sync-every 4 --epochs 9 "
        "--lr 0.1 --lr-milestones 3 6 --alpha 0.2 --wd 5e-4 --output /tmp/x "
        "--checkpoint-every 7 --resume --no-progress --mapper pmap"
    )
    parse = lambda text: _common.config_from_args(_train_parser().parse_args(text.split(" ")))
    cfg = parse(flags)
    assert (cfg.batch_size, cfg.learners_per_device, cfg.algorithm, cfg.epochs) == (
        32, 3, "sma", 9.0,
    )  # fmt: skip
    assert cfg.lr_milestones == (3.0, 6.0) and cfg.alpha == 0.2 and cfg.weight_decay == 5e-4
    assert cfg.checkpoint_dir == "/tmp/x" and cfg.checkpoint_every == 7 and cfg.resume
    assert not cfg.progress and cfg.mapper == "pmap" and cfg.learning_rate == 0.1
    assert cfg.sync_every == 4
    cfg = parse("--algorithm hierarchical --every 8 --hosts 2 --outer-lr 0.5 --outer-momentum 0.8")
    assert (cfg.algorithm, cfg.sync_every, cfg.hosts) == ("hierarchical", 8, 2)
    assert (cfg.outer_learning_rate, cfg.outer_momentum) == (0.5, 0.8)
    cfg = parse("--algorithm diloco --every 8 --fragments 2 --compress int8 --no-error-feedback "
                "--participation 0.75 --overlap 1")
    assert (cfg.fragments, cfg.compress, cfg.error_feedback) == (2, "int8", False)
    assert (cfg.participation, cfg.overlap) == (0.75, 1)
    cfg = parse("--algorithm local_sgd --every 8 --sync-warmup-steps 100")
    assert cfg.sync_warmup_steps == 100 and cfg.error_feedback and cfg.overlap == 0


def test_settings_an_algorithm_would_ignore_are_refused_in_one_line(capsys):
    for flags, named in [
        ("--algorithm ssgd --alpha 0.2", "alpha=0.2 is SMA's"),
        ("--algorithm diloco", "needs sync_every"),
        ("--algorithm sma --outer-lr 0.5", "outer_learning_rate=0.5 applies to"),
        ("--algorithm sma --fragments 2", "fragments=2 applies to algorithm='diloco' only"),
        ("--algorithm diloco --every 4 --no-error-feedback", "error_feedback=False turns off"),
        ("--algorithm diloco --every 4 --overlap 2", "argument --overlap: invalid choice: 2"),
    ]:
        assert cli.main(["train", "--dataset", "synthetic", *flags.split(" ")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], err


def test_train_end_to_end_prints_one_result_line_and_writes_the_run_folder(run_folder):
    folder, code, out, err = run_folder
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("result: test accuracy ")
    for part in ("images/s", "wall ", "compile ", "2 devices x 2 learners x batch 8", "8 steps",
                 " programs cached) | setup ", "execution unroll (default: the run was too short"):
        assert part in lines[0]  # fmt: skip
    result = json.loads((folder / "result.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    assert result["steps"] == 8 == history[-1]["step"]
    assert result["programs"][0] >= result["programs"][1] >= 0 and result["setup_time"] > 0
    assert result["devices"] == 2 and result["learners_per_device"] == 2
    assert result["processes"] == 1 and result["model"] == "lenet"
    assert 0 <= result["accuracy"] <= 1 and result["images_per_second"] > 0
    assert result["config"]["checkpoint_dir"] == str(folder)
    assert "test_accuracy" in history[-1]
    assert (folder / "config.json").is_file() and (folder / "checkpoints").is_dir()


def test_the_result_line_shows_the_mean_bytes_and_a_peak_that_differs():
    from crossbow_jax.cli.train import result_line
    from crossbow_jax.engine.result import TrainResult

    result = TrainResult(
        params=None, accuracy=None, history=[], time_to_accuracy=None, images_per_second=1.0,
        wall_time=1.0, compile_time=0.0, steps=12, learners_per_device=2, devices=4,
        config=TrainConfig(algorithm="local_sgd", sync_every=4),
        all_reduce_bytes={"hosts": 8.0, "devices": 264.0},
        peak_bytes={"hosts": 8.0, "devices": 4096.0},
    )  # fmt: skip
    line = result_line(result)
    assert "| collectives per step: 264 B devices (mean; peak 4.0 KiB), 8 B hosts |" in line


def test_resume_continues_the_run(run_folder, capsys):
    folder = run_folder[0]
    args = TINY + ["--output", str(folder), "--resume"]
    assert cli.main([a if a != "1" else "2" for a in args]) == 0  # --epochs 2
    out = capsys.readouterr().out
    assert "16 steps" in out
    history = json.loads((folder / "history.json").read_text())
    assert [row["step"] for row in history][-1] == 16 and history[0]["step"] <= 8


def test_a_used_folder_needs_resume_and_the_same_config(run_folder, capsys):
    folder = str(run_folder[0])
    assert cli.main(TINY + ["--output", folder]) == 2
    assert "already holds a run" in capsys.readouterr().err
    changed = [a if a != "8" else "4" for a in TINY]  # --batch-size 4
    assert cli.main(changed + ["--output", folder, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and "batch_size: 8 -> 4" in err
    assert err.count("\n") == 1


def _with(flag, value):
    args = list(TINY)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.mark.parametrize(
    "argv, message",
    [
        (_with("--batch-size", "0"), "--batch-size: 0 must be >= 1"),
        (_with("--learners-per-device", "0"), "--learners-per-device: 0 must be >= 1"),
        (_with("--learners-per-device", "many"), "'many' is not an integer"),
        (_with("--model", "alexnet"), "invalid choice: 'alexnet'"),
        (_with("--dataset", "svhn"), "invalid choice: 'svhn'"),
        (_with("--lr", "-1"), "learning_rate=-1.0 must be > 0"),
        (_with("--lr-milestones", "5"), "must lie inside (0, epochs)"),
        (TINY + ["--resume"], "--resume needs --output"),
        (TINY + ["--tensorboard"], "--tensorboard needs --output DIR, where event files go"),
        (TINY + ["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["data", "prepare", "synthetic"], "nothing to prepare"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_code_2(argv, message, capsys, no_training):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


def test_unwritable_output_folder_is_refused(tmp_path, capsys, no_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli.main(TINY + ["--output", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to") and err.count("\n") == 1


def test_multihost_flags_must_be_complete(capsys, no_training):
    assert cli.main(TINY + ["--coordinator-address", "127.0.0.1:1234"]) == 2
    assert "needs num_processes and process_id" in capsys.readouterr().err
    assert cli.main(TINY + ["--num-processes", "2", "--process-id", "1"]) == 2
    assert "no coordinator address" in capsys.readouterr().err


def test_diverged_training_prints_its_message_and_exits_1(monkeypatch, capsys):
    def diverge(*args, **kwargs):
        raise crossbow_jax.TrainingDiverged("loss became nan at step 3 (epoch 0.38)")

    monkeypatch.setattr(crossbow_jax, "train", diverge)
    assert cli.main(TINY) == 1
    err = capsys.readouterr().err
    assert err == "error: training diverged: loss became nan at step 3 (epoch 0.38)\n"


def test_models_lists_all_four(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "GFLOPs/image" in out
    for name in ("lenet", "resnet32", "vgg16", "resnet50"):
        assert f"\n{name} " in out


def test_data_list_and_prepare(monkeypatch, capsys, tmp_path):
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in crossbow_jax.data.dataset_names():
        assert f"\n{name} " in out
    calls = []

    def fake_prepare(name, data_dir=None):
        calls.append((name, data_dir))
        return tmp_path / name / f"{name}.npz"

    monkeypatch.setattr(crossbow_jax.data, "prepare", fake_prepare)
    assert cli.main(["data", "prepare", "mnist", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "mnist" / "mnist.npz")
    assert calls == [("mnist", str(tmp_path))]


def test_commands_without_a_module_are_left_out():
    assert cli.COMMANDS == ("train", "models", "data", "tune", "sweep")
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    present = [c for c in cli.COMMANDS if importlib.util.find_spec(f"crossbow_jax.cli.{c}")]
    assert sorted(sub.choices) == sorted(present)


def test_python_dash_m_is_the_same_command():
    out = subprocess.run(
        [sys.executable, "-m", "crossbow_jax", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "--learners-per-device" in out and out.startswith("usage: crossbow-jax train")


def test_a_model_of_ones_own_by_module_and_attribute(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(
        "import flax.linen as nn\n\n"
        "class Tiny(nn.Module):\n"
        "    @nn.compact\n"
        "    def __call__(self, x):\n"
        "        return nn.Dense(10)(x.reshape(x.shape[0], -1))\n\n"
        "def build():\n"
        "    return Tiny()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("my_models:Tiny", "my_models:build"):
        assert cli.main(_with("--model", spec)) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.startswith("result: test accuracy ")
    assert cli.main(_with("--model", "my_models:Nope")) == 2
    assert "my_models has no 'Nope'" in capsys.readouterr().err
    assert cli.main(_with("--model", "no_such_module:Net")) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err
