"""Two processes, one run: `jax.distributed` over 127.0.0.1 matches one process.

Each worker is this file run as a script in a fresh interpreter with 2
simulated CPU devices; together they train over 4 global devices with
`shard_map`, and process 0 saves the central model. The reference is the
same run in this (pytest) process on 4 of its simulated devices.
"""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from _engine_fixtures import subprocess_xla_flags

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT_S = 420
RUN = {
    "execution": "unroll",  # fixed: both sides of a comparison run the same program
    "batch_size": 8,
    "learners_per_device": 2,
    "epochs": 1,
    "seed": 3,
    "steps_per_dispatch": 2,
    "progress": False,
}
# name: (model fixture, extra options); BNNet exercises batch_stats and dropout across hosts.
# hierarchical takes its hosts from the processes; the one-process reference names them.
CASES = {
    "sma_mlp": ("MLP", {"algorithm": "sma"}),
    "ssgd_bnnet": ("BNNet", {"algorithm": "ssgd"}),
    "hierarchical_mlp": ("MLP", {"algorithm": "hierarchical", "sync_every": 3}),
}


def _train(case: str, **options):
    import _engine_fixtures

    import crossbow_jax

    model, extra = CASES[case]
    train, test = _engine_fixtures.split()
    model = getattr(_engine_fixtures, model)()
    return crossbow_jax.train(model, train, test, mapper="shard_map", **RUN, **extra, **options)


def _flatten(variables) -> dict[str, np.ndarray]:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def test_settings_come_from_flags_else_the_environment():
    from crossbow_jax.engine.config import ConfigError
    from crossbow_jax.engine.distributed import Cluster, resolve

    env = {
        "CROSSBOW_JAX_COORDINATOR": "10.0.0.1:1234",
        "CROSSBOW_JAX_NUM_PROCESSES": "4",
        "CROSSBOW_JAX_PROCESS_ID": "2",
    }
    assert resolve(environ={}) is None
    assert resolve(environ=env) == Cluster("10.0.0.1:1234", 4, 2)
    assert resolve("h:1", 2, 0, environ=env) == Cluster("h:1", 2, 0)
    assert resolve("h:1", 1, 0, environ={}) is None  # one process: nothing to start
    assert resolve("auto", environ={}) == Cluster("auto", None, None)
    for bad in [
        ("h:1", None, None),
        ("h:1", 2, 2),
        ("nohostport", 2, 0),
        (None, 2, 1),
    ]:
        with pytest.raises(ConfigError):
            resolve(*bad, environ={})
    with pytest.raises(ConfigError, match="must be an integer"):
        resolve(environ=dict(env, CROSSBOW_JAX_PROCESS_ID="one"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSBOW_JAX_")}
    env.update(
        XLA_FLAGS=subprocess_xla_flags(devices),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]),
    )
    return env


def run_processes(commands: list[list[str]], env_for, cwd) -> list[subprocess.CompletedProcess]:
    """Starts every command at once and waits for all of them.

    Output goes to files in `cwd` (no pipe can fill up). As soon as one
    process fails, or after `TIMEOUT_S`, the others are killed.
    """
    cwd = pathlib.Path(cwd)
    with contextlib.ExitStack() as stack:
        procs = []
        for i, cmd in enumerate(commands):
            out, err = (
                stack.enter_context(open(cwd / f"process-{i}.{s}", "w"))
                for s in ("stdout", "stderr")
            )
            procs.append(subprocess.Popen(cmd, env=env_for(i), cwd=cwd, stdout=out, stderr=err))
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                    break
                time.sleep(0.1)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    results = [
        subprocess.CompletedProcess(
            cmd, proc.returncode, (cwd / f"process-{i}.stdout").read_text(),
            (cwd / f"process-{i}.stderr").read_text(),
        )
        for i, (proc, cmd) in enumerate(zip(procs, commands))
    ]  # fmt: skip
    failed = [
        f"process {i} exited {r.returncode}: {r.args}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
        for i, r in enumerate(results)
        if r.returncode != 0
    ]
    assert not failed, "\n\n".join(failed)
    return results


def _worker(out: str) -> None:
    """Runs in each subprocess: join the cluster from the environment, train, save."""
    from crossbow_jax.engine import distributed

    assert distributed.initialize()
    import jax

    assert jax.process_count() == 2 and len(jax.local_devices()) == 2
    for case in CASES:
        r = _train(case)
        if distributed.is_main_process():
            np.savez(os.path.join(out, f"{case}.npz"), **_flatten(r.params))
            with open(os.path.join(out, f"{case}.json"), "w") as f:
                json.dump(_summary(r), f)
    print(f"process {jax.process_index()} done", flush=True)


