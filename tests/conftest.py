"""Test set-up: 8 simulated CPU devices, set before JAX is first imported, and one XLA
compilation cache for the run.

`make test` runs the suite on 2 pytest-xdist workers (`--dist loadgroup`). The
workers, and the processes the tests start, share a persistent XLA compilation
cache in a temporary folder removed at the end of the run: many tests compile
the same small programs, and the cache saved about a fifth of the suite's time
here. Executables are keyed by their program and options, so a cached one is
the one XLA would compile.
"""

import os
import shutil
import tempfile

from crossbow_jax.engine.mapping import simulated_devices_flags

os.environ["XLA_FLAGS"] = simulated_devices_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Set by the process pytest was started in; the xdist workers inherit it.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="crossbow_jax-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # A size limit makes JAX lock the folder (filelock) around each read and write, so
    # one worker never reads an entry another is still writing.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pytest

# Files whose tests share a module- or session-scoped fixture (a trained run, fetched
# data) or run in an order (time_to_accuracy reads statistical_efficiency's rows):
# under xdist each stays on one worker; the other files' tests spread one by one.
TOGETHER = {
    "test_cli.py", "test_data.py", "test_executions.py", "test_experiments.py", "test_models.py",
}  # fmt: skip


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in TOGETHER:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


def pytest_sessionfinish(session):
    """The run's compilation cache goes with the run (the process that made it removes it)."""
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _execution_measurements(request, monkeypatch, tmp_path_factory):
    """Every run's execution="auto" is measured into a cache shared by the session, except
    that tests not marked `measure_execution` skip the measurement (unroll, as on a CPU,
    the candidate that wins here): the suite would spend minutes timing executions. The
    tests of the measured choice itself carry the marker."""
    cache = tmp_path_factory.getbasetemp() / "execution-cache"
    monkeypatch.setenv("CROSSBOW_JAX_CACHE", str(cache))
    if request.node.get_closest_marker("measure_execution"):
        return
    from crossbow_jax.tuning import executions

    def unmeasured(config, *args, learners, **kwargs):
        return {"chosen": "unroll", "learners": learners, "candidates": [], "cached": False,
                "cache_file": None, "key": None, "seconds": 0.0, "unmeasured": True}  # fmt: skip

    monkeypatch.setattr(executions, "choose_execution", unmeasured)
