"""One short GPU check: the figures that decide how learners run on an accelerator.

Command (from the repository root; at most about 8 minutes on one H100/H200,
`--quick` about a minute on a CPU, with tiny models and data)::

    python -m experiments.benchmarks.gpu_check [--quick] [--out results/benchmarks]
        [--budget SECONDS] [--data-dir DIR]

Writes `gpu_check.json` (rows) and `gpu_check.md` (the tables) in `--out`:

1. images/s of m = 1, 2, 4, 8, 16 learners at b = 16, 32, 64 for LeNet and
   ResNet-32 (`--quick`: a tiny LeNet only) under each execution (vmap,
   unroll, im2col), beside one learner
   at batch m*b (the bound), with MFU = XLA's flop count of the dispatch /
   time / the device's dense TF32 peak (H100/H200 SXM: 494.7 TFLOP/s; none on
   a CPU). Settings run cheapest first until 60% of `--budget` is spent; the
   rest are listed as skipped.
2. the choice of `execution="auto"` for LeNet at m=8, b=16 (every candidate
   timed by the tuner);
3. SMA against plain per-learner steps (the SMA/plain step-time ratio);
4. LeNet to 99% test accuracy on real MNIST with the online tuner
   (`learners_per_device="auto"`): its curve, choice, tuning steps and time
   to accuracy. It needs the MNIST cache in `--data-dir` or the default data
   folder (a machine without network cannot fetch it); without it the run
   uses easy synthetic MNIST-shaped data and the row says why.

Benchmarks are noisy on shared machines: quote ratios from one run, device named.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import crossbow_jax
from crossbow_jax.models import LeNet, get_model
from experiments.benchmarks import _engine, _timing, learner_efficiency

PEAK_TFLOPS = {"H100": 494.7, "H200": 494.7}  # dense TF32 tensor-core peak, SXM
EXECUTIONS = ("vmap", "unroll", "im2col")


def settings(quick: bool) -> dict[str, Any]:
    """The grid and the runs: full, or tiny for `--quick`."""
    if quick:
        return {
            "models": {"lenet-tiny": (LeNet(conv_features=(4, 8), hidden=16), (28, 28, 1))},
            "batches": (4,), "learners": (2,), "repeats": 1, "images": 64,
            "probe": (2, 4), "n_train": 768, "tune_max": 2, "accuracy": 0.8, "epochs": 3,
            "train": {"batch_size": 4, "learning_rate": 0.01, "tune_steps": 4, "tune_repeats": 1},
        }  # fmt: skip
    return {
        "models": {"lenet": (LeNet(), (28, 28, 1)), "resnet32": (get_model("resnet32"), (32, 32, 3))},
        "batches": (16, 32, 64), "learners": (1, 2, 4, 8, 16), "repeats": 3, "images": 8192,
        "probe": (8, 16), "n_train": 60000, "tune_max": 16, "accuracy": 0.99, "epochs": 10,
        "train": {"batch_size": 16, "learning_rate": 0.05, "eval_every": 300},
    }  # fmt: skip


def peak_flops() -> float | None:
    """The device's dense TF32 peak in FLOP/s, when known."""
    kind = _timing.environment()["device"]
    return next((t * 1e12 for name, t in PEAK_TFLOPS.items() if name in kind), None)


def efficiency_grid(grid: dict[str, Any], deadline: float) -> list[dict[str, Any]]:
    """Section 1: every execution beside the bound, cheapest settings first, until `deadline`."""
    rows, peak = [], peak_flops()
    order = sorted(
        (
            (name, b, m)
            for name in grid["models"]
            for b in grid["batches"]
            for m in grid["learners"]
        ),
        key=lambda s: (s[2] * s[1], list(grid["models"]).index(s[0])),
    )
    for name, b, m in order:
        if time.perf_counter() > deadline:
            rows.append({"section": "efficiency", "model": name, "batch": b, "learners": m,
                         "variant": "skipped", "config": {"model": name, "batch": b, "m": m}})  # fmt: skip
            continue
        model, shape = grid["models"][name]
        measured = learner_efficiency.measure(
            name, model, shape, grid["images"], m, b, grid["repeats"], (*EXECUTIONS, "bound")
        )
        for row in measured:
            flops = row["flops_per_image"] * row["images_per_second"]
            row.update(section="efficiency", mfu=flops / peak if peak and flops else None)
        rows += measured
        print(f"  {name} b={b} m={m}: " + ", ".join(
            f"{r['variant']} {r['images_per_second']:.0f}" for r in measured) + " img/s")  # fmt: skip
    return rows


