"""A user's own sweeps (crossbow_jax.sweeps): a sweep file through `crossbow-jax sweep FILE.py`,
a config dict through `crossbow_jax.sweep`, one-line errors before any run, and (slow) the
same from a wheel installed in a fresh venv, outside the checkout."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import crossbow_jax
from crossbow_jax import sweeps
from crossbow_jax.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent

SWEEP_FILE = '''\
"""A user's sweep: learning rates of LeNet on tiny synthetic MNIST-shaped data."""


def get_config(quick=False):
    fixed = {
        "model": "lenet", "dataset": "synthetic", "synthetic_like": "mnist",
        "train_examples": 64, "test_examples": 32, "batch_size": 8,
        "learners_per_device": 2, "num_devices": 2, "epochs": 1, "steps_per_dispatch": 1,
    }
    rates = [0.05, 0.01] if quick else [0.1, 0.05, 0.01, 0.005]
    return {
        "fixed": fixed,
        "grid": [{"learning_rate": lr} for lr in rates],
        "plots": [{"x": "learning_rate", "y": "final_accuracy"}],
    }
'''


def quiet(*_):
    pass


@pytest.fixture
def recorded(monkeypatch):
    """Training replaced by a stub that records (learning_rate, seed) of each run it is given."""
    calls = []

    def measure(run, data, show=None):
        calls.append((run["settings"]["learning_rate"], run["seed"]))
        return {"final_accuracy": 0.5, "images_per_second": 1.0, "curve": [[1.0, 0.5]]}

    monkeypatch.setitem(sweeps.MEASURES, "train", measure)
    return calls


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "my_sweep.py"
    path.write_text(SWEEP_FILE)
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_sweep_file_runs_from_the_shell_then_resumes_with_the_missing_runs_only(
    sweep_file, monkeypatch, capsys
):
    assert cli_main(["sweep", str(sweep_file), "--quick"]) == 0
    out = sweep_file.parent / "sweep_results" / "quick"  # the default: beside the file
    rows = _rows(out / "my_sweep.jsonl")
    assert [r["settings"]["learning_rate"] for r in rows] == [0.05, 0.01]
    assert all(0 <= r["figures"]["final_accuracy"] <= 1 for r in rows)
    for figures in (r["figures"] for r in rows):  # SMA sends its corrections at every step
        assert figures["peak_bytes"] == figures["all_reduce_bytes"] > 0
        assert figures["peak_by_axis"] == figures["all_reduce_by_axis"] == {
            "devices": figures["all_reduce_bytes"]
        }
    assert rows[0]["experiment"] == "my_sweep" and rows[0]["versions"]["crossbow_jax"]
    table = (out / "my_sweep.md").read_text()
    assert "| learning_rate | n | final_accuracy |" in table and "| 0.05 | 1 |" in table
    assert (out / "my_sweep.png").read_bytes()[:4] == b"\x89PNG"

    calls = []
    monkeypatch.setitem(  # a second seed: only its runs are trained, the first seed's are kept
        sweeps.MEASURES, "train", lambda run, *_: calls.append(run["seed"]) or {"status": "ok"}
    )
    assert cli_main(["sweep", str(sweep_file), "--quick", "--seeds", "2"]) == 0
    assert calls == [1, 1] and _rows(out / "my_sweep.jsonl")[:2] == rows
    assert "4 runs, 2 already done" in capsys.readouterr().out


def test_sweep_from_python_returns_the_rows_and_writes_to_sweep_results(
    tmp_path, monkeypatch, recorded
):
    config = {
        "name": "notebook",
        "fixed": {"model": "lenet", "dataset": "synthetic", "batch_size": 8},
        "grid": [{"variant": "a", "learning_rate": 0.1}, {"variant": "b", "learning_rate": 0.2}],
        "seeds": 2,
    }
    monkeypatch.chdir(tmp_path)
    rows = crossbow_jax.sweep(config, shard="1/2", log=quiet)  # runs 1 and 3 of (a0, b0, a1, b1)
    assert recorded == [(0.2, 0), (0.2, 1)] and len(rows) == 2
    rows = crossbow_jax.sweep(config, shard=(0, 2), log=quiet)
    assert recorded[2:] == [(0.1, 0), (0.1, 1)] and len(rows) == 4
    assert crossbow_jax.sweep(config, log=quiet) == rows and len(recorded) == 4  # all done
    table = (tmp_path / "sweep_results" / "notebook.md").read_text()
    assert "| variant | n | final_accuracy |" in table and "| a | 2 | 0.5000 ± 0.0000 |" in table


BAD_FILES = [
    (None, "does not exist; pass the path of a .py file"),
    ("x = 1\n", "defines no get_config(quick)"),
    (
        SWEEP_FILE.replace('"learning_rate": lr', '"learning_rat": lr'),
        "did you mean 'learning_rate'",
    ),
    (SWEEP_FILE.replace('"batch_size"', '"batchsize"'), "fixed has 'batchsize'"),
    (SWEEP_FILE.replace('"lenet"', '"lenett"'), "model='lenett' (did you mean 'lenet'?)"),
    (SWEEP_FILE.replace('"batch_size": 8', '"batch_size": 0'), "grid point 0: batch_size"),
    (SWEEP_FILE.replace('"grid":', '"grids":'), "the entry 'grids' (did you mean 'grid'?)"),
    (SWEEP_FILE.replace("return {", "return 3, {"), "a sweep config is a dict, not tuple"),
]


@pytest.mark.parametrize("text, message", BAD_FILES)
def test_a_bad_sweep_file_is_one_error_line_before_any_run(
    text, message, tmp_path, recorded, capsys
):
    path = tmp_path / "bad.py"
    if text is not None:
        path.write_text(text)
    assert cli_main(["sweep", str(path), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert recorded == [] and not (tmp_path / "sweep_results").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shard", "2/2"], "shard '2/2' is not I/N with 0 <= I < N"),
        (["--seeds", "0"], "0 must be >= 1"),
        (["no_such_experiment"], "unknown experiment 'no_such_experiment'"),
    ],
)
def test_bad_flags_are_one_error_line(argv, message, sweep_file, recorded, capsys):
    target = [] if argv[0] == "no_such_experiment" else [str(sweep_file)]
    assert cli_main(["sweep", *target, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert recorded == []


def test_bad_python_arguments_raise_one_line_config_errors(tmp_path, recorded):
    config = {"name": "x", "fixed": {"model": "lenet", "dataset": "synthetic"}, "grid": [{}]}
    for kwargs, message in [
        ({"shard": (2, 2)}, "shard (2, 2) is not I/N"),
        ({"shard": "1-2"}, "shard '1-2' is not I/N"),
        ({"seeds": 0}, "seeds=0 is not an integer >= 1"),
    ]:
        with pytest.raises(crossbow_jax.ConfigError, match=r"^[^\n]+$") as info:
            crossbow_jax.sweep(config, tmp_path, log=quiet, **kwargs)
        assert message in str(info.value)
    with pytest.raises(crossbow_jax.ConfigError, match="give it a name like 'my_sweep'"):
        crossbow_jax.sweep({k: v for k, v in config.items() if k != "name"}, tmp_path)
    assert recorded == [] and not list(tmp_path.iterdir())


def _fresh_venv_with_the_wheel(tmp_path: Path) -> Path:
    """A venv holding only the wheel built from a copy of the checkout; the dependencies
    come from this interpreter's site-packages through a plain path in a .pth file (which
    does not run that folder's own .pth files, so not the editable install's finder)."""
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "crossbow_jax", src / "crossbow_jax", ignore=ignore)
    import setuptools

    isolation = [] if int(setuptools.__version__.split(".")[0]) < 77 else ["--no-build-isolation"]
    dist = tmp_path / "dist"
    build = subprocess.run(  # isolated, pip fetches pyproject's setuptools>=77 for the build
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", dist, src],
        capture_output=True,
        text=True,
    )
    if (
        build.returncode
        and not isolation
        and "setuptools" in build.stderr
        and ("No matching distribution" in build.stderr or "connection" in build.stderr.lower())
    ):
        pytest.skip(f"setuptools {setuptools.__version__} here, and no index to fetch >=77 from")
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("crossbow_jax-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    deps = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    Path(purelib, "dependencies.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel],
        check=True,
    )
    return venv


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_runs_a_sweep_file_outside_the_checkout(tmp_path):
    venv = _fresh_venv_with_the_wheel(tmp_path)
    work = tmp_path / "work"  # the cwd and the sweep file's folder: no checkout around
    work.mkdir()
    (work / "my_sweep.py").write_text(SWEEP_FILE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*argv):
        return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)

    where = run(venv / "bin" / "python", "-c", "import crossbow_jax; print(crossbow_jax.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(venv), where
    done = run(venv / "bin" / "crossbow-jax", "sweep", "my_sweep.py", "--quick")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _rows(work / "sweep_results" / "quick" / "my_sweep.jsonl")
    assert [r["settings"]["learning_rate"] for r in rows] == [0.05, 0.01]
    assert "| 0.01 | 1 |" in (work / "sweep_results" / "quick" / "my_sweep.md").read_text()
    paper = run(venv / "bin" / "crossbow-jax", "sweep", "statistical_efficiency")
    assert paper.returncode == 2 and "no experiments/ folder here" in paper.stderr, paper.stderr
