"""What the commands share: the parser class, the run flags, flags -> `TrainConfig`, data.

`add_run_arguments` declares every flag of a training run (`train` and `tune`
use it). The flags that set `TrainConfig` fields are made from the fields
themselves (`add_config_arguments`: help, group, choices, defaults and the
int bounds all come from each field's metadata in
`crossbow_jax/engine/config.py`); `config_from_args` turns the parsed flags
back into the `TrainConfig`, and `data_arguments` the data flags into the
data arguments of `crossbow_jax.train`.
"""

from __future__ import annotations

import argparse
from typing import Any

from crossbow_jax.engine import distributed
from crossbow_jax.engine.config import FIELDS, ConfigError, TrainConfig, kind


class UsageError(Exception):
    """A flag the parser refused; printed as one `error: ...` line (exit code 2)."""


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are exceptions, not a usage dump and exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: ...)" to every option's help unless the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def add_command(subparsers, name: str, summary: str, description: str = "", **kwargs) -> Parser:
    """A subcommand parser with the shared help formatter."""
    return subparsers.add_parser(
        name,
        help=summary,
        description=description or summary,
        formatter_class=HelpFormatter,
        **kwargs,
    )


def int_at_least(low: int | None):
    """A flag parser: an integer, >= `low` when given."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def int_or_auto(low: int):
    """A flag parser: "auto", or an integer >= `low`."""
    number = int_at_least(low)

    def parse(text: str) -> int | str:
        if text == "auto":
            return text
        try:
            return number(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e}; pass an int >= {low} or 'auto'") from None

    return parse


def mebibytes(text: str) -> int:
    """A flag parser: a positive number of MiB, returned in bytes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0 MiB")
    return int(value * 2**20)


CLI_TYPES = {"mebibytes": mebibytes}
"""Flag parsers a field may name in its metadata (`cli_type`)."""


