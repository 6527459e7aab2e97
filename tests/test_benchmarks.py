"""Smoke test of the benchmark scripts: `--quick` runs and writes its JSON.

Benchmarks are scripts, not timed tests: nothing here checks a speed.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# learner_efficiency's measurement (`measure`) runs inside gpu_check --quick.
BENCHMARKS = ["engine_overhead", "gpu_check"]
STAMP = {"benchmark", "quick", "device", "platform", "jax", "date"}


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_quick_mode_runs_and_writes_json(name, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-m", f"experiments.benchmarks.{name}", "--quick", "--out", str(tmp_path)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stdout
    rows = json.loads((tmp_path / f"{name}-quick.json").read_text())
    assert rows and all(STAMP <= set(row) and row["quick"] for row in rows)
    assert all(row["benchmark"] == name for row in rows)
    figures = [row["images_per_second"] for row in rows if "images_per_second" in row]
    assert figures and all(f > 0 for f in figures)
    if name == "engine_overhead":
        ratios = {row["ratio"] for row in rows if row["variant"] == "ratio"}
        assert {"loop / bare", "SMA / plain step time (unroll)"} <= ratios
    else:
        sections = {row["section"]: row for row in rows}
        assert set(sections) == {"efficiency", "auto", "sma", "online"}
        assert {r["variant"] for r in rows if r["section"] == "efficiency"} == {
            "vmap",
            "unroll",
            "im2col",
            "bound",
        }
        assert sections["online"]["curve"] and sections["online"]["accuracy"] > 0.5  # it learns
        assert sections["sma"]["ratio"] > 0
        assert (tmp_path / "gpu_check-quick.md").read_text().startswith("# gpu_check")
