"""The paper's sweeps on top of the package's runner (`crossbow_jax.sweeps`).

What the experiments share: where their rows go (`RESULTS`), the LeNet/MNIST
learner settings and what a `--quick` variant changes, and the
`python -m experiments.<name>` front door.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from crossbow_jax.cli.sweep import add_arguments
from crossbow_jax.sweeps import sweep

RESULTS = Path(__file__).resolve().parent / "results"
"""Where full sweeps write by default; quick ones go to `results/quick/`."""

LENET_MNIST = {
    "model": "lenet",
    "dataset": "mnist",
    "batch_size": 16,
    "learning_rate": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "central_momentum": 0.9,
}
"""Learner settings shared by the LeNet/MNIST sweeps (docs/results.md)."""

QUICK_MNIST = {
    "dataset": "synthetic",
    "synthetic_like": "mnist",
    "train_examples": 256,
    "test_examples": 64,
    "batch_size": 8,
    "steps_per_dispatch": 1,
}
"""What a `--quick` variant changes: tiny synthetic MNIST-shaped data, one step per dispatch
(on a CPU half the program of the default two unrolled steps to compile: a quick run is
mostly compiling)."""


def run_from_args(name: str, args: argparse.Namespace) -> int:
    """Loads `experiments.<name>` and runs its sweep with the parsed flags."""
    module = importlib.import_module(f"experiments.{name}")
    config = module.get_config(quick=args.quick)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    sweep(config, out, seeds=args.seeds, shard=args.shard, data_dir=args.data_dir)
    return 0


def main(name: str, argv: list[str] | None = None) -> int:
    """`python -m experiments.<name> [--quick] [--seeds N] [--shard I/N] [--out DIR]`."""
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}",
        description=importlib.import_module(f"experiments.{name}").__doc__.split("\n")[0],
    )
    add_arguments(
        parser, default_out="experiments/results (experiments/results/quick with --quick)"
    )
    return run_from_args(name, parser.parse_args(argv))
