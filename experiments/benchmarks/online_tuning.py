"""Online tuning against the same run with the tuned setting given by hand.

Command (from the repository root; about 5 minutes on a 2-core CPU, `--quick`
under a minute with a tiny LeNet on easy synthetic data)::

    python -m experiments.benchmarks.online_tuning [--quick] [--out results/benchmarks]

LeNet on real MNIST (batch 16, evaluation every 300 steps, the original
LeNet script's SMA alpha 0.1, and lr 0.01: on one CPU device the tuner keeps
1 learner, and a single learner at the demo's lr 0.05 with the default
alpha 1/k = 1, or with alpha 0.1, did not reach 99% in 5 epochs), all local
devices, to 99% test accuracy of the central model:

1. "online": `learners_per_device="auto"` (the online tuner: training starts
   at once with 1 learner per device and adds learners while throughput
   rises; `execution="auto"` measured first, as a run does);
2. "by hand": the same run with the setting the online run chose (its
   learners per device and execution) given by hand, so nothing is tuned.

Both take the same data order and seed. The figure is the time to 99% of
each run and the difference against what the online run spent compiling
its tuning settings (the extra layouts it tried) plus measuring executions:
the claim is that the online run loses no more than that.
"""

from __future__ import annotations

from typing import Any

import crossbow_jax
from experiments.benchmarks import _timing
from experiments.benchmarks.gpu_check import learnable, settings


def runs(quick: bool) -> dict[str, Any]:
    """The data and settings of both runs."""
    if quick:
        grid = settings(True)
        x, y = learnable(grid["n_train"] + 512, seed=1)
        data = {"model": grid["models"]["lenet-tiny"][0],
                "train": (x[:-512], y[:-512]), "test": (x[-512:], y[-512:])}  # fmt: skip
        return {"data": data, "options": {"target_accuracy": 0.9, "epochs": 3, "tune_max_learners": 2,
                **grid["train"]}}  # fmt: skip
    return {"data": {"model": "lenet", "train": "mnist", "test": None},
            "options": {"target_accuracy": 0.99, "epochs": 5, "batch_size": 16,
                        "learning_rate": 0.01, "eval_every": 300, "alpha": 0.1}}  # fmt: skip


def one(data: dict[str, Any], **options: Any) -> crossbow_jax.TrainResult:
    return crossbow_jax.train(data["model"], data["train"], data["test"], progress=False, **options)


def main(argv=None) -> list[dict[str, Any]]:
    args = _timing.parse_args(__doc__, argv)
    env = _timing.environment()
    setting = runs(args.quick)
    print(f"online_tuning: {env['device']}, jax {env['jax']}")
    online = one(setting["data"], learners_per_device="auto", **setting["options"])
    chosen, execution = online.learners_per_device, online.config.execution
    by_hand = one(setting["data"], learners_per_device=chosen, execution=execution,
                  **setting["options"])  # fmt: skip
    measuring = (online.executions or {}).get("seconds", 0.0)
    extra = online.tuning["compile_seconds"] + measuring
    rows = []
    for name, r in (("online", online), ("by hand", by_hand)):
        rows.append({"config": {"run": name, "learners": chosen, "execution": execution},
                     "variant": name, "time_to_accuracy": r.time_to_accuracy,
                     "wall_time": r.wall_time, "compile_time": r.compile_time,
                     "accuracy": r.accuracy, "steps": r.steps,
                     "images_per_second": r.images_per_second})  # fmt: skip
    lost = None
    if online.time_to_accuracy and by_hand.time_to_accuracy:
        lost = online.time_to_accuracy - by_hand.time_to_accuracy
    rows.append({"config": {"run": "difference"}, "variant": "difference", "lost_seconds": lost,
                 "tuning_compile_seconds": online.tuning["compile_seconds"],
                 "execution_measure_seconds": measuring, "within": lost is not None and lost <= extra,
                 "curve": online.tuning["curve"], "tuning_steps": online.tuning["tuning_steps"]})  # fmt: skip
    print(_timing.format_table(rows[:2], ["variant", "time_to_accuracy", "wall_time",
                                          "compile_time", "accuracy", "steps", "images_per_second"]))  # fmt: skip
    curve = ", ".join(
        f"m={c['learners']}: {c['images_per_second'] or 0:.0f}" for c in online.tuning["curve"]
    )
    print(f"online chose m={chosen} ({curve} img/s), execution {execution}; "
          f"lost {lost if lost is None else round(lost, 1)} s against tuning compile "
          f"{online.tuning['compile_seconds']:.1f} s + execution measurement {measuring:.1f} s")  # fmt: skip
    path = _timing.write_rows(args.out, "online_tuning", rows, env, args.quick)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
