"""The run folder under real faults: signals to a running command, a second process,
damaged checkpoints, a file system that turns read-only or full, another run's folder.

The runs are `_run_folder_child.COMMAND` (32 tiny steps, a checkpoint every 4):
in subprocesses (`_run_folder_child.py`, slowed down so a test can act
mid-run) and, for the references and resumes, through `cli.main` here.
"""

import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from _engine_fixtures import subprocess_xla_flags
from _run_folder_child import COMMAND

import crossbow_jax
from crossbow_jax import cli
from crossbow_jax.engine import runfolder
from crossbow_jax.engine.config import ConfigError

HERE = pathlib.Path(__file__).resolve().parent
CHILD = str(HERE / "_run_folder_child.py")
pytestmark = pytest.mark.xdist_group("run_folder")  # one worker: the module's runs share


def command(folder, *more) -> tuple[int, str]:
    """`crossbow-jax train` (COMMAND) in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main([*COMMAND, "--output", str(folder), *more])
    return code, err.getvalue()


def params(folder) -> list[np.ndarray]:
    """The central model of a run folder's newest intact checkpoint, as saved."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(crossbow_jax.load_run(folder).params)]
    assert leaves
    return leaves


def evaluations(history) -> list[tuple]:
    """The test figures of the central model, by step."""
    return [(r["step"], r["test_loss"], r["test_accuracy"]) for r in history if "test_loss" in r]


def assert_same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The run without faults: the reference for every resume, and a folder to damage."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    code, err = command(folder)
    assert code == 0, err
    assert runfolder.checkpoint_steps(folder) == [28, 32]
    return folder, params(folder)


class Child:
    """`_run_folder_child.py` in a subprocess (stderr to a file), optionally wrapped."""

    def __init__(self, tmp_path, fault, folder, *more, wrap=(), name="child"):
        self.folder, self.log = pathlib.Path(folder), tmp_path / f"{name}.stderr"
        env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(2), JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))  # fmt: skip
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [*wrap, sys.executable, CHILD, fault, str(folder), *more],
                env=env, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip

    def wait_for_checkpoint(self, after: int = -1, timeout: float = 120) -> int:
        """Waits until the folder holds a checkpoint newer than `after`; returns its step."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = [s for s in runfolder.checkpoint_steps(self.folder) if s > after]
            if steps and (self.folder / runfolder.DIGESTS / f"{steps[-1]}.json").exists():
                return steps[-1]
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.stderr()}"
            time.sleep(0.05)
        raise AssertionError(f"no checkpoint after step {after} within {timeout} s")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def stderr(self) -> str:
        return self.log.read_text()


def interrupted_line(stderr: str, signal_name: str, folder) -> int:
    """The step of the command's one 'interrupted by' line, checked."""
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted by")]
    assert len(lines) == 1, stderr
    head = f"interrupted by {signal_name}: saved step "
    assert lines[0].startswith(head) and f" in {folder};" in lines[0], lines[0]
    assert "--resume" in lines[0]
    return int(lines[0][len(head) :].split()[0])


