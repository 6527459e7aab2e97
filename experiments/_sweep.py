"""The shared runner of the experiment sweeps: grid -> runs -> JSONL rows -> plot + table.

An experiment is a small module `experiments/<name>.py` whose `get_config(quick)`
returns a plain dict:

    name     the experiment's name (the JSONL file is `<out>/<name>.jsonl`)
    measure  "train" (a `crossbow_jax.train` run) or "throughput" (one timed
             trial of the auto-tuner's `run_trial`, no training)
    fixed    settings shared by every run: `TrainConfig` fields, plus `model`,
             `dataset`, `train_examples`, `test_examples`, `synthetic_like`
    grid     one dict per point; `TrainConfig`/data keys override `fixed`, any
             other key (e.g. `variant`, `k`) is a label for tables and plots,
             and `seeds` caps the seeds of that point
    seeds    seeds per point (the `--seeds` flag overrides it)
    devices  optional: simulated CPU devices the sweep needs
    reuse    optional: names of other experiments whose rows with the same
             settings and seed are copied instead of run again
    table, plots  how the rows are summarised (see `experiments._report`)

A run is identified by the hash of its full settings and seed; a row whose
key is already in the JSONL file is skipped, so a stopped sweep resumes.
Seeds are the outer loop, so a partly done sweep covers every point.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import importlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
"""Where full sweeps write by default; quick ones go to `results/quick/`."""

DATA_KEYS = ("model", "dataset", "train_examples", "test_examples", "synthetic_like")
LENET_MNIST = {
    "model": "lenet",
    "dataset": "mnist",
    "batch_size": 16,
    "learning_rate": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "central_momentum": 0.9,
}
"""Learner settings shared by the LeNet/MNIST sweeps (docs/results.md)."""

QUICK_MNIST = {
    "dataset": "synthetic",
    "synthetic_like": "mnist",
    "train_examples": 256,
    "test_examples": 64,
    "batch_size": 8,
    "steps_per_dispatch": 1,
}
"""What a `--quick` variant changes: tiny synthetic MNIST-shaped data, one step per dispatch
(on a CPU half the program of the default two unrolled steps to compile: a quick run is
mostly compiling)."""

TRIAL_KEYS = ("trial_steps", "trial_repeats")
"""Settings of a throughput trial (`measure: "throughput"`): steps per timing, timings."""


def ensure_devices(count: int) -> None:
    """Asks for `count` simulated CPU devices; must run before JAX starts its backend.

    Sets `XLA_FLAGS` for `count` simulated devices (with raised collective
    timeouts, `simulated_devices_flags`) unless a device count is already
    there, and `jax_num_cpu_devices` when JAX is imported but not yet started.
    """
    from crossbow_jax.engine.mapping import simulated_devices_flags

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = simulated_devices_flags(count, flags)
        if "jax" in sys.modules:  # imported but perhaps not started: ask it too
            with contextlib.suppress(Exception):  # started: the engine then refuses num_devices
                sys.modules["jax"].config.update("jax_num_cpu_devices", count)


def _train_fields() -> set[str]:
    from crossbow_jax.engine.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def expand(config: dict[str, Any], seeds: int | None = None) -> list[dict[str, Any]]:
    """The runs of a sweep, seed by seed: dicts with `labels`, `settings`, `seed`, `key`."""
    fields = _train_fields() | set(DATA_KEYS) | set(TRIAL_KEYS)
    total = config.get("seeds", 1) if seeds is None else seeds
    runs = []
    for seed in range(total):
        for point in config["grid"]:
            if seed >= point.get("seeds", total):
                continue
            settings = dict(config["fixed"])
            settings.update({k: v for k, v in point.items() if k in fields})
            labels = {k: v for k, v in point.items() if k not in fields and k != "seeds"}
            blob = json.dumps(
                {"measure": config["measure"], "settings": settings, "seed": seed},
                sort_keys=True,
                default=str,
            )
            key = hashlib.sha1(blob.encode()).hexdigest()[:16]
            runs.append({"labels": labels, "settings": settings, "seed": seed, "key": key})
    return runs


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file (none if it does not exist; a torn last line is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _append(path: Path, row: dict[str, Any]) -> None:
    """Appends one row; starts a new line if a killed run left a torn one."""
    torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        f.write(("\n" if torn else "") + json.dumps(row, default=str) + "\n")


def environment() -> dict[str, Any]:
    """Device, versions and date, recorded in every row."""
    import jax

    import crossbow_jax

    device = jax.devices()[0]
    return {
        "device": {
            "platform": device.platform,
            "kind": getattr(device, "device_kind", device.platform),
            "count": jax.device_count(),
            "cpu_cores": os.cpu_count(),
            "cpu_cores_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),  # fewer when the process is pinned (taskset)
            "machine": platform.machine(),
        },
        "versions": {"jax": jax.__version__, "crossbow_jax": crossbow_jax.__version__},
        "date": _now(),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def data_loader(data_dir: str | None):
    """The data arguments of `train` for a run's settings, each data set loaded once per sweep."""
    from crossbow_jax.data import training_data

    @functools.cache
    def load(name, train_examples, test_examples, like):
        return training_data(
            name,
            train_examples=train_examples,
            test_examples=test_examples,
            like=like,
            data_dir=data_dir,
        )

    def arguments(s: dict[str, Any]) -> dict[str, Any]:
        like = s.get("synthetic_like", "mnist") if s["dataset"] == "synthetic" else None
        return load(s["dataset"], s.get("train_examples"), s.get("test_examples"), like)

    return arguments


