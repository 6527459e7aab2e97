"""Scripted sweeps that reproduce the CROSSBOW paper's claims (see docs/results.md).

One small config module per experiment (`get_config(quick)` returns the grid
and fixed settings; the package's sweep runner, `crossbow_jax.sweeps`, does the work):

    python -m experiments.<name> [--quick] [--seeds N] [--out DIR]
    crossbow-jax sweep <name> [--quick] [--seeds N] [--out DIR]

Rows go to `<out>/<name>.jsonl` (one per finished run; done runs are skipped,
so a stopped sweep resumes), with a plot `<name>.png` and a table `<name>.md`.
"""

import importlib

from experiments._sweep import run_from_args

EXPERIMENTS = (
    "hardware_efficiency",
    "statistical_efficiency",
    "statistical_efficiency_resnet32",
    "time_to_accuracy",
    "device_scaling",
    "sensitivity",
    "algorithms",
)


__all__ = ["EXPERIMENTS", "get_config", "run_from_args"]


def get_config(name: str, quick: bool = False) -> dict:
    """The config dict of experiment `name` (one of `EXPERIMENTS`)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{name}").get_config(quick=quick)
