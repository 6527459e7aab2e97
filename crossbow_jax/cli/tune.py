"""`crossbow-jax tune`: choose learners per device by measured throughput, no training."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os

from crossbow_jax.cli import _common
from crossbow_jax.engine import distributed, runfolder
from crossbow_jax.tuning import tuner

EXAMPLES = """\
examples:
  crossbow-jax tune --model lenet --dataset mnist --batch-size 16 \\
      --plot tune.png --json tune.json
  crossbow-jax tune --model resnet32 --dataset synthetic --synthetic-like cifar10 \\
      --batch-size 16 --tune-strategy doubling --tune-max-learners 32

Prints the throughput curve as a table, then the chosen setting. Flags that
only matter to training (--epochs, --target-accuracy, --checkpoint-every, ...)
are accepted and unused; the optimiser flags shape the timed program.
Exit codes: 0 done, 2 bad input (one 'error:' line).
"""


def add_parser(subparsers) -> None:
    """Registers `tune` and its flags."""
    parser = _common.add_command(
        subparsers,
        "tune",
        "choose learners per device by measured throughput (no training)",
        "Measure training throughput at 1, 2, ... learners per device and choose the "
        "setting by CROSSBOW's rule: add a learner while throughput grows by more than "
        "the threshold. Nothing is trained.",
        epilog=EXAMPLES,
    )
    _common.add_run_arguments(parser)
    g = parser.add_argument_group("tuning outputs")
    g.add_argument(
        "--json", metavar="PATH",
        help="write the curve and decision as JSON (default: <--output>/tuning.json with "
        "--output, else none)",
    )  # fmt: skip
    g.add_argument("--plot", metavar="PATH", help="draw the curve as a PNG (default: none)")


def run(args: argparse.Namespace) -> int:
    """Tunes; process 0 prints the table and writes the JSON and plot."""
    if args.learners_per_device != "auto":
        raise _common.UsageError("tune chooses --learners-per-device itself; leave it out")
    if args.resume or args.overwrite:
        flag = "--resume" if args.resume else "--overwrite"
        raise _common.UsageError(f"tune does not train, so there is no run to {flag}")
    config = _common.config_from_args(args)  # bad flags fail here, before anything starts
    _common.start_processes(args)  # before the user's model code may touch JAX
    model = _common.model_from_args(args)
    main_process = distributed.is_main_process()
    folder = config.checkpoint_dir
    json_path = args.json or (os.path.join(folder, "tuning.json") if folder else None)

    # The run's settings and the search's (`tune_*`); the run folder's do not apply.
    skip = {"learners_per_device", "checkpoint_dir", "checkpoint_every", "checkpoint_minutes",
            "resume", "overwrite", "progress", "tensorboard"}  # fmt: skip
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}
    data = _common.data_arguments(args)
    locked = folder and main_process  # a training run there keeps its tuning.json
    with runfolder.RunLock(folder) if locked else contextlib.nullcontext():
        tuner.tune(
            model,
            data["train"],
            data_dir=data["data_dir"],
            augment=data["augment"],
            log=(lambda line: print(line, flush=True)) if main_process else None,
            json_path=json_path if main_process else None,
            plot_path=args.plot if main_process else None,
            **fields,
        )
    if main_process:
        for what, path in (("curve", json_path), ("plot", args.plot)):
            if path:
                print(f"wrote the {what} to {path}")
    return 0
