"""Engine overhead: the training loop against its bare step, SMA against plain steps.

Command (from the repository root; about 12 minutes on a busy 2-core CPU, 8 on an idle one,
`--quick` about a minute, nearly all of it compiling, with a tiny LeNet)::

    python -m experiments.benchmarks.engine_overhead [--quick] [--out results/benchmarks]

LeNet, m=4 learners at batch b=16 on one device, MNIST-shaped synthetic uint8
data (60000 x 28 x 28 x 1) resident on the device. Every figure is images/s of
all learners: the median of samples taken in interleaved rounds in this one
process, after a warm-up; compilation is timed apart.

(a) loop: `crossbow_jax.train` (dispatch, one-late metrics, logging;
    evaluation only at the end, which the engine leaves out of its figure):
    its own `TrainResult.images_per_second`, and the wall clock over windows
    of `WINDOW` dispatches between its logged rows (robust to bursts of load).
(b) bare: the same compiled dispatch program (the platform's default steps
    per dispatch) called back to back with no host work, timed over the same
    windows. Target: loop >= 0.95 x bare.
(c) SMA against the same learners taking plain per-learner SGD steps (the
    learner optimiser `sma` wraps, vmapped, no averaging), for execution
    "unroll" and "vmap". Target: SMA step time <= 1.15 x the plain one.
(d) the steps of a dispatch as a rolled `lax.scan` (a while loop), as
    straight-line code (unrolled), and one step per call: the measurement
    behind the engine's per-platform `unroll_steps` default. "1/call" is the
    engine's own one-step dispatch, unrolled: straight-line code too.

Programs that come out identical (on CPU: bare, sma/unroll and unrolled/L=2)
are compiled and timed once and reported under each name.
"""

from __future__ import annotations

from typing import Any

import crossbow_jax
from crossbow_jax.models import LeNet
from experiments.benchmarks import _engine, _timing

SHAPE = (28, 28, 1)
WINDOW = 10  # dispatches per timed window of the loop and of the bare program
LOOP_TARGET, SMA_TARGET = 0.95, 1.15


def sizes(quick: bool) -> dict[str, Any]:
    """The benchmark's settings: full, or tiny for `--quick`."""
    if quick:
        return {"model": LeNet(conv_features=(4, 8), hidden=16), "model_name": "lenet-tiny",
                "learners": 2, "batch": 4, "n_train": 512, "n_test": 64, "steps": 2,
                "loop_steps": 24, "lengths": (2,), "repeats": 1}  # fmt: skip
    return {"model": "lenet", "model_name": "lenet", "learners": 4, "batch": 16,
            "n_train": 60000, "n_test": 1000, "steps": 16, "loop_steps": 400,
            "lengths": (2, 8), "repeats": 5}  # fmt: skip


class Loop:
    """Runs `crossbow_jax.train` once per call; returns its throughput samples.

    Each call returns one sample per window of `WINDOW` logged dispatches
    (the wall clock between logged rows, the first dispatch left out) and
    keeps the engine's own figure and compile time.
    """

    def __init__(self, size, data, test):
        self.size, self.data, self.test = size, data, test
        per_step = size["learners"] * size["batch"]
        self.epochs = size["loop_steps"] * per_step / len(data[0])
        self.reported: list[float] = []
        self.compile_seconds: list[float] = []

    def __call__(self) -> list[float]:
        rows = []
        size = self.size
        result = crossbow_jax.train(
            size["model"], self.data, self.test, batch_size=size["batch"],
            learners_per_device=size["learners"], epochs=self.epochs, num_devices=1,
            data_placement="device", progress=False, callback=rows.append,
        )  # fmt: skip
        self.reported.append(result.images_per_second)
        self.compile_seconds.append(result.compile_time)
        rows = [r for r in rows if "test_accuracy" not in r]
        per_step = size["learners"] * size["batch"]
        return [
            (b["step"] - a["step"]) * per_step / (b["time"] - a["time"])
            for a, b in zip(rows[::WINDOW], rows[WINDOW::WINDOW])
        ]


def variant_specs(lengths) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, kind, config overrides) of every engine program timed.

    kind: "sma"; "plain" (per-learner SGD, no averaging).
    """
    specs = [("bare", "sma", {})]
    for execution in ("unroll", "vmap"):
        specs += [(f"{kind}/{execution}", kind, {"execution": execution})
                  for kind in ("sma", "plain")]  # fmt: skip
    specs.append(("1/call", "sma", {"steps_per_dispatch": 1, "unroll_steps": True}))
    for length in lengths:
        for unroll in (False, True):
            name = f"{'unrolled' if unroll else 'rolled'}/L={length}"
            specs.append((name, "sma", {"steps_per_dispatch": length, "unroll_steps": unroll}))
    return specs


def build_steppers(size, data):
    """Compiled engine programs by key, and each variant name's key and settings."""
    base = {"batch_size": size["batch"], "learners_per_device": size["learners"],
            "num_devices": 1}  # fmt: skip
    steppers, names = {}, {}
    for name, kind, overrides in variant_specs(size["lengths"]):
        engine = _engine.engine_run(size["model"], data, **base, **overrides)
        setup = engine.setup
        execution = setup.compiler.spec.execution
        key = (kind, execution, setup.steps_per_dispatch, setup.unroll)
        if key not in steppers:
            engine = _engine.with_plain_learners(engine) if kind == "plain" else engine
            steppers[key] = _engine.Stepper(engine)
        names[name] = (key, {"update": kind, "execution": execution,
                             "steps_per_dispatch": setup.steps_per_dispatch,
                             "unroll_steps": setup.unroll})  # fmt: skip
    return steppers, names


