"""How far good runs stay from the divergence rule, and how soon bad runs cross it.

The rule (`TrainConfig.divergence_factor`, docs/usage.md, "Divergence"): a
history row whose mean training loss is over F x max(the first step's loss,
ln(classes)) raises `TrainingDiverged`. This script trains LeNet on the first
12,000 MNIST training images (2,000 test images) with the engine's defaults
(SMA, 4 learners, batch 16, SGD 0.05 with momentum 0.9), with adam(1e-3), and
with SSGD, and reports each row's ratio loss / max(start, ln 10): the worst is
how near a good run comes to F. Then the two blow-ups of issue 21, adam(1e4)
and alpha=1.5 with 2 learners and adam(1e-3), run with the rule on: the step
and row at which they stop.

Command (from the repository root; a few minutes on a 2-core CPU; `--quick`:
the tiny MLP of the tests on Gaussian blobs, seconds)::

    python -m experiments.benchmarks.divergence_margin [--quick] [--out results/benchmarks]
"""

from __future__ import annotations

import math
import pathlib
import sys
import tempfile
from typing import Any

import optax

import crossbow_jax
from crossbow_jax.data import training_data
from crossbow_jax.engine.checkpoint import read_record
from experiments.benchmarks import _timing

GOOD = {
    "sma defaults (SGD 0.05, momentum 0.9)": {},
    "sma, adam(1e-3)": {"optimizer": optax.adam(1e-3)},
    "ssgd defaults": {"algorithm": "ssgd"},
}
BAD = {
    "adam(1e4)": {"optimizer": optax.adam(1e4)},
    "alpha=1.5, 2 learners, adam(1e-3)": {
        "optimizer": optax.adam(1e-3), "alpha": 1.5, "learners_per_device": 2,
    },
}  # fmt: skip


def data(quick: bool) -> tuple[Any, dict[str, Any], int]:
    """The model, the data arguments and the number of classes."""
    if quick:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
        from _engine_fixtures import MLP, split

        train, test = split()
        return MLP(), {"train": train, "test": test}, 4
    ds = training_data("mnist", train_examples=12000, test_examples=2000)
    return "lenet", {"train": ds["train"], "test": ds["test"]}, 10


def run(model, arrays, classes: int, epochs: float, options: dict[str, Any]) -> dict[str, Any]:
    """One run with a run folder (where the first step's loss is recorded); its rows' worst
    ratio to the rule's reference, or where it diverged."""
    settings = {"execution": "unroll", "progress": False, "epochs": epochs, **options}
    with tempfile.TemporaryDirectory() as folder:
        try:
            result = crossbow_jax.train(model, **arrays, checkpoint_dir=folder, **settings)
        except crossbow_jax.TrainingDiverged as e:
            return {"diverged": str(e)}
        start = read_record(folder)["start_loss"]
    reference = max(start, math.log(classes))
    ratios = [row["loss"] / reference for row in result.history]
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    return {"start_loss": start, "reference": reference, "worst_ratio": ratios[worst],
            "worst_at_step": result.history[worst]["step"], "rows": len(ratios),
            "last_loss": result.history[-1]["loss"], "accuracy": result.accuracy}  # fmt: skip


def main(argv=None) -> list[dict[str, Any]]:
    args = _timing.parse_args(__doc__, argv)
    model, arrays, classes = data(args.quick)
    rows = []
    for kind, runs, epochs in (("good", GOOD, 2), ("bad", BAD, 1)):
        for name, options in runs.items():
            row = {"kind": kind, "run": name, **run(model, arrays, classes, epochs, options)}
            print(row, flush=True)
            rows.append(row)
    env = _timing.environment()
    print(f"divergence_margin: {env['device']}, jax {env['jax']}")
    path = _timing.write_rows(args.out, "divergence_margin", rows, env, args.quick)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
