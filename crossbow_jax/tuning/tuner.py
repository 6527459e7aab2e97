"""The auto-tuner: the decision rule driven by real trials on the run's devices.

`tune` tunes without training (the `crossbow-jax tune` command).
`choose_learners` is what `crossbow_jax.train(..., learners_per_device="auto")`
calls after the run's clock has started, so tuning time counts in the run's
wall time and time-to-accuracy. Both read their options (`tune_strategy`,
`tune_threshold`, ...) from the run's `TrainConfig`, which validated them.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

import jax

from crossbow_jax.engine.cache import enable_compilation_cache
from crossbow_jax.engine.checks import check_run
from crossbow_jax.engine.config import ConfigError, TrainConfig, make_config
from crossbow_jax.engine.inputs import resolve
from crossbow_jax.engine.optimizers import refuse_ignored_options
from crossbow_jax.engine.programs import resolve_execution
from crossbow_jax.engine.task import Task
from crossbow_jax.tuning import report
from crossbow_jax.tuning.executions import auto_execution
from crossbow_jax.tuning.measure import run_trial
from crossbow_jax.tuning.search import Search


def search_learners(
    cfg: TrainConfig,
    model,
    optimizer,
    data,
    mesh,
    task: Task | None = None,
    *,
    log: Callable[[str], None] | None = print,
    measure: Callable[..., Any] = run_trial,
) -> dict[str, Any]:
    """Measures settings of learners per device until the rule decides.

    Args:
        cfg: the run's config: batch size, algorithm, execution, dtype, ...,
            and the search's `tune_strategy`, `tune_threshold`,
            `tune_max_learners` (also capped so that one step fits in the
            training set), `tune_steps`, `tune_repeats`, `tune_memory_limit`.
        model: a resolved Flax module.
        optimizer: the learner optimiser, or None for the config's default.
        data: resolved `Arrays` (training set only is used).
        mesh: the device mesh the run will use.
        task: the run's loss and figures (None: the default).
        log: where the table goes, line by line (None: silent).
        measure: the trial function (`run_trial`); tests substitute it.

    Returns:
        The tuning report (see `tune`).

    Raises:
        ConfigError: even 1 learner per device does not fit.
    """
    per_learner = mesh.size * cfg.batch_size
    cap = min(cfg.tune_max_learners, data.num_train // per_learner)
    if cap < 1:
        raise ConfigError(
            f"one step of 1 learner per device needs {per_learner} images ({mesh.size} devices "
            f"x batch {cfg.batch_size}) but the training set has {data.num_train}"
        )
    t0 = time.perf_counter()
    search = Search(cfg.tune_strategy, cfg.tune_threshold, cap)
    curve: list[dict[str, Any]] = []
    previous = None
    say = log or (lambda line: None)
    say(report.table_header())
    while (m := search.propose()) is not None:
        row = measure(cfg, model, optimizer, data, mesh, m, task).as_row()
        curve.append(row)
        say(report.table_row(row, previous))
        previous = row["images_per_second"] or previous
        search.record(row["images_per_second"])
    device = mesh.devices.flat[0]
    result = {
        "mode": "trials",
        "chosen": search.chosen,
        "strategy": cfg.tune_strategy,
        "threshold": cfg.tune_threshold,
        "max_learners": cap,
        "steps": cfg.tune_steps,
        "repeats": cfg.tune_repeats,
        "curve": curve,
        "seconds": time.perf_counter() - t0,
        "compile_seconds": sum(r["compile_seconds"] or 0.0 for r in curve),
        "devices": mesh.size,
        "platform": device.platform,
        "device_kind": getattr(device, "device_kind", device.platform),
        "batch_size": cfg.batch_size,
        "algorithm": cfg.algorithm,
        "execution": resolve_execution(cfg.execution, mesh),
        "memory_limit": cfg.tune_memory_limit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if search.chosen is None:
        raise ConfigError(
            f"even 1 learner per device does not fit ({curve[0]['error']}); "
            "use a smaller batch_size or a smaller model"
        )
    say(report.summary(result))
    return result


def model_name(model) -> str:
    """A model as the report names it: its registry name, or its class name."""
    return model if isinstance(model, str) else type(model).__name__


def choose_learners(
    cfg: TrainConfig,
    model,
    optimizer,
    data,
    mesh,
    task: Task | None = None,
    *,
    name: str,
    reuse: bool = False,
) -> dict[str, Any]:
    """Chooses learners per device for a training run (`learners_per_device="auto"`).

    The search runs on the run's devices, data and optimiser, and the report
    goes to `<checkpoint_dir>/tuning.json` when the run has a folder. With
    `reuse` (a resumed run whose folder holds a checkpoint), the choice
    recorded there is reused without trials, so the restored state has the
    shape it was saved with.

    Args:
        cfg: the run's config (`tune_*` fields, `checkpoint_dir`, `progress`).
        model: the resolved Flax module.
        optimizer: the learner optimiser as passed to `train`.
        data: the resolved data.
        mesh: the run's device mesh.
        task: the run's loss and figures (None: the default).
        name: the model's name in the report.
        reuse: take the choice from the run folder's `tuning.json` if it is there.

    Returns:
        The tuning report; its "chosen" entry is the setting to train with.
    """
    log = print if cfg.progress else None
    path = os.path.join(cfg.checkpoint_dir, report.JSON_FILE) if cfg.checkpoint_dir else None
    if reuse and path and os.path.exists(path):
        result = dict(report.read_json(path), reused=True)
        if log:
            log(f"reusing the tuned setting from {path}: {result['chosen']}")
        return result
    result = search_learners(cfg, model, optimizer, data, mesh, task, log=log)
    result["model"] = name
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
    loss_fn: Callable[[Any, Any], Any] | None = None,
    metrics_fn: Callable[[Any, Any], dict[str, Any]] | None = None,
    log: Callable[[str], None] | None = print,
    json_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    **config: Any,
) -> dict[str, Any]:
    """Finds the number of learners per device by measured throughput; no training.

    Args:
        model, train, test, optimizer, data_dir, augment, loss_fn, metrics_fn:
            as for `crossbow_jax.train`.
        log: where the table goes, line by line (None: silent).
        json_path: write the report there as JSON.
        plot_path: draw the curve there as PNG.
        **config: `TrainConfig` fields of the run to tune for (`batch_size`,
            `algorithm`, `num_devices`, `execution`, `dtype`, ...) and of the
            search (`tune_strategy`, `tune_threshold`, `tune_max_learners`,
            `tune_steps`, `tune_repeats`, `tune_memory_limit`).

    Returns:
        A dict: "chosen" (learners per device), "curve" (one row per trial in
        the order tried: "learners", "images_per_second" (None if failed),
        "memory_bytes", "status" ("ok", "oom", "memory"), "median_seconds",
        "compile_seconds", "steps", "error"), "strategy", "threshold",
        "max_learners" (the effective cap), "seconds" (tuning wall time),
        "compile_seconds", "devices", "platform", "device_kind", "batch_size",
        "algorithm", "execution", "memory_limit", "date", "model", and "executions"
        (with `execution="auto"`: every candidate's measured images/s and the
        choice, `crossbow_jax.tuning.executions`; else None).
    """
    refuse_ignored_options(optimizer, config)
    config.pop("learners_per_device", None)
    config.setdefault("progress", False)
    cfg = make_config(learners_per_device="auto", **config)
    enable_compilation_cache()
    module, data, mesh = resolve(cfg, model, train, test, data_dir=data_dir, augment=augment)
    task = check_run(cfg, module, optimizer, data, loss_fn=loss_fn, metrics_fn=metrics_fn)
    cfg, executions = auto_execution(cfg, module, optimizer, data, mesh, task, log=log)
    result = search_learners(cfg, module, optimizer, data, mesh, task, log=log)
    result["model"] = model_name(model)
    result["executions"] = executions
    if json_path is not None:
        report.write_json(result, json_path)
    if plot_path is not None:
        report.plot_curve(result, plot_path)
    return result
