"""`crossbow-jax sweep`: run a sweep file (any `get_config(quick)`) or a paper experiment.

`crossbow-jax sweep path/to/my_sweep.py` runs the config its
`get_config(quick)` returns with the package's runner (`crossbow_jax.sweeps`;
docs/sweeps.md). `crossbow-jax sweep NAME` runs the paper's experiment
`experiments/NAME.py`, which lives in a source checkout, not in the wheel
(docs/results.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from crossbow_jax.cli import _common
from crossbow_jax.engine.config import ConfigError
from crossbow_jax.sweeps import load_sweep_file, parse_shard, sweep

EXAMPLES = """\
examples:
  crossbow-jax sweep my_sweep.py --quick                 # your own sweep file
  crossbow-jax sweep my_sweep.py --shard 0/2 &           # two processes share it
  crossbow-jax sweep my_sweep.py --shard 1/2
  crossbow-jax sweep statistical_efficiency --seeds 3    # a paper experiment (checkout)
  crossbow-jax sweep --list

Rows go to <out>/<name>.jsonl, one per finished run; runs already there are
skipped, so an interrupted sweep resumes. The plot <name>.png and table
<name>.md are redrawn at the end. A sweep file's rows go by default to
sweep_results/ beside the file (sweep_results/quick/ with --quick), a paper
experiment's to experiments/results/. Exit codes: 0 done, 2 bad input.
"""

RESULTS_FOLDER = "sweep_results"
"""A sweep file's default output folder, beside the file."""


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """The flags shared by `crossbow-jax sweep` and `python -m experiments.<name>`."""
    parser.add_argument(
        "--quick", action="store_true", help="the config's tiny variant: get_config(quick=True)"
    )
    parser.add_argument(
        "--seeds",
        type=_common.positive_int,
        metavar="N",
        help="seeds per point (default: the config's)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help=f"where rows, plot and table go (default: {default_out})"
    )
    parser.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        metavar="I/N",
        help="run only every N-th run, starting at I, so N processes share a sweep (default: 0/1)",
    )
    parser.add_argument("--data-dir", metavar="DIR", help="data set cache (default: the package's)")


def _experiments():
    """The `experiments` package of a source checkout, or None outside one."""
    try:
        return importlib.import_module("experiments")
    except ModuleNotFoundError as e:
        if e.name != "experiments":
            raise
    root = Path(__file__).resolve().parents[2]
    if not (root / "experiments" / "_sweep.py").exists():
        return None
    sys.path.insert(0, str(root))
    return importlib.import_module("experiments")


def add_parser(subparsers) -> None:
    """Registers `sweep` and its flags."""
    parser = _common.add_command(
        subparsers,
        "sweep",
        "run a sweep file (get_config(quick) -> grid) or a paper experiment, and plot it",
        "Run every point of a sweep's grid, append one JSON row per run (a stopped sweep "
        "resumes), and draw its table and plot.",
        epilog=EXAMPLES,
    )
    parser.add_argument(
        "target",
        nargs="?",
        metavar="FILE.py|NAME",
        help="a sweep file defining get_config(quick), or a paper experiment (see --list)",
    )
    parser.add_argument("--list", action="store_true", help="list the paper's experiments")
    add_arguments(
        parser,
        default_out=f"{RESULTS_FOLDER}/ beside a sweep file, experiments/results for an "
        "experiment; quick/ inside either with --quick",
    )


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or Path(target).exists()


def _list() -> int:
    experiments = _experiments()
    if experiments is None:
        raise _common.UsageError(
            "the paper's experiments need a source checkout (experiments/ is not here); "
            "run your own sweep with 'crossbow-jax sweep path/to/my_sweep.py'"
        )
    for name in experiments.EXPERIMENTS:
        doc = importlib.import_module(f"experiments.{name}").__doc__ or ""
        print(f"{name:24s} {doc.strip().splitlines()[0]}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs the sweep file or named experiment (or lists the experiments)."""
    if args.list or not args.target:
        return _list()
    if _is_file(args.target):
        config = load_sweep_file(args.target, quick=args.quick)
        out = args.out or Path(args.target).parent / RESULTS_FOLDER / (
            "quick" if args.quick else ""
        )
        sweep(config, out, seeds=args.seeds, shard=args.shard, data_dir=args.data_dir)
        return 0
    experiments = _experiments()
    names = experiments.EXPERIMENTS if experiments else ()
    if args.target not in names:
        where = f"choose from {', '.join(names)}" if names else "no experiments/ folder here"
        raise _common.UsageError(
            f"unknown experiment {args.target!r} ({where}); to run your own sweep, pass "
            "the path of a .py file defining get_config(quick)"
        )
    return experiments.run_from_args(args.target, args)
