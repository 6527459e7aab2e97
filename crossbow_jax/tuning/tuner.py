"""The auto-tuner: the decision rule driven by real trials on the run's devices.

`tune` tunes without training (the `crossbow-jax tune` command). `tune_for_run`
is what `train(..., learners_per_device="auto")` calls from inside the
engine's `Run`, after its clock has started, so tuning time counts in the
run's wall time and time-to-accuracy.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

import jax

from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.inputs import resolve_data, resolve_model
from crossbow_jax.engine.programs import resolve_execution
from crossbow_jax.tuning import report
from crossbow_jax.tuning.measure import run_trial
from crossbow_jax.tuning.search import (
    DEFAULT_MAX_LEARNERS,
    DEFAULT_STRATEGY,
    DEFAULT_THRESHOLD,
    Search,
    check_options,
)

DEFAULT_STEPS = 10
DEFAULT_REPEATS = 5

# Tuning options and the `TrainConfig` fields that may carry them.
_CONFIG_FIELDS = {
    "strategy": ("tune_strategy", DEFAULT_STRATEGY),
    "threshold": ("tune_threshold", DEFAULT_THRESHOLD),
    "max_learners": ("tune_max_learners", DEFAULT_MAX_LEARNERS),
    "steps": ("tune_steps", DEFAULT_STEPS),
    "repeats": ("tune_repeats", DEFAULT_REPEATS),
    "memory_limit": ("tune_memory_limit", None),
}


def search_learners(
    cfg: TrainConfig,
    model,
    optimizer,
    data,
    mesh,
    *,
    strategy: str = DEFAULT_STRATEGY,
    threshold: float = DEFAULT_THRESHOLD,
    max_learners: int = DEFAULT_MAX_LEARNERS,
    steps: int = DEFAULT_STEPS,
    repeats: int = DEFAULT_REPEATS,
    memory_limit: int | None = None,
    log: Callable[[str], None] | None = print,
    measure: Callable[..., Any] = run_trial,
) -> dict[str, Any]:
    """Measures settings of learners per device until the rule decides.

    Args:
        cfg: the run's config (batch size, algorithm, execution, dtype, ...).
        model: a resolved Flax module.
        optimizer: the learner optimiser, or None for the config's default.
        data: resolved `Arrays` (training set only is used).
        mesh: the device mesh the run will use.
        strategy: "linear" (default, the paper's rule) or "doubling".
        threshold: relative gain that justifies one more learner (0.1 = 10%).
        max_learners: the largest setting tried; also capped so that one
            step fits in the training set.
        steps: steps per timed dispatch.
        repeats: timed dispatches per setting (after one warm-up dispatch).
        memory_limit: bytes per device a setting may use (None: the
            device's free memory, when it reports it).
        log: where the table goes, line by line (None: silent).
        measure: the trial function (`run_trial`); tests substitute it.

    Returns:
        The tuning report (see `tune`).

    Raises:
        ConfigError: bad options, or even 1 learner per device does not fit.
    """
    try:
        check_options(strategy, threshold, max_learners)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, value in (("steps", steps), ("repeats", repeats)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"tuning {name}={value!r} must be an int >= 1")
    per_learner = mesh.size * cfg.batch_size
    cap = min(max_learners, data.num_train // per_learner)
    if cap < 1:
        raise ConfigError(
            f"one step of 1 learner per device needs {per_learner} images ({mesh.size} devices "
            f"x batch {cfg.batch_size}) but the training set has {len(data.train_x)}"
        )
    t0 = time.perf_counter()
    search = Search(strategy, threshold, cap)
    curve: list[dict[str, Any]] = []
    previous = None
    say = log or (lambda line: None)
    say(report.table_header())
    while (m := search.propose()) is not None:
        trial = measure(
            cfg, model, optimizer, data, mesh, m, steps=steps, repeats=repeats,
            memory_limit=memory_limit,
        )  # fmt: skip
        row = trial.as_row()
        curve.append(row)
        say(report.table_row(row, previous))
        previous = row["images_per_second"] or previous
        search.record(row["images_per_second"])
    device = mesh.devices.flat[0]
    result = {
        "chosen": search.chosen,
        "strategy": strategy,
        "threshold": threshold,
        "max_learners": cap,
        "steps": steps,
        "repeats": repeats,
        "curve": curve,
        "seconds": time.perf_counter() - t0,
        "compile_seconds": sum(r["compile_seconds"] or 0.0 for r in curve),
        "devices": mesh.size,
        "platform": device.platform,
        "device_kind": getattr(device, "device_kind", device.platform),
        "batch_size": cfg.batch_size,
        "algorithm": cfg.algorithm,
        "execution": resolve_execution(cfg.execution, mesh),
        "memory_limit": memory_limit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if search.chosen is None:
        raise ConfigError(
            f"even 1 learner per device does not fit ({curve[0]['error']}); "
            "use a smaller batch_size or a smaller model"
        )
    say(report.summary(result))
    return result


def _options_from_config(cfg: TrainConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """Tuning options: explicit overrides, else `TrainConfig.tune_*` fields, else defaults."""
    unknown = sorted(set(overrides) - set(_CONFIG_FIELDS) - {"log"})
    if unknown:
        raise ConfigError(f"unknown tuning option(s) {unknown}")
    options = {k: getattr(cfg, field, default) for k, (field, default) in _CONFIG_FIELDS.items()}
    options.update(overrides)
    return options


def _model_name(model) -> str:
    return model if isinstance(model, str) else type(model).__name__


def tune_for_run(run, model, optimizer, **options: Any) -> dict[str, Any]:
    """Tunes learners per device for an engine `Run` (called by `Run.__init__`).

    On a resumed run whose folder holds `tuning.json`, the recorded choice is
    reused (no trials), so the restored state has the shape it was saved with.
    Otherwise the search runs on the run's devices, data and optimiser, and
    the report goes to `<checkpoint_dir>/tuning.json` when the run has a folder.

    Args:
        run: the `crossbow_jax.engine.loop.Run` being built (uses its
            `config`, `data`, `mesh` and `checkpointer`).
        model: the model as passed to `train` (a module or a model name).
        optimizer: the learner optimiser as passed to `train`.
        **options: tuning options of `search_learners` (`strategy`,
            `threshold`, `max_learners`, `steps`, `repeats`, `memory_limit`,
            `log`); unset ones come from `TrainConfig.tune_*` fields when the
            config has them, else the defaults.

    Returns:
        The tuning report; its "chosen" entry is the setting to train with.
    """
    cfg = run.config
    options = _options_from_config(cfg, options)
    options.setdefault("log", print if cfg.progress else None)
    checkpointer = getattr(run, "checkpointer", None)
    path = os.path.join(checkpointer.directory, report.JSON_FILE) if checkpointer else None
    if cfg.resume and path and os.path.exists(path) and checkpointer.latest_step() is not None:
        result = dict(report.read_json(path), reused=True)
        if options["log"]:
            options["log"](f"reusing the tuned setting from {path}: {result['chosen']}")
        return result
    resolved = resolve_model(model, run.data.num_classes, cfg.dtype)
    result = search_learners(cfg, resolved, optimizer, run.data, run.mesh, **options)
    result["model"] = _model_name(model)
    if path and jax.process_index() == 0:
        report.write_json(result, path)
    return result


def tune(
    model: Any,
    train: Any,
    test: Any = None,
    *,
    optimizer: Any = None,
    data_dir: str | None = None,
    augment: str | None = None,
    strategy: str = DEFAULT_STRATEGY,
    threshold: float = DEFAULT_THRESHOLD,
    max_learners: int = DEFAULT_MAX_LEARNERS,
    steps: int = DEFAULT_STEPS,
    repeats: int = DEFAULT_REPEATS,
    memory_limit: int | None = None,
    log: Callable[[str], None] | None = print,
    json_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    **config: Any,
) -> dict[str, Any]:
    """Finds the number of learners per device by measured throughput; no training.

    Args:
        model, train, test, optimizer, data_dir, augment: as for
            `crossbow_jax.train`.
        strategy, threshold, max_learners, steps, repeats, memory_limit, log:
            see `search_learners`.
        json_path: write the report there as JSON.
        plot_path: draw the curve there as PNG.
        **config: `TrainConfig` fields of the run to tune for (`batch_size`,
            `algorithm`, `num_devices`, `execution`, `dtype`, ...).

    Returns:
        A dict: "chosen" (learners per device), "curve" (one row per trial in
        the order tried: "learners", "images_per_second" (None if failed),
        "memory_bytes", "status" ("ok", "oom", "memory"), "median_seconds",
        "compile_seconds", "steps", "error"), "strategy", "threshold",
        "max_learners" (the effective cap), "seconds" (tuning wall time),
        "compile_seconds", "devices", "platform", "device_kind", "batch_size",
        "algorithm", "execution", "memory_limit", "date", "model".
    """
    from crossbow_jax.engine.loop import select_devices
    from crossbow_jax.engine.mapping import make_mesh

    config.pop("learners_per_device", None)
    config.setdefault("progress", False)
    try:
        cfg = TrainConfig(learners_per_device="auto", **config)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    data = resolve_data(train, test, data_dir=data_dir, augment=augment)
    mesh = make_mesh(select_devices(cfg.num_devices))
    resolved = resolve_model(model, data.num_classes, cfg.dtype)
    result = search_learners(
        cfg, resolved, optimizer, data, mesh,
        strategy=strategy, threshold=threshold, max_learners=max_learners, steps=steps,
        repeats=repeats, memory_limit=memory_limit, log=log,
    )  # fmt: skip
    result["model"] = _model_name(model)
    if json_path is not None:
        report.write_json(result, json_path)
    if plot_path is not None:
        report.plot_curve(result, plot_path)
    return result
