"""`crossbow-jax models`: the models by name, with parameters and FLOPs per image."""

from __future__ import annotations

import argparse

from crossbow_jax.cli import _common


def add_parser(subparsers) -> None:
    """Registers `models`."""
    _common.add_command(
        subparsers,
        "models",
        "list the models: parameters and forward GFLOPs per image",
        "List the models --model accepts, with their parameter counts and forward FLOPs "
        "per image (measured by compiling each model once: a few seconds).",
    )


def run(args: argparse.Namespace) -> int:
    """Prints `crossbow_jax.models.format_model_table()`."""
    from crossbow_jax.models import format_model_table

    print(format_model_table())
    return 0