def learnable(n: int, shape=(28, 28, 1), classes: int = 10, seed: int = 0):
    """MNIST-shaped uint8 images whose class is the row of a bright bar: easy to learn."""
    images, labels = _engine.synthetic(n, shape, classes, seed)
    images //= 4
    for c in range(classes):
        rows = slice(c * shape[0] // classes, (c + 1) * shape[0] // classes)
        images[labels == c, rows] = 255
    return images, labels


def auto_choice(grid: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Section 2: what `execution="auto"` picks for LeNet (every candidate timed)."""
    model, shape = grid["models"]["lenet-tiny" if quick else "lenet"]
    m, b = grid["probe"][0], grid["batches"][0]
    trials = {"tune_steps": 2, "tune_repeats": 1} if quick else {}
    report = _engine.measured_execution(model, _engine.synthetic(2048, shape), batch_size=b,
                                        learners_per_device=m, num_devices=1, **trials)  # fmt: skip
    return {"section": "auto", "variant": "auto", "model": "lenet", "learners": m, "batch": b,
            "chosen": report["chosen"], "candidates": report["candidates"],
            "config": {"model": "lenet", "m": m, "b": b}}  # fmt: skip


def sma_ratio(grid: dict[str, Any], quick: bool, execution: str) -> dict[str, Any]:
    """Section 3: the SMA step time over the plain per-learner step time (same program)."""
    model, shape = grid["models"]["lenet-tiny" if quick else "lenet"]
    m, b = grid["probe"][0], grid["batches"][0]
    run = _engine.engine_run(model, _engine.synthetic(2048, shape), batch_size=b,
                             learners_per_device=m, num_devices=1, execution=execution)  # fmt: skip
    steppers = {
        "sma": _engine.Stepper(run),
        "plain": _engine.Stepper(_engine.with_plain_learners(run)),
    }
    calls = max(1, grid["images"] // (m * b * steppers["sma"].length))
    variants = {k: _timing.rate(lambda s=s: s(calls), calls * s.images_per_call)
                for k, s in steppers.items()}  # fmt: skip
    samples = _timing.interleave(variants, grid["repeats"])
    ratio = _timing.median(samples["plain"]) / _timing.median(samples["sma"])
    return {"section": "sma", "variant": "ratio", "ratio": ratio, "learners": m, "batch": b,
            "execution": execution, "config": {"model": "lenet", "m": m, "b": b}}  # fmt: skip


def online(grid: dict[str, Any], quick: bool, data_dir: str | None) -> dict[str, Any]:
    """Section 4: LeNet trained to the target accuracy with the online tuner (real
    MNIST in full; easy synthetic data with `--quick`, or where MNIST is missing)."""
    options = dict(learners_per_device="auto", target_accuracy=grid["accuracy"], progress=False,
                   epochs=grid["epochs"], tune_max_learners=grid["tune_max"], **grid["train"])  # fmt: skip
    row = {"section": "online", "variant": "online", "target": grid["accuracy"]}
    try:
        if quick:
            raise crossbow_jax.ConfigError("--quick: synthetic data")
        r = crossbow_jax.train("lenet", "mnist", data_dir=data_dir, **options)
        row["config"] = {"model": "lenet", "data": "mnist"}
    except (crossbow_jax.ConfigError, crossbow_jax.data.DatasetError) as e:  # no MNIST here
        x, y = learnable(grid["n_train"] + 512, seed=1)
        model = grid["models"]["lenet-tiny" if quick else "lenet"][0]
        r = crossbow_jax.train(model, (x[:-512], y[:-512]), (x[-512:], y[-512:]), **options)
        row["config"] = {"model": "lenet", "data": "synthetic", "why": str(e)}
    t = r.tuning
    return dict(row, accuracy=r.accuracy, time_to_accuracy=r.time_to_accuracy,
                wall_time=r.wall_time, compile_time=r.compile_time, chosen=t["chosen"],
                execution=r.config.execution, steps=r.steps, curve=t["curve"],
                tuning_steps=t["tuning_steps"], tuning_compile_seconds=t["compile_seconds"])  # fmt: skip


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """The report: one table per section."""
    grid = [r for r in rows if r["section"] == "efficiency" and r["variant"] != "skipped"]
    lines = [f"# gpu_check: {env['device']}, jax {env['jax']}, {env['date']}", "",
             "| model | b | m | execution | img/s | vs bound | MFU |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in grid:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
        lines.append(f"| {r['model']} | {r['batch']} | {r['learners']} | {r['variant']} | "
                     f"{r['images_per_second']:.0f} | {r['efficiency']:.2f} | {mfu} |")  # fmt: skip
    skipped = [r for r in rows if r["variant"] == "skipped"]
    if skipped:
        lines += ["", f"Skipped for time: {len(skipped)} settings (" + ", ".join(
            f"{r['model']} b={r['batch']} m={r['learners']}" for r in skipped) + ")."]  # fmt: skip
    for r in rows:
        if r["section"] == "auto":
            lines += ["", f"execution='auto' at {r['model']} m={r['learners']} b={r['batch']}: "
                      f"{r['chosen']} (" + ", ".join(f"{c['execution']} {c['images_per_second'] or 0:.0f}"
                                                     for c in r["candidates"]) + " img/s)"]  # fmt: skip
        elif r["section"] == "sma":
            lines += ["", f"SMA / plain step time: {r['ratio']:.2f} ({r['execution']}, "
                      f"m={r['learners']}, b={r['batch']})"]  # fmt: skip
        elif r["section"] == "online":
            curve = ", ".join(
                f"m={c['learners']}: {c['images_per_second'] or 0:.0f}" for c in r["curve"]
            )
            reached = r["time_to_accuracy"]
            lines += ["", f"Online tuner ({r['config']['data']} data): chose m={r['chosen']} "
                      f"({curve} img/s; {r['tuning_steps']} tuning steps, their compile "
                      f"{r['tuning_compile_seconds']:.1f} s), {r['execution']}; accuracy "
                      f"{r['accuracy']:.4f}, time to {r['target']:.0%}: "
                      + (f"{reached:.1f} s" if reached else "not reached")
                      + f" of {r['wall_time']:.1f} s (compile {r['compile_time']:.1f} s)"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes on any device: a smoke run"
    )
    parser.add_argument("--out", default=_timing.DEFAULT_OUT, help="output folder")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check")
    parser.add_argument("--data-dir", default=None, help="where the MNIST cache is")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    grid, env = settings(args.quick), _timing.environment()
    print(f"gpu_check: {env['device']}, jax {env['jax']}")
    rows: list[dict[str, Any]] = []
    try:  # whatever was measured is written, even if a later section fails
        rows += efficiency_grid(grid, started + 0.6 * args.budget)
        rows.append(auto_choice(grid, args.quick))
        rows.append(sma_ratio(grid, args.quick, rows[-1]["chosen"]))
        rows.append(online(grid, args.quick, args.data_dir))
    finally:
        text = markdown(rows, env)
        print(text)
        path = _timing.write_rows(args.out, "gpu_check", rows, env, args.quick)
        (path.parent / path.name.replace(".json", ".md")).write_text(text)
        print(f"wrote {path} in {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