def test_signals_save_the_step_reached_and_the_resumed_run_ends_bit_identical(tmp_path, finished):
    """SIGTERM (143), kill -9 and two Ctrl-C's (at once, 130) in turn on one run (one
    Ctrl-C: the next test); the lock names its holder and keeps a second process out;
    the run resumed to the end is bit-identical to one never interrupted."""
    folder = tmp_path / "run"
    first = Child(tmp_path, "none", folder, name="sigterm")
    first.wait_for_checkpoint()
    holder = (folder / runfolder.LOCK_FILE).read_text()
    assert holder.startswith(f"pid {first.proc.pid} on ")
    with pytest.raises(ConfigError, match=f"is in use by another run \\(pid {first.proc.pid} on"):
        crossbow_jax.train("lenet", "mnist", checkpoint_dir=str(folder), resume=True)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait() == 143, first.stderr()
    step = interrupted_line(first.stderr(), "SIGTERM", folder)
    assert runfolder.checkpoint_steps(folder)[-1] == step and step % 2 == 0  # a dispatch's end
    assert not (folder / runfolder.LOCK_FILE).read_text()  # let go

    killed = Child(tmp_path, "none", folder, "--resume", name="sigkill")
    step = killed.wait_for_checkpoint(after=step)
    killed.proc.kill()
    killed.wait()
    assert (folder / runfolder.LOCK_FILE).read_text().startswith(f"pid {killed.proc.pid} on ")

    twice = Child(tmp_path, "none", folder, "--resume", name="sigint-twice")  # takes the lock
    twice.wait_for_checkpoint(after=step)
    twice.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    while "SIGINT received" not in twice.stderr() and time.monotonic() < deadline:
        time.sleep(0.01)
    twice.proc.send_signal(signal.SIGINT)  # before the save (the loop logs its rows first)
    started = time.monotonic()
    assert twice.wait(timeout=30) == 130, twice.stderr()
    assert time.monotonic() - started < 15
    assert "stopped at once" in twice.stderr()

    code, err = command(folder, "--resume")  # from the newest intact checkpoint
    assert code == 0, err
    assert_same(params(folder), finished[1])
    resumed, straight = crossbow_jax.load_run(folder), crossbow_jax.load_run(finished[0])
    assert resumed.steps == 32
    assert evaluations(resumed.history) == evaluations(straight.history)  # 8, 16, 24, 32


