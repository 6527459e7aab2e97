"""The shell front door: `crossbow-jax <command> ...` (also `python -m crossbow_jax`).

Each command is a module `crossbow_jax.cli.<name>` with `add_parser(subparsers)`
and `run(args) -> int`; commands whose module is absent are left out.

Exit codes: 0 success; 1 training diverged; 2 bad input (a one-line
`error: ...` on stderr, printed before any training); 130 interrupted.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from crossbow_jax.cli._common import HelpFormatter, Parser, UsageError

COMMANDS = ("train", "models", "data", "tune", "sweep")


def _command_modules() -> dict:
    modules = {}
    for name in COMMANDS:
        try:
            modules[name] = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the module exists but something it imports does not
    return modules


def build_parser(modules: dict | None = None) -> Parser:
    """The `crossbow-jax` parser with one subparser per available command.

    A command's subparser must be named like its module (`args.command` picks
    the module whose `run` is called).
    """
    from crossbow_jax import __version__

    parser = Parser(
        prog="crossbow-jax",
        description="CROSSBOW on JAX: many small-batch learners per device, kept together "
        "by Synchronous Model Averaging.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (_command_modules() if modules is None else modules).values():
        module.add_parser(sub)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (default: `sys.argv[1:]`), runs the command, returns the exit code.

    Bad input of any kind (flags, config values, data that cannot be had, an
    unwritable or mismatched run folder) prints one `error: ...` line to
    stderr and returns 2; a diverged run prints its message and returns 1; a run
    stopped by SIGTERM or Ctrl-C says where it saved and returns 143 or 130.
    Other exceptions propagate with their traceback.
    """
    from crossbow_jax.data import DatasetError
    from crossbow_jax.engine import CheckpointError, ConfigError, RunInterrupted, TrainingDiverged

    try:
        modules = _command_modules()
        args = build_parser(modules).parse_args(argv)
        return int(modules[args.command].run(args) or 0)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        print(f"interrupted by {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except TrainingDiverged as e:
        print(f"error: training diverged: {_one_line(e)}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, DatasetError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopped at once; a run folder keeps its latest checkpoint, and "
              "--resume continues from it", file=sys.stderr)  # fmt: skip
        return 130


__all__ = ["COMMANDS", "build_parser", "main"]
