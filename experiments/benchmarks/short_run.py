"""A short run's fixed costs: `execution="auto"` against the execution pinned, with cold
and warm caches (docs/performance.md, "Fixed costs of a short run").

Command (from the repository root; about 4 minutes on a 2-core CPU, `--quick` about
1 minute with a smaller run)::

    python -m experiments.benchmarks.short_run [--quick] [--out results/benchmarks]

One short training run (LeNet on MNIST, 1 device, 4 learners at batch 16: 300
steps of 64 images; `--quick`: the tests' MLP on 768 blobs, 96 steps), each
in a fresh process with XLA's default options:

- "pinned, cold": `execution` pinned to the CPU's default (unroll), with an
  empty cache folder (`CROSSBOW_JAX_CACHE`: no execution decision and no
  compiled programs);
- "auto, cold": `execution="auto"` (the default), with another empty cache
  folder: the choice is made on the run's own steps;
- "auto, warm": the same run again, in the folder the previous run filled
  (its compiled programs; an execution decision, if it measured every candidate);
- without `--quick`, "trials, cold": the choice as it was made before training
  runs started measuring it (`crossbow_jax.tuning.executions.auto_execution`: a
  trial of every candidate, then the run with the chosen execution), as the
  reference the online choice replaces.

The figures are the run's wall time as the caller sees it (`train()` called to
returned, data loading included), its `compile_time`, the programs loaded from
the compilation cache, and the execution choice's cost; the ratios are to
"pinned, cold". One process at a time: the ratios come from one run of each.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

from experiments.benchmarks import _timing

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUN = {"batch_size": 16, "learners_per_device": 4, "num_devices": 1, "progress": False}
STEPS = {"lenet": 300, "mlp": 96}


def child(model: str, variant: str) -> dict[str, Any]:
    """In the measuring process: one run, timed from the call of `train` to its return."""
    import crossbow_jax

    if model == "lenet":
        train, test, name, examples = "mnist", None, "lenet", 60_000
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from _engine_fixtures import MLP, split

        (train, test), name, examples = split(), MLP(), 768
    images = STEPS[model] * RUN["batch_size"] * RUN["learners_per_device"]
    options = dict(RUN, epochs=images / examples, eval_every=STEPS[model])
    start = time.perf_counter()
    if variant == "trials":
        options["execution"] = _trial_choice(name, train, test, options)
    elif variant == "pinned":
        options["execution"] = "unroll"
    result = crossbow_jax.train(name, train, test, **options)
    wall = time.perf_counter() - start
    e = result.executions or {}
    return {"wall_seconds": wall, "compile_seconds": result.compile_time,
            "programs": result.programs[0], "cached_programs": result.programs[1],
            "choice_seconds": e.get("seconds", 0.0), "setup_seconds": result.setup_time,
            "execution": result.config.execution, "steps": result.steps,
            "accuracy": result.accuracy}  # fmt: skip


def _trial_choice(name, train, test, options) -> str:
    """The execution chosen by trials before training (the choice before this one)."""
    from crossbow_jax.engine.checks import check_run
    from crossbow_jax.engine.config import make_config
    from crossbow_jax.engine.inputs import resolve
    from crossbow_jax.tuning.executions import auto_execution

    config = make_config(**options)
    model, data, mesh = resolve(config, name, train, test)
    task = check_run(config, model, None, data)
    return auto_execution(config, model, None, data, mesh, task, log=None)[0].execution


def measure(model: str, variant: str, cache: str) -> dict[str, Any]:
    """`child` in a fresh process with `cache` as its cache folder and XLA's defaults."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "XLA_FLAGS"))}  # fmt: skip
    env.update(CROSSBOW_JAX_CACHE=cache, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.short_run", "--child", model, variant],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict[str, Any]]:
    args = _timing.parse_args(__doc__, argv)
    model = "mlp" if args.quick else "lenet"
    rows = []
    with tempfile.TemporaryDirectory(prefix="short_run-") as folder:
        plan = [("pinned, cold", "pinned", "pinned"), ("auto, cold", "auto", "auto"),
                ("auto, warm", "auto", "auto")]  # fmt: skip
        if not args.quick:
            plan.append(("trials, cold", "trials", "trials"))
        for label, variant, cache in plan:
            row = measure(model, variant, os.path.join(folder, cache))
            rows.append({"variant": label, "model": model, **row})
    pinned = rows[0]
    for row in rows:
        row["wall_vs_pinned"] = row["wall_seconds"] / pinned["wall_seconds"]
        row["compile_vs_pinned"] = row["compile_seconds"] / pinned["compile_seconds"]
    env = _timing.environment()
    print(f"short_run: {env['device']}, jax {env['jax']}, {model}, {pinned['steps']} steps")
    print(_timing.format_table(rows, ["variant", "execution", "wall_seconds", "wall_vs_pinned",
                                      "compile_seconds", "compile_vs_pinned", "cached_programs",
                                      "programs", "choice_seconds"]))  # fmt: skip
    path = _timing.write_rows(args.out, "short_run", rows, env, args.quick)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(*sys.argv[2:4])))
    else:
        main()
