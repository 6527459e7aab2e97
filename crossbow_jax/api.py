"""`train`, the notebook front door: settings checked, inputs resolved, learners
chosen (the tuner, for "auto"), then the engine's loop (`crossbow_jax.engine.fit`)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import jax

from crossbow_jax.engine import TrainResult, fit, preemption
from crossbow_jax.engine.algorithms import warn_outer_momentum
from crossbow_jax.engine.cache import enable_compilation_cache
from crossbow_jax.engine.checkpoint import Checkpointer
from crossbow_jax.engine.checks import check_run
from crossbow_jax.engine.config import make_config
from crossbow_jax.engine.inputs import resolve
from crossbow_jax.engine.optimizers import refuse_ignored_options
from crossbow_jax.models import get_spec
from crossbow_jax.tuning import choose_learners, report
from crossbow_jax.tuning.choice import OnlineExecutions
from crossbow_jax.tuning.online import OnlineTuner


def train(
    model: Any,
    train: Any,
    test: Any = None,
    *,
    optimizer: Any = None,
    batch_size: int = 16,
    learners_per_device: int | str = 4,
    algorithm: str = "sma",
    epochs: float = 5,
    seed: int = 0,
    target_accuracy: float | None = None,
    data_dir: str | None = None,
    augment: str | None = None,
    transform: Callable[..., Any] | None = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    metrics_fn: Callable[[Any, Any], dict[str, Any]] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> TrainResult:
    """Trains `model` with many small-batch learners per device.

    Args:
        model: a model name (`crossbow_jax.models.model_names()`); a Flax Linen
            module (its mode keyword: `train`, `training`, `is_training` or
            `deterministic`, or the one named by `mode_keyword=`); a Flax NNX
            module (initialised; every learner starts from its parameters); or
            a pair `(apply_fn, params)` with `apply_fn(params, x) -> outputs`.
        train: a pair `(inputs, labels)` of NumPy arrays (NHWC images, (N,
            features) or any (N, ...) array; labels of any shape and dtype with
            `loss_fn=`, integer class labels for the default loss); a dataset
            name (`crossbow_jax.data.dataset_names()`); or a random-access source
            (`__len__` and `__getitem__`: a `grain.MapDataset`, a grain data source,
            a Hugging Face `datasets.Dataset`, ...) of `(input, label)` or
            `{"image": ..., "label": ...}` records, placed on the devices whole when
            small or streamed through grain (docs/data.md).
        test: a pair or a source like `train`, or None (a named dataset brings its own).
        optimizer: the learner optimiser (any optax transformation; not
            `sma`/`ssgd`: the engine wraps it). None builds SGD with
            `learning_rate`, `momentum`, `weight_decay` and the epoch-based
            schedule of the config; with an `optimizer`, those settings are refused.
        batch_size, learners_per_device, algorithm, epochs, seed, target_accuracy:
            see `TrainConfig`.
        data_dir: where named datasets are looked for and cached.
        augment: "crop_flip" for user arrays that want CIFAR-style augmentation.
        transform: for a source: `record -> record` in training and evaluation, or
            `(record, rng) -> record` (random: a NumPy Generator in training, None in
            evaluation), run where the records are read.
        loss_fn: `(outputs, labels) -> per-example loss` (shape (batch,)); None:
            softmax cross-entropy on integer labels, with accuracy reported.
        metrics_fn: `(outputs, labels) -> {name: per-example values}`, reported
            in the history (training and test) besides the loss.
        callback: called once with every history row.
        **options: any other `TrainConfig` field (e.g. `eval_every`, `mapper`,
            `checkpoint_dir`, `resume`, `lr_milestones`, `alpha`).

    Returns:
        A `TrainResult`.

    Raises:
        ConfigError: bad settings, model, data or optimiser, or a run folder that
            holds another run or is in use, before any training.
        TrainingDiverged: the loss became NaN/Inf or rose above divergence_factor x its
            start (the last good checkpoint stays).
        RunInterrupted: SIGTERM or SIGINT (the first Ctrl-C) came; the dispatch in
            flight finished and, with `checkpoint_dir`, its step was saved
            (`.step`, `.folder`); resume=True continues from there.
        CheckpointError: a checkpoint could not be written (no space, read-only:
            the cause is named); the previous checkpoints stay.
    """
    refuse_ignored_options(optimizer, options)
    config = make_config(
        batch_size=batch_size,
        learners_per_device=learners_per_device,
        algorithm=algorithm,
        epochs=epochs,
        seed=seed,
        target_accuracy=target_accuracy,
        **options,
    )
    if optimizer is None:
        warn_outer_momentum(config)
    if isinstance(model, str):  # a bad name fails before the data is loaded
        get_spec(model)
    enable_compilation_cache()  # before anything compiles (docs/usage.md, "Caches")
    checkpointer = Checkpointer(config.checkpoint_dir, config) if config.checkpoint_dir else None
    with checkpointer or contextlib.nullcontext(), preemption.Signals() as signals:
        module, data, mesh = resolve(config, model, train, test, data_dir=data_dir, augment=augment,
                                    transform=transform)  # fmt: skip
        folder = checkpointer.directory if checkpointer else None
        resumed = checkpointer.latest_step() if checkpointer and config.resume else None
        preemption.stop_if_signalled(signals, resumed, folder)  # (and after each phase below)
        task = check_run(config, module, optimizer, data, loss_fn=loss_fn, metrics_fn=metrics_fn)
        started = time.perf_counter()
        name = model if isinstance(model, str) else module.name
        m, tuning, tuner = config.learners_per_device, None, None
        log = print if config.progress and jax.process_index() == 0 else None
        resuming = resumed is not None
        if resuming and not config.elastic:  # the run goes on as it was measured and tuned
            saved = checkpointer.latest_record()["run"]
            if config.execution == "auto":  # the execution it ran (its choice, once made)
                config = config.replace(execution=saved["config"]["execution"])
            if m == "auto":
                config = config.replace(tune_mode=(saved.get("tuning") or {}).get("mode", "trials"))
        chooser = None  # "auto": measured on the run's own steps, or read from the cache
        if config.execution == "auto":
            chooser = OnlineExecutions(config, module, data, mesh, log=log)
        if m == "auto" and config.tune_mode == "online":
            device = mesh.devices.flat[0]
            tuner = OnlineTuner(
                config, mesh.size, data.num_train, platform=device.platform,
                device_kind=getattr(device, "device_kind", ""), model=name, log=log,
            )  # fmt: skip
            m = 1
        elif m == "auto":
            tuning = choose_learners(config, module, optimizer, data, mesh, task, name=name,
                                     reuse=resuming and not config.elastic)  # fmt: skip
            m = tuning["chosen"]
            preemption.stop_if_signalled(signals, resumed, folder)
        result = fit(
            config,
            module,
            optimizer,
            data,
            mesh,
            m,
            task=task,
            checkpointer=checkpointer,
            callback=callback,
            tuning=tuning,
            started=started,
            tuner=tuner,
            signals=signals,
            chooser=chooser,
        )
        if tuner and config.checkpoint_dir and jax.process_index() == 0:
            report.write_json(result.tuning, os.path.join(config.checkpoint_dir, report.JSON_FILE))
        return result