@pytest.fixture
def python_sigint():
    """SIGINT as Python and a notebook kernel have it (KeyboardInterrupt), whatever the
    suite's process inherited (a shell's `cmd &` starts it ignored) or a test left."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_python_callers_get_run_interrupted_with_the_saved_step(tmp_path, python_sigint):
    """The first SIGINT in a notebook: `RunInterrupted` after the dispatch in flight and its
    evaluation, the step saved, the handlers and threads as they were; resumed, the run
    ends as one never interrupted, evaluations included."""
    from _engine_fixtures import MLP, split

    train, test = split()
    run = {"batch_size": 8, "learners_per_device": 2, "num_devices": 2, "epochs": 1,
           "steps_per_dispatch": 2, "eval_every": 8, "progress": False}  # fmt: skip
    before = {t for t in threading.enumerate() if not t.daemon}
    handler = signal.getsignal(signal.SIGINT)

    def interrupt(row, sent=[]):  # noqa: B006 (once: a second Ctrl-C stops at once)
        if row["step"] >= 12 and not sent:  # logged one late: after the 12..14 dispatch
            sent.append(os.kill(os.getpid(), signal.SIGINT))

    with pytest.raises(crossbow_jax.RunInterrupted) as info:
        crossbow_jax.train(MLP(), train, test, checkpoint_dir=str(tmp_path), callback=interrupt,
                           **run)  # fmt: skip
    error = info.value
    assert (error.signal, error.exit_code, error.folder) == ("SIGINT", 130, str(tmp_path))
    assert runfolder.checkpoint_steps(tmp_path) == [error.step] == [16]  # seen after 14..16
    assert signal.getsignal(signal.SIGINT) is handler
    alive = {t for t in threading.enumerate() if not t.daemon and t.is_alive()} - before
    # (asyncio's idle executor threads, which orbax's reads start, end at exit on their own)
    assert not [t for t in alive if not t.name.startswith("asyncio_")], alive
    resumed = crossbow_jax.train(MLP(), train, test, checkpoint_dir=str(tmp_path), resume=True,
                                 **run)  # fmt: skip
    straight = crossbow_jax.train(MLP(), train, test, **run)
    assert_same(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params))
    assert evaluations(resumed.history) == evaluations(straight.history)  # 8, 16, 24
    assert resumed.accuracy == straight.accuracy and resumed.steps == 24


# --- another run's folder -------------------------------------------------------------------


def test_a_folder_with_another_runs_checkpoints_is_refused_unless_overwritten(tmp_path, finished):
    """With or without config.json: refused before work (nothing changes); overwrite=True
    replaces the old run, whose checkpoints are gone before the new one writes."""
    folder = tmp_path / "run"
    shutil.copytree(finished[0], folder)
    (folder / "config.json").unlink()
    listing = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    code, err = command(folder, "--seed", "1")
    assert code == 2 and "already holds a run (checkpoints up to step 32)" in err, err
    assert "--overwrite" in err
    code, err = command(folder, "--resume")
    assert code == 2 and "no config.json" in err, err
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == listing

    code, err = command(folder, "--seed", "1", "--overwrite", "--epochs", "1")
    assert code == 0, err
    assert runfolder.checkpoint_steps(folder) == [4, 8]  # the new run's alone
    assert crossbow_jax.load_run(folder).config.seed == 1
    assert not (folder / runfolder.DAMAGED).exists()


def test_resuming_a_complete_run_trains_nothing_and_keeps_its_result(tmp_path, finished):
    """A requeued job whose run is done: its result, not a rerun with 0 images/s."""
    folder = tmp_path / "run"
    shutil.copytree(finished[0], folder)
    before = json.loads((folder / "result.json").read_text())
    code, err = command(folder, "--resume")
    assert code == 0 and "is complete at step 32" in err, err
    after = json.loads((folder / "result.json").read_text())
    for key in ("accuracy", "images_per_second", "steps", "compile_time"):
        assert after[key] == before[key], key
    assert runfolder.checkpoint_steps(folder) == [28, 32]


def test_a_config_json_that_cannot_be_read_is_named(tmp_path, finished):
    folder = tmp_path / "run"
    shutil.copytree(finished[0], folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    code, err = command(folder, "--resume")
    assert code == 2 and f"{folder}/config.json cannot be read" in err, err
    assert "--overwrite" in err


def test_a_save_orbax_declines_is_an_error(tmp_path):
    from crossbow_jax.engine.checkpoint import Checkpointer

    config = crossbow_jax.TrainConfig(checkpoint_dir=str(tmp_path), progress=False)
    state = {"w": jax.numpy.ones(3)}
    with Checkpointer(str(tmp_path), config) as checkpointer:
        checkpointer.save(8, state, {"step": 8})
        with pytest.raises(crossbow_jax.CheckpointError, match="declined .* already holds step 8"):
            checkpointer.save(4, state, {"step": 4})
    assert runfolder.checkpoint_steps(tmp_path) == [8]


def test_the_lock_file_is_not_followed_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / runfolder.LOCK_FILE).symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        crossbow_jax.train("lenet", "mnist", checkpoint_dir=str(folder))
    assert target.read_text() == "keep"


# --- damaged checkpoints ----------------------------------------------------------------------


def _state_files(step_folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in (step_folder / "state").rglob("*") if p.is_file()),
                  key=lambda p: -p.stat().st_size)  # fmt: skip


def truncate(step: pathlib.Path) -> None:
    biggest = _state_files(step)[0]
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def flip_a_bit(step: pathlib.Path) -> None:
    biggest = _state_files(step)[0]
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))


def drop_metadata(step: pathlib.Path) -> None:
    (step / "state" / "_METADATA").unlink()


def empty(step: pathlib.Path) -> None:
    shutil.rmtree(step)
    step.mkdir()


@pytest.mark.parametrize("damage", [truncate, flip_a_bit])
def test_a_damaged_latest_checkpoint_is_reported_and_resume_falls_back(tmp_path, finished, damage):
    folder = tmp_path / "run"
    shutil.copytree(finished[0], folder)
    damage(folder / "checkpoints" / "32")
    code, err = command(folder, "--resume")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "is damaged" in line]
    assert len(notes) == 1 and "step 32" in notes[0] and "resuming from step 28" in notes[0]
    assert "diverged" not in err
    assert (folder / runfolder.DAMAGED / "32").is_dir()
    assert_same(params(folder), finished[1])  # steps 28..32 again, as before


@pytest.mark.parametrize("damage", [drop_metadata, empty])
def test_load_run_skips_a_damaged_checkpoint(tmp_path, finished, damage, capsys):
    folder = tmp_path / "run"
    shutil.copytree(finished[0], folder)
    damage(folder / "checkpoints" / "32")
    assert crossbow_jax.load_run(folder).steps == 28
    assert "skipped the checkpoint of step 32" in capsys.readouterr().err
    damage(folder / "checkpoints" / "28")
    with pytest.raises(
        crossbow_jax.CheckpointError, match=r"no intact checkpoint in .*\(step 32: .*; step 28: "
    ):
        crossbow_jax.load_run(folder)
    code, err = command(folder, "--resume")
    assert code == 2 and "no intact checkpoint" in err, err


# --- a file system that fails --------------------------------------------------------------

UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def _tmpfs_wrapper(folder, size: str) -> list[str]:
    """Runs the child in its own mount namespace with `folder` a tmpfs of `size`, then
    prints when it ended (the epoch's seconds) and the newest step still intact there."""
    check = (f"{sys.executable} -c \"from crossbow_jax.engine import runfolder; "
             f"print('intact', runfolder.newest_intact_step('{folder}'))\"")  # fmt: skip
    script = (f'mount -t tmpfs -o size={size} tmpfs {folder} && "$@"; rc=$?; '
              f'echo "ended $(date +%s.%N)" >&2; {check} >&2; exit $rc')  # fmt: skip
    return [*UNSHARE, "sh", "-c", script, "wrapper"]


def _can_mount_tmpfs(tmp_path) -> str | None:
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        done = subprocess.run([*UNSHARE, "mount", "-t", "tmpfs", "tmpfs", str(probe)],
                              check=False, capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare cannot run here ({e})"
    return None if done.returncode == 0 else f"cannot mount a tmpfs: {done.stderr.strip()}"


@pytest.mark.parametrize("fault, cause", [("readonly", "Read-only file system"),
                                          ("full", "No space left on device")])  # fmt: skip
def test_a_save_that_fails_ends_the_run_within_seconds_with_one_line(tmp_path, fault, cause):
    why = _can_mount_tmpfs(tmp_path)
    if why:
        pytest.skip(f"needs a tmpfs this test may mount (user and mount namespaces): {why}")
    folder = tmp_path / "run"
    folder.mkdir()
    # An event file open for writing keeps `mount -o remount,ro` from going read-only (the
    # kernel's own remount after an I/O error does not wait), so that fault runs without one.
    more = ("--no-tensorboard",) if fault == "readonly" else ()
    child = Child(tmp_path, fault, folder, *more, wrap=_tmpfs_wrapper(folder, "4m"), name=fault)
    deadline = time.monotonic() + 120
    while "fault injected" not in child.stderr() and time.monotonic() < deadline:
        assert child.proc.poll() is None, child.stderr()
        time.sleep(0.05)
    injected = time.time()
    assert child.wait(timeout=60) == 2, child.stderr()
    ended = next(line for line in child.stderr().splitlines() if line.startswith("ended "))
    assert float(ended.split()[1]) - injected < 20, child.stderr()  # the run's own exit
    errors = [line for line in child.stderr().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, child.stderr()
    assert "could not write the checkpoint of step" in errors[0] and cause in errors[0]
    intact = next(line for line in child.stderr().splitlines() if line.startswith("intact"))
    assert intact.split()[1].isdigit(), child.stderr()  # the checkpoints written before stay


def test_deleting_every_digest_does_not_switch_the_check_off(tmp_path, finished):
    folder = tmp_path / "run"
    shutil.copytree(finished[0], folder)
    shutil.rmtree(folder / runfolder.DIGESTS)
    with pytest.raises(crossbow_jax.CheckpointError, match="step 32: it has no digest"):
        crossbow_jax.load_run(folder)
