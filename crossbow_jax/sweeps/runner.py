"""The sweep runner: grid -> runs -> JSONL rows -> plot + table.

A run is identified by the hash of its full settings and seed; a row whose
key is already in the JSONL file is skipped, so a stopped sweep resumes.
Seeds are the outer loop, so a partly done sweep covers every point. The
config format is described in `crossbow_jax.sweeps`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from crossbow_jax.sweeps.config import (
    DATA_KEYS,
    TRIAL_KEYS,
    check_config,
    check_seeds,
    parse_shard,
    setting_keys,
)
from crossbow_jax.sweeps.report import render

DEFAULT_OUT = "sweep_results"
"""Where `sweep` writes when no `out` is given (relative to the working folder)."""


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


def expand(config: dict[str, Any], seeds: int | None = None) -> list[dict[str, Any]]:
    """The runs of a sweep, seed by seed: dicts with `labels`, `settings`, `seed`, `key`."""
    fields = setting_keys()
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

    from crossbow_jax.version import __version__

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
        "versions": {"jax": jax.__version__, "crossbow_jax": __version__},
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
    from crossbow_jax.api import train
    from crossbow_jax.engine import TrainingDiverged

    s = run["settings"]
    options = {k: v for k, v in s.items() if k not in DATA_KEYS + TRIAL_KEYS}
    options.update(seed=run["seed"], progress=False)
    if show:
        options["callback"] = lambda h: (
            "test_accuracy" in h
            and show({"epoch": h["epoch"], "test_acc": f"{h['test_accuracy']:.4f}"})
        )
    try:
        r = train(s["model"], **data(s), **options)
    except TrainingDiverged as e:
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
        "peak_bytes": sum((r.peak_bytes or {}).values()),
        "peak_by_axis": r.peak_bytes,
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
"""What one run measures, by the config's `measure` (keys: `config.MEASURE_NAMES`)."""


def sweep(
    config: dict[str, Any],
    out: str | os.PathLike = DEFAULT_OUT,
    *,
    seeds: int | None = None,
    shard: tuple[int, int] | str = (0, 1),
    data_dir: str | None = None,
    report: bool = True,
    log=print,
) -> list[dict[str, Any]]:
    """Runs every run of a sweep config not yet in `<out>/<name>.jsonl`; returns its rows.

    Each finished run is appended to the JSONL file at once. At the end the
    plot (`<name>.png`) and table (`<name>.md`) are drawn from the rows of
    this grid (rows of other settings in the same file are kept, not shown).

    Args:
        config: the sweep (see `crossbow_jax.sweeps`), checked before any run.
        out: the folder of the rows, plot and table (default `./sweep_results`).
        seeds: seeds per point, instead of the config's `seeds`.
        shard: `(i, n)` or "i/n": run only the runs whose place in the grid's
            run list is i modulo n, so n processes can share a sweep (and one
            file: each appends whole lines).
        data_dir: the data set cache (default: the package's).
        report: draw the table and plot at the end.
        log: called with each line of news (`print` by default).

    Returns:
        The rows of this grid's runs found in the file, this call's included.

    Raises:
        ConfigError: a config, `seeds` or `shard` that cannot work (before any run).
    """
    config, seeds, (index, count) = check_config(config), check_seeds(seeds), parse_shard(shard)
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
        for written in render(config, rows, out):
            log(f"wrote {written}")
    return rows