def flags(field) -> tuple[str, ...]:
    """The flags of a `TrainConfig` field: its `flags` metadata, else --field-name."""
    return field.metadata.get("flags") or (f"--{field.name.replace('_', '-')}",)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field, made from the field (dest: the field's name).

    Booleans that default to False are switches (`--resume`), other booleans
    take `--x`/`--no-x`; choices, metavars, int bounds and defaults (or the
    shell's own `cli_default`) come from the field's metadata.
    """
    groups: dict[str, Any] = {}
    for field in FIELDS:
        rule = field.metadata
        if rule.get("cli") is False:  # a setting of Python's `train` alone
            continue
        if rule["group"] not in groups:
            groups[rule["group"]] = parser.add_argument_group(rule["group"])
        options: dict[str, Any] = {
            "dest": field.name,
            "default": rule.get("cli_default", field.default),
            "help": rule["help"].replace("%", "%%"),
        }
        what = kind(field)
        if what == "bool":
            switch = field.default is False
            options["action"] = "store_true" if switch else argparse.BooleanOptionalAction
        elif "choices" in rule:
            options["choices"] = rule["choices"]
            if what == "int":  # (e.g. --overlap {0,1})
                options["type"] = int
        elif what == "tuple":
            options.update(type=float, nargs="+")
        elif "cli_type" in rule:
            options["type"] = CLI_TYPES[rule["cli_type"]]
        elif rule.get("auto"):
            options["type"] = int_or_auto(rule["at_least"])
        elif what in ("int", "float"):
            options["type"] = int_at_least(rule.get("at_least")) if what == "int" else float
        if "metavar" in rule and what != "bool":
            options["metavar"] = rule["metavar"]
        groups[rule["group"]].add_argument(*flags(field), **options)


def model_argument(names: list[str]):
    """A flag parser: a model name, or package.module:attribute (imported at run time)."""

    def parse(text: str) -> str:
        if text in names or (":" in text and all(text.partition(":")[::2])):
            return text
        choices = ", ".join(repr(n) for n in names)
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {choices}, or package.module:attribute)"
        )

    return parse


def model_from_args(args: argparse.Namespace) -> Any:
    """The `--model`: a name as it is, or the model imported from package.module:attribute."""
    if ":" not in args.model:
        return args.model
    from crossbow_jax.models.adapters import ModelError, import_model

    try:
        return import_model(args.model)
    except ModelError as e:
        raise ConfigError(str(e)) from None


def add_data_dir_argument(parser) -> None:
    """`--data-dir`, shared by `train` and `data prepare`."""
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where data sets are looked for and cached "
        "(default: $CROSSBOW_JAX_DATA, else ~/.cache/crossbow_jax)",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and data flags (not `TrainConfig` fields)."""
    from crossbow_jax.data import dataset_names
    from crossbow_jax.models import model_names

    g = parser.add_argument_group("model and data")
    g.add_argument(
        "--model",
        type=model_argument(model_names()),
        default="lenet",
        metavar="NAME",
        help=f"the model to train: {', '.join(model_names())}, or a model of your own as "
        "package.module:attribute (a Linen or NNX module, a pair (apply_fn, params), or a "
        "class or function of no arguments that returns one)",
    )
    g.add_argument(
        "--dataset", choices=dataset_names(), default="mnist", help="the data set, by name"
    )
    add_data_dir_argument(g)
    for split in ("train", "test"):
        g.add_argument(
            f"--{split}-examples",
            type=positive_int,
            metavar="N",
            help=f"use the first N {split} examples (for synthetic: generate N) (default: all)",
        )
    g.add_argument(
        "--synthetic-like",
        choices=sorted(set(dataset_names()) - {"synthetic"}),
        default="cifar10",
        help="with --dataset synthetic: the data set whose shape it imitates",
    )


def add_multihost_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that join this process to a multi-process run (see `engine.distributed`)."""
    g = parser.add_argument_group(
        "multi-host", "run the same command in every process; process 0 reports"
    )
    g.add_argument(
        "--coordinator-address",
        metavar="HOST:PORT",
        help="address of process 0, the same in every process, or 'auto' to let JAX detect "
        f"the cluster (default: ${distributed.ENV_COORDINATOR}, else one process)",
    )
    g.add_argument(
        "--num-processes",
        type=positive_int,
        metavar="N",
        help=f"processes in the run (default: ${distributed.ENV_NUM_PROCESSES})",
    )
    g.add_argument(
        "--process-id",
        type=nonnegative_int,
        metavar="I",
        help=f"this process's index, 0..N-1 (default: ${distributed.ENV_PROCESS_ID})",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares every flag of a training run, grouped as in `--help`."""
    add_data_arguments(parser)
    add_config_arguments(parser)
    add_multihost_arguments(parser)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The `TrainConfig` of the parsed run flags (validated: may raise `ConfigError`).

    Every field is read from its flag's destination; `overrides` replace any field.
    """
    folder = next(flags(f)[0] for f in FIELDS if f.name == "checkpoint_dir")  # --output
    needs_folder = {"resume": "the run folder to resume", "overwrite": "the run folder to "
                    "start anew", "checkpoint_every": "where checkpoints go",
                    "tensorboard": "where event files go"}  # fmt: skip
    for name, why in needs_folder.items():
        if getattr(args, name, None) and not args.checkpoint_dir:
            raise ConfigError(f"--{name.replace('_', '-')} needs {folder} DIR, {why}")
    values = {f.name: getattr(args, f.name, f.default) for f in FIELDS}
    values.update(overrides)
    return TrainConfig(**values)


def start_processes(args: argparse.Namespace) -> bool:
    """Joins a multi-process run when the flags or environment ask; True if multi-process."""
    return distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def data_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """`train`, `test`, `augment` and `data_dir` arguments of `crossbow_jax.train`.

    See `crossbow_jax.data.training_data`: a whole named data set goes by name;
    with `--train-examples`/`--test-examples`, or for synthetic data, the
    arrays are loaded here.
    """
    from crossbow_jax.data import training_data

    return training_data(
        args.dataset,
        train_examples=args.train_examples,
        test_examples=args.test_examples,
        like=args.synthetic_like,
        data_dir=args.data_dir,
    )
