"""What the commands share: the parser class, the run flags, flags -> `TrainConfig`, data.

`add_run_arguments` declares every flag of a training run (`train` uses it;
`tune` can too); `config_from_args` turns the parsed flags into the
`TrainConfig` both front doors share, and `data_arguments` into the data
arguments of `crossbow_jax.train`. Defaults come from `TrainConfig` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from crossbow_jax.engine import distributed
from crossbow_jax.engine.config import TUNE_STRATEGIES, ConfigError, TrainConfig

DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
"""`TrainConfig`'s defaults, which are the flags' defaults (except learners: "auto")."""


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


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def learners(text: str) -> int | str:
    """`--learners-per-device`: an int >= 1 or "auto"."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; pass an int >= 1 or 'auto'") from None


def add_data_dir_argument(parser) -> None:
    """`--data-dir`, shared by `train` and `data prepare`."""
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where data sets are looked for and cached "
        "(default: $CROSSBOW_JAX_DATA, else ~/.cache/crossbow_jax)",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares every flag of a training run, grouped as in `--help`."""
    from crossbow_jax.data import dataset_names
    from crossbow_jax.models import model_names

    d = DEFAULTS
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", choices=model_names(), default="lenet", help="the model to train")
    g.add_argument(
        "--dataset", choices=dataset_names(), default="mnist", help="the data set, by name"
    )
    add_data_dir_argument(g)
    g.add_argument(
        "--train-examples",
        type=positive_int,
        metavar="N",
        help="use the first N training examples (for synthetic: generate N) (default: all)",
    )
    g.add_argument(
        "--test-examples",
        type=positive_int,
        metavar="N",
        help="use the first N test examples (for synthetic: generate N) (default: all)",
    )
    g.add_argument(
        "--synthetic-like",
        choices=sorted(set(dataset_names()) - {"synthetic"}),
        default="cifar10",
        help="with --dataset synthetic: the data set whose shape it imitates",
    )

    g = parser.add_argument_group("learners and algorithm")
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=d["batch_size"],
        metavar="B",
        help="images per learner per step",
    )
    g.add_argument(
        "--learners-per-device",
        type=learners,
        default="auto",
        metavar="M",
        help="learners on every device, or 'auto' to choose M by measured throughput "
        "(the tuning package)",
    )
    g.add_argument(
        "--algorithm",
        choices=("sma", "ssgd"),
        default=d["algorithm"],
        help="sma: M x devices learners kept together by SMA; ssgd: the synchronous-SGD "
        "baseline, one learner per device at batch M x B",
    )
    g.add_argument(
        "--epochs", type=float, default=d["epochs"], metavar="E", help="epochs of training data"
    )
    g.add_argument(
        "--seed",
        type=int,
        default=d["seed"],
        help="seeds initialisation, data order, augmentation and dropout",
    )
    g.add_argument(
        "--target-accuracy",
        type=float,
        metavar="ACC",
        help="stop when the central model's test accuracy reaches ACC, and report the time "
        "to reach it (default: none, train all epochs)",
    )

    g = parser.add_argument_group("learner optimiser (SGD) and schedule")
    g.add_argument(
        "--lr",
        "--learning-rate",
        dest="learning_rate",
        type=float,
        default=d["learning_rate"],
        metavar="LR",
        help="base learning rate",
    )
    g.add_argument(
        "--momentum", type=float, default=d["momentum"], metavar="MU", help="SGD momentum"
    )
    g.add_argument(
        "--weight-decay",
        "--wd",
        type=float,
        default=d["weight_decay"],
        metavar="WD",
        help="weight decay",
    )
    g.add_argument(
        "--lr-milestones",
        type=float,
        nargs="+",
        default=(),
        metavar="EPOCH",
        help="epochs at which the learning rate is multiplied by --lr-gamma (default: none)",
    )
    g.add_argument(
        "--lr-gamma",
        type=float,
        default=d["lr_gamma"],
        metavar="GAMMA",
        help="factor at each milestone",
    )
    g.add_argument(
        "--warmup-epochs",
        type=float,
        default=d["warmup_epochs"],
        metavar="EPOCHS",
        help="linear warm-up of the learning rate from 0 over this many epochs",
    )
    g.add_argument(
        "--reset-at-drops",
        action="store_true",
        help="SMA: move every learner onto the central model at each milestone (default: off)",
    )

    g = parser.add_argument_group("SMA")
    g.add_argument(
        "--alpha", type=float, help="correction step (default: 1/k, k = learners in all)"
    )
    g.add_argument(
        "--central-momentum",
        type=float,
        default=d["central_momentum"],
        metavar="MU",
        help="momentum of the central model",
    )

    g = parser.add_argument_group("execution")
    g.add_argument(
        "--eval-every",
        type=nonnegative_int,
        default=d["eval_every"],
        metavar="STEPS",
        help="also evaluate the central model every STEPS steps (0: at epoch ends only)",
    )
    g.add_argument(
        "--steps-per-dispatch",
        type=positive_int,
        default=d["steps_per_dispatch"],
        metavar="STEPS",
        help="steps run by one device call (default: 2 on CPU, 50 elsewhere)",
    )
    g.add_argument(
        "--data-placement",
        choices=("auto", "device", "host"),
        default=d["data_placement"],
        help="device: the training set stays on every device; host: batches are assembled "
        "on the host and fed ahead of use (streamed data sets always); auto: host only "
        "when the data would fill over half of a device's free memory",
    )
    g.add_argument(
        "--unroll-steps",
        action=argparse.BooleanOptionalAction,
        default=d["unroll_steps"],
        help="unroll a dispatch's steps into one program instead of a loop "
        "(default: on for CPU, where XLA runs loop bodies ~5x slower; off elsewhere)",
    )
    g.add_argument(
        "--execution",
        choices=("auto", "vmap", "unroll"),
        default=d["execution"],
        help="how a device runs its learners; auto: unroll on CPU, vmap elsewhere",
    )
    g.add_argument(
        "--mapper",
        choices=("shard_map", "pmap"),
        default=d["mapper"],
        help="how the program is mapped over devices (multi-host: shard_map)",
    )
    g.add_argument(
        "--num-devices",
        type=positive_int,
        metavar="N",
        help="use the first N devices (default: all; all processes' devices when multi-host)",
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=d["dtype"],
        help="compute dtype of the model",
    )
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (default: a bar on stderr)",
    )

    g = parser.add_argument_group("run folder")
    g.add_argument(
        "--output",
        metavar="DIR",
        help="run folder: config.json, checkpoints/, and at the end history.json and "
        "result.json (default: none, nothing written)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=nonnegative_int,
        default=d["checkpoint_every"],
        metavar="STEPS",
        help="with --output: checkpoint every STEPS steps (0: only at the end)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its latest checkpoint, with the same "
        "settings (default: off)",
    )
    add_multihost_arguments(parser)
    add_tuning_arguments(parser)


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


def mebibytes(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0 MiB")
    return int(value * 2**20)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0 (0.1 = 10%)")
    return value


def add_tuning_arguments(parser: argparse.ArgumentParser) -> None:
    """The auto-tuner's flags (dests: the `tune_*` fields of `TrainConfig`)."""
    d = DEFAULTS
    g = parser.add_argument_group("auto-tuning (docs/tuning.md)")
    g.add_argument(
        "--tune-strategy", choices=TUNE_STRATEGIES, default=d["tune_strategy"],
        help="linear: add one learner at a time (the paper's rule); doubling: 1, 2, 4, ... "
        "then one at a time",
    )  # fmt: skip
    g.add_argument(
        "--tune-threshold", type=fraction, default=d["tune_threshold"], metavar="GAIN",
        help="add a learner only while throughput grows by more than GAIN (0.1 = 10%%)",
    )  # fmt: skip
    g.add_argument(
        "--tune-max-learners", type=positive_int, default=d["tune_max_learners"],
        metavar="M", help="never try more than M learners per device",
    )  # fmt: skip
    g.add_argument(
        "--tune-steps", type=positive_int, default=d["tune_steps"], metavar="STEPS",
        help="steps per timed interval of a trial (fewer for big models)",
    )  # fmt: skip
    g.add_argument(
        "--tune-repeats", type=positive_int, default=d["tune_repeats"],
        metavar="N", help="timed dispatches per setting, after one warm-up; the median counts",
    )  # fmt: skip
    g.add_argument(
        "--tune-memory-limit", type=mebibytes, metavar="MIB",
        help="skip settings whose compiled program needs more than MIB per device "
        "(default: the device's free memory where it reports it; none on CPU)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The `TrainConfig` of the parsed run flags (validated: may raise `ConfigError`).

    Every flag whose destination is a `TrainConfig` field is copied;
    `--output` becomes `checkpoint_dir` and `--no-progress` `progress=False`.
    `overrides` replace any field.
    """
    if args.resume and not args.output:
        raise ConfigError("--resume needs --output DIR, the run folder to resume")
    if args.checkpoint_every and not args.output:
        raise ConfigError("--checkpoint-every needs --output DIR, where checkpoints go")
    values = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    values.update(
        lr_milestones=tuple(args.lr_milestones or ()),
        checkpoint_dir=args.output,
        progress=not args.no_progress,
    )
    values.update(overrides)
    return TrainConfig(**values)


def start_processes(args: argparse.Namespace) -> bool:
    """Joins a multi-process run when the flags or environment ask; True if multi-process."""
    return distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def data_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """`train`, `test`, `augment` and `data_dir` arguments of `crossbow_jax.train`.

    A whole named data set is passed by name (the engine loads it). With
    `--train-examples`/`--test-examples`, or for synthetic data, the data set
    is loaded here and passed as arrays with its own augmentation; the engine
    then normalises with the mean and standard deviation of those arrays and
    takes the number of classes from their labels.
    """
    from crossbow_jax.data import load_dataset

    n_train, n_test = args.train_examples, args.test_examples
    if args.dataset != "synthetic" and n_train is None and n_test is None:
        return {"train": args.dataset, "test": None, "augment": None, "data_dir": args.data_dir}
    options = {}
    if args.dataset == "synthetic":
        options = {"like": args.synthetic_like, "n_train": n_train, "n_test": n_test}
    ds = load_dataset(args.dataset, data_dir=args.data_dir, **options)
    return {
        "train": (ds.train_images[:n_train], ds.train_labels[:n_train]),
        "test": (ds.test_images[:n_test], ds.test_labels[:n_test]),
        "augment": ds.info.augment,
        "data_dir": args.data_dir,
    }