def _summary(r) -> dict:
    return {
        "accuracy": r.accuracy,
        "steps": r.steps,
        "devices": r.devices,
        "history": len(r.history),
    }


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_four_devices(tmp_path):
    port = _free_port()

    def env_for(i):
        return dict(
            _worker_env(2),
            CROSSBOW_JAX_COORDINATOR=f"127.0.0.1:{port}",
            CROSSBOW_JAX_NUM_PROCESSES="2",
            CROSSBOW_JAX_PROCESS_ID=str(i),
        )

    cmd = [sys.executable, str(pathlib.Path(__file__)), str(tmp_path)]
    results = run_processes([cmd, cmd], env_for, cwd=tmp_path)
    assert [r.stdout.strip().splitlines()[-1] for r in results] == [
        "process 0 done",
        "process 1 done",
    ]

    for case in CASES:
        hosts = {"hosts": 2} if case.startswith("hierarchical") else {}
        ref = _train(case, num_devices=4, **hosts)
        got = np.load(tmp_path / f"{case}.npz")
        want = _flatten(ref.params)
        assert sorted(got.files) == sorted(want)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert json.loads((tmp_path / f"{case}.json").read_text()) == _summary(ref)
        assert ref.devices == 4 and ref.accuracy > (0.8 if hosts else 0.9)  # 12 steps


if __name__ == "__main__":
    _worker(sys.argv[1])


@pytest.mark.slow
def test_shell_command_across_two_processes_reports_once(tmp_path):
    """`crossbow-jax train` with the multi-host flags: one result line, files from process 0
    (a model of one's own by module:attribute, the MLP of the tests: LeNet would add a
    minute of compiling to what this checks)."""
    port, run = _free_port(), tmp_path / "run"
    argv = [
        sys.executable, "-m", "crossbow_jax", "train", "--model", "_engine_fixtures:mnist_mlp",
        "--dataset", "synthetic", "--synthetic-like", "mnist", "--train-examples", "256",
        "--test-examples", "64", "--batch-size", "8", "--learners-per-device", "2",
        "--epochs", "1", "--steps-per-dispatch", "2", "--output", str(run),
        "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
    ]  # fmt: skip
    commands = [argv + ["--process-id", str(i)] for i in range(2)]
    first, second = run_processes(commands, lambda i: _worker_env(2), cwd=tmp_path)
    # (gloo itself may print "[Gloo] Rank i is connected ..." lines to stdout)
    results = [line for line in first.stdout.splitlines() if line.startswith("result:")]
    assert len(results) == 1 and results[0].startswith("result: test accuracy ")
    assert "sma, 4 devices x 2 learners x batch 8, 4 steps" in results[0]
    assert "result:" not in second.stdout
    result = json.loads((run / "result.json").read_text())
    assert result["processes"] == 2 and result["devices"] == 4 and result["steps"] == 4
    assert json.loads((run / "history.json").read_text())[-1]["step"] == 4
    assert (run / "checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_a_signal_to_one_process_saves_the_same_step_in_every_process(tmp_path):
    """SIGTERM to process 1 alone: both processes finish the dispatch, save the same step
    (one checkpoint, intact) and exit 143; the run resumes from it to the end."""
    from _run_folder_child import COMMAND

    from crossbow_jax import cli
    from crossbow_jax.engine import runfolder

    port, run = _free_port(), tmp_path / "run"
    procs = []
    for i in range(2):
        flags = ["--num-devices", "4", "--coordinator-address", f"127.0.0.1:{port}",
                 "--num-processes", "2", "--process-id", str(i)]  # fmt: skip
        with open(tmp_path / f"process-{i}.stderr", "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "_run_folder_child.py"), "none", str(run), *flags],
                env=_worker_env(2), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
            ))  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (run / runfolder.DIGESTS).is_dir() or not os.listdir(run / runfolder.DIGESTS):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errs = [(tmp_path / f"process-{i}.stderr").read_text() for i in range(2)]
    assert codes == [143, 143], errs
    said = [[line for line in e.splitlines() if line.startswith("interrupted by SIGTERM")]
            for e in errs]  # fmt: skip
    assert all(len(lines) == 1 for lines in said), errs
    step = int(said[0][0].split("saved step ")[1].split()[0])
    assert said[1][0] == said[0][0]  # the same step, the same folder
    assert runfolder.newest_intact_step(str(run)) == step
    assert cli.main([*COMMAND, "--output", str(run), "--num-devices", "4", "--resume"]) == 0
    assert json.loads((run / "result.json").read_text())["steps"] == 16  # 4 a epoch