def train_figures(run: dict[str, Any], data, show=None) -> dict[str, Any]:
    """Trains one run; its figures: accuracy, epochs/time to target, images/s, curve.

    `show`, when given, is called with a short dict after every evaluation.
    """
    import crossbow_jax

    s = run["settings"]
    options = {k: v for k, v in s.items() if k not in DATA_KEYS + TRIAL_KEYS}
    options.update(seed=run["seed"], progress=False)
    if show:
        options["callback"] = lambda h: (
            "test_accuracy" in h
            and show({"epoch": h["epoch"], "test_acc": f"{h['test_accuracy']:.4f}"})
        )
    try:
        r = crossbow_jax.train(s["model"], **data(s), **options)
    except crossbow_jax.TrainingDiverged as e:
        return {"status": "diverged", "error": " ".join(str(e).split())[:300]}
    evals = [h for h in r.history if "test_accuracy" in h]
    hit = next((h for h in evals if h.get("reached_target")), None)
    return {
        "status": "ok",
        "final_accuracy": r.accuracy,
        "best_accuracy": max((h["test_accuracy"] for h in evals), default=None),
        "reached_target": hit is not None,
        "epochs_to_target": hit["epoch"] if hit else None,
        "time_to_target": r.time_to_accuracy,
        "epochs_run": r.history[-1]["epoch"] if r.history else 0.0,
        "images_per_second": r.images_per_second,
        "all_reduce_bytes": sum((r.all_reduce_bytes or {}).values()),
        "all_reduce_by_axis": r.all_reduce_bytes,
        "wall_time": r.wall_time,
        "compile_time": r.compile_time,
        "steps": r.steps,
        "curve": [[h["epoch"], h["test_accuracy"]] for h in evals],
    }


def throughput_figures(run: dict[str, Any], data, show=None) -> dict[str, Any]:
    """Times one layout (no training) with the auto-tuner's trial; images/s of all learners."""
    from crossbow_jax.engine.config import TrainConfig
    from crossbow_jax.engine.inputs import resolve
    from crossbow_jax.tuning.measure import run_trial

    s = dict(run["settings"])
    steps, repeats = s.pop("trial_steps", 10), s.pop("trial_repeats", 3)
    options = {k: v for k, v in s.items() if k not in DATA_KEYS}
    cfg = TrainConfig(
        **options, seed=run["seed"], progress=False, tune_steps=steps, tune_repeats=repeats
    )
    model, arrays, mesh = resolve(cfg, s["model"], **data(s))
    return run_trial(cfg, model, None, arrays, mesh, cfg.learners_per_device).as_row()


