"""Compile time of the test suite's programs under XLA:CPU's default options and the
suite's fast-compile flags (`tests/_engine_fixtures.FAST_COMPILE_FLAGS`, docs/design.md,
"Testing").

Command (from the repository root; about 2 minutes on an idle 2-core CPU, `--quick`
about 20 s, the tiny MLP only)::

    python -m experiments.benchmarks.suite_compile [--quick] [--out results/benchmarks]

Each flag set runs in a fresh process (XLA reads its flags once) with no
persistent compilation cache: `crossbow_jax.train` of the suite's MLP
(`tests/_engine_fixtures.MLP`, 768 blobs, 2 devices x 2 learners x batch 8,
one epoch, unroll, 2 unrolled steps a dispatch: what most engine tests run)
and, without `--quick`, of LeNet on MNIST-shaped synthetic data in the same
layout. The figure is `TrainResult.compile_time` (every program the run
compiled: initialisation, optimiser state, training and evaluation) and the
run's wall time.
"""

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

from experiments.benchmarks import _timing

ROOT = pathlib.Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
LAYOUT = {"batch_size": 8, "learners_per_device": 2, "num_devices": 2, "epochs": 1,
          "execution": "unroll", "progress": False}  # fmt: skip


def flag_sets() -> dict[str, tuple[str, ...]]:
    """The variants: XLA's defaults, the LLVM passes off, and the suite's full set."""
    sys.path.insert(0, str(TESTS))
    from _engine_fixtures import FAST_COMPILE_FLAGS

    return {"default": (), "llvm passes off": FAST_COMPILE_FLAGS[:2], "suite": FAST_COMPILE_FLAGS}


def child(models: list[str]) -> list[dict[str, Any]]:
    """In the measuring process: one training run per model, its compile and wall time."""
    sys.path.insert(0, str(TESTS))
    import crossbow_jax
    from _engine_fixtures import MLP, split
    from experiments.benchmarks._engine import synthetic

    rows = []
    for name in models:
        if name == "mlp":
            train, test = split()
            result = crossbow_jax.train(MLP(), train, test, **LAYOUT)
        else:
            images, labels = synthetic(832, (28, 28, 1))
            result = crossbow_jax.train(name, (images[:768], labels[:768]),
                                        (images[768:], labels[768:]), **LAYOUT)  # fmt: skip
        rows.append({"model": name, "compile_seconds": result.compile_time,
                     "wall_seconds": result.wall_time})  # fmt: skip
    return rows


def measure(flags: tuple[str, ...], models: list[str]) -> list[dict[str, Any]]:
    """`child` in a fresh process with `flags` and 2 simulated devices, no compilation cache."""
    from crossbow_jax.engine.mapping import simulated_devices_flags

    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(XLA_FLAGS=simulated_devices_flags(2, " ".join(flags)), JAX_PLATFORMS="cpu",
               CROSSBOW_JAX_CACHE="")  # no compilation cache of train's own either  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.suite_compile", "--child", *models],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict[str, Any]]:
    args = _timing.parse_args(__doc__, argv)
    models = ["mlp"] if args.quick else ["mlp", "lenet"]
    rows = []
    for variant, flags in flag_sets().items():
        for row in measure(flags, models):
            rows.append({"variant": variant, "flags": " ".join(flags), **row})
    default = {r["model"]: r["compile_seconds"] for r in rows if r["variant"] == "default"}
    for row in rows:
        row["compile_vs_default"] = row["compile_seconds"] / default[row["model"]]
    env = _timing.environment()
    print(f"suite_compile: {env['device']}, jax {env['jax']}")
    print(_timing.format_table(rows, ["variant", "model", "compile_seconds", "compile_vs_default",
                                      "wall_seconds"]))  # fmt: skip
    path = _timing.write_rows(args.out, "suite_compile", rows, env, args.quick)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2:])))
    else:
        main()
