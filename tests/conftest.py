"""Test set-up: 8 simulated CPU devices, set before JAX is first imported."""

import os

from crossbow_jax.engine.mapping import simulated_devices_flags

os.environ["XLA_FLAGS"] = simulated_devices_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest


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