MEASURES = {"train": train_figures, "throughput": throughput_figures}


def run_sweep(
    config: dict[str, Any],
    out: str | os.PathLike,
    *,
    seeds: int | None = None,
    shard: tuple[int, int] = (0, 1),
    data_dir: str | None = None,
    report: bool = True,
    log=print,
) -> list[dict[str, Any]]:
    """Runs every run of `config` not yet in `<out>/<name>.jsonl`; returns this grid's rows.

    Each finished run is appended to the JSONL file at once. At the end the
    plot (`<name>.png`) and table (`<name>.md`) are drawn from the rows of
    this grid (rows of other settings in the same file are kept, not shown).
    With `shard=(i, n)` this process runs only the runs whose place in the
    grid's run list is i modulo n, so n processes can share a sweep (and one
    file: each appends whole lines).
    """
    from tqdm.auto import tqdm

    if config.get("devices"):
        ensure_devices(config["devices"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{config['name']}.jsonl"
    runs = expand(config, seeds)
    done = {r["key"] for r in read_rows(path)}
    borrowed = {}
    for other in config.get("reuse", ()):
        for row in read_rows(out / f"{other}.jsonl"):
            borrowed.setdefault(row["key"], dict(row, reused_from=other))
    index, count = shard
    todo = [r for i, r in enumerate(runs) if r["key"] not in done and i % count == index]
    log(f"{config['name']}: {len(runs)} runs, {len(runs) - len(todo)} already done -> {path}")
    data, env = data_loader(data_dir), None
    bar = tqdm(todo, desc=config["name"], unit="run", dynamic_ncols=True)
    for run in bar:
        where = {**run["labels"], "seed": run["seed"]}
        bar.set_postfix(where)
        if run["key"] in borrowed:
            row = dict(borrowed[run["key"]], labels=run["labels"], experiment=config["name"])
        else:
            env = env or environment()
            figures = MEASURES[config["measure"]](
                run, data, lambda now, where=where: bar.set_postfix({**where, **now})
            )
            row = {"experiment": config["name"], **run, **env, "figures": figures}
            row["date"] = _now()  # when this run finished
        _append(path, row)
    keys = {r["key"] for r in runs}
    rows = [r for r in read_rows(path) if r["key"] in keys]
    if report and rows:
        from experiments import _report

        for written in _report.render(config, rows, out):
            log(f"wrote {written}")
    return rows


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N, e.g. 0/2")
    return int(index), int(count)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags shared by `python -m experiments.<name>` and `crossbow-jax sweep`."""
    parser.add_argument(
        "--quick", action="store_true", help="the tiny CI variant (seconds, synthetic/sliced data)"
    )
    parser.add_argument(
        "--seeds", type=_positive, metavar="N", help="seeds per point (default: the config's)"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="where rows, plot and table go (default: experiments/results, "
        "or experiments/results/quick with --quick)",
    )
    parser.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        metavar="I/N",
        help="run only every N-th run, starting at I (N processes share a sweep; default 0/1)",
    )
    parser.add_argument("--data-dir", metavar="DIR", help="data set cache (default: the package's)")


def run_from_args(name: str, args: argparse.Namespace) -> int:
    """Loads `experiments.<name>` and runs its sweep with the parsed flags."""
    module = importlib.import_module(f"experiments.{name}")
    config = module.get_config(quick=args.quick)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    run_sweep(config, out, seeds=args.seeds, shard=args.shard, data_dir=args.data_dir)
    return 0


def main(name: str, argv: list[str] | None = None) -> int:
    """`python -m experiments.<name> [--quick] [--seeds N] [--out DIR]`."""
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}",
        description=importlib.import_module(f"experiments.{name}").__doc__.split("\n")[0],
    )
    add_arguments(parser)
    return run_from_args(name, parser.parse_args(argv))
