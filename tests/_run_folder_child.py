"""The crossbow-jax command with a slow host loop, for the tests that signal,
lock or damage a run mid-way (test_run_folder.py).

Usage: python _run_folder_child.py FAULT RUN_DIR [more crossbow-jax train flags]

FAULT is what happens to the run folder's file system once it holds a
checkpoint: "none"; "readonly" (it is remounted read-only) or "full" (a file
fills it). The last two need RUN_DIR to be a tmpfs mount point this process
may remount (the test starts it under `unshare --user --mount`).
"""

import os
import signal
import subprocess
import sys
import time

import crossbow_jax
from crossbow_jax import cli

COMMAND = [
    "train", "--model", "_engine_fixtures:mnist_mlp", "--dataset", "synthetic",
    "--synthetic-like", "mnist", "--train-examples", "256", "--test-examples", "64",
    "--batch-size", "8", "--learners-per-device", "2", "--num-devices", "2", "--epochs", "4",
    "--steps-per-dispatch", "2", "--checkpoint-every", "4", "--eval-every", "8",
    "--execution", "unroll", "--no-progress", "--seed", "3",
]  # fmt: skip
"""A run of 32 steps (8 a epoch), a checkpoint every 4, one dispatch per 2 steps."""


def _injector(fault: str, folder: str):
    done = []

    def after_row(row) -> None:
        time.sleep(0.25)  # slow enough for a test to act between checkpoints
        checkpoints = os.path.join(folder, "checkpoints")
        if done or fault == "none" or not os.path.isdir(checkpoints):
            return
        if not any(name.isdigit() for name in os.listdir(checkpoints)):
            return
        done.append(fault)
        if fault == "readonly":
            subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
        else:  # full: one file takes what is left
            with open(os.path.join(folder, "filler"), "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                        f.flush()
                except OSError:
                    pass
        print(f"fault injected: {fault}", file=sys.stderr, flush=True)

    return after_row


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the parent ignores it
    fault, folder, more = sys.argv[1], sys.argv[2], sys.argv[3:]
    real = crossbow_jax.train

    def slow_train(*args, **kwargs):
        return real(*args, callback=_injector(fault, folder), **kwargs)

    crossbow_jax.train = slow_train  # the command calls crossbow_jax.train
    sys.exit(cli.main([*COMMAND, "--output", folder, *more]))
