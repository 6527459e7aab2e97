"""`crossbow-jax data list | prepare NAME`: the data sets by name, and fetching one ahead of time."""

from __future__ import annotations

import argparse

from crossbow_jax.cli import _common


def add_parser(subparsers) -> None:
    """Registers `data` with its actions `list` and `prepare`."""
    from crossbow_jax.data import dataset_names

    parser = _common.add_command(subparsers, "data", "list or prepare data sets")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _common.add_command(actions, "list", "list the data sets --dataset accepts")
    prepare = _common.add_command(
        actions,
        "prepare",
        "fetch, verify and cache a data set ahead of time; prints the cache path",
    )
    prepare.add_argument("name", choices=dataset_names(), help="the data set")
    _common.add_data_dir_argument(prepare)


def run(args: argparse.Namespace) -> int:
    """Lists the data sets, or prepares one and prints where it is cached."""
    from crossbow_jax import data

    if args.data_command == "prepare":
        print(data.prepare(args.name, data_dir=args.data_dir))
        return 0
    print(format_dataset_table(data.DATASETS))
    return 0


def format_dataset_table(specs) -> str:
    """One line per data set: name, image shape, classes, sizes, notes."""
    lines = [f"{'name':<16} {'image':<10} {'classes':>7} {'train / test':>20}  notes"]
    for name in sorted(specs):
        spec = specs[name]
        info = spec.info
        shape = "x".join(map(str, info.image_shape))
        sizes = f"{spec.num_train:,} / {spec.num_test:,}"
        notes = {
            "stream": "streamed from folders (crossbow_jax.data.load_imagenet)",
            "synthetic": "random images shaped like --synthetic-like, sized by "
            "--train-examples/--test-examples",
        }.get(spec.kind, f"stands in for {info.substitute}" if info.substitute else "")
        if spec.kind == "synthetic":
            shape, classes, sizes = "any", "any", "any"
        else:
            classes = str(info.num_classes)
        lines.append(f"{name:<16} {shape:<10} {classes:>7} {sizes:>20}  {notes}".rstrip())
    return "\n".join(lines)
