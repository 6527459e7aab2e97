"""Test set-up: 8 simulated CPU devices, set before JAX is first imported, XLA:CPU's
fast-compile options, and one XLA compilation cache for the run.

`make test` runs the suite on 2 pytest-xdist workers (`--dist loadgroup`). The
workers, and the processes the tests start, share a persistent XLA compilation
cache in a temporary folder removed at the end of the run: many tests compile
the same small programs, and the cache saved about a fifth of the suite's time
here. Executables are keyed by their program and options, so a cached one is
the one XLA would compile.

The suite's programs are tiny and most run a few steps: compiling them is most
of the suite's time. `FAST_COMPILE_FLAGS` turn off XLA:CPU's LLVM optimisation
and its newer fusion emitters (slower code, which a few steps never feel;
docs/design.md, "Testing", has the measured compile times). Every result a
test compares is computed with the same flags on both sides: the processes the
tests start keep them (`_engine_fixtures.subprocess_xla_flags`), except the
one check that needs XLA's defaults (`_placement_child.py`). `make demo`, the
benchmarks run by hand and users' runs compile with XLA's defaults.
"""

import math
import os
import shutil
import tempfile

from _engine_fixtures import FAST_COMPILE_FLAGS

from crossbow_jax.engine.mapping import simulated_devices_flags

os.environ["XLA_FLAGS"] = simulated_devices_flags(
    8, " ".join([os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE_FLAGS])
)
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

from crossbow_jax.tuning.choice import REPAY as _REPAY
from crossbow_jax.tuning.executions import choose_execution as _MEASURED

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


def _unmeasured(config, *args, learners, **kwargs):
    """`choose_execution` without the measurement: unroll, the candidate that wins on a CPU."""
    return {"chosen": "unroll", "learners": learners, "candidates": [], "cached": False,
            "cache_file": None, "key": None, "seconds": 0.0, "unmeasured": True}  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _execution_cache(tmp_path_factory):
    """Every run's execution="auto" goes to a cache of the session's own (never the user's),
    and is not measured (`tune` keeps unroll; a run keeps the CPU's default, unroll, and
    tries no other candidate): the suite would spend minutes timing executions. Session-wide, so
    that module- and session-scoped fixtures (set up before any test's own fixtures) are
    covered too; tests marked `measure_execution` get the real measurement back."""
    from crossbow_jax.tuning import choice, executions

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CROSSBOW_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "execution-cache"))
        patch.setattr(executions, "choose_execution", _unmeasured)
        patch.setattr(choice, "REPAY", math.inf)  # a run never tries a second candidate
        yield


@pytest.fixture(autouse=True)
def _execution_measurements(request, monkeypatch):
    """The tests of the measured choice itself (marked `measure_execution`) measure."""
    if request.node.get_closest_marker("measure_execution"):
        from crossbow_jax.tuning import choice, executions

        monkeypatch.setattr(executions, "choose_execution", _MEASURED)
        monkeypatch.setattr(choice, "REPAY", _REPAY)