def ratio_rows(ips: dict[str, float], lengths) -> list[dict[str, Any]]:
    """The figures the targets are about."""
    rows = []

    def add(name, value, target=None, met=None):
        rows.append({"ratio": name, "value": value, "target": target, "met": met})

    for loop in ("loop", "loop (engine figure)"):
        value = ips[loop] / ips["bare"]
        add(f"{loop} / bare", value, f">= {LOOP_TARGET}", value >= LOOP_TARGET)
    for execution in ("unroll", "vmap"):
        value = ips[f"plain/{execution}"] / ips[f"sma/{execution}"]  # = SMA time / plain time
        add(f"SMA / plain step time ({execution})", value, f"<= {SMA_TARGET}", value <= SMA_TARGET)
    for length in lengths:
        unrolled = ips[f"unrolled/L={length}"]
        add(f"unrolled / rolled scan (L={length})", unrolled / ips[f"rolled/L={length}"])
        add(f"unrolled L={length} / 1 step per call", unrolled / ips["1/call"])
    return rows


def main(argv=None) -> list[dict[str, Any]]:
    """Runs the benchmark, prints its tables and writes its JSON rows."""
    args = _timing.parse_args(__doc__, argv)
    size = sizes(args.quick)
    repeats = args.repeats or size["repeats"]
    env = _timing.environment()
    data = _engine.synthetic(size["n_train"], SHAPE)
    test = _engine.synthetic(size["n_test"], SHAPE, seed=1)
    steppers, names = build_steppers(size, data)
    loop = Loop(size, data, test)
    variants = {"loop": loop}
    bare_key = names["bare"][0]
    for key, stepper in steppers.items():
        if key == bare_key:  # windows of WINDOW dispatches, as long in all as a loop run
            windows = max(1, size["loop_steps"] // (WINDOW * stepper.length))
            one = _timing.rate(lambda s=stepper: s(WINDOW), WINDOW * stepper.images_per_call)
            variants[key] = lambda one=one, n=windows: [r for _ in range(n) for r in one()]
        else:
            calls = max(1, size["steps"] // stepper.length)
            variants[key] = _timing.rate(lambda s=stepper, k=calls: s(k),
                                         calls * stepper.images_per_call)  # fmt: skip
    samples = _timing.interleave(variants, repeats)

    config = {"model": size["model_name"], "learners": size["learners"],
              "batch": size["batch"], "n_train": size["n_train"]}  # fmt: skip
    rows = [
        {"variant": "loop", "config": config, "images_per_second": _timing.median(samples["loop"]),
         "spread": _timing.spread(samples["loop"]), "samples": len(samples["loop"]),
         "compile_seconds": _timing.median(loop.compile_seconds)},
        {"variant": "loop (engine figure)", "config": config,
         "images_per_second": _timing.median(loop.reported),
         "spread": _timing.spread(loop.reported), "samples": len(loop.reported)},
    ]  # fmt: skip
    for name, (key, settings) in names.items():
        rows.append({"variant": name, "config": {**config, **settings},
                     "images_per_second": _timing.median(samples[key]),
                     "spread": _timing.spread(samples[key]), "samples": len(samples[key]),
                     "compile_seconds": steppers[key].compile_seconds})  # fmt: skip
    ips = {row["variant"]: row["images_per_second"] for row in rows}
    ratios = ratio_rows(ips, size["lengths"])
    print(f"engine_overhead: {size['model_name']} m={size['learners']} b={size['batch']}, "
          f"{env['device']}, jax {env['jax']}, {repeats} rounds")  # fmt: skip
    columns = ["variant", "images_per_second", "spread", "samples", "compile_seconds"]
    print(_timing.format_table(rows, columns))
    print()
    print(_timing.format_table(ratios, ["ratio", "value", "target", "met"]))
    all_rows = rows + [{"variant": "ratio", **r} for r in ratios]
    path = _timing.write_rows(args.out, "engine_overhead", all_rows, env, args.quick)
    print(f"wrote {path}")
    return all_rows


if __name__ == "__main__":
    main()
