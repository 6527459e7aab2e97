"""`make demo`: real MNIST, LeNet, SMA with several learners on every local device.

Run with `python -m crossbow_jax.demo`. It fetches and verifies the genuine
MNIST on first use (cached afterwards), trains with 4 learners per device at
batch 16 until the central model z reaches 99% test accuracy or 3 epochs
pass, and ends with one line: z's test accuracy, images/s, wall time.
"""

from __future__ import annotations

import sys
import time

import jax

from crossbow_jax import data, train

DEMO = {
    "batch_size": 16,
    "learners_per_device": 4,
    "algorithm": "sma",
    "epochs": 5,
    "learning_rate": 0.05,
    "eval_every": 300,
    "target_accuracy": 0.99,
}


def main() -> int:
    start = time.perf_counter()
    print(f"crossbow_jax demo: {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"{DEMO['learners_per_device']} learners each, batch {DEMO['batch_size']} per learner")
    print(f"MNIST: {data.prepare('mnist')}")
    result = train("lenet", "mnist", **DEMO)
    wall = time.perf_counter() - start
    print(f"result: central model test accuracy {result.accuracy:.2%} | "
          f"{result.images_per_second:,.0f} images/s | wall time {wall:.0f} s "
          f"({result.steps} steps, {result.devices} device(s) x {result.learners_per_device} "
          f"learners) | {' | '.join(result.fixed_costs())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
