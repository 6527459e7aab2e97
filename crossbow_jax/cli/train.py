"""`crossbow-jax train`: one training run from the shell, through `crossbow_jax.train`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from typing import Any

from crossbow_jax.cli import _common
from crossbow_jax.engine import distributed, runfolder
from crossbow_jax.engine.runfolder import check_writable

EXAMPLES = """\
examples:
  crossbow-jax train --model lenet --dataset mnist --batch-size 16 \\
      --learners-per-device 4 --algorithm sma --epochs 5 --target-accuracy 0.99
  crossbow-jax train --model resnet32 --dataset cifar10 --learners-per-device 2 \\
      --lr-milestones 80 120 --epochs 140 --output runs/r32 --checkpoint-every 1000
  crossbow-jax train ... --output runs/r32 --resume      # same flags: continue the run

The last line printed is the result: the central model's test accuracy,
images/s, wall time, the fixed costs (compile time and the programs loaded from the
compilation cache, setup, how the execution was chosen) and time to --target-accuracy.
Exit codes: 0 done, 1 training diverged, 2 bad input or a run folder that cannot
be used (one 'error:' line), 143 SIGTERM and 130 Ctrl-C (the step reached is saved
in --output first; a second Ctrl-C stops at once).
"""

RESULT_FILE = "result.json"
HISTORY_FILE = "history.json"


def add_parser(subparsers) -> None:
    """Registers `train` and its flags."""
    parser = _common.add_command(
        subparsers,
        "train",
        "train a model with many small-batch learners per device",
        "Train a model with many small-batch learners per device, kept together by "
        "Synchronous Model Averaging (or the SSGD baseline).",
        epilog=EXAMPLES,
    )
    _common.add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Trains; process 0 prints the result line and writes the run folder's files."""
    config = _common.config_from_args(args)  # bad flags fail here, before anything starts
    _common.start_processes(args)  # before the user's model code may touch JAX
    model = _common.model_from_args(args)
    main_process = distributed.is_main_process()
    if not main_process:
        config = config.replace(progress=False)
    elif config.checkpoint_dir:
        check_writable(config.checkpoint_dir)

    import crossbow_jax

    folder = config.checkpoint_dir if main_process else None
    with (
        runfolder.RunLock(folder) if folder else contextlib.nullcontext()
    ):  # until result.json is out
        result = crossbow_jax.train(
            model, **_common.data_arguments(args), **dataclasses.asdict(config)
        )
        if folder:
            write_run_files(folder, result, model=args.model, dataset=args.dataset)
    if main_process:
        print(result_line(result), flush=True)
    return 0


def summary(result, **extra: Any) -> dict[str, Any]:
    """`result.json`: the run's outcome and config (no parameters, no history)."""
    import jax

    fields = (
        "accuracy",
        "time_to_accuracy",
        "images_per_second",
        "wall_time",
        "compile_time",
        "programs",
        "setup_time",
        "steps",
        "learners_per_device",
        "devices",
        "tuning",
        "executions",
        "all_reduce_bytes",
        "peak_bytes",
    )
    out = dict(extra, **{name: getattr(result, name) for name in fields})
    out["processes"] = jax.process_count()
    out["config"] = dataclasses.asdict(result.config)
    return out


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


def write_run_files(folder: str, result, **extra: Any) -> None:
    """Writes `history.json` and `result.json` into the run folder."""
    runfolder.write_json(os.path.join(folder, HISTORY_FILE), result.history, default=_plain)
    runfolder.write_json(
        os.path.join(folder, RESULT_FILE), summary(result, **extra), default=_plain
    )


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def result_line(result) -> str:
    """The one line a run ends with."""
    cfg = result.config
    parts = [
        "no test set"
        if result.accuracy is None
        else f"test accuracy {result.accuracy:.4f} (central model)",
        f"{result.images_per_second:,.0f} images/s",
        f"wall {result.wall_time:.1f} s",
    ]
    if cfg.target_accuracy is not None:
        tta = result.time_to_accuracy
        parts.append(
            f"target {cfg.target_accuracy:g} not reached"
            if tta is None
            else f"time to {cfg.target_accuracy:g}: {tta:.1f} s"
        )
    m, b = result.learners_per_device, cfg.batch_size
    chosen = " (auto)" if cfg.learners_per_device == "auto" else ""
    learners = f"{m} learner{'s' if m != 1 else ''}{chosen}"
    layout = f"batch {m} x {b}{chosen}" if cfg.algorithm == "ssgd" else f"{learners} x batch {b}"
    devices = f"{result.devices} device{'s' if result.devices != 1 else ''}"
    algorithm = cfg.algorithm + (f" every {cfg.sync_every}" if cfg.sync_every else "")
    parts.append(f"{algorithm}, {devices} x {layout}, {result.steps} steps")
    if result.all_reduce_bytes:
        peak = result.peak_bytes or {}
        split = ", ".join(
            f"{_bytes(v)} {k}" + (f" (mean; peak {_bytes(peak[k])})" if peak.get(k, v) != v else "")
            for k, v in sorted(result.all_reduce_bytes.items())
        )
        parts.append(f"collectives per step: {split}")
    costs = result.fixed_costs()  # compile (cached programs), setup; the execution's choice
    return "result: " + " | ".join(parts[:3] + costs[:-1] + parts[3:] + costs[-1:])
