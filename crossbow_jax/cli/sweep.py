"""`crossbow-jax sweep`: run one of the scripted experiments under `experiments/`.

The experiments live beside the package (in the source tree, not in the
installed wheel): each is `experiments/<name>.py` with `get_config(quick)`,
run by the shared runner in `experiments/_sweep.py` (see docs/results.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from crossbow_jax.cli import _common

EXAMPLES = """\
examples:
  crossbow-jax sweep statistical_efficiency --seeds 3
  crossbow-jax sweep device_scaling --quick --out /tmp/sweeps
  crossbow-jax sweep --list

Rows go to <out>/<name>.jsonl, one per finished run; runs already there are
skipped, so an interrupted sweep resumes. The plot <name>.png and table
<name>.md are redrawn at the end. Exit codes: 0 done, 2 bad input.
"""


def _experiments():
    """The `experiments` package, from the source tree when it is not importable."""
    try:
        return importlib.import_module("experiments")
    except ModuleNotFoundError as e:
        if e.name != "experiments":
            raise
    root = Path(__file__).resolve().parents[2]
    if not (root / "experiments" / "_sweep.py").exists():
        raise _common.UsageError(
            "the experiments/ folder is not here; run sweeps from a source checkout"
        ) from None
    sys.path.insert(0, str(root))
    return importlib.import_module("experiments")


def add_parser(subparsers) -> None:
    """Registers `sweep` and its flags."""
    parser = _common.add_command(
        subparsers,
        "sweep",
        "run a scripted experiment (experiments/<name>.py) and plot it",
        "Run the grid of one experiment that reproduces a claim of the CROSSBOW paper, "
        "append one JSON row per run, and draw its plot and table.",
        epilog=EXAMPLES,
    )
    parser.add_argument("name", nargs="?", help="the experiment (see --list)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    try:
        experiments = _experiments()
    except _common.UsageError:
        return  # no source tree: `run` says so
    experiments.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Runs the named experiment's sweep (or lists them)."""
    experiments = _experiments()
    if args.list or not args.name:
        for name in experiments.EXPERIMENTS:
            doc = importlib.import_module(f"experiments.{name}").__doc__ or ""
            print(f"{name:24s} {doc.strip().splitlines()[0]}")
        return 0
    if args.name not in experiments.EXPERIMENTS:
        raise _common.UsageError(
            f"unknown experiment {args.name!r}; choose from {', '.join(experiments.EXPERIMENTS)}"
        )
    return experiments.run_from_args(args.name, args)
