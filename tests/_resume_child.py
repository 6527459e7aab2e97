"""A training run that a test kills mid-way (see test_engine_reliability.py).

Usage: python _resume_child.py RUN_DIR
"""

import sys
import time

import crossbow_jax
from _engine_fixtures import MLP, split

RESUME_KW = {
    "batch_size": 8,
    "learners_per_device": 2,
    "epochs": 4,
    "num_devices": 2,
    "steps_per_dispatch": 4,
    "checkpoint_every": 8,
    "eval_every": 12,
    "progress": False,
    "seed": 3,
    "execution": "unroll",  # fixed: the run it is compared with must take the same one
}

if __name__ == "__main__":
    train, test = split()
    # Slow the host loop down so the parent can kill us between checkpoints.
    crossbow_jax.train(
        MLP(),
        train,
        test,
        checkpoint_dir=sys.argv[1],
        callback=lambda row: time.sleep(0.3),
        **RESUME_KW,
    )
