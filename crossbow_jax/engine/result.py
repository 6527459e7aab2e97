"""What a run gives back: `TrainResult` (with `predict`), and `load_run` for a run folder."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np

from crossbow_jax.data.preprocess import Preprocess
from crossbow_jax.engine.checkpoint import read_central, read_record
from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.identity import check_same_model
from crossbow_jax.engine.inputs import Arrays, as_model_layout, resolve_model
from crossbow_jax.models.adapters import Model

PREDICT_BATCH = 1024


@dataclasses.dataclass(repr=False)
class TrainResult:
    """What `train` returns (and `load_run` reads back from a run folder).

    Attributes:
        params: the central model z, in the model's own form: Linen
            `{"params": ..., "batch_stats": ...}` (`model.apply(params, x)`);
            NNX an `nnx.State` (`nnx.update(model, params)`); for
            `(apply_fn, params)` the parameters (`apply_fn(params, x)`). These
            take model inputs: apply `preprocess` to raw inputs first, or use
            `predict`.
        accuracy: the last test accuracy of z (None without a test set or for
            a task other than classification).
        test_loss: the last test loss of z (None without a test set).
        history: one dict per logged interval (step, epoch, loss, accuracy,
            the user's metrics, images_per_second, time, learners_per_device,
            all_reduce_bytes, peak_bytes, and learning_rate with the default optimiser;
            test_loss, test_accuracy and test_<metric> at evaluations;
            docs/usage.md, "Metrics").
        time_to_accuracy: seconds from the start of the run (tuning and
            compilation included) until z first reached `target_accuracy`.
        images_per_second: training images per second of all learners,
            compilation, evaluation and checkpoints excluded.
        wall_time: seconds for the whole run, data loading excluded.
        compile_time: seconds spent compiling, reported apart.
        programs: (programs compiled, of which loaded from JAX's persistent
            compilation cache: `crossbow_jax.engine.cache`).
        setup_time: seconds before the first step besides compiling: the data
            placed on the devices, the initial (or restored) state.
        steps: steps taken in all (including before a resume).
        learners_per_device, devices: the layout that ran.
        config: the `TrainConfig` of the run.
        tuning: the auto-tuner's report when `learners_per_device="auto"`
            (chosen setting and throughput curve, docs/tuning.md), else None.
        executions: with `execution="auto"`, how the execution was chosen on the
            run's own steps: every measured candidate's images/s, the choice, what
            measuring cost ("seconds"), or the cached decision
            (`crossbow_jax.tuning.choice`); else None.
        all_reduce_bytes: bytes one device sends in collectives per training
            step, averaged over the run's steps, by mesh axis: "devices" (with
            hosts: "devices" inside a host, "hosts" across them, "hosts,devices"
            over all). Every collective counts (all-reduces, all-gathers,
            reduce-scatters, permutes, all-to-alls), each as its ring algorithm
            sends it over the axis's D devices (an all-reduce of n bytes:
            2 (D - 1) / D n; one device: 0). Read from the compiled step
            (`crossbow_jax.engine.traffic`); sync steps weigh by how many of the
            run's steps synchronised (each fragment apart).
        peak_bytes: the most bytes one device sends in collectives in any one
            step of the run, by mesh axis (each axis's busiest step: a sync
            step when the run synchronised at all).
        preprocess: how the engine turns raw inputs (as passed to `train`)
            into model inputs: `preprocess(x, None)` (scale, normalise; no
            augmentation without a key).
    """

    params: Any
    accuracy: float | None
    history: list[dict[str, Any]]
    time_to_accuracy: float | None
    images_per_second: float
    wall_time: float
    compile_time: float
    steps: int
    learners_per_device: int
    devices: int
    config: TrainConfig
    tuning: dict[str, Any] | None = None
    test_loss: float | None = None
    preprocess: Preprocess | None = None
    model: Model | None = dataclasses.field(default=None, compare=False)
    central: tuple[Any, Any] | None = dataclasses.field(default=None, compare=False)
    input_shape: tuple[int, ...] | None = None  # one training input, for `predict`
    executions: dict[str, Any] | None = None
    all_reduce_bytes: dict[str, float] | None = None
    peak_bytes: dict[str, float] | None = None
    programs: tuple[int, int] | None = None
    setup_time: float | None = None

    def predict(self, x, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """The central model's outputs on raw inputs like the training data.

        Applies `preprocess` (no augmentation) and z in evaluation mode, in
        batches of `batch_size`, on the first device.

        Args:
            x: (N, ...) inputs as passed to `train` ((N, H, W) uint8 images get
                their channel axis, as in training).
            batch_size: examples per call.

        Returns:
            (N, ...) outputs as NumPy (logits for a classifier).
        """
        if self.model is None or self.central is None:
            raise ConfigError(
                "this result has no model to predict with; for a run folder of your own "
                "model, pass it: load_run(folder, model=...)"
            )
        x = as_model_layout(np.asarray(x))  # (N, H, W) uint8 images get a channel, as in train
        if self.input_shape is not None and x.shape[1:] != tuple(self.input_shape):
            raise ConfigError(
                f"predict takes inputs like the training inputs, (N, "
                f"{', '.join(map(str, self.input_shape))}); got shape {x.shape}"
            )
        params, state = jax.device_put(self.central)  # placed once, used by every batch
        fn = _predictor(self.model, self.preprocess)
        out = [np.asarray(fn(params, state, x[i : i + batch_size]))
               for i in range(0, len(x), batch_size)]  # fmt: skip
        return np.concatenate(out) if out else np.zeros((0,))

    def __repr__(self) -> str:
        cfg = self.config
        first = (
            f"central model: test accuracy {self.accuracy:.4f}"
            if self.accuracy is not None
            else "central model: no test accuracy"
        )
        if self.test_loss is not None:
            first += f", test loss {self.test_loss:.4g}"
        m, b = self.learners_per_device, cfg.batch_size
        layout = f"batch {m} x {b}" if cfg.algorithm == "ssgd" else f"{m} learner(s) at batch {b}"
        return (
            f"TrainResult({first}\n"
            f"  {self.steps} steps, {cfg.algorithm}, {self.devices} device(s) x {layout}\n"
            f"  {self.images_per_second:,.0f} images/s, wall {self.wall_time:.1f} s\n"
            f"  {', '.join(self.fixed_costs())})"
        )

    def fixed_costs(self) -> list[str]:
        """The run's fixed costs, as the result line prints them: compilation (with the
        programs loaded from the persistent cache), setup, and how the execution was chosen
        (with what measuring it on the run's steps cost)."""
        compiled = f"compile {self.compile_time:.1f} s"
        if self.programs:
            compiled += f" ({self.programs[1]} of {self.programs[0]} programs cached)"
        parts = [compiled] + ([f"setup {self.setup_time:.1f} s"] if self.setup_time else [])
        e, how = self.executions, ""
        if e and e.get("cached"):
            how = " (cached choice)"
        elif e and len(e.get("candidates") or ()) > 1:
            how = f" (chosen of {len(e['candidates'])} on the run's steps: {e['seconds']:.1f} s)"
        elif e and e.get("mode") == "online":  # the default ran: too short to measure others
            how = " (default: the run was too short to measure others)"
        elif e:
            how = " (measured)"
        return parts + [f"execution {self.config.execution}{how}"]


@functools.lru_cache(maxsize=8)
def _predictor(model: Model, preprocess: Preprocess | None):
    """The jitted outputs of `model` on raw inputs (compiled once per model and input shape)."""

    def outputs(params, state, x):
        x = preprocess(x, None) if preprocess is not None else x
        return model.apply(params, state, x, train=False)[0]

    return jax.jit(outputs)


def run_summary(result: TrainResult, data: Arrays) -> dict[str, Any]:
    """What a checkpoint records about the run besides the state (JSON), for `load_run`."""
    return {
        "config": dataclasses.asdict(result.config),
        "preprocess": dataclasses.asdict(result.preprocess),
        "example": {"shape": list(data.example.shape), "dtype": str(data.example.dtype)},
        "num_classes": data.num_classes,
        "learners_per_device": result.learners_per_device,
        "devices": result.devices,
        "images_per_second": result.images_per_second,
        "compile_time": result.compile_time,
        "model": result.model.name,
        "registry_name": getattr(result.model, "registry", None),
        "tuning": result.tuning,
    }


def load_run(folder: str | os.PathLike, model: Any = None) -> TrainResult:
    """The central model, config, history and a `predict` of a run folder's latest checkpoint.

    Args:
        folder: the run folder (`checkpoint_dir`, the command's `--output`).
        model: the model the run trained, when it is not a named model
            (a Linen or NNX module, or `(apply_fn, params)`: only its structure
            is used, and it must match the run's); None for a named model, or
            to read the variables alone (`params` as `{"params": ...,
            "state": ...}` nested dicts, and no `predict`).

    Returns:
        A `TrainResult` as the run would have returned at that checkpoint
        (`params`, `accuracy`, `test_loss`, `history`, `config`, `steps`, ...).

    Raises:
        ConfigError: no checkpoint, one written before central models were saved,
            or a `model` other than the run's (saying what differs).
    """
    folder = os.fspath(folder)
    record = read_record(folder)
    run = record.get("run")
    if run is None:
        raise ConfigError(
            f"the checkpoint in {folder!r} was written by an older crossbow_jax and holds no "
            "run summary; resume the run once to write one"
        )
    if model is None:
        model = run["registry_name"]
    adapter = None
    if model is not None:
        config = TrainConfig(**run["config"])
        adapter = resolve_model(model, run["num_classes"], config.dtype, config.mode_keyword)
    return result_of_record(folder, record, adapter)


def result_of_record(folder: str, record: dict[str, Any], adapter: Model | None) -> TrainResult:
    """The `TrainResult` a checkpoint's record and central model describe (`load_run`; a
    resumed run that has nothing left to train).

    Args:
        folder: the run folder.
        record: the checkpoint's JSON record (`read_record`).
        adapter: the run's model, resolved; None: the variables alone, as nested dicts.
    """
    run = record["run"]
    config = TrainConfig(**run["config"])
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in run["preprocess"].items()})  # fmt: skip
    like = None
    if adapter is not None:
        example = np.zeros(run["example"]["shape"], run["example"]["dtype"])
        if adapter.given:
            like = adapter.init(None, None)
        else:
            like = jax.eval_shape(adapter.init, jax.random.PRNGKey(0), pre(example, None))
        check_same_model(folder, like[0])
    central = read_central(folder, like, record["step"])
    rows = record["history"]
    tested = [r for r in rows if "test_loss" in r]
    return TrainResult(
        params=adapter.variables(*central) if adapter else dict(zip(("params", "state"), central)),
        accuracy=next((r["test_accuracy"] for r in reversed(tested) if "test_accuracy" in r), None),
        history=rows,
        time_to_accuracy=next((r["time"] for r in rows if r.get("reached_target")), None),
        images_per_second=run["images_per_second"],
        wall_time=record["elapsed"],
        compile_time=run["compile_time"],
        steps=record["step"],
        learners_per_device=run["learners_per_device"],
        devices=run["devices"],
        config=config,
        tuning=run["tuning"],
        test_loss=tested[-1]["test_loss"] if tested else None,
        preprocess=pre,
        model=adapter,
        central=tuple(central) if adapter else None,
        input_shape=tuple(run["example"]["shape"][1:]),
    )
